"""Reply checks shared by the contract tests (CONTRACT §3), written from
the contract alone. Not a test module: it never skips, so both test files
can import it."""

NON_RETRYABLE = {
    "BAD_PAYLOAD",
    "UNKNOWN_TEMPLATE",
    "UNKNOWN_OPERATION",
    "WRONG_BROKER",
    "VALIDATION",
    "FORBIDDEN",
    "CONFLICT",
    "NOT_FOUND",
    "EXPIRED",
}


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def header(props, name):
    value = (props.headers or {}).get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return value


def assert_envelope(reply, props):
    """CONTRACT §3: reply properties and the fields every reply carries."""
    assert props.content_type == "application/json", props.content_type
    assert reply.get("status") in ("ok", "error"), reply
    event_id = reply.get("event_id")
    assert isinstance(event_id, str) and event_id, "event_id: %r" % (event_id,)
    assert header(props, "x-beds-event-id") == event_id, (
        "header x-beds-event-id %r != body event_id %r"
        % (header(props, "x-beds-event-id"), event_id)
    )


def assert_ok_entry(entry):
    """A successful reply object: status ok, data an array of row objects."""
    assert entry.get("status") == "ok", "expected ok, got %r" % (entry,)
    event_id = entry.get("event_id")
    assert isinstance(event_id, str) and event_id, "event_id: %r" % (entry,)
    data = entry.get("data")
    assert isinstance(data, list), "data must always be an array: %r" % (entry,)
    assert all(isinstance(row, dict) for row in data), entry
    if "affected" in entry:
        assert is_int(entry["affected"]), entry


def assert_error_entry(entry, code):
    """A failed reply object: status error + error {code, message, retryable}."""
    assert entry.get("status") == "error", "expected error %s, got %r" % (code, entry)
    event_id = entry.get("event_id")
    assert isinstance(event_id, str) and event_id, "event_id: %r" % (entry,)
    error = entry.get("error")
    assert isinstance(error, dict), entry
    assert error.get("code") == code, "expected %s, got %r" % (code, error)
    assert isinstance(error.get("message"), str) and error["message"], error
    assert isinstance(error.get("retryable"), bool), error
    if code in NON_RETRYABLE:
        assert error["retryable"] is False, error
    if "data" in entry:
        assert isinstance(entry["data"], list), entry


def assert_ok(reply, props):
    assert_envelope(reply, props)
    assert_ok_entry(reply)
    assert is_int(reply.get("elapsed_us")), "elapsed_us: %r" % (reply,)
    assert reply["elapsed_us"] >= 0, reply


def assert_error(reply, props, code):
    assert_envelope(reply, props)
    assert_error_entry(reply, code)
