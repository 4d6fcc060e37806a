<?php
// Recent events, newest first, paged on the server. Filters are equality only and
// live in the URL, so a view can be shared.
declare(strict_types=1);

// URL parameter => event field. `event` is the event id (= _id).
const EV_FILTERS = [
    'status' => 'status', 'code' => 'code', 'template' => 'template', 'op' => 'op',
    'node' => 'node', 'broker' => 'broker', 'kind' => 'kind', 'event' => '_id', 'message_id' => 'message_id',
];
// Filters an index serves with the ts sort (status_code_ts, template_op_ts, node_ts, _id,
// message_id). broker, kind and op have none: alone they scan, so they get a default range.
const EV_INDEXED = ['status' => 1, 'code' => 1, 'template' => 1, 'node' => 1, 'event' => 1, 'message_id' => 1];
const EV_DEFAULT_SINCE = '24h';
const EV_MAX_TIES = 1000;  // rows sharing the page's last ts added to it (keyset paging needs them all)
const EV_MAX_TS = 7258118400000; // 2200-01-01, the latest time in_time() takes

/** @return array<string,string> the filters given, validated */
function events_filters(): array
{
    $f = [];
    foreach (EV_FILTERS as $param => $field) {
        $v = match ($param) {
            'status' => in_enum('status', ['ok', 'error']),
            'kind' => in_enum('kind', ['request', 'lifecycle', 'admin']),
            default => in_str($param, 200),
        };
        if ($v !== null) {
            $f[$param] = $v;
        }
    }
    return $f;
}

/** The MongoDB filter: plain field = string pairs plus a ts range. */
function events_query(array $f, array $range): array
{
    $q = [];
    foreach ($f as $param => $v) {
        $q[EV_FILTERS[$param]] = (string) $v;
    }
    if (isset($f['code']) && !isset($f['status'])) {
        $q['status'] = ['$in' => ['ok', 'error']]; // so status_code_ts serves a code alone
    }
    $ts = [];
    if ($range['from'] !== null) {
        $ts['$gte'] = bson_date($range['from']);
    }
    if ($range['to'] !== null) {
        $ts['$lte'] = bson_date($range['to']);
    }
    if ($ts) {
        $q['ts'] = $ts;
    }
    return $q;
}

/** The URL parameters that reproduce a filter + range (for links). */
function events_params(array $f, array $range): array
{
    $p = $f;
    if ($range['since'] !== null) {
        $p['since'] = $range['since'];
    } else {
        $p['from'] = $range['from'] !== null ? fmt_ts_input($range['from']) : null;
        $p['to'] = $range['to'] !== null ? fmt_ts_input($range['to']) : null;
    }
    return $p;
}

function status_cell(array $e): string
{
    $st = str_or($e['status'] ?? null);
    $code = $e['code'] ?? null;
    $cls = $st === 'error' ? 'st-error' : ($st === 'ok' ? 'st-ok' : '');
    return '<span class="' . $cls . '">' . h($st) . (is_string($code) ? ' ' . h($code) : '') . '</span>';
}

