<?php
// The front controller's work: error handling, security headers, routing.
// Every failure ends as a short page with the right status, never a PHP message.
declare(strict_types=1);

require __DIR__ . '/config.php';
require __DIR__ . '/db.php';
require __DIR__ . '/input.php';
require __DIR__ . '/html.php';
require __DIR__ . '/svg.php';
require __DIR__ . '/pages/events.php';
require __DIR__ . '/pages/event.php';
require __DIR__ . '/pages/failures.php';
require __DIR__ . '/pages/graphs.php';
require __DIR__ . '/pages/nodes.php';

const OBS_ROUTES = ['events', 'event', 'failures', 'graphs', 'nodes'];

function obs_headers(): void
{
    header("Content-Security-Policy: default-src 'none'; style-src 'self'; script-src 'self'; "
        . "form-action 'self'; base-uri 'none'; frame-ancestors 'none'");
    header('X-Content-Type-Options: nosniff');
    header('X-Frame-Options: DENY');
    header('Referrer-Policy: no-referrer');
    header('Cache-Control: no-store');
    header('Content-Type: text/html; charset=utf-8');
}

/** A complete error page; $html is already escaped. */
function obs_error_page(int $status, string $title, string $html, array $cfg = []): void
{
    while (ob_get_level() > 0) {
        ob_end_clean();
    }
    if (!headers_sent()) {
        http_response_code($status);
        obs_headers();
    }
    page_start($cfg + ['title' => 'BEDS observer'], 'error', $title, null);
    echo '<h2>', h($title), '</h2><div class="error-box" id="error" data-status="', $status, '">', $html, '</div>';
    page_end();
}

function obs_main(): void
{
    ini_set('display_errors', '0');
    ini_set('log_errors', '1');
    error_reporting(E_ALL);
    // Warnings and notices become exceptions, so they end in the clean error page.
    set_error_handler(function (int $no, string $str, string $file, int $line): bool {
        if (!(error_reporting() & $no)) {
            return false;
        }
        throw new ErrorException($str, 0, $no, $file, $line);
    });
    register_shutdown_function(function (): void {
        $e = error_get_last();
        if ($e !== null && in_array($e['type'], [E_ERROR, E_PARSE, E_CORE_ERROR, E_COMPILE_ERROR], true)) {
            obs_error_page(500, 'Internal error', 'The observer failed; the details are in the web server\'s error log.');
        }
    });

    $cfg = [];
    ob_start();
    try {
        $method = $_SERVER['REQUEST_METHOD'] ?? 'GET';
        if ($method !== 'GET' && $method !== 'HEAD') {
            obs_error_page(405, 'Method not allowed', 'The observer only reads: use GET.');
            return;
        }
        $page = in_enum('page', OBS_ROUTES, 'events');
        $refresh = in_int('refresh', -1, 0, 3600, true);
        [$cfg] = obs_config();
        $db = new ObsDb($cfg['uri'], $cfg['db']);
        $ctx = new Ctx($cfg, $db, (int) floor(microtime(true) * 1000),
            $refresh >= 0 ? $refresh : (int) $cfg['refresh'], $refresh >= 0);
        obs_headers();
        ('page_' . $page)($ctx);
        ob_end_flush();
    } catch (ObsBadInput $e) {
        obs_error_page(400, 'Bad request', h($e->getMessage()) . '. ' . a('?page=events', 'Start over'), $cfg);
    } catch (ObsConfigError $e) {
        obs_error_page(500, 'Configuration error', h($e->getMessage()), $cfg);
    } catch (ObsDbTimeout $e) {
        obs_error_page(504, 'Query too slow', 'The query took longer than ' . intdiv(OBS_MAX_TIME_MS, 1000)
            . ' s: narrow the filter or the time range. ' . a('?page=events', 'Start over'), $cfg);
    } catch (ObsDbError $e) {
        obs_error_page(503, 'MongoDB unavailable',
            'The event log could not be read from MongoDB at <code>' . h(obs_uri_hosts($cfg['uri'] ?? '')) . '</code>, database <code>'
            . h($cfg['db'] ?? '?') . '</code>.<br>Driver: '
            . h($e->getMessage()) . '<br>Check that MongoDB runs and that BEDS_OBSERVER_URI (or <code>uri</code> in the ini file) points at it.', $cfg);
    } catch (Throwable $e) {
        error_log('beds observer: ' . get_class($e) . ': ' . $e->getMessage() . ' at ' . $e->getFile() . ':' . $e->getLine());
        obs_error_page(500, 'Internal error', 'The observer failed; the details are in the web server\'s error log.', $cfg);
    }
}
