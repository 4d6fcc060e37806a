<?php
// A small BEDS client in PHP (php-amqplib), and a demo of the wire protocol.
//
// The protocol is described in wiki/12-client-guide.md. In short: publish a
// JSON BrokerPayload to the exchange <prefix> with routing key = broker name
// (rBroker for read ops, wBroker for writes, mBroker for meta ops), with
// reply_to and correlation_id set, and wait for the one JSON reply.
//
// Needs PHP 8 and php-amqplib 3 (Debian: `apt-get install php-cli
// php-amqplib`, which puts the library in /usr/share/php, on PHP's default
// include_path; with Composer, require php-amqplib/php-amqplib and load
// vendor/autoload.php instead). Run against a node serving `usr`:
//
//   BEDS_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F BEDS_PREFIX=beds \
//       php examples/php/beds_client.php
//
// Set BEDS_EXAMPLES_NOTE=1 when the node also serves the MongoDB `note`
// domain. Exit status: 0 when every step got the expected answer, 1 otherwise.

declare(strict_types=1);

require_once 'PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;

const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';
const READ = 'rBroker';
const WRITE = 'wBroker';
const META = 'mBroker';

/** A reply with status "error" where the caller expected "ok". */
class BedsError extends RuntimeException
{
    public array $reply;

    public function __construct(array $reply)
    {
        $this->reply = $reply;
        $e = $reply['error'] ?? [];
        parent::__construct(($e['code'] ?? '?') . ': ' . ($e['message'] ?? ''));
    }

    public function code(): ?string
    {
        return $this->reply['error']['code'] ?? null;
    }

    public function retryable(): bool
    {
        return (bool) ($this->reply['error']['retryable'] ?? false);
    }
}

/** One connection, one channel, replies on RabbitMQ's direct reply-to. */
class BedsClient
{
    public string $user;
    private AMQPStreamConnection $conn;
    private $channel;
    private array $replies = [];
    private ?string $returned = null;

    public function __construct(string $url, private string $prefix = 'beds', private float $timeout = 10.0)
    {
        $u = parse_url($url);
        if ($u === false || !isset($u['host'])) {
            throw new InvalidArgumentException("not an amqp:// URL: $url");
        }
        $path = isset($u['path']) ? substr($u['path'], 1) : '';
        $vhost = $path === '' ? '/' : rawurldecode($path);
        $this->user = rawurldecode($u['user'] ?? 'guest');
        $this->conn = new AMQPStreamConnection(
            $u['host'],
            $u['port'] ?? 5672,
            $this->user,
            rawurldecode($u['pass'] ?? 'guest'),
            $vhost,
            false, 'AMQPLAIN', null, 'en_US',
            5.0,   // connection timeout, s
            30.0   // read/write timeout, s
        );
        $this->channel = $this->conn->channel();
        // Publisher confirms + mandatory: a request that no queue takes
        // (wrong prefix or broker name) comes back as basic.return and
        // fails the call instead of timing out.
        $this->channel->confirm_select();
        $this->channel->set_return_listener(function ($code, $text, $exchange, $key) {
            $this->returned = "request returned by RabbitMQ: $code $text (exchange '$exchange', routing key '$key')";
        });
        $this->channel->set_nack_handler(function () {
            $this->returned = 'request nacked by RabbitMQ';
        });
        // Direct reply-to: consume it (no-ack) on the publishing channel
        // before the first publish that names it.
        $this->channel->basic_consume(DIRECT_REPLY_TO, '', false, true, false, false, function (AMQPMessage $m) {
            if ($m->has('correlation_id')) {
                $this->replies[$m->get('correlation_id')] = $m;
            }
        });
    }