function page_events(Ctx $c): void
{
    $f = events_filters();
    $range = in_range($c->nowMs, null);
    $defaulted = $f && $range['from'] === null && $range['to'] === null && !array_intersect_key($f, EV_INDEXED);
    if ($defaulted) {
        $range = in_range($c->nowMs, EV_DEFAULT_SINCE);
    }
    $limit = in_int('limit', 50, 1, 200, true);
    $before = in_int('before', -1, 0, EV_MAX_TS);
    $query = events_query($f, $range);
    if ($before >= 0) {
        $query['ts']['$lt'] = bson_date($before); // keyset paging: older than the previous page's last row
    }
    // Sorting on ts alone lets MongoDB walk an index ({…, ts:-1} or the TTL index)
    // instead of sorting the collection; one more row tells whether an older page exists.
    $proj = ['ts' => 1, 'node' => 1, 'broker' => 1, 'template' => 1, 'op' => 1, 'status' => 1,
        'code' => 1, 'elapsed_us' => 1, 'kind' => 1, 'attempt' => 1, 'outcome' => 1, 'message_id' => 1,
        'message' => 1, 'entry' => 1];
    $logs = $c->cfg['logs'];
    $rows = $c->db->find($logs, $query, ['sort' => ['ts' => -1], 'limit' => $limit + 1, 'projection' => $proj]);
    $more = count($rows) > $limit;
    $tiesCut = false;
    $lastTs = $more ? dt_ms($rows[$limit - 1]['ts'] ?? null) : null;
    if ($more && $lastTs !== null && dt_ms($rows[$limit]['ts'] ?? null) === $lastTs) {
        // The next page starts below the last row's ts, so every row sharing it belongs
        // on this page (batch entries share a ts; so do events of one busy millisecond).
        $newer = array_values(array_filter(array_slice($rows, 0, $limit), fn ($e) => dt_ms($e['ts'] ?? null) !== $lastTs));
        $ties = $c->db->find($logs, ['ts' => bson_date($lastTs)] + $query,
            ['sort' => ['_id' => 1], 'limit' => EV_MAX_TIES + 1, 'projection' => $proj]);
        $tiesCut = count($ties) > EV_MAX_TIES;
        $rows = array_merge($newer, array_slice($ties, 0, EV_MAX_TIES));
        $older = $query;
        $older['ts']['$lt'] = bson_date($lastTs);
        $more = (bool) $c->db->find($logs, $older, ['limit' => 1, 'projection' => ['_id' => 1]]);
    } else {
        $rows = array_slice($rows, 0, $limit);
    }
    $params = events_params($f, $range) + ($limit !== 50 ? ['limit' => $limit] : []);

    page_start($c->cfg, 'events', 'Events', $c);
    echo '<h2>Events</h2>';
    events_form($f, $range, $limit, $c);
    echo '<p class="summary" id="summary" data-rows="', count($rows), '">', $rows ? count($rows) . ' events, newest first'
        . ($before >= 0 ? ', older than ' . h(fmt_ts($before)) . ' UTC' : '') : 'no events match', '</p>';
    if ($defaulted) {
        echo '<p class="warn" id="default-range">broker, kind and op have no index of their own: without a time range ',
            'they would scan the whole log, so this shows the last ', EV_DEFAULT_SINCE, '. Pick a range to see more.</p>';
    }
    if ($tiesCut) {
        echo '<p class="warn" id="ties-cut">More than ', EV_MAX_TIES, ' events share the time ', h(fmt_ts($lastTs)),
            ': only ', EV_MAX_TIES, ' of them are shown, and the older page starts below that millisecond. Narrow the filter.</p>';
    }
    if ($rows) {
        echo '<table class="events"><thead><tr><th>time (UTC)</th><th>node</th><th>broker</th><th>template.op</th>',
            '<th>status</th><th>elapsed</th><th>attempt</th><th>message</th><th>event</th></tr></thead><tbody>';
        foreach ($rows as $e) {
            $id = str_or($e['_id'] ?? null, '');
            $ms = dt_ms($e['ts'] ?? null);
            $err = ($e['status'] ?? null) === 'error';
            $tpl = str_or($e['template'] ?? null) . '.' . str_or($e['op'] ?? null);
            $node = str_or($e['node'] ?? null);
            $broker = str_or($e['broker'] ?? null);
            $att = str_or($e['attempt'] ?? null) . (is_string($e['outcome'] ?? null) ? ' ' . $e['outcome'] : '');
            $kind = str_or($e['kind'] ?? null, '');
            echo '<tr class="ev', $err ? ' err' : '', '" data-id="', h($id), '" data-ts="', h($ms ?? ''), '">',
                '<td class="ts">', h(fmt_ts($ms)), '</td>',
                '<td>', is_string($e['node'] ?? null) ? a(obs_url('events', ['node' => $node] + $params, $c), $node) : '-', '</td>',
                '<td>', h($broker), '</td>',
                '<td>', $kind !== 'request' && $kind !== '' ? '<span class="kind">' . h($kind) . '</span> ' : '', h($tpl), '</td>',
                '<td>', status_cell($e), '</td>',
                '<td class="num">', h(fmt_us($e['elapsed_us'] ?? null)), '</td>',
                '<td>', h($att), '</td>',
                '<td class="msg">', h(str_or($e['message'] ?? null, '')), '</td>',
                '<td class="id">', a(obs_url('event', ['id' => $id], $c), strlen($id) > 14 ? '…' . substr($id, -12) : $id), '</td></tr>';
        }
        echo '</tbody></table>';
    }
    echo '<p class="paging">';
    if ($before >= 0) {
        echo a(obs_url('events', $params, $c), '← newest', 'newer'), ' ';
    }
    $last = $rows ? dt_ms(end($rows)['ts'] ?? null) : null;
    if ($more && $last !== null) {
        echo a(obs_url('events', ['before' => $last] + $params, $c), 'older →', 'older');
    }
    echo '</p>';
    page_end();
}

function events_form(array $f, array $range, int $limit, Ctx $c): void
{
    echo '<form class="filters" method="get" action=""><input type="hidden" name="page" value="events">';
    if ($c->refreshInUrl) {
        echo '<input type="hidden" name="refresh" value="', h($c->refresh), '">';
    }
    echo '<label>status <select name="status">';
    foreach (['' => 'any', 'ok' => 'ok', 'error' => 'error'] as $v => $l) {
        echo '<option value="', h($v), '"', ($f['status'] ?? '') === $v ? ' selected' : '', '>', h($l), '</option>';
    }
    echo '</select></label>';
    foreach (['code', 'template', 'op', 'node', 'broker', 'event' => 'event id', 'message_id' => 'message id'] as $k => $label) {
        $name = is_int($k) ? $label : $k;
        echo '<label>', h($label), ' <input name="', h($name), '" value="', h($f[$name] ?? ''), '" maxlength="200"></label>';
    }
    echo '<label>from <input name="from" value="', h($range['since'] === null ? fmt_ts_input($range['from']) : ''),
        '" placeholder="YYYY-MM-DDTHH:MM" maxlength="40"></label>',
        '<label>to <input name="to" value="', h(fmt_ts_input($range['to'])), '" placeholder="UTC" maxlength="40"></label>',
        '<label>last <select name="since"><option value="">-</option>';
    foreach (array_keys(OBS_SINCE) as $s) {
        echo '<option', $range['since'] === $s ? ' selected' : '', '>', h($s), '</option>';
    }
    echo '</select></label><label>per page <input name="limit" value="', h($limit), '" size="4" maxlength="4"></label>',
        '<button type="submit">filter</button> ', a(obs_url('events', [], $c), 'clear'), '</form>';
}
