<?php
// One event and its whole chain: every event with the same root_event_id (one
// indexed query), built into a tree by parent_event_id.
declare(strict_types=1);

const CHAIN_MAX = 2000;     // events fetched for one chain
const ANCESTOR_HOPS = 64;   // when the chain is truncated, walk up to the root at most this far
const TREE_MAX_DEPTH = 200; // deeper hops are linked, not drawn (the page's nesting stays readable)

function page_event(Ctx $c): void
{
    $id = in_str('id', 200);
    if ($id === null) {
        throw new ObsBadInput('parameter "id" (an event id) is required');
    }
    $logs = $c->cfg['logs'];
    $ev = $c->db->findOne($logs, ['_id' => $id]);
    if ($ev === null) {
        http_response_code(404);
        page_start($c->cfg, 'event', 'Event', $c);
        echo '<h2>Event</h2><p class="error-box">No event ', h($id),
            ' (wrong id, or older than the event log\'s retention).</p>';
        page_end();
        return;
    }
    $root = str_or($ev['root_event_id'] ?? null, $id);
    $rows = $c->db->find($logs, ['root_event_id' => $root], ['sort' => ['ts' => 1], 'limit' => CHAIN_MAX + 1]);
    $truncated = count($rows) > CHAIN_MAX;
    $rows = array_slice($rows, 0, CHAIN_MAX);
    $byId = [];
    foreach ($rows as $r) {
        $byId[(string) ($r['_id'] ?? '')] = $r;
    }
    $byId[$id] = $ev;
    if ($truncated) {
        // Make sure the asked event's own ancestors are in the tree.
        $cur = $ev;
        for ($i = 0; $i < ANCESTOR_HOPS && is_string($cur['parent_event_id'] ?? null); $i++) {
            $pid = $cur['parent_event_id'];
            if (!isset($byId[$pid])) {
                $pe = $c->db->findOne($logs, ['_id' => $pid]);
                if ($pe === null) {
                    break;
                }
                $byId[$pid] = $pe;
            }
            $cur = $byId[$pid];
        }
    }
    // children lists; events whose parent is not here become top level
    $kids = [];
    $tops = [];
    foreach ($byId as $eid => $r) {
        $pid = $r['parent_event_id'] ?? null;
        if (is_string($pid) && $pid !== (string) $eid && isset($byId[$pid])) {
            $kids[$pid][] = (string) $eid;
        } else {
            $tops[] = (string) $eid;
        }
    }
    $byTs = fn (string $a, string $b) => [dt_ms($byId[$a]['ts'] ?? null), $byId[$a]['entry'] ?? 0, $a]
        <=> [dt_ms($byId[$b]['ts'] ?? null), $byId[$b]['entry'] ?? 0, $b];
    usort($tops, $byTs);
    foreach ($kids as &$list) {
        usort($list, $byTs);
    }
    unset($list);

    page_start($c->cfg, 'event', 'Event ' . $id, $c);
    echo '<h2>Event <code>', h($id), '</code></h2>';
    event_fields($ev, $c);
    echo '<h3>Chain</h3><p class="summary">', count($byId), ' event(s) with root ',
        a(obs_url('event', ['id' => $root], $c), $root), '. Per hop: <b>exec</b> = elapsed_us (receipt to reply); ',
        '<b>wait after parent\'s reply</b> = this event\'s ts − (parent ts + parent elapsed), shown when positive.</p>';
    if ($truncated) {
        echo '<p class="warn" id="truncated">The chain has more than ', CHAIN_MAX,
            ' events: only the oldest ', CHAIN_MAX, ' (and the asked event\'s ancestors) are shown.</p>';
    }
    echo '<ul class="tree">';
    $seen = [];
    $cut = false;
    foreach ($tops as $t) {
        event_tree_node($t, $byId, $kids, $id, $c, $seen, 0, $cut);
    }
    // Bad data (A's parent B, B's parent A) leaves events no top level reaches: draw them too.
    $rest = array_values(array_filter(array_map('strval', array_keys($byId)), fn ($e) => !isset($seen[$e])));
    usort($rest, $byTs);
    foreach ($rest as $t) {
        event_tree_node($t, $byId, $kids, $id, $c, $seen, 0, $cut, 'parent not in chain / cycle');
    }
    echo '</ul>';
    if ($cut) {
        echo '<p class="warn" id="depth-cut">The chain is more than ', TREE_MAX_DEPTH,
            ' hops deep: the deeper events are not drawn; follow the links at the cut.</p>';
    }
    page_end();
}

