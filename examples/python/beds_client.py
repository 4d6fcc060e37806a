#!/usr/bin/env python3
"""A small BEDS client in Python (pika), and a demo of the wire protocol.

The protocol is described in wiki/12-client-guide.md. In short: publish a
JSON BrokerPayload to the exchange <prefix> with routing key = broker name
(rBroker for read ops, wBroker for writes, mBroker for meta ops), with
reply_to and correlation_id set, and wait for the one JSON reply.

Run (needs `pip install 'pika>=1.3,<2'` and a running BEDS node that serves
the `usr` sample domain):

    BEDS_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F BEDS_PREFIX=beds \
        python3 examples/python/beds_client.py

Set BEDS_EXAMPLES_NOTE=1 when the node also serves the MongoDB `note`
domain. Exit status: 0 when every step got the expected answer, 1 otherwise.
"""

import json
import os
import secrets
import sys
import time
import uuid
from urllib.parse import unquote, urlparse

import pika

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
READ, WRITE, META = "rBroker", "wBroker", "mBroker"


class BedsError(Exception):
    """A reply with status "error" where the caller expected "ok"."""

    def __init__(self, reply):
        self.reply = reply
        err = reply.get("error") or {}
        self.code = err.get("code")
        self.retryable = bool(err.get("retryable"))
        super().__init__("%s: %s" % (self.code, err.get("message")))


class BedsClient:
    """One connection, one channel, replies on RabbitMQ's direct reply-to.

    Not thread-safe (pika's BlockingConnection is not): use one client per
    thread.
    """

    def __init__(self, url, prefix="beds", timeout=10.0):
        self.prefix = prefix
        self.timeout = timeout
        self.user = unquote(urlparse(url).username or "guest")
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        # Publisher confirms: basic_publish returns once RabbitMQ has the
        # request. With mandatory=True below, a request that no queue takes
        # (wrong prefix or broker, no node ever started) raises
        # pika.exceptions.UnroutableError instead of timing out.
        self.channel.confirm_delivery()
        # Direct reply-to: consume it (no-ack) on the publishing channel
        # before the first publish that names it.
        self._replies = {}
        self.channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, _channel, _method, properties, body):
        self._replies[properties.correlation_id] = (properties, body)

    def call(self, broker, payload, message_id=None, user_id=None,
             traceparent=None, timeout=None):
        """Sends one request (a BrokerPayload dict or a batch dict) and
        returns the reply as a dict, with the reply's AMQP properties in
        reply["_props"].

        The request carries x-beds-deadline = now + timeout, so BEDS never
        runs it after this call has given up waiting.
        """
        timeout = self.timeout if timeout is None else timeout
        correlation_id = str(uuid.uuid4())
        headers = {"x-beds-deadline": int(time.time() * 1000 + timeout * 1000)}
        if traceparent:
            headers["traceparent"] = traceparent
        props = pika.BasicProperties(
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO,
            message_id=message_id,
            user_id=user_id,
            headers=headers,
        )
        body = json.dumps(payload).encode("utf-8")
        self.channel.basic_publish(self.prefix, broker, body, props, mandatory=True)
        end = time.monotonic() + timeout
        while correlation_id not in self._replies:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply within %.1f s" % timeout)
            self.connection.process_data_events(time_limit=min(left, 0.5))
        reply_props, raw = self._replies.pop(correlation_id)
        reply = json.loads(raw)
        reply["_props"] = reply_props
        return reply

    def ok(self, broker, payload, **kw):
        """call(), raising BedsError unless the reply's status is "ok"."""
        reply = self.call(broker, payload, **kw)
        if reply.get("status") != "ok":
            raise BedsError(reply)
        return reply

    def close(self):
        if self.connection.is_open:
            self.connection.close()


def req(template, op, data):
    return {"template": template, "op": op, "data": data}


def new_traceparent():
    return "00-%s-%s-01" % (secrets.token_hex(16), secrets.token_hex(8))


def event_id_header(reply):
    value = (reply["_props"].headers or {}).get("x-beds-event-id")
    return value.decode() if isinstance(value, bytes) else value


def show(reply):
    return json.dumps({k: v for k, v in reply.items() if k != "_props"})


class Failed(Exception):
    pass


def expect(cond, what, reply=None):
    if not cond:
        raise Failed(what + ("" if reply is None else ": " + show(reply)))


