<?php
// Throughput, error rate and latency per node and broker over time: from the
// admin node's counter windows (msGraphs), or, when it has nothing in the range,
// aggregated from the event log itself.
declare(strict_types=1);

const GRAPH_BUCKETS = 60;           // points per line at most
const GRAPH_MAX_DAYS = 90;          // longest range: the page's work grows with it
const GRAPH_MAX_GROUPS = 20000;     // rows an aggregation may return
const GRAPH_LOG_SAMPLE = 20000;     // events read for percentiles in the fallback

/** A round bucket length giving at most GRAPH_BUCKETS points over the span. */
function graph_bucket_ms(int $spanMs): int
{
    foreach ([10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400, 172800] as $s) {
        if ($spanMs / ($s * 1000) <= GRAPH_BUCKETS) {
            return $s * 1000;
        }
    }
    return (int) ceil($spanMs / GRAPH_BUCKETS / 1000) * 1000; // not reached while the span is capped
}

/** Epoch ms of the start of a document's bucket, computed in the server (works on MongoDB 4.x too). */
function graph_bucket_expr(int $bucketMs): array
{
    $ms = ['$subtract' => ['$ts', bson_date(0)]];
    return ['$subtract' => [$ms, ['$mod' => [$ms, $bucketMs]]]];
}

/** Nearest-rank percentile of a sorted list; null for none (no point is drawn). */
function percentile(array $sorted, float $p): ?float
{
    $n = count($sorted);
    if ($n === 0) {
        return null;
    }
    $rank = (int) ceil($p / 100 * $n);
    return (float) $sorted[max(0, min($n - 1, $rank - 1))];
}

function num_or_null(mixed $v): ?float
{
    return is_int($v) || is_float($v) ? (float) $v : null;
}

