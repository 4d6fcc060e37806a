<?php
// Failures: events with status "error" in the time range, grouped by code,
// template, node and broker (one $group, sorted by count), with the
// `beds dlq` lines that replay the parked ones.
declare(strict_types=1);

const FAIL_MAX_GROUPS = 500;

/** A value for a shell command line: bare when harmless, else single-quoted. */
function shell_arg(string $s): string
{
    if (preg_match('/^[A-Za-z0-9_.:=@\/-]+$/', $s)) {
        return $s;
    }
    return "'" . str_replace("'", "'\\''", $s) . "'";
}

/** @param list<?string> $values */
function dlq_has_star(array $values): bool
{
    foreach ($values as $v) {
        if ($v !== null && str_contains($v, '*')) {
            return true;
        }
    }
    return false;
}

function page_failures(Ctx $c): void
{
    $range = in_range($c->nowMs, '24h');
    $node = in_str('node', 200);
    $match = ['status' => 'error'];
    $ts = ['$gte' => bson_date($range['from'] ?? 0)];
    if ($range['to'] !== null) {
        $ts['$lte'] = bson_date($range['to']);
    }
    $match['ts'] = $ts;
    if ($node !== null) {
        $match['node'] = $node;
    }
    $groups = $c->db->aggregate($c->cfg['logs'], [
        ['$match' => $match],
        ['$group' => [
            '_id' => ['code' => '$code', 'template' => '$template', 'node' => '$node', 'broker' => '$broker'],
            'count' => ['$sum' => 1],
            'parked' => ['$sum' => ['$cond' => [['$eq' => ['$outcome', 'parked']], 1, 0]]],
            'first' => ['$min' => '$ts'],
            'last' => ['$max' => '$ts'],
            'ops' => ['$addToSet' => '$op'],
        ]],
        ['$sort' => ['count' => -1, '_id.code' => 1, '_id.template' => 1, '_id.node' => 1]],
        ['$limit' => FAIL_MAX_GROUPS + 1],
    ]);
    $more = count($groups) > FAIL_MAX_GROUPS;
    $groups = array_slice($groups, 0, FAIL_MAX_GROUPS);
    $total = array_sum(array_map(fn ($g) => (int) $g['count'], $groups));
    if ($more) {
        // The groups shown are not all of them: count every failure in the range once more.
        $all = $c->db->aggregate($c->cfg['logs'], [['$match' => $match], ['$group' => ['_id' => null, 'n' => ['$sum' => 1]]]]);
        $total = (int) ($all[0]['n'] ?? $total);
    }
    $rangeParams = $range['since'] !== null ? ['since' => $range['since']]
        : ['from' => fmt_ts_input($range['from']), 'to' => $range['to'] !== null ? fmt_ts_input($range['to']) : null];

    page_start($c->cfg, 'failures', 'Failures', $c);
    echo '<h2>Failures</h2>';
    range_form('failures', $range, $c, ['node' => $node]);
    echo '<p class="summary" id="summary" data-groups="', count($groups), '" data-total="', $total, '">',
        $groups ? h("$total failed event(s) in " . ($more ? 'more than ' : '') . count($groups) . ' group(s), ' . range_text($range))
        : h('no failures ' . range_text($range)), '</p>';
    if ($more) {
        echo '<p class="warn" id="more-groups">More than ', FAIL_MAX_GROUPS, ' groups: only the largest ', FAIL_MAX_GROUPS,
            ' are shown (the total counts them all).</p>';
    }
    if (!$groups) {
        page_end();
        return;
    }
    echo '<table class="failures"><thead><tr><th>count</th><th>code</th><th>template</th><th>ops</th><th>node</th>',
        '<th>broker</th><th>parked</th><th>first</th><th>last</th></tr></thead><tbody>';
    foreach ($groups as $g) {
        $k = $g['_id'];
        $code = is_string($k['code'] ?? null) ? $k['code'] : null;
        $tpl = is_string($k['template'] ?? null) ? $k['template'] : null;
        $gnode = is_string($k['node'] ?? null) ? $k['node'] : null;
        $broker = is_string($k['broker'] ?? null) ? $k['broker'] : null;
        $ops = array_filter($g['ops'] ?? [], 'is_string');
        sort($ops);
        $link = obs_url('events', ['status' => 'error', 'code' => $code, 'template' => $tpl, 'node' => $gnode,
            'broker' => $broker] + $rangeParams, $c);
        echo '<tr class="grp" data-count="', h((int) $g['count']), '" data-code="', h($code ?? ''), '" data-template="',
            h($tpl ?? ''), '" data-node="', h($gnode ?? ''), '" data-broker="', h($broker ?? ''), '">',
            '<td class="num">', a($link, (string) (int) $g['count']), '</td>',
            '<td class="st-error">', h($code ?? '-'), '</td><td>', h($tpl ?? '-'), '</td><td>', h(implode(', ', $ops)), '</td>',
            '<td>', h($gnode ?? '-'), '</td><td>', h($broker ?? '-'), '</td>',
            '<td class="num">', h((int) ($g['parked'] ?? 0)), '</td>',
            '<td class="ts">', h(fmt_ts(dt_ms($g['first'] ?? null))), '</td><td class="ts">', h(fmt_ts(dt_ms($g['last'] ?? null))), '</td></tr>';
        // The replay lines get a row of their own: they are long, and copied whole.
        echo '<tr class="cmds"><td></td><td colspan="8">';
        $parked = (int) ($g['parked'] ?? 0);
        if ($parked === 0) {
            echo '<span class="muted">none parked: nothing in the dead-letter queue to replay</span>';
        } elseif ($broker !== null && dlq_has_star([$code, $tpl, $gnode])) {
            // beds dlq reads * as a wildcard and cannot escape it: the line would replay more than this group.
            echo '<span class="warn dlq-star">a value contains *, which beds dlq reads as a wildcard: ',
                'replay by event id or message id instead</span>';
        } elseif ($broker !== null) {
            $cmd = 'beds dlq replay ' . shell_arg($broker);
            foreach (['code' => $code, 'template' => $tpl, 'node' => $gnode] as $fk => $fv) {
                // An empty value matches messages without the field; leaving the filter out would match the whole broker.
                $cmd .= ' --filter ' . shell_arg("$fk=" . ($fv ?? ''));
            }
            echo '<div class="cmdline"><span class="muted">check</span><pre class="cmd dry">', h($cmd . ' --dry-run'), '</pre></div>',
                '<div class="cmdline"><span class="muted">replay</span><pre class="cmd">', h($cmd), '</pre></div>';
        } else {
            echo '<span class="muted">no broker: nothing to replay</span>';
        }
        echo '</td></tr>';
    }
    echo '</tbody></table><p class="muted">Only messages that were parked (outcome "parked") are in the dead-letter queue. ',
        'Run the <code>--dry-run</code> line first (it lists what would be replayed); see also <code>beds dlq list &lt;broker&gt; --group-by code</code>.</p>';
    page_end();
}

