"""BEDS wire-contract acceptance tests (written from shared/CONTRACT.md only).

Runs against a live appServer node (rBroker / wBroker / mBroker) with the
shipped ``usr`` sample domain (CONTRACT §5) loaded.  See README.md.
"""

import json
import os
import time
import uuid

import pytest

from contract_checks import (
    assert_envelope,
    assert_error,
    assert_error_entry,
    assert_ok,
    assert_ok_entry,
    is_int,
)

if not os.environ.get("BEDS_AMQP_URL", "").strip():
    pytest.skip(
        "BEDS_AMQP_URL is not set: the contract suite needs a running BEDS node",
        allow_module_level=True,
    )

R, W, M = "rBroker", "wBroker", "mBroker"
MISSING_ID = 2 ** 62  # a valid int that no row of a fresh table has



# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def unique_email():
    return "ct-%s@example.org" % uuid.uuid4().hex


def unique_name(tag="user"):
    return "%s-%s" % (tag, uuid.uuid4().hex[:8])


def req(op, data, template="usr", **extra):
    """A BrokerPayload (CONTRACT §2)."""
    body = {"template": template, "op": op, "data": data}
    body.update(extra)
    return body


def ok(call, broker, body, **kwargs):
    reply, props = call(broker, body, **kwargs)
    assert_ok(reply, props)
    return reply


def err(call, broker, body, code, **kwargs):
    reply, props = call(broker, body, **kwargs)
    assert_error(reply, props, code)
    return reply


def the_row(reply):
    """The single row of a returns="one" op."""
    assert len(reply["data"]) == 1, "expected exactly one row: %r" % (reply,)
    row = reply["data"][0]
    assert is_int(row.get("id")), row
    return row


def create(call, name=None, email=None):
    name = name or unique_name()
    email = email or unique_email()
    row = the_row(ok(call, W, req("create", {"name": name, "email": email})))
    assert (row.get("name"), row.get("email")) == (name, email), row
    return row


def list_page(call, limit, offset):
    return ok(call, R, req("list", {"limit": limit, "offset": offset}))["data"]


def list_all(call, page=100):
    rows, offset = [], 0
    while True:
        chunk = list_page(call, page, offset)
        assert len(chunk) <= page, "list returned more rows than limit"
        rows.extend(chunk)
        if len(chunk) < page:
            return rows
        offset += page


def rows_with_email(call, email):
    return [row for row in list_all(call) if row.get("email") == email]


def deadline_ms(offset_s):
    return int((time.time() + offset_s) * 1000)


# --------------------------------------------------------------------------
# 1. usr CRUD through the brokers
# --------------------------------------------------------------------------


def test_create_returns_new_row(beds):
    """§5: usr_create(name, email) returns the new row; §3: data is an array
    of row objects, reply has same correlation_id, content_type
    application/json and header x-beds-event-id equal to body event_id."""
    name, email = unique_name("ada"), unique_email()
    corr = beds.publish(W, req("create", {"name": name, "email": email}))
    reply, props = beds.wait(corr)
    assert props.correlation_id == corr
    assert_ok(reply, props)
    row = the_row(reply)
    assert row["name"] == name
    assert row["email"] == email


def test_read_returns_created_row(call):
    """§5: usr_read(id) on rBroker returns the row."""
    created = create(call)
    reply = ok(call, R, req("read", {"id": created["id"]}))
    row = the_row(reply)
    assert (row["id"], row["name"], row["email"]) == (
        created["id"], created["name"], created["email"])


def test_update_returns_updated_row(call):
    """§5: usr_update(id, name, email) returns the row (as updated)."""
    created = create(call)
    new_name, new_email = unique_name("upd"), unique_email()
    reply = ok(call, W, req("update", {"id": created["id"], "name": new_name,
                                       "email": new_email}))
    row = the_row(reply)
    assert (row["id"], row["name"], row["email"]) == (created["id"], new_name, new_email)
    again = the_row(ok(call, R, req("read", {"id": created["id"]})))
    assert (again["name"], again["email"]) == (new_name, new_email)


def test_delete_affects_one_row_then_read_is_not_found(call):
    """§5: usr_delete(id) gives affected = 1; §3: NOT_FOUND when a
    returns="one" op finds no row."""
    created = create(call)
    reply = ok(call, W, req("delete", {"id": created["id"]}))
    assert reply.get("affected") == 1, reply
    assert isinstance(reply["data"], list)
    err(call, R, req("read", {"id": created["id"]}), "NOT_FOUND")


