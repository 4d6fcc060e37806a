<?php
// HTML helpers: escaping, links, formatting, the page frame. Every value that
// reaches the page goes through h() (text and attributes) or obs_url() (links):
// events carry client-controlled strings.
declare(strict_types=1);

use MongoDB\BSON\UTCDateTime;

/** What every page needs. */
final class Ctx
{
    public function __construct(
        public array $cfg,
        public ObsDb $db,
        public int $nowMs,
        public int $refresh,          // seconds, 0 = off
        public bool $refreshInUrl,    // keep ?refresh= on links when the user set it
    ) {
    }
}

function h(mixed $s): string
{
    return htmlspecialchars((string) $s, ENT_QUOTES | ENT_SUBSTITUTE | ENT_HTML5, 'UTF-8');
}

/** A link to this application: page + params, nulls dropped, everything encoded. Escape with h() when printing. */
function obs_url(string $page, array $params = [], ?Ctx $c = null): string
{
    $q = ['page' => $page];
    foreach ($params as $k => $v) {
        if ($v !== null && $v !== '') {
            $q[$k] = (string) $v;
        }
    }
    if ($c !== null && $c->refreshInUrl) {
        $q['refresh'] = (string) $c->refresh;
    }
    return '?' . http_build_query($q, '', '&', PHP_QUERY_RFC3986);
}

/** <a href="url">text</a>, both escaped. */
function a(string $url, string $text, string $class = ''): string
{
    $cls = $class !== '' ? ' class="' . h($class) . '"' : '';
    return '<a href="' . h($url) . '"' . $cls . '>' . h($text) . '</a>';
}

/** A BSON date (or anything else) as epoch ms, or null. */
function dt_ms(mixed $v): ?int
{
    if ($v instanceof UTCDateTime) {
        return (int) (string) $v;
    }
    return null;
}

function bson_date(int $ms): UTCDateTime
{
    return new UTCDateTime($ms);
}

function fmt_ts(?int $ms): string
{
    if ($ms === null) {
        return '-';
    }
    return gmdate('Y-m-d H:i:s', intdiv($ms, 1000)) . sprintf('.%03d', $ms % 1000);
}

/** For from/to fields and links: the format in_time() reads back, milliseconds kept when there are any. */
function fmt_ts_input(?int $ms): string
{
    if ($ms === null) {
        return '';
    }
    return gmdate('Y-m-d\TH:i:s', intdiv($ms, 1000)) . ($ms % 1000 !== 0 ? sprintf('.%03d', $ms % 1000) : '');
}

function fmt_us(mixed $us): string
{
    if (!is_int($us) && !is_float($us)) {
        return '-';
    }
    if ($us < 1000) {
        return sprintf('%d µs', $us);
    }
    if ($us < 1000000) {
        return sprintf('%.1f ms', $us / 1000);
    }
    return sprintf('%.2f s', $us / 1000000);
}

function fmt_age(int $ms): string
{
    $s = intdiv(max(0, $ms), 1000);
    if ($s < 120) {
        return "{$s} s";
    }
    if ($s < 7200) {
        return intdiv($s, 60) . ' min';
    }
    if ($s < 172800) {
        return intdiv($s, 3600) . ' h';
    }
    return intdiv($s, 86400) . ' d';
}

/** A field that should be a string (documents may hold anything). */
function str_or(mixed $v, string $dflt = '-'): string
{
    return (is_string($v) && $v !== '') ? $v : (is_int($v) || is_float($v) ? (string) $v : $dflt);
}

const OBS_PAGES = ['events' => 'Events', 'failures' => 'Failures', 'graphs' => 'Graphs', 'nodes' => 'Nodes'];

function page_start(array $cfg, string $page, string $title, ?Ctx $c): void
{
    $site = $cfg['title'] ?? 'BEDS observer';
    echo "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<title>', h($title . ' · ' . $site), '</title>',
        '<link rel="stylesheet" href="observer.css"></head>', "\n",
        '<body data-page="', h($page), '"><header><h1>', a('?page=events', $site), '</h1><nav>';
    foreach (OBS_PAGES as $p => $label) {
        echo a(obs_url($p, [], $c), $label, $p === $page || ($p === 'events' && $page === 'event') ? 'current' : '');
    }
    echo '</nav>';
    if ($c !== null) {
        echo '<span class="meta">', h(obs_uri_hosts($c->cfg['uri'])), ' / ', h($c->cfg['db']),
            ' · ', h(gmdate('Y-m-d H:i:s', intdiv($c->nowMs, 1000))), ' UTC</span>';
        // observer.js reads these; without JS the page simply does not refresh.
        $secs = $c->refresh > 0 ? $c->refresh : ((int) $c->cfg['refresh'] > 0 ? (int) $c->cfg['refresh'] : 10);
        echo '<label class="refresh"><input type="checkbox" id="autorefresh" data-seconds="', h($secs),
            '" data-url-off="', $c->refresh === 0 ? '1' : '0', '"> auto-refresh every ', h($secs), ' s</label>';
    }
    echo "</header>\n<main>\n";
}

function page_end(): void
{
    echo "\n</main>\n<script src=\"observer.js\"></script>\n</body></html>\n";
}
