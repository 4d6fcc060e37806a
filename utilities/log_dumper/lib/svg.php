<?php
// Line charts drawn on the server as inline SVG: no script, no external asset,
// works offline and under a strict CSP (presentation attributes, no style="").
declare(strict_types=1);

const SVG_COLORS = ['#1f6fb2', '#d9480f', '#2b8a3e', '#9c36b5', '#c92a2a', '#0b7285', '#e67700', '#495057',
    '#5c940d', '#a61e4d', '#364fc7', '#087f5b'];

/** A round number ≥ $v for the top of an axis. */
function svg_nice_max(float $v): float
{
    if ($v <= 0) {
        return 1.0;
    }
    $e = 10 ** floor(log10($v));
    $f = $v / $e;
    $n = $f <= 1 ? 1 : ($f <= 2 ? 2 : ($f <= 2.5 ? 2.5 : ($f <= 5 ? 5 : 10)));
    return $n * $e;
}

/**
 * @param array<string, list<array{0:int,1:float}>> $series name => [[epoch ms, value], …]
 * @param callable(float):string $fmt formats a y value
 * @param int $gapMs a gap longer than this between points breaks the line
 */
function svg_line_chart(string $title, array $series, int $fromMs, int $toMs, callable $fmt, int $gapMs): string
{
    $W = 900;
    [$L, $R, $T, $B] = [72, 16, 26, 34];
    $plotH = 190;
    $names = array_keys($series);
    $legendRows = (int) ceil(count($names) / 4);
    $H = $T + $plotH + $B + $legendRows * 18 + 4;
    $plotW = $W - $L - $R;
    $span = max(1, $toMs - $fromMs);
    $ymax = 0.0;
    foreach ($series as $pts) {
        foreach ($pts as [, $v]) {
            $ymax = max($ymax, (float) $v);
        }
    }
    $ymax = svg_nice_max($ymax);
    $x = fn (int $t): float => $L + (max($fromMs, min($toMs, $t)) - $fromMs) / $span * $plotW; // a bucket's middle may pass the range
    $y = fn (float $v): float => $T + $plotH - ($v / $ymax) * $plotH;

    $o = '<svg class="chart" role="img" viewBox="0 0 ' . $W . ' ' . $H . '" width="' . $W . '" height="' . $H
        . '" font-family="sans-serif" font-size="11"><title>' . h($title) . '</title>';
    $o .= '<text x="' . $L . '" y="16" font-size="13" font-weight="bold" fill="#222">' . h($title) . '</text>';
    // y axis: 4 gridlines with labels
    for ($i = 0; $i <= 4; $i++) {
        $v = $ymax * $i / 4;
        $yy = round($y($v), 1);
        $o .= '<line x1="' . $L . '" x2="' . ($L + $plotW) . '" y1="' . $yy . '" y2="' . $yy . '" stroke="'
            . ($i === 0 ? '#888' : '#e3e3e3') . '" stroke-width="1"/>';
        $o .= '<text x="' . ($L - 6) . '" y="' . ($yy + 4) . '" text-anchor="end" fill="#555">' . h($fmt($v)) . '</text>';
    }
    // x axis: a round step giving at most ~7 ticks; whole days beyond the list
    $step = 0;
    foreach ([60, 300, 600, 900, 1800, 3600, 10800, 21600, 43200, 86400, 172800, 604800, 1209600] as $s) {
        if ($span / ($s * 1000) <= 7) {
            $step = $s * 1000;
            break;
        }
    }
    if ($step === 0) {
        $step = (int) ceil($span / 7 / 86400000) * 86400000;
    }
    $o .= '<line x1="' . $L . '" x2="' . $L . '" y1="' . $T . '" y2="' . ($T + $plotH) . '" stroke="#888" stroke-width="1"/>';
    for ($t = intdiv($fromMs + $step - 1, $step) * $step; $t <= $toMs; $t += $step) {
        $xx = round($x($t), 1);
        $lbl = gmdate($span > 172800000 ? 'm-d H:i' : 'H:i', intdiv($t, 1000));
        $o .= '<line x1="' . $xx . '" x2="' . $xx . '" y1="' . ($T + $plotH) . '" y2="' . ($T + $plotH + 4) . '" stroke="#888"/>'
            . '<text class="tick" x="' . $xx . '" y="' . ($T + $plotH + 16) . '" text-anchor="middle" fill="#555">' . h($lbl) . '</text>';
    }
    $o .= '<text x="' . ($L + $plotW) . '" y="' . ($T + $plotH + 28) . '" text-anchor="end" fill="#777">UTC</text>';
    // the lines
    foreach ($names as $i => $name) {
        $color = SVG_COLORS[$i % count(SVG_COLORS)];
        $pts = $series[$name];
        usort($pts, fn ($a, $b) => $a[0] <=> $b[0]);
        $segs = [];
        $cur = [];
        $prev = null;
        foreach ($pts as [$t, $v]) {
            if ($prev !== null && $t - $prev > $gapMs && $cur) {
                $segs[] = $cur;
                $cur = [];
            }
            $cur[] = [round($x($t), 1) . ',' . round($y((float) $v), 1), round((float) $v, 3)];
            $prev = $t;
        }
        if ($cur) {
            $segs[] = $cur;
        }
        foreach ($segs as $seg) {
            if (count($seg) === 1) {
                [$cx, $cy] = explode(',', $seg[0][0]);
                $o .= '<circle cx="' . $cx . '" cy="' . $cy . '" r="2.5" fill="' . $color . '" data-series="' . h($name) . '"/>';
            }
            // data-values: the plotted values, unscaled (for reading and for the test)
            $o .= '<polyline fill="none" stroke="' . $color . '" stroke-width="1.6" stroke-linejoin="round" data-series="'
                . h($name) . '" data-values="' . implode(' ', array_column($seg, 1)) . '" points="' . implode(' ', array_column($seg, 0)) . '"/>';
        }
        // legend, four per row under the axis
        $lx = $L + ($i % 4) * 205;
        $ly = $T + $plotH + $B + intdiv($i, 4) * 18 + 8;
        $o .= '<rect x="' . $lx . '" y="' . ($ly - 9) . '" width="14" height="4" fill="' . $color . '"/>'
            . '<text x="' . ($lx + 19) . '" y="' . ($ly - 4) . '" fill="#222" class="legend" data-name="' . h($name) . '">'
            // Long names are cut to their column; the full one is the tooltip.
            . h(mb_strimwidth_safe($name, 26)) . '<title>' . h($name) . '</title></text>';
    }
    if (!$names) {
        $o .= '<text x="' . ($L + $plotW / 2) . '" y="' . ($T + $plotH / 2) . '" text-anchor="middle" fill="#777">no data</text>';
    }
    return $o . '</svg>';
}