def test_list_rows_ordered_by_id_with_limit_and_offset(call):
    """§5: usr_list(limit, offset) returns rows ordered by id."""
    mine = [create(call)["id"] for _ in range(3)]
    everything = list_all(call, page=2)
    ids = [row["id"] for row in everything]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert set(mine) <= set(ids)
    for row in everything:
        assert {"id", "name", "email"} <= set(row), row

    first_two = list_page(call, 2, 0)
    assert [r["id"] for r in first_two] == ids[:2]
    shifted = list_page(call, 2, 1)
    assert [r["id"] for r in shifted] == ids[1:3]
    assert len(list_page(call, 1, 0)) == 1


def test_list_past_the_end_returns_empty_array(call):
    """§3: data is always an array of row objects (empty when none)."""
    create(call)
    reply = ok(call, R, req("list", {"limit": 10, "offset": 1_000_000_000}))
    assert reply["data"] == []


def test_each_request_gets_its_own_event_id(call):
    """§3: every reply carries an event_id for its request."""
    created = create(call)
    first = ok(call, R, req("read", {"id": created["id"]}))
    second = ok(call, R, req("read", {"id": created["id"]}))
    assert first["event_id"] != second["event_id"]


def test_optional_top_level_keys_are_accepted(call):
    """§2: parent_event_id and context are optional BrokerPayload keys."""
    created = create(call)
    reply = ok(call, R, req("read", {"id": created["id"]},
                            parent_event_id=str(uuid.uuid4()), context="default"))
    assert the_row(reply)["id"] == created["id"]


# --------------------------------------------------------------------------
# 2. error codes
# --------------------------------------------------------------------------


def test_bad_payload_not_json(call):
    """§3 BAD_PAYLOAD: not JSON."""
    err(call, R, b"this is {not json", "BAD_PAYLOAD")


@pytest.mark.parametrize(
    "body",
    [
        [{"template": "usr", "op": "read", "data": {"id": 1}}],
        "usr",
        42,
        None,
    ],
    ids=["array", "string", "number", "null"],
)
def test_bad_payload_not_an_object(call, body):
    """§3 BAD_PAYLOAD: not an object (body is a JSON array / scalar)."""
    err(call, R, json.dumps(body).encode(), "BAD_PAYLOAD")


def test_bad_payload_unknown_top_level_key(call):
    """§2: unknown top-level keys are an error (BAD_PAYLOAD)."""
    body = req("read", {"id": 1})
    body["tempalte"] = "usr"
    err(call, R, body, "BAD_PAYLOAD")


def test_bad_payload_too_large(call, max_payload):
    """§2/§3 BAD_PAYLOAD: body larger than the configured max size."""
    body = req("read", {"id": 1}, context="")
    size = len(json.dumps(body).encode())
    body["context"] = "x" * (max_payload + 1 - size)
    raw = json.dumps(body).encode()
    assert len(raw) == max_payload + 1
    err(call, R, raw, "BAD_PAYLOAD")


def test_bad_payload_wrong_content_type_is_not_executed(call):
    """§2: content_type other than application/json -> BAD_PAYLOAD (and the
    request is not executed)."""
    email = unique_email()
    err(call, W, req("create", {"name": unique_name(), "email": email}),
        "BAD_PAYLOAD", content_type="text/plain")
    create(call, email=email)  # would be CONFLICT had it been applied


def test_unknown_template(call):
    """§3 UNKNOWN_TEMPLATE: no template of that name."""
    name = "zz_nosuch_" + uuid.uuid4().hex[:12]
    err(call, R, req("read", {"id": 1}, template=name), "UNKNOWN_TEMPLATE")


@pytest.mark.parametrize("broker", [R, W])
def test_unknown_operation(call, broker):
    """§3 UNKNOWN_OPERATION: template has no such op."""
    err(call, broker, req("frobnicate", {"id": 1}), "UNKNOWN_OPERATION")


def test_wrong_broker_write_sent_to_rbroker_is_not_executed(call):
    """§3 WRONG_BROKER: e.g. a write sent to rBroker."""
    email = unique_email()
    err(call, R, req("create", {"name": unique_name(), "email": email}), "WRONG_BROKER")
    create(call, email=email)


def test_wrong_broker_read_sent_to_wbroker(call):
    """§3 WRONG_BROKER: op's access kind (read) not served by wBroker."""
    created = create(call)
    err(call, W, req("read", {"id": created["id"]}), "WRONG_BROKER")