    /**
     * Sends one request (a BrokerPayload or a batch, as a PHP array) and
     * returns the decoded reply, with the reply's AMQP headers in
     * $reply['_headers']. Use (object) [] for an empty `data`: PHP encodes
     * an empty array as [] and BEDS wants an object.
     *
     * The request carries x-beds-deadline = now + timeout, so BEDS never
     * runs it after this call has given up waiting.
     */
    public function call(string $broker, array $payload, array $opts = []): array
    {
        $timeout = $opts['timeout'] ?? $this->timeout;
        $cid = bin2hex(random_bytes(16));
        $headers = new AMQPTable();
        $headers->set('x-beds-deadline', (int) (microtime(true) * 1000 + $timeout * 1000), AMQPTable::T_INT_LONGLONG);
        if (isset($opts['traceparent'])) {
            $headers->set('traceparent', $opts['traceparent']);
        }
        $props = [
            'content_type' => 'application/json',
            'correlation_id' => $cid,
            'reply_to' => DIRECT_REPLY_TO,
            'application_headers' => $headers,
        ];
        foreach (['message_id', 'user_id', 'expiration'] as $k) {
            if (isset($opts[$k])) {
                $props[$k] = (string) $opts[$k];
            }
        }
        $body = json_encode($payload, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
        $this->returned = null;
        $this->channel->basic_publish(new AMQPMessage($body, $props), $this->prefix, $broker, true);
        $this->channel->wait_for_pending_acks_returns($timeout);
        if ($this->returned !== null) {
            throw new RuntimeException($this->returned);
        }
        $end = microtime(true) + $timeout;
        while (!isset($this->replies[$cid])) {
            $left = $end - microtime(true);
            if ($left <= 0) {
                throw new RuntimeException(sprintf('no reply within %.1f s', $timeout));
            }
            try {
                $this->channel->wait(null, false, $left);
            } catch (PhpAmqpLib\Exception\AMQPTimeoutException $e) {
                // loop: the check above reports it
            }
        }
        $m = $this->replies[$cid];
        unset($this->replies[$cid]);
        $reply = json_decode($m->getBody(), true, 512, JSON_THROW_ON_ERROR);
        $reply['_headers'] = $m->has('application_headers') ? $m->get('application_headers')->getNativeData() : [];
        return $reply;
    }

    /** call(), throwing BedsError unless the reply's status is "ok". */
    public function ok(string $broker, array $payload, array $opts = []): array
    {
        $reply = $this->call($broker, $payload, $opts);
        if (($reply['status'] ?? null) !== 'ok') {
            throw new BedsError($reply);
        }
        return $reply;
    }

    public function close(): void
    {
        $this->channel->close();
        $this->conn->close();
    }
}

function req(string $template, string $op, array $data): array
{
    return ['template' => $template, 'op' => $op, 'data' => (object) $data];
}

function uuid4(): string
{
    $b = random_bytes(16);
    $b[6] = chr((ord($b[6]) & 0x0f) | 0x40);
    $b[8] = chr((ord($b[8]) & 0x3f) | 0x80);
    return vsprintf('%s%s-%s-%s-%s-%s%s%s', str_split(bin2hex($b), 4));
}

function show(array $reply): string
{
    unset($reply['_headers']);
    return json_encode($reply, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
}

class Failed extends RuntimeException
{
}

function expect(bool $cond, string $what, ?array $reply = null): void
{
    if (!$cond) {
        throw new Failed($what . ($reply === null ? '' : ': ' . show($reply)));
    }
}

function run(BedsClient $c): void
{
    $tag = bin2hex(random_bytes(6));
    $email = "example-php-$tag@example.org";

    // 1. usr create: a write, so wBroker, with a message_id (dedup key).
    $create = req('usr', 'create', ['name' => "Ada $tag", 'email' => $email]);
    $messageId = uuid4();
    $traceparent = '00-' . bin2hex(random_bytes(16)) . '-' . bin2hex(random_bytes(8)) . '-01';
    $r = $c->ok(WRITE, $create, ['message_id' => $messageId, 'user_id' => $c->user, 'traceparent' => $traceparent]);
    expect(count($r['data']) === 1 && $r['data'][0]['email'] === $email, 'create row', $r);
    expect(($r['_headers']['x-beds-event-id'] ?? null) === $r['event_id'], 'x-beds-event-id header', $r);
    $user = $r['data'][0];
    printf("usr create     -> ok, id=%d affected=%d elapsed_us=%d\n", $user['id'], $r['affected'], $r['elapsed_us']);

    // 1b. The same request again (same message_id, same body), as a client
    // does after a lost reply: answered with the first execution's reply.
    $again = $c->ok(WRITE, $create, ['message_id' => $messageId, 'user_id' => $c->user]);
    expect($again['event_id'] === $r['event_id'] && $again['data'] == $r['data'],
        'repeat with the same message_id gets the first reply', $again);
    printf("usr create (repeat, same message_id) -> first reply, event_id=%s\n", $again['event_id']);

    // 2. usr read: a read, so rBroker.
    $r = $c->ok(READ, req('usr', 'read', ['id' => $user['id']]));
    expect($r['data'] == [$user], 'read returns the created row', $r);
    printf("usr read       -> ok, %s\n", json_encode($r['data'][0], JSON_UNESCAPED_SLASHES));

    // 3. Same email again (a new request, so a new message_id): CONFLICT.
    $r = $c->call(WRITE, req('usr', 'create', ['name' => "Eve $tag", 'email' => $email]), ['message_id' => uuid4()]);
    expect($r['status'] === 'error' && $r['error']['code'] === 'CONFLICT' && $r['error']['retryable'] === false,
        'duplicate email is CONFLICT', $r);
    printf("usr create dup -> error %s (retryable=false): %s\n", $r['error']['code'], $r['error']['message']);

    // 4. note (MongoDB), only when the node serves it.
    if (getenv('BEDS_EXAMPLES_NOTE') === '1') {
        $title = "Hello $tag";
        $r = $c->ok(WRITE, req('note', 'create', [
            'user_id' => $user['id'], 'title' => $title, 'body' => 'First note.', 'tags' => ['example', 'php'],
        ]), ['message_id' => uuid4()]);
        $note = $r['data'][0];
        expect(preg_match('/^[0-9a-f]{24}$/', $note['id']) === 1, 'note id is 24 lowercase hex', $r);
        expect($note['title'] === $title && $note['tags'] === ['example', 'php'], 'note row', $r);
        printf("note create    -> ok, id=%s created=%s\n", $note['id'], $note['created'] ?? '?');
        $r = $c->ok(READ, req('note', 'read', ['id' => $note['id']]));
        expect($r['data'][0]['title'] === $title && $r['data'][0]['user_id'] === $user['id'], 'note read', $r);
        printf("note read      -> ok, %s\n", json_encode($r['data'][0], JSON_UNESCAPED_SLASHES));
        $r = $c->ok(WRITE, req('note', 'delete', ['id' => $note['id']]), ['message_id' => uuid4()]);
        expect($r['affected'] === 1, 'note delete affected 1', $r);
        print("note delete    -> ok, affected=1\n");
    } else {
        print("note steps: skipped (BEDS_EXAMPLES_NOTE unset)\n");
    }

    // 5. A batch of two reads: one reply, one result per entry, in order.
    // Each entry succeeds or fails on its own (not atomic).
    $missing = 2 ** 62;
    $r = $c->ok(READ, ['batch' => [req('usr', 'read', ['id' => $user['id']]), req('usr', 'read', ['id' => $missing])]]);
    $res = $r['results'];
    expect(count($res) === 2 && $res[0]['status'] === 'ok' && $res[0]['data'] == [$user], 'batch entry 0 ok', $r);
    expect($res[1]['status'] === 'error' && $res[1]['error']['code'] === 'NOT_FOUND', 'batch entry 1 NOT_FOUND', $r);
    printf("batch of 2 reads -> ok: [0] ok id=%d, [1] %s\n", $res[0]['data'][0]['id'], $res[1]['error']['code']);

    // 6. Clean up.
    $r = $c->ok(WRITE, req('usr', 'delete', ['id' => $user['id']]), ['message_id' => uuid4()]);
    expect($r['affected'] === 1, 'usr delete affected 1', $r);
    print("usr delete     -> ok, affected=1\n");
}

$url = getenv('BEDS_AMQP_URL') ?: 'amqp://guest:guest@127.0.0.1:5672/%2F';
$prefix = getenv('BEDS_PREFIX') ?: 'beds';
try {
    $client = new BedsClient($url, $prefix);
    try {
        run($client);
    } finally {
        $client->close();
    }
} catch (Throwable $e) {
    fprintf(STDERR, "FAILED: %s: %s\n", get_class($e), $e->getMessage());
    exit(1);
}
print("php example: all steps ok\n");
exit(0);