function range_text(array $r): string
{
    if ($r['since'] !== null) {
        return 'in the last ' . $r['since'];
    }
    return 'from ' . ($r['from'] !== null ? fmt_ts($r['from']) : 'the start') . ' to ' . ($r['to'] !== null ? fmt_ts($r['to']) : 'now') . ' UTC';
}

/** The time-range picker shared by failures and graphs. */
function range_form(string $page, array $range, Ctx $c, array $extra = []): void
{
    echo '<form class="filters" method="get" action=""><input type="hidden" name="page" value="', h($page), '">';
    if ($c->refreshInUrl) {
        echo '<input type="hidden" name="refresh" value="', h($c->refresh), '">';
    }
    foreach ($extra as $k => $v) {
        echo '<label>', h($k), ' <input name="', h($k), '" value="', h($v ?? ''), '" maxlength="200"></label>';
    }
    echo '<label>last <select name="since"><option value="">-</option>';
    foreach (array_keys(OBS_SINCE) as $s) {
        echo '<option', $range['since'] === $s ? ' selected' : '', '>', h($s), '</option>';
    }
    echo '</select></label> or <label>from <input name="from" value="', h($range['since'] === null ? fmt_ts_input($range['from']) : ''),
        '" placeholder="YYYY-MM-DDTHH:MM" maxlength="40"></label><label>to <input name="to" value="',
        h(fmt_ts_input($range['to'])), '" placeholder="UTC" maxlength="40"></label><button type="submit">show</button></form>';
}