@pytest.mark.parametrize(
    "broker,op",
    [(W, "list"), (R, "delete"), (R, "update"), (M, "read"), (M, "create")],
)
def test_wrong_broker_other_pairs(call, broker, op):
    """§4: read -> rBroker, write -> wBroker, meta -> mBroker; any other
    pairing is WRONG_BROKER (usr has no meta ops)."""
    data = {
        "list": {"limit": 1, "offset": 0},
        "delete": {"id": MISSING_ID},
        "update": {"id": MISSING_ID, "name": unique_name(), "email": unique_email()},
        "read": {"id": MISSING_ID},
        "create": {"name": unique_name(), "email": unique_email()},
    }[op]
    err(call, broker, req(op, data), "WRONG_BROKER")


def test_validation_missing_required_field(call):
    """§3 VALIDATION: missing required field (read requires id)."""
    err(call, R, req("read", {}), "VALIDATION")


@pytest.mark.parametrize(
    "bad_id", ["abc", "42", 1.5, True, [1], {"id": 1}],
    ids=["string", "numeric-string", "float", "bool", "array", "object"],
)
def test_validation_wrong_type(call, bad_id):
    """§3 VALIDATION: wrong type (id is an int field)."""
    err(call, R, req("read", {"id": bad_id}), "VALIDATION")


def test_validation_string_too_long_is_not_executed(call):
    """§3 VALIDATION: too long (name max_len = 64)."""
    email = unique_email()
    err(call, W, req("create", {"name": "n" * 65, "email": email}), "VALIDATION")
    create(call, email=email)


def test_string_at_max_len_is_accepted(call):
    """§4: max_len = 64 means a 64-character name is valid."""
    name = ("m" * 56) + uuid.uuid4().hex[:8]
    assert len(name) == 64
    create(call, name=name)


def test_validation_unknown_field_in_data(call):
    """§3 VALIDATION: unknown field in data."""
    err(call, R, req("read", {"id": 1, "nickname": "x"}), "VALIDATION")


def test_conflict_on_duplicate_email(call):
    """§5: email is UNIQUE, so a second create with the same email is CONFLICT."""
    email = unique_email()
    create(call, email=email)
    err(call, W, req("create", {"name": unique_name(), "email": email}), "CONFLICT")
    assert len(rows_with_email(call, email)) == 1


def test_not_found_for_missing_id(call):
    """§3 NOT_FOUND: a returns = "one" op found no row."""
    err(call, R, req("read", {"id": MISSING_ID}), "NOT_FOUND")


def test_expired_deadline_is_not_executed(call):
    """§2: BEDS never executes a request whose x-beds-deadline has passed,
    and answers EXPIRED."""
    email = unique_email()
    err(call, W, req("create", {"name": unique_name(), "email": email}), "EXPIRED",
        headers={"x-beds-deadline": deadline_ms(-60)})
    create(call, email=email)  # succeeds: the expired create was not applied


def test_future_deadline_is_executed(call):
    """§2: a deadline that has not passed does not stop execution."""
    email = unique_email()
    reply = ok(call, W, req("create", {"name": unique_name(), "email": email}),
               headers={"x-beds-deadline": deadline_ms(60)})
    assert the_row(reply)["email"] == email


# --------------------------------------------------------------------------
# 3. batches
# --------------------------------------------------------------------------


def batch_results(reply, props, count):
    assert_envelope(reply, props)
    results = reply.get("results")
    assert isinstance(results, list), "batch reply needs results: %r" % (reply,)
    assert len(results) == count, reply
    return results


def test_batch_non_atomic_entries_succeed_or_fail_on_their_own(call):
    """§2: batch reply `results` holds one reply object per entry, in order;
    each entry succeeds or fails on its own."""
    taken = create(call)
    email_a, email_b = unique_email(), unique_email()
    body = {"batch": [
        req("create", {"name": unique_name("a"), "email": email_a}),
        req("create", {"name": unique_name("dup"), "email": taken["email"]}),
        req("create", {"name": unique_name("b"), "email": email_b}),
    ]}
    results = batch_results(*call(W, body), 3)
    assert_ok_entry(results[0])
    assert_error_entry(results[1], "CONFLICT")
    assert_ok_entry(results[2])
    row_a, row_b = the_row(results[0]), the_row(results[2])
    assert (row_a["email"], row_b["email"]) == (email_a, email_b)
    for row in (row_a, row_b):
        assert the_row(ok(call, R, req("read", {"id": row["id"]})))["email"] == row["email"]


