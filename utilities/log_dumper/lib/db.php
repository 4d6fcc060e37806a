<?php
// MongoDB access through the extension's own API (no Composer library exists on the
// servers). Read-only: this file only ever issues find and aggregate.
declare(strict_types=1);

use MongoDB\Driver\Command;
use MongoDB\Driver\Exception\Exception as DriverException;
use MongoDB\Driver\Exception\ExecutionTimeoutException;
use MongoDB\Driver\Manager;
use MongoDB\Driver\Query;

// Bounds every server-side operation, so a huge collection cannot hang a page.
const OBS_MAX_TIME_MS = 8000;

final class ObsDbError extends RuntimeException
{
}

/** A query ran past OBS_MAX_TIME_MS: MongoDB is up, the question was too wide. */
final class ObsDbTimeout extends RuntimeException
{
}

final class ObsDb
{
    private Manager $manager;
    private string $uri;
    public string $db;

    public function __construct(string $uri, string $db)
    {
        $this->uri = $uri;
        $this->db = $db;
        // Without connectTimeoutMS a listener that never answers holds a page 10 s;
        // options already in the URI win.
        $opts = [];
        foreach (['serverSelectionTimeoutMS' => 2000, 'connectTimeoutMS' => 2000] as $k => $v) {
            if (stripos($uri, $k . '=') === false) {
                $opts[$k] = $v;
            }
        }
        try {
            $this->manager = new Manager($uri, $opts);
        } catch (Throwable $e) {
            throw new ObsDbError($this->clean($e->getMessage()));
        }
    }

    /** @return list<array<string,mixed>> */
    public function find(string $coll, array $filter, array $options = []): array
    {
        $options += ['maxTimeMS' => OBS_MAX_TIME_MS];
        return $this->run(fn () => $this->manager->executeQuery(
            "{$this->db}.$coll",
            new Query($filter, $options)
        ));
    }

    /** @return array<string,mixed>|null */
    public function findOne(string $coll, array $filter): ?array
    {
        $rows = $this->find($coll, $filter, ['limit' => 1]);
        return $rows[0] ?? null;
    }

    /** @return list<array<string,mixed>> */
    public function aggregate(string $coll, array $pipeline): array
    {
        return $this->run(fn () => $this->manager->executeReadCommand($this->db, new Command([
            'aggregate' => $coll,
            'pipeline' => $pipeline,
            'cursor' => new stdClass(),
            'maxTimeMS' => OBS_MAX_TIME_MS,
        ])));
    }

    private function run(callable $op): array
    {
        try {
            $cursor = $op();
            $cursor->setTypeMap(['root' => 'array', 'document' => 'array', 'array' => 'array']);
            return $cursor->toArray();
        } catch (ExecutionTimeoutException $e) {
            throw new ObsDbTimeout($this->clean($e->getMessage()));
        } catch (DriverException $e) {
            throw new ObsDbError($this->clean($e->getMessage()));
        }
    }

    /** Driver messages may quote the whole URI (password, secret options): never pass it on. */
    private function clean(string $msg): string
    {
        $msg = str_replace($this->uri, '(the configured URI)', $msg);
        $msg = (string) preg_replace('#[a-z+]+://\S*#i', '(a URI)', $msg);
        return mb_strimwidth_safe($msg, 300);
    }
}

function mb_strimwidth_safe(string $s, int $max): string
{
    if (strlen($s) <= $max) {
        return $s;
    }
    // Cut on a UTF-8 boundary without needing mbstring.
    $cut = substr($s, 0, $max);
    while ($cut !== '' && !preg_match('//u', $cut)) {
        $cut = substr($cut, 0, -1);
    }
    return $cut . '…';
}
