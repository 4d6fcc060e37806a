"""Fixtures for the BEDS contract acceptance suite.

The suite is written from shared/CONTRACT.md alone.  It talks to a running
BEDS node over AMQP exactly like any client would:

* publish to the request exchange ``$BEDS_PREFIX`` with routing key = broker
  name (CONTRACT §1), ``content_type='application/json'``, a fresh
  ``correlation_id`` and ``reply_to='amq.rabbitmq.reply-to'`` (CONTRACT §2);
* wait for the one reply carrying that ``correlation_id`` (CONTRACT §3).

Environment:
    BEDS_AMQP_URL     amqp://user:pass@host:port/vhost  (unset: suite skipped)
    BEDS_PREFIX       exchange name / queue prefix        (default "beds")
    BEDS_MAX_PAYLOAD  configured max body size in bytes   (default 1 MiB)
"""

import json
import os
import time
import uuid

import pytest

REPLY_TO = "amq.rabbitmq.reply-to"
REPLY_TIMEOUT_S = 10.0


def _env_url():
    return os.environ.get("BEDS_AMQP_URL", "").strip()


class BedsClient:
    """A minimal BEDS client: one connection, one channel, direct reply-to."""

    def __init__(self, url, prefix, reply_timeout=REPLY_TIMEOUT_S):
        import pika  # imported lazily so a missing URL skips cleanly

        self._pika = pika
        self.prefix = prefix
        self.reply_timeout = reply_timeout
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        # Publisher confirms + mandatory: a request that no queue would take
        # (e.g. a broker that is not bound) fails loudly instead of timing out.
        self.channel.confirm_delivery()
        # Direct reply-to must be consumed, no-ack, on the publishing channel
        # before the first publish that names it.
        self._replies = {}
        self.channel.basic_consume(REPLY_TO, self._on_reply, auto_ack=True)

    # -- plumbing ----------------------------------------------------------

    def _on_reply(self, _channel, _method, properties, body):
        self._replies.setdefault(properties.correlation_id, []).append(
            (properties, body)
        )

    @staticmethod
    def encode(body):
        if isinstance(body, (bytes, bytearray)):
            return bytes(body)
        return json.dumps(body).encode("utf-8")

    def publish(
        self,
        broker,
        body,
        content_type="application/json",
        headers=None,
        message_id=None,
        expiration=None,
        correlation_id=None,
        want_reply=True,
    ):
        """Publish one request; return its correlation_id (None if none set)."""
        if want_reply and correlation_id is None:
            correlation_id = str(uuid.uuid4())
        props = self._pika.BasicProperties(
            content_type=content_type,
            correlation_id=correlation_id,
            reply_to=REPLY_TO if want_reply else None,
            headers=headers,
            message_id=message_id,
            expiration=None if expiration is None else str(expiration),
        )
        self.channel.basic_publish(
            exchange=self.prefix,
            routing_key=broker,
            body=self.encode(body),
            properties=props,
            mandatory=True,
        )
        return correlation_id

    def wait_raw(self, correlation_id, timeout=None):
        """Wait for the next reply with this correlation_id -> (props, bytes)."""
        timeout = self.reply_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            pending = self._replies.get(correlation_id)
            if pending:
                return pending.pop(0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                strays = {k: len(v) for k, v in self._replies.items() if v}
                raise AssertionError(
                    "no reply with correlation_id %r within %.1fs "
                    "(unmatched replies by correlation_id: %r)"
                    % (correlation_id, timeout, strays)
                )
            self.connection.process_data_events(time_limit=min(0.2, remaining))

    def wait(self, correlation_id, timeout=None):
        """Wait for the reply -> (reply_json, properties)."""
        props, raw = self.wait_raw(correlation_id, timeout)
        assert props.correlation_id == correlation_id, (
            "reply correlation_id %r != request's %r"
            % (props.correlation_id, correlation_id)
        )
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            raise AssertionError("reply body is not JSON: %r (%s)" % (raw[:200], exc))
        assert isinstance(reply, dict), "reply body is not a JSON object: %r" % (reply,)
        return reply, props

    def call(
        self,
        broker,
        body,
        content_type="application/json",
        headers=None,
        message_id=None,
        expiration=None,
    ):
        """Request/reply round trip -> (reply_json, properties)."""
        corr = self.publish(
            broker,
            body,
            content_type=content_type,
            headers=headers,
            message_id=message_id,
            expiration=expiration,
        )
        return self.wait(corr)

    def fire_and_forget(self, broker, body, **kwargs):
        """Publish without reply_to / correlation_id (CONTRACT §2)."""
        self.publish(broker, body, want_reply=False, **kwargs)

    def close(self):
        try:
            if self.connection.is_open:
                self.connection.close()
        except Exception:  # pragma: no cover - best effort teardown
            pass


@pytest.fixture(scope="session")
def amqp_url():
    url = _env_url()
    if not url:
        pytest.skip("BEDS_AMQP_URL is not set: no BEDS node to test against")
    return url


@pytest.fixture(scope="session")
def prefix():
    return os.environ.get("BEDS_PREFIX", "").strip() or "beds"


@pytest.fixture(scope="session")
def max_payload():
    return int(os.environ.get("BEDS_MAX_PAYLOAD", "").strip() or 1048576)


@pytest.fixture
def beds(amqp_url, prefix):
    """A fresh client (own connection and reply consumer) per test."""
    client = BedsClient(amqp_url, prefix)
    yield client
    client.close()


@pytest.fixture
def call(beds):
    """``call(broker, body, content_type=..., headers=None, message_id=None,
    expiration=None) -> (reply_json, properties)``"""
    return beds.call


# -- note domain switch (test_note.py) -----------------------------------------

NOTE_SKIP_REASON = "note domain not served: set BEDS_NOTE=1"


def _skip_reason(report):
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say loudly when the note-domain tests did not run (BEDS_NOTE unset):
    they are skipped, never passed, and this line makes that hard to miss."""
    skipped = terminalreporter.stats.get("skipped", [])
    count = sum(1 for rep in skipped if NOTE_SKIP_REASON in _skip_reason(rep))
    if count:
        terminalreporter.section("BEDS note domain NOT TESTED", sep="!", red=True, bold=True)
        terminalreporter.line(
            "%d note-domain test(s) SKIPPED: %s" % (count, NOTE_SKIP_REASON),
            red=True, bold=True,
        )