def main():
    url = os.environ.get("BEDS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    prefix = os.environ.get("BEDS_PREFIX", "beds")
    client = BedsClient(url, prefix)
    try:
        run(client)
    except (Failed, BedsError, TimeoutError, pika.exceptions.AMQPError) as e:
        print("FAILED: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    finally:
        client.close()
    print("python example: all steps ok")
    return 0


def run(c):
    tag = uuid.uuid4().hex[:12]
    email = "example-py-%s@example.org" % tag

    # 1. usr create: a write, so wBroker, with a message_id (dedup key).
    create = req("usr", "create", {"name": "Ada " + tag, "email": email})
    message_id = str(uuid.uuid4())
    r = c.ok(WRITE, create, message_id=message_id, user_id=c.user,
             traceparent=new_traceparent())
    expect(len(r["data"]) == 1 and r["data"][0]["email"] == email, "create row", r)
    expect(event_id_header(r) == r["event_id"], "x-beds-event-id header", r)
    user = r["data"][0]
    print("usr create     -> ok, id=%s affected=%s elapsed_us=%s"
          % (user["id"], r["affected"], r["elapsed_us"]))

    # 1b. The same request again (same message_id, same body), as a client
    # does after a lost reply: BEDS does not create a second row, it answers
    # with the first execution's reply.
    again = c.ok(WRITE, create, message_id=message_id, user_id=c.user)
    expect(again["event_id"] == r["event_id"] and again["data"] == r["data"],
           "repeat with the same message_id gets the first reply", again)
    print("usr create (repeat, same message_id) -> first reply, event_id=%s" % again["event_id"])

    # 2. usr read: a read, so rBroker.
    r = c.ok(READ, req("usr", "read", {"id": user["id"]}))
    expect(r["data"] == [user], "read returns the created row", r)
    print("usr read       -> ok, %s" % json.dumps(r["data"][0]))

    # 3. Same email again (a new request, so a new message_id): CONFLICT.
    r = c.call(WRITE, req("usr", "create", {"name": "Eve " + tag, "email": email}),
               message_id=str(uuid.uuid4()))
    expect(r["status"] == "error" and r["error"]["code"] == "CONFLICT"
           and r["error"]["retryable"] is False, "duplicate email is CONFLICT", r)
    print("usr create dup -> error %s (retryable=%s): %s"
          % (r["error"]["code"], r["error"]["retryable"], r["error"]["message"]))

    # 4. note (MongoDB), only when the node serves it.
    if os.environ.get("BEDS_EXAMPLES_NOTE") == "1":
        title = "Hello " + tag
        r = c.ok(WRITE, req("note", "create", {
            "user_id": user["id"], "title": title, "body": "First note.",
            "tags": ["example", "python"]}), message_id=str(uuid.uuid4()))
        note = r["data"][0]
        expect(len(note["id"]) == 24 and all(ch in "0123456789abcdef" for ch in note["id"]),
               "note id is 24 lowercase hex", r)
        expect(note["title"] == title and note["tags"] == ["example", "python"], "note row", r)
        print("note create    -> ok, id=%s created=%s" % (note["id"], note.get("created")))
        r = c.ok(READ, req("note", "read", {"id": note["id"]}))
        expect(r["data"][0]["title"] == title and r["data"][0]["user_id"] == user["id"],
               "note read", r)
        print("note read      -> ok, %s" % json.dumps(r["data"][0]))
        r = c.ok(WRITE, req("note", "delete", {"id": note["id"]}),
                 message_id=str(uuid.uuid4()))
        expect(r["affected"] == 1, "note delete affected 1", r)
        print("note delete    -> ok, affected=1")
    else:
        print("note steps: skipped (BEDS_EXAMPLES_NOTE unset)")

    # 5. A batch of two reads: one reply, one result per entry, in order.
    # Each entry succeeds or fails on its own (not atomic).
    missing = 2 ** 62
    r = c.ok(READ, {"batch": [req("usr", "read", {"id": user["id"]}),
                              req("usr", "read", {"id": missing})]})
    res = r["results"]
    expect(len(res) == 2 and res[0]["status"] == "ok" and res[0]["data"] == [user],
           "batch entry 0 ok", r)
    expect(res[1]["status"] == "error" and res[1]["error"]["code"] == "NOT_FOUND",
           "batch entry 1 NOT_FOUND", r)
    print("batch of 2 reads -> ok: [0] ok id=%s, [1] %s"
          % (res[0]["data"][0]["id"], res[1]["error"]["code"]))

    # 6. Clean up.
    r = c.ok(WRITE, req("usr", "delete", {"id": user["id"]}), message_id=str(uuid.uuid4()))
    expect(r["affected"] == 1, "usr delete affected 1", r)
    print("usr delete     -> ok, affected=1")


if __name__ == "__main__":
    sys.exit(main())