function page_graphs(Ctx $c): void
{
    $range = in_range($c->nowMs, '1h');
    $node = in_str('node', 200);
    $from = $range['from'] ?? ($c->nowMs - 3600000);
    $to = $range['to'] ?? $c->nowMs;
    if ($to - $from > GRAPH_MAX_DAYS * 86400000) {
        throw new ObsBadInput('the graphs cover at most ' . GRAPH_MAX_DAYS . ' days: narrow "from" and "to"');
    }
    $bucket = graph_bucket_ms($to - $from);
    $match = ['ts' => ['$gte' => bson_date($from), '$lte' => bson_date($to)]];
    if ($node !== null) {
        $match['node'] = $node;
    }
    // rows: key "node · broker" => bucket ms => [requests, errors, rate/s, p50, p95, p99] (µs)
    $rows = [];
    $windowMs = []; // key => ms the rate is over (msGraphs: its node's windows; the log: the range)
    $source = 'msGraphs';
    $note = '';
    $truncated = false; // an aggregation hit GRAPH_MAX_GROUPS
    if ($c->db->find($c->cfg['graphs'], $match, ['limit' => 1, 'projection' => ['_id' => 1]])) {
        // A window lists only the brokers that had requests in it, so a broker's time
        // is all of its node's windows: sum window_ms per node and bucket before $unwind.
        $win = $c->db->aggregate($c->cfg['graphs'], [
            ['$match' => $match],
            ['$group' => ['_id' => ['node' => '$node', 'b' => graph_bucket_expr($bucket)], 'window_ms' => ['$sum' => '$window_ms']]],
            ['$limit' => GRAPH_MAX_GROUPS],
        ]);
        $agg = $c->db->aggregate($c->cfg['graphs'], [
            ['$match' => $match],
            ['$unwind' => '$brokers'],
            ['$group' => [
                '_id' => ['node' => '$node', 'broker' => '$brokers.broker', 'b' => graph_bucket_expr($bucket)],
                'requests' => ['$sum' => '$brokers.requests'], 'errors' => ['$sum' => '$brokers.errors'],
                'p50' => ['$max' => '$brokers.p50_us'], 'p95' => ['$max' => '$brokers.p95_us'], 'p99' => ['$max' => '$brokers.p99_us'],
            ]],
            ['$limit' => GRAPH_MAX_GROUPS],
        ]);
        $truncated = count($win) >= GRAPH_MAX_GROUPS || count($agg) >= GRAPH_MAX_GROUPS;
        $nodeMs = []; // node => bucket => window_ms of all its windows
        foreach ($win as $g) {
            $nodeMs[str_or($g['_id']['node'] ?? null)][(int) $g['_id']['b']] = (int) ($g['window_ms'] ?? 0);
        }
        $got = []; // node => broker => bucket => the group
        foreach ($agg as $g) {
            $got[str_or($g['_id']['node'] ?? null)][str_or($g['_id']['broker'] ?? null)][(int) $g['_id']['b']] = $g;
        }
        foreach ($got as $n => $brokers) {
            foreach ($brokers as $br => $byB) {
                // every bucket the node reported in; where this broker is absent it had 0 requests
                foreach ($nodeMs[$n] ?? [] as $b => $wms) {
                    $g = $byB[$b] ?? ['requests' => 0, 'errors' => 0];
                    $rows["$n · $br"][$b] = [(int) $g['requests'], (int) $g['errors'], $g['requests'] / (max(1, $wms) / 1000),
                        num_or_null($g['p50'] ?? null), num_or_null($g['p95'] ?? null), num_or_null($g['p99'] ?? null)];
                }
                $windowMs["$n · $br"] = array_sum($nodeMs[$n] ?? []);
            }
        }
        $note = 'From the admin node\'s counter windows (' . $c->cfg['graphs'] . '). Throughput = requests / the length '
            . 'of the node\'s windows; a percentile per point is the highest of the windows in it.';
    } else {
        $source = 'log';
        [$rows, $note, $truncated] = graphs_from_log($c, $match, $bucket);
    }
    ksort($rows);

    $series = ['rate' => [], 'err' => [], 'p50' => [], 'p95' => [], 'p99' => []];
    $totals = [];
    foreach ($rows as $key => $byB) {
        ksort($byB);
        $t = [0, 0, 0.0];
        foreach ($byB as $b => [$req, $err, $rate, $p50, $p95, $p99]) {
            $mid = $b + intdiv($bucket, 2);
            $series['rate'][$key][] = [$mid, $rate];
            if ($req > 0) { // no requests: no error rate or latency to draw
                $series['err'][$key][] = [$mid, 100 * $err / $req];
                foreach (['p50' => $p50, 'p95' => $p95, 'p99' => $p99] as $pk => $pv) {
                    if ($pv !== null) { // null: not measured (outside the log's sample), not 0 µs
                        $series[$pk][$key][] = [$mid, $pv];
                    }
                }
            }
            $t = [$t[0] + $req, $t[1] + $err, max($t[2], $p99 ?? 0.0)];
        }
        $totals[$key] = $t;
    }

    page_start($c->cfg, 'graphs', 'Graphs', $c);
    echo '<h2>Graphs</h2>';
    range_form('graphs', $range, $c, ['node' => $node]);
    echo '<p class="summary" id="source" data-source="', h($source), '">',
        $source === 'log' ? '<b>From the event log</b> (' . h($c->cfg['graphs']) . ' has no counters in this range). ' : '',
        h($note), ' Range: ', h(range_text($range)), ', one point per ', h(fmt_age($bucket)), '.</p>';
    if ($truncated) {
        echo '<p class="warn" id="truncated">More than ', GRAPH_MAX_GROUPS, ' node · broker · bucket groups: ',
            'some lines or points are missing. Pick a node or a shorter range.</p>';
    }
    if (!$rows) {
        echo '<p class="warn">No requests in this range.</p>';
        page_end();
        return;
    }
    $gap = 3 * max($bucket, 60000);
    $fmtRate = fn (float $v) => $v >= 100 ? sprintf('%.0f/s', $v) : sprintf('%.3g/s', $v);
    $fmtPct = fn (float $v) => sprintf('%.3g%%', $v);
    $fmtLat = fn (float $v) => fmt_us((int) round($v));
    echo '<div class="charts">',
        svg_line_chart('Throughput (requests/s)', $series['rate'], $from, $to, $fmtRate, $gap),
        svg_line_chart('Error rate (% of requests)', $series['err'], $from, $to, $fmtPct, $gap),
        svg_line_chart('Latency p50', $series['p50'], $from, $to, $fmtLat, $gap),
        svg_line_chart('Latency p95', $series['p95'], $from, $to, $fmtLat, $gap),
        svg_line_chart('Latency p99', $series['p99'], $from, $to, $fmtLat, $gap),
        '</div>';
    echo '<h3>Totals in the range</h3><table class="totals"><thead><tr><th>node · broker</th><th>requests</th>',
        '<th>requests/s</th><th>errors</th><th>error rate</th><th>highest p99</th></tr></thead><tbody>';
    foreach ($totals as $key => [$req, $err, $p99]) {
        $rate = round($req / (max(1, $windowMs[$key] ?? ($to - $from)) / 1000), 3);
        echo '<tr data-series="', h($key), '" data-requests="', $req, '" data-errors="', $err, '" data-rate="', $rate, '"><td>',
            h($key), '</td><td class="num">', $req, '</td><td class="num">', h($fmtRate($rate)),
            '</td><td class="num">', $err, '</td><td class="num', $err > 0 ? ' st-error' : '', '">',
            h($req > 0 ? sprintf('%.2f%%', 100 * $err / $req) : '-'), '</td><td class="num">', h(fmt_us((int) $p99)), '</td></tr>';
    }
    echo '</tbody></table>';
    page_end();
}