def test_batch_read_entries_succeed_or_fail_on_their_own(call):
    """§2: per-entry results in order; a NOT_FOUND entry does not spoil the
    others."""
    row = create(call)
    body = {"batch": [
        req("read", {"id": row["id"]}),
        req("read", {"id": MISSING_ID}),
        req("read", {"id": row["id"]}),
    ]}
    results = batch_results(*call(R, body), 3)
    assert_ok_entry(results[0])
    assert_error_entry(results[1], "NOT_FOUND")
    assert_ok_entry(results[2])
    assert the_row(results[0])["id"] == row["id"]
    assert the_row(results[2])["email"] == row["email"]


def test_batch_atomic_conflict_applies_nothing(call):
    """§2: "atomic": true -> one database transaction, all or nothing."""
    taken = create(call)
    fresh = unique_email()
    body = {"atomic": True, "batch": [
        req("create", {"name": unique_name("first"), "email": fresh}),
        req("create", {"name": unique_name("dup"), "email": taken["email"]}),
    ]}
    reply, props = call(W, body)
    assert_envelope(reply, props)
    codes = []
    if reply["status"] == "error":
        codes.append(reply["error"]["code"])
    for entry in reply.get("results") or []:
        if entry.get("status") == "error":
            codes.append(entry["error"]["code"])
    assert "CONFLICT" in codes, "atomic batch must report the CONFLICT: %r" % (reply,)
    # Nothing applied: the first entry's email is still free.
    assert rows_with_email(call, fresh) == []
    create(call, email=fresh)


def test_batch_atomic_all_valid_applies_all(call):
    """§2: an atomic batch whose entries all succeed applies all of them."""
    email_a, email_b = unique_email(), unique_email()
    body = {"atomic": True, "batch": [
        req("create", {"name": unique_name("a"), "email": email_a}),
        req("create", {"name": unique_name("b"), "email": email_b}),
    ]}
    results = batch_results(*call(W, body), 2)
    assert_ok_entry(results[0])
    assert_ok_entry(results[1])
    assert the_row(results[0])["email"] == email_a
    assert the_row(results[1])["email"] == email_b
    assert len(rows_with_email(call, email_a)) == 1
    assert len(rows_with_email(call, email_b)) == 1


# --------------------------------------------------------------------------
# 4. dedup on message_id
# --------------------------------------------------------------------------


def test_repeated_message_id_is_applied_once(call):
    """§2: repeated delivery of the same message_id to a write operation must
    not apply it twice within the dedup window. Each request with reply_to
    still gets exactly one reply."""
    email, message_id = unique_email(), "ct-" + uuid.uuid4().hex
    body = req("create", {"name": unique_name(), "email": email})
    first = ok(call, W, body, message_id=message_id)
    second = ok(call, W, body, message_id=message_id)
    assert the_row(first)["id"] == the_row(second)["id"], (first, second)
    assert len(rows_with_email(call, email)) == 1


def test_back_to_back_duplicates_are_applied_once(beds, call):
    """§2: dedup also holds when both copies are queued at once; both
    requests are answered. (The UNIQUE email keeps the row count at one
    anyway, so the evidence is in the replies: a CONFLICT would mean the
    second copy was executed.)"""
    email, message_id = unique_email(), "ct-" + uuid.uuid4().hex
    body = req("create", {"name": unique_name(), "email": email})
    corrs = [beds.publish(W, body, message_id=message_id) for _ in range(2)]
    replies = [beds.wait(c) for c in corrs]
    for reply, props in replies:
        assert_envelope(reply, props)
    codes = [r["error"].get("code") for r, _ in replies if r["status"] == "error"]
    assert "CONFLICT" not in codes, "duplicate was executed twice: %r" % (replies,)
    oks = [r for r, _ in replies if r["status"] == "ok"]
    assert oks, "at least one copy must succeed: %r" % (replies,)
    assert len({the_row(r)["id"] for r in oks if r["data"]}) == 1, oks
    assert len(rows_with_email(call, email)) == 1


# --------------------------------------------------------------------------
# 5. fire-and-forget
# --------------------------------------------------------------------------


def test_fire_and_forget_request_is_executed(beds, call):
    """§2: without reply_to the request is fire-and-forget (still executed)."""
    email = unique_email()
    beds.fire_and_forget(W, req("create", {"name": unique_name("ff"), "email": email}))
    deadline = time.monotonic() + 15
    while True:
        found = rows_with_email(call, email)
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert len(found) == 1, "fire-and-forget create was not executed within 15 s"
