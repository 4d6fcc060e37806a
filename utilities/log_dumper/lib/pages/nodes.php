<?php
// Nodes as the admin node last recorded them (msNodes, upserted on every
// heartbeat). A node silent longer than its missing_after_ms is MISSING.
declare(strict_types=1);

const NODES_MAX = 1000;

function page_nodes(Ctx $c): void
{
    $nodes = $c->db->find($c->cfg['nodes'], [], ['sort' => ['_id' => 1], 'limit' => NODES_MAX]);
    page_start($c->cfg, 'nodes', 'Nodes', $c);
    echo '<h2>Nodes</h2>';
    if (!$nodes) {
        echo '<p class="warn" id="no-nodes">No admin node has recorded heartbeats (collection ',
            h($c->cfg['nodes']), ' is empty or absent). Without a running admin node, see the ',
            a(obs_url('events', ['kind' => 'lifecycle', 'since' => '24h'], $c), 'lifecycle events'), ' for nodes that started or stopped.</p>';
        page_end();
        return;
    }
    $counts = ['up' => 0, 'missing' => 0, 'stopped' => 0];
    ob_start();
    foreach ($nodes as $n) {
        $last = dt_ms($n['last_seen'] ?? null);
        $after = is_int($n['missing_after_ms'] ?? null) ? $n['missing_after_ms'] : null;
        $alive = ($n['alive'] ?? null) === true;
        if (!$alive) {
            [$state, $cls] = ['stopped', 'stopped'];
        } elseif ($last === null || $after === null || $c->nowMs - $last > $after) {
            // No heartbeat time or bound recorded counts as missing too: we cannot vouch for it.
            [$state, $cls] = ['MISSING', 'missing'];
        } else {
            [$state, $cls] = ['up', 'up'];
        }
        $counts[$cls]++;
        $name = str_or($n['node'] ?? null, str_or($n['_id'] ?? null));
        $brokers = array_filter(is_array($n['brokers'] ?? null) ? $n['brokers'] : [], 'is_string');
        echo '<tr class="node ', $cls, '" data-node="', h($name), '" data-state="', h($state), '">',
            '<td>', a(obs_url('events', ['node' => $name], $c), $name), '</td>',
            '<td><span class="state ', $cls, '">', h($state), '</span></td>',
            '<td>', h(str_or($n['role'] ?? null)), '</td>',
            '<td>', h($brokers ? implode(', ', $brokers) : '-'), '</td>',
            '<td>', h(str_or($n['version'] ?? null)), '</td>',
            '<td><code>', h(str_or($n['templates'] ?? null)), '</code></td>',
            '<td class="ts">', h(fmt_ts(dt_ms($n['started'] ?? null))), '</td>',
            '<td class="ts">', h(fmt_ts($last)), $last !== null ? ' <span class="muted">(' . h(fmt_age($c->nowMs - $last)) . ' ago)</span>' : '', '</td>',
            '<td class="num">', h($after !== null ? fmt_age($after) : '-'), '</td></tr>';
    }
    $body = (string) ob_get_clean();
    echo '<p class="summary" id="summary">', count($nodes), ' node(s): ', $counts['up'], ' up, ',
        '<span class="', $counts['missing'] ? 'st-error' : '', '">', $counts['missing'], ' missing</span>, ',
        $counts['stopped'], ' stopped. Times are UTC; "last heartbeat" is what the admin node recorded.</p>',
        '<table class="nodes"><thead><tr><th>node</th><th>state</th><th>role</th><th>brokers</th><th>version</th>',
        '<th>template set</th><th>started</th><th>last heartbeat</th><th>missing after</th></tr></thead><tbody>',
        $body, '</tbody></table>';
    page_end();
}
