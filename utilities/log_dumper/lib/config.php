<?php
// Configuration: defaults, then the ini file, then environment variables.
// Environment wins, so one Apache site can override a shared ini with SetEnv.
declare(strict_types=1);

const OBS_KEYS = [
    // key => [env variable, default]
    'uri'     => ['BEDS_OBSERVER_URI', 'mongodb://127.0.0.1:27017/?directConnection=true'],
    'db'      => ['BEDS_OBSERVER_DB', 'beds'],
    'logs'    => ['BEDS_OBSERVER_LOGS', 'msLogs'],
    'graphs'  => ['BEDS_OBSERVER_GRAPHS', 'msGraphs'],
    'nodes'   => ['BEDS_OBSERVER_NODES', 'msNodes'],
    'title'   => ['BEDS_OBSERVER_TITLE', 'BEDS observer'],
    'refresh' => ['BEDS_OBSERVER_REFRESH', '10'],
];

// Apache's SetEnv lands in $_SERVER (getenv() misses it under mod_php), php -S and
// CLI put it in the real environment: look in both.
function obs_env(string $name): ?string
{
    $v = $_SERVER[$name] ?? getenv($name);
    return (is_string($v) && $v !== '') ? $v : null;
}

/** @return array{0: array<string,string>, 1: ?string} the config and the ini path read (or null) */
function obs_config(): array
{
    $cfg = [];
    foreach (OBS_KEYS as $k => [, $default]) {
        $cfg[$k] = $default;
    }
    $ini = obs_env('BEDS_OBSERVER_INI') ?? '/etc/beds/observer.ini';
    $used = null;
    if (is_file($ini) && is_readable($ini)) {
        // INI_SCANNER_RAW: a password with ; or " in the URI stays intact. A syntax error is
        // a PHP warning (an exception here); its text may quote the file, so only the line is kept.
        try {
            $parsed = parse_ini_file($ini, false, INI_SCANNER_RAW);
        } catch (ErrorException $e) {
            $parsed = false;
            $line = preg_match('/on line (\d+)/', $e->getMessage(), $m) ? " (line {$m[1]})" : '';
        }
        if ($parsed === false) {
            throw new ObsConfigError("cannot parse the ini file $ini" . ($line ?? ''));
        }
        foreach ($parsed as $k => $v) {
            if (isset(OBS_KEYS[$k]) && is_string($v) && $v !== '') {
                $cfg[$k] = $v;
            }
        }
        $used = $ini;
    }
    foreach (OBS_KEYS as $k => [$env]) {
        $v = obs_env($env);
        if ($v !== null) {
            $cfg[$k] = $v;
        }
    }
    foreach (['db', 'logs', 'graphs', 'nodes'] as $k) {
        // A database or collection name never needs more; refuse anything odd early.
        if (!preg_match('/^[A-Za-z0-9_.-]{1,64}$/', $cfg[$k])) {
            throw new ObsConfigError("config key $k is not a valid MongoDB name");
        }
    }
    $r = filter_var($cfg['refresh'], FILTER_VALIDATE_INT);
    $cfg['refresh'] = (string) (($r === false) ? 10 : max(0, min(3600, $r)));
    return [$cfg, $used];
}

/**
 * The host list of a URI, the only part of it ever shown: the password may hold
 * ? # @ unencoded, and options (tlsCertificateKeyFilePassword=…) are secrets too.
 * The authority ends at the first / (the driver refuses / in a password), the
 * user info at the authority's last @, the host list at the next ?.
 */
function obs_uri_hosts(string $uri): string
{
    $p = strpos($uri, '://');
    if ($p === false) {
        return '?';
    }
    $auth = explode('/', substr($uri, $p + 3))[0];
    $at = strrpos($auth, '@');
    $hosts = explode('?', $at === false ? $auth : substr($auth, $at + 1))[0];
    // Anything but a plain host list is a URI we misread: show nothing of it.
    return preg_match('/^[A-Za-z0-9._~%:,\[\]-]{1,500}$/', $hosts) ? $hosts : '?';
}

final class ObsConfigError extends RuntimeException
{
}
