<?php
// Request parameters: every value the pages use comes through here, validated.
// Anything odd is refused with a message (HTTP 400), never passed to MongoDB as
// anything but a plain string, int or date.
declare(strict_types=1);

final class ObsBadInput extends RuntimeException
{
}

const OBS_SINCE = ['15m' => 900, '1h' => 3600, '6h' => 21600, '24h' => 86400, '7d' => 604800, '30d' => 2592000];

/** A string parameter, trimmed; null when absent or empty. Arrays (status[]=, status[$ne]=) are refused. */
function in_str(string $name, int $max = 200): ?string
{
    if (!array_key_exists($name, $_GET)) {
        return null;
    }
    $v = $_GET[$name];
    if (!is_string($v)) {
        throw new ObsBadInput("parameter \"$name\" must be a single value, not a list");
    }
    if (strlen($v) > $max) {
        throw new ObsBadInput("parameter \"$name\" is too long (at most $max bytes)");
    }
    if (!preg_match('//u', $v)) {
        throw new ObsBadInput("parameter \"$name\" is not valid UTF-8");
    }
    if (preg_match('/[\x00-\x1F\x7F]/', $v)) {
        throw new ObsBadInput("parameter \"$name\" contains control characters");
    }
    $v = trim($v);
    return $v === '' ? null : $v;
}

/** @param list<string> $allowed */
function in_enum(string $name, array $allowed, ?string $default = null): ?string
{
    $v = in_str($name, 40);
    if ($v === null) {
        return $default;
    }
    if (!in_array($v, $allowed, true)) {
        throw new ObsBadInput("parameter \"$name\" must be one of: " . implode(', ', $allowed));
    }
    return $v;
}

/** An integer in [min, max]: malformed is refused; out of range is refused or, with $clamp, clamped. */
function in_int(string $name, int $default, int $min, int $max, bool $clamp = false): int
{
    $v = in_str($name, 20);
    if ($v === null) {
        return $default;
    }
    if (!preg_match('/^-?\d{1,18}$/', $v)) {
        throw new ObsBadInput("parameter \"$name\" must be a whole number");
    }
    $i = (int) $v;
    if ($i < $min || $i > $max) {
        if (!$clamp) {
            throw new ObsBadInput("parameter \"$name\" must be between $min and $max");
        }
        $i = max($min, min($max, $i));
    }
    return $i;
}

/** A UTC time (2024-05-01, 2024-05-01T13:45, 2024-05-01 13:45:10.250Z) as epoch milliseconds. */
function in_time(string $name): ?int
{
    $v = in_str($name, 40);
    if ($v === null) {
        return null;
    }
    $re = '/^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,3}))?)?)?Z?$/';
    if (!preg_match($re, $v, $m)) {
        throw new ObsBadInput("parameter \"$name\" is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC)");
    }
    [$y, $mo, $d] = [(int) $m[1], (int) $m[2], (int) $m[3]];
    $hh = (int) ($m[4] ?? 0);
    $mi = (int) ($m[5] ?? 0);
    $ss = (int) ($m[6] ?? 0);
    $ms = isset($m[7]) && $m[7] !== '' ? (int) str_pad($m[7], 3, '0') : 0;
    if ($y < 1970 || $y > 2200 || !checkdate($mo, $d, $y) || $hh > 23 || $mi > 59 || $ss > 59) {
        throw new ObsBadInput("parameter \"$name\" is not a valid date");
    }
    return gmmktime($hh, $mi, $ss, $mo, $d, $y) * 1000 + $ms;
}

/**
 * The time range of a page: from/to when given, else the last `since` (a preset).
 * @return array{from: ?int, to: ?int, since: ?string} epoch ms; null = unbounded
 */
function in_range(int $nowMs, ?string $defaultSince): array
{
    $from = in_time('from');
    $to = in_time('to');
    $since = in_enum('since', array_keys(OBS_SINCE), null);
    if ($from === null && $to === null) {
        $since = $since ?? $defaultSince;
        if ($since !== null) {
            $from = $nowMs - OBS_SINCE[$since] * 1000;
        }
    } else {
        $since = null; // explicit times win over a preset
    }
    if ($from !== null && $to !== null && $from > $to) {
        throw new ObsBadInput('"from" is after "to"');
    }
    return ['from' => $from, 'to' => $to, 'since' => $since];
}