/**
 * The fallback: counts per node, broker and bucket with one $group (exact), and
 * percentiles computed here from the newest GRAPH_LOG_SAMPLE events (bounded).
 * @return array{0: array, 1: string, 2: bool} rows, note, whether the $group hit GRAPH_MAX_GROUPS
 */
function graphs_from_log(Ctx $c, array $match, int $bucket): array
{
    $match['broker'] = ['$type' => 'string']; // lifecycle events have no broker
    $logs = $c->cfg['logs'];
    $agg = $c->db->aggregate($logs, [
        ['$match' => $match],
        ['$group' => [
            '_id' => ['node' => '$node', 'broker' => '$broker', 'b' => graph_bucket_expr($bucket)],
            'requests' => ['$sum' => 1],
            'errors' => ['$sum' => ['$cond' => [['$eq' => ['$status', 'error']], 1, 0]]],
        ]],
        ['$limit' => GRAPH_MAX_GROUPS],
    ]);
    $sample = $c->db->find($logs, $match, ['sort' => ['ts' => -1], 'limit' => GRAPH_LOG_SAMPLE,
        'projection' => ['_id' => 0, 'node' => 1, 'broker' => 1, 'ts' => 1, 'elapsed_us' => 1]]);
    $lat = [];
    foreach ($sample as $e) {
        $ms = dt_ms($e['ts'] ?? null);
        if ($ms === null || !is_int($e['elapsed_us'] ?? null)) {
            continue;
        }
        $key = str_or($e['node'] ?? null) . ' · ' . str_or($e['broker'] ?? null);
        $lat[$key][$ms - $ms % $bucket][] = $e['elapsed_us'];
    }
    $rows = [];
    $keys = array_unique(array_map(fn ($g) => str_or($g['_id']['node'] ?? null) . ' · ' . str_or($g['_id']['broker'] ?? null), $agg));
    // In the log, a bucket without events means no requests: draw 0, not a gap.
    $from = (int) (string) $match['ts']['$gte'];
    $to = (int) (string) $match['ts']['$lte'];
    $first = intdiv($from, $bucket) * $bucket;
    foreach ($keys as $key) {
        for ($b = $first; $b <= $to; $b += $bucket) {
            $rows[$key][$b] = [0, 0, 0.0, null, null, null];
        }
    }
    foreach ($agg as $g) {
        $key = str_or($g['_id']['node'] ?? null) . ' · ' . str_or($g['_id']['broker'] ?? null);
        $b = (int) $g['_id']['b'];
        $l = $lat[$key][$b] ?? [];
        sort($l);
        // The first and last buckets are cut by the range: a rate over their covered part only.
        $covered = min($b + $bucket, $to + 1) - max($b, $from);
        $rows[$key][$b] = [(int) $g['requests'], (int) $g['errors'], $g['requests'] / (max(1, $covered) / 1000),
            percentile($l, 50), percentile($l, 95), percentile($l, 99)];
    }
    $note = 'Counts per bucket from the event log (' . $logs . '); percentiles from the newest '
        . (count($sample) >= GRAPH_LOG_SAMPLE ? GRAPH_LOG_SAMPLE . ' events in the range (older buckets have no latency points).' : 'events (all of them in the range).');
    return [$rows, $note, count($agg) >= GRAPH_MAX_GROUPS];
}