/** One tree node and, recursively, its children. $seen guards against cycles in bad data. */
function event_tree_node(string $eid, array $byId, array $kids, string $asked, Ctx $c, array &$seen, int $depth,
    bool &$cut, string $note = ''): void
{
    if (isset($seen[$eid])) {
        return;
    }
    $seen[$eid] = true;
    $e = $byId[$eid];
    $cls = ['hop'];
    if (($e['status'] ?? null) === 'error') {
        $cls[] = 'err';
    }
    if ($eid === $asked) {
        $cls[] = 'asked';
    }
    $exec = $e['elapsed_us'] ?? null;
    $wait = null;
    $pid = $e['parent_event_id'] ?? null;
    $ts = dt_ms($e['ts'] ?? null);
    if (is_string($pid) && isset($byId[$pid]) && !isset($e['entry'])) {
        $pts = dt_ms($byId[$pid]['ts'] ?? null);
        $pel = $byId[$pid]['elapsed_us'] ?? null;
        if ($ts !== null && $pts !== null && is_int($pel)) {
            $w = ($ts - $pts) * 1000 - $pel;
            $wait = $w >= 0 ? $w : null; // negative: clocks or a shared ts (batch entries); unknown
        }
    }
    $label = str_or($e['template'] ?? null) . '.' . str_or($e['op'] ?? null);
    echo '<li class="', h(implode(' ', $cls)), '" data-id="', h($eid), '"', $wait !== null ? ' data-wait-us="' . h($wait) . '"' : '',
        ' data-exec-us="', h(is_int($exec) ? $exec : ''), '"><div class="hopline">',
        a(obs_url('event', ['id' => $eid], $c), $label), ' ', status_cell($e),
        ' <span class="where">', h(str_or($e['node'] ?? null)), ' / ', h(str_or($e['broker'] ?? null)), '</span>',
        ' <span class="ts">', h(fmt_ts($ts)), '</span>',
        ' <span class="exec">exec ', h(fmt_us($exec)), '</span>';
    if ($wait !== null) {
        echo ' <span class="wait">wait after parent\'s reply ', h(fmt_us($wait)), '</span>';
    }
    if (isset($e['entry'])) {
        echo ' <span class="kind">batch entry ', h(str_or($e['entry'])), '</span>';
    }
    if (is_string($e['outcome'] ?? null)) {
        echo ' <span class="kind">', h($e['outcome']), '</span>';
    }
    if ($note !== '') {
        echo ' <span class="kind orphan">', h($note), '</span>';
    }
    echo ' <span class="id">', h($eid), '</span></div>';
    if (!empty($kids[$eid]) && $depth >= TREE_MAX_DEPTH) {
        // Too deep to nest further: link the children, and count their subtrees as shown.
        $cut = true;
        echo '<ul><li class="cut">deeper, not drawn: ';
        foreach ($kids[$eid] as $k) {
            echo a(obs_url('event', ['id' => $k], $c), $k), ' ';
        }
        echo '</li></ul>';
        for ($stack = $kids[$eid]; $stack;) {
            $k = array_pop($stack);
            if (!isset($seen[$k])) {
                $seen[$k] = true;
                array_push($stack, ...($kids[$k] ?? []));
            }
        }
    } elseif (!empty($kids[$eid])) {
        echo '<ul>';
        foreach ($kids[$eid] as $k) {
            event_tree_node($k, $byId, $kids, $asked, $c, $seen, $depth + 1, $cut);
        }
        echo '</ul>';
    }
    echo '</li>';
}

/** Every field of the event, as a definition table. */
function event_fields(array $e, Ctx $c): void
{
    echo '<table class="fields">';
    foreach ($e as $k => $v) {
        if ($v instanceof MongoDB\BSON\UTCDateTime) {
            $s = fmt_ts(dt_ms($v)) . ' UTC';
        } elseif (is_array($v) || is_object($v)) {
            $s = (string) json_encode($v, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_INVALID_UTF8_SUBSTITUTE | JSON_PARTIAL_OUTPUT_ON_ERROR);
        } elseif ($v === null) {
            $s = 'null';
        } elseif (is_bool($v)) {
            $s = $v ? 'true' : 'false';
        } else {
            $s = (string) $v;
        }
        $cell = h($s);
        if (in_array($k, ['parent_event_id', 'root_event_id'], true) && is_string($v)) {
            $cell = a(obs_url('event', ['id' => $v], $c), $v);
        } elseif ($k === 'elapsed_us') {
            $cell .= ' <span class="muted">(' . h(fmt_us($v)) . ')</span>';
        } elseif ($k === 'status') {
            $cell = status_cell($e);
        } elseif ($k === 'message_id' && is_string($v)) {
            $cell = a(obs_url('events', ['message_id' => $v], $c), $v);
        }
        echo '<tr><th>', h((string) $k), '</th><td>', $cell, '</td></tr>';
    }
    echo '</table>';
}
