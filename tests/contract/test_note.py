"""BEDS acceptance tests for the MongoDB ``note`` sample domain and the v1.1
wire changes (written from shared/CONTRACT.md v1.1 only).

Two groups live here:

* ``note`` tests (CONTRACT §6 and the MongoDB specifics of §4, plus §2
  ``message_id`` dedup, duplicate keys and ``traceparent`` on note ops).
  They need a node that serves the ``note`` template and are switched on with
  ``BEDS_NOTE=1``.  Without it every one of them is reported SKIPPED with the
  reason "note domain not served: set BEDS_NOTE=1" (and conftest.py prints a
  loud summary section), never silently passed.
* v1.1 §2 wire checks that need no MongoDB (duplicate JSON keys at any depth
  -> BAD_PAYLOAD, header ``traceparent`` accepted).  They use the shipped
  ``usr`` domain (§5) like test_contract.py and run whenever BEDS_AMQP_URL is
  set.

Environment: BEDS_AMQP_URL, BEDS_PREFIX (see conftest.py), BEDS_NOTE=1.

Tests that write notes use a fresh random ``user_id`` per test, so runs and
tests never collide on a shared database; every title carries a random
suffix as well.  Reads go to rBroker (the replica pool, §4): where a read
follows a write, it is retried for a few seconds until it shows the write, so
replica lag cannot fail a test, while a read that never shows it still does.
"""

import datetime
import json
import os
import random
import re
import time
import uuid

import pytest

from contract_checks import (
    assert_envelope,
    assert_error,
    assert_error_entry,
    assert_ok,
    header,
    is_int,
)

R, W, M = "rBroker", "wBroker", "mBroker"

NOTE_SKIP_REASON = "note domain not served: set BEDS_NOTE=1"
NOTE_ON = os.environ.get("BEDS_NOTE", "").strip().lower() in ("1", "true", "yes", "on")
needs_note = pytest.mark.skipif(not NOTE_ON, reason=NOTE_SKIP_REASON)

SETTLE_S = 5.0  # how long a read after a write may lag (replica pool)


OID_RE = re.compile(r"\A[0-9a-f]{24}\Z")
RFC3339_RE = re.compile(
    r"\A(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?"
    r"([Zz]|[+-]\d{2}:\d{2})\Z"
)
TRACEPARENT_RE = re.compile(r"\A([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")

_rng = random.SystemRandom()


def eventually(fetch, done, timeout=SETTLE_S, interval=0.1):
    """Call fetch() until done(result) or timeout; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if done(result) or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def parse_rfc3339_utc(value):
    """CONTRACT §4: dates are RFC 3339 UTC. Returns an aware datetime."""
    assert isinstance(value, str), "date must be an RFC 3339 string: %r" % (value,)
    m = RFC3339_RE.match(value)
    assert m, "not RFC 3339: %r" % (value,)
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, offset = m.group(7), m.group(8)
    assert offset in ("Z", "z", "+00:00", "-00:00"), "not UTC: %r" % (value,)
    micro = int((frac[1:] + "000000")[:6]) if frac else 0
    # datetime() raises on impossible dates (month 13, day 32, ...).
    return datetime.datetime(year, month, day, hour, minute, second, micro,
                             tzinfo=datetime.timezone.utc)


def new_user_id():
    """A user_id no other test or run uses (int, >= 1, exact in a double)."""
    return _rng.randint(10 ** 12, 2 ** 53 - 1)


def unique_title(tag="note"):
    return "%s-%s" % (tag, uuid.uuid4().hex)


def missing_oid():
    """A well-formed object id that no document has: its timestamp part is
    0xffffffff (year 2106), which no ObjectId generated today carries."""
    return "ffffffff" + uuid.uuid4().hex[:16]


def traceparent():
    return "00-%s-%s-01" % (uuid.uuid4().hex, uuid.uuid4().hex[:16])


# --------------------------------------------------------------------------
# note helpers
# --------------------------------------------------------------------------

ABSENT = object()


def note_req(op, data, **extra):
    body = {"template": "note", "op": op, "data": data}
    body.update(extra)
    return body


def one_row(reply):
    assert len(reply["data"]) == 1, "expected exactly one row: %r" % (reply,)
    return reply["data"][0]


def assert_note(row, user_id, title, body=ABSENT, tags=ABSENT, note_id=None):
    """A note row (CONTRACT §4 rows + §6 fields)."""
    assert isinstance(row, dict), row
    assert "_id" not in row, "§4: _id is returned as id: %r" % (row,)
    assert isinstance(row.get("id"), str) and OID_RE.match(row["id"]), (
        "id must be 24 lowercase hex: %r" % (row,))
    if note_id is not None:
        assert row["id"] == note_id, row
    assert is_int(row.get("user_id")), "user_id must be a JSON integer: %r" % (row,)
    assert row["user_id"] == user_id, row
    assert row.get("title") == title, row
    if body is not ABSENT:
        assert "body" in row and row["body"] == body, row
    if tags is not ABSENT:
        assert "tags" in row and row["tags"] == tags, row
    assert "created" in row, "note rows carry created: %r" % (row,)
    parse_rfc3339_utc(row["created"])


def assert_unset_optional(row):
    """A note created without body/tags: the contract does not say whether
    the stored document then lacks the keys or holds an empty value; it must
    not invent content."""
    assert row.get("body", None) in (None, ""), row
    assert row.get("tags", None) in (None, []), row


class Notes:
    """Thin note-domain client over the suite's ``call`` fixture."""

    def __init__(self, call):
        self._call = call

    def send(self, broker, op, data, **kwargs):
        return self._call(broker, note_req(op, data), **kwargs)

    def ok(self, broker, op, data, **kwargs):
        reply, props = self.send(broker, op, data, **kwargs)
        assert_ok(reply, props)
        return reply

    def err(self, broker, op, data, code, **kwargs):
        reply, props = self.send(broker, op, data, **kwargs)
        assert_error(reply, props, code)
        return reply

    def create(self, user_id, title=None, **optional):
        title = unique_title() if title is None else title
        data = {"user_id": user_id, "title": title}
        data.update(optional)
        reply = self.ok(W, "create", data)
        assert reply.get("affected") == 1, "§4: affected = inserted count: %r" % (reply,)
        row = one_row(reply)
        assert_note(row, user_id, title, body=optional.get("body", ABSENT),
                    tags=optional.get("tags", ABSENT))
        return row

    def read_reply(self, note_id, until=None):
        """read on rBroker; retried while until(reply) is false (replica lag)."""
        def fetch():
            reply, props = self.send(R, "read", {"id": note_id})
            return reply, props
        reply, props = eventually(fetch, lambda rp: until is None or until(rp[0]))
        return reply, props

    def read(self, note_id, until=None):
        check = until or (lambda r: r.get("status") == "ok")
        reply, props = self.read_reply(note_id, until=check)
        assert_ok(reply, props)
        return one_row(reply)

    def read_missing(self, note_id):
        reply, props = self.read_reply(
            note_id, until=lambda r: r.get("status") == "error")
        assert_error(reply, props, "NOT_FOUND")

    def by_user(self, user_id, limit=None, expect_len=None):
        data = {"user_id": user_id}
        if limit is not None:
            data["limit"] = limit

        def fetch():
            return self.send(R, "by_user", data)

        def done(rp):
            reply = rp[0]
            return expect_len is None or (
                reply.get("status") == "ok" and len(reply.get("data") or []) == expect_len)

        reply, props = eventually(fetch, done)
        assert_ok(reply, props)
        for row in reply["data"]:
            assert row.get("user_id") == user_id, "by_user leaked another user: %r" % (row,)
        return reply["data"]

    def tag_counts(self, user_id, expect=None):
        def fetch():
            return self.send(R, "tag_counts", {"user_id": user_id})

        def done(rp):
            reply = rp[0]
            return expect is None or (
                reply.get("status") == "ok" and counts_of(reply["data"]) == expect)

        reply, props = eventually(fetch, done)
        assert_ok(reply, props)
        return reply["data"]


def counts_of(rows):
    return [(row.get("tag"), row.get("count")) for row in rows]


@pytest.fixture
def notes(request):
    """The note client; skips with the note reason before anything else."""
    if not NOTE_ON:
        pytest.skip(NOTE_SKIP_REASON)
    return Notes(request.getfixturevalue("call"))


@pytest.fixture
def uid():
    return new_user_id()


@pytest.fixture
def uid2():
    return new_user_id()


# --------------------------------------------------------------------------
# 1. create / read
# --------------------------------------------------------------------------


@needs_note
class TestCreateRead:
    def test_create_returns_the_stored_document(self, notes, uid):
        """§6 create: one row, the stored document with id (object_id: 24
        lowercase hex, §4), user_id, title, body, tags, created (RFC 3339
        UTC); §4 affected = inserted count."""
        title = unique_title("full")
        row = notes.create(uid, title, body="hello\nworld", tags=["a", "b"])
        assert_note(row, uid, title, body="hello\nworld", tags=["a", "b"])

    def test_create_without_body_and_tags(self, notes, uid):
        """§6: body and tags are optional on create."""
        title = unique_title("bare")
        row = notes.create(uid, title)
        assert_unset_optional(row)
        again = notes.read(row["id"])
        assert_note(again, uid, title, note_id=row["id"])
        assert_unset_optional(again)

    def test_create_with_empty_tags(self, notes, uid):
        """An empty array is an array of strings."""
        row = notes.create(uid, tags=[])
        assert notes.read(row["id"])["tags"] == []

    def test_ids_are_distinct(self, notes, uid):
        ids = {notes.create(uid)["id"] for _ in range(3)}
        assert len(ids) == 3, ids

    def test_read_by_id_returns_the_document(self, notes, uid):
        """§6 read (rBroker, returns one)."""
        created = notes.create(uid, body="b", tags=["x"])
        row = notes.read(created["id"])
        assert_note(row, uid, created["title"], body="b", tags=["x"], note_id=created["id"])
        assert parse_rfc3339_utc(row["created"]) == parse_rfc3339_utc(created["created"])

    def test_created_is_not_decreasing(self, notes, uid):
        first = notes.create(uid)
        time.sleep(0.05)
        second = notes.create(uid)
        assert parse_rfc3339_utc(second["created"]) >= parse_rfc3339_utc(first["created"])

    def test_read_missing_id_is_not_found(self, notes):
        """§4: returns = "one" with no document is NOT_FOUND."""
        notes.err(R, "read", {"id": missing_oid()}, "NOT_FOUND")

    def test_read_requires_id(self, notes):
        notes.err(R, "read", {}, "VALIDATION")

    def test_unknown_op(self, notes):
        notes.err(R, "frobnicate", {"id": missing_oid()}, "UNKNOWN_OPERATION")


BAD_IDS = [
    ("xyz", "short-string"),
    ("a" * 23, "23-hex"),
    ("a" * 25, "25-hex"),
    ("ABCDEF0123456789ABCDEF01", "uppercase-hex"),
    ("abcdef0123456789ABCDEF01", "mixed-case-hex"),
    ("g" * 24, "24-non-hex"),
    ("", "empty"),
    (" " + "a" * 23, "leading-space"),
    (42, "integer"),
    (None, "null"),
    (["a" * 24], "array"),
    ({"$ne": None}, "operator-ne"),
    ({"$oid": "a" * 24}, "extended-json-oid"),
]


@needs_note
class TestMalformedId:
    @pytest.mark.parametrize("bad", [b for b, _ in BAD_IDS], ids=[i for _, i in BAD_IDS])
    def test_read(self, notes, bad):
        """§4: object_id is 24 lowercase hex characters on the wire; anything
        else (including an operator object) is VALIDATION."""
        notes.err(R, "read", {"id": bad}, "VALIDATION")

    @pytest.mark.parametrize("bad", ["xyz", "A" * 24, {"$ne": None}, {"$exists": True}],
                             ids=["short", "uppercase", "ne", "exists"])
    def test_delete_does_not_touch_other_notes(self, notes, uid, bad):
        """A malformed id on delete is VALIDATION, and (an operator in it being
        only a value) no note is deleted."""
        keep = notes.create(uid)
        notes.err(W, "delete", {"id": bad}, "VALIDATION")
        notes.read(keep["id"])
        assert notes.ok(W, "delete", {"id": keep["id"]})["affected"] == 1

    @pytest.mark.parametrize("bad", ["xyz", "A" * 24, {"$ne": None}],
                             ids=["short", "uppercase", "ne"])
    def test_update_does_not_touch_other_notes(self, notes, uid, bad):
        keep = notes.create(uid, body="keep")
        notes.err(W, "update", {"id": bad, "title": unique_title("hijack")}, "VALIDATION")
        row = notes.read(keep["id"])
        assert (row["title"], row["body"]) == (keep["title"], "keep")


# --------------------------------------------------------------------------
# 2. field validation
# --------------------------------------------------------------------------


@needs_note
class TestValidation:
    @pytest.mark.parametrize("bad", [0, -1], ids=["zero", "negative"])
    def test_user_id_below_min(self, notes, bad):
        """§6: user_id is int, min 1."""
        notes.err(W, "create", {"user_id": bad, "title": unique_title()}, "VALIDATION")
        notes.err(R, "by_user", {"user_id": bad}, "VALIDATION")
        notes.err(R, "tag_counts", {"user_id": bad}, "VALIDATION")

    def test_user_id_min_is_accepted(self, notes):
        """min 1 means 1 is valid (read only: user 1 may be shared)."""
        notes.ok(R, "by_user", {"user_id": 1, "limit": 1})

    @pytest.mark.parametrize(
        "bad", ["5", 1.5, True, None, [5], {"$gt": 0}],
        ids=["string", "float", "bool", "null", "array", "operator"])
    def test_user_id_wrong_type(self, notes, bad):
        notes.err(W, "create", {"user_id": bad, "title": unique_title()}, "VALIDATION")
        notes.err(R, "by_user", {"user_id": bad}, "VALIDATION")
        notes.err(R, "tag_counts", {"user_id": bad}, "VALIDATION")

    def test_required_fields_of_create(self, notes, uid):
        notes.err(W, "create", {"title": unique_title()}, "VALIDATION")
        notes.err(W, "create", {"user_id": uid}, "VALIDATION")
        notes.err(W, "create", {"user_id": uid, "body": "b", "tags": []}, "VALIDATION")
        assert notes.by_user(uid) == []

    def test_required_fields_of_reads(self, notes):
        notes.err(R, "by_user", {}, "VALIDATION")
        notes.err(R, "by_user", {"limit": 5}, "VALIDATION")
        notes.err(R, "tag_counts", {}, "VALIDATION")

    def test_title_too_long_is_not_stored(self, notes, uid):
        """§6: title max_len 200."""
        title = "t" * 201
        notes.err(W, "create", {"user_id": uid, "title": title}, "VALIDATION")
        notes.create(uid, "t" * 200)  # also proves 200 is fine ...
        assert len(notes.by_user(uid, expect_len=1)) == 1  # ... and 201 was not stored

    def test_body_max_len(self, notes, uid):
        """§6: body max_len 10000."""
        title = unique_title("body")
        notes.err(W, "create", {"user_id": uid, "title": title, "body": "b" * 10001},
                  "VALIDATION")
        row = notes.create(uid, title, body="b" * 10000)  # not CONFLICT: nothing stored
        assert len(notes.read(row["id"])["body"]) == 10000

    @pytest.mark.parametrize("bad", [5, None, True, ["t"], {"t": 1}],
                             ids=["int", "null", "bool", "array", "object"])
    def test_title_wrong_type(self, notes, uid, bad):
        notes.err(W, "create", {"user_id": uid, "title": bad}, "VALIDATION")

    def test_body_wrong_type(self, notes, uid):
        notes.err(W, "create", {"user_id": uid, "title": unique_title(), "body": 5},
                  "VALIDATION")

    @pytest.mark.parametrize("bad", ["a", "", 5, True, {"a": "b"}],
                             ids=["string", "empty-string", "int", "bool", "object"])
    def test_tags_not_an_array(self, notes, uid, bad):
        """§6: tags is "json: an array of strings"; a non-array is the wrong
        type (§3 VALIDATION) and is not stored."""
        title = unique_title("tags")
        notes.err(W, "create", {"user_id": uid, "title": title, "tags": bad}, "VALIDATION")
        notes.create(uid, title, tags=["ok"])  # not CONFLICT: nothing was stored

    @pytest.mark.parametrize("bad", [[1], [None], [True], [["a"]], ["a", 2], [{"k": "v"}]],
                             ids=["int", "null", "bool", "nested-array", "mixed", "object"])
    def test_tags_array_of_non_strings(self, notes, uid, bad):
        """§6: tags is "json: an array of strings"; an array holding anything
        but strings is the wrong type (§3 VALIDATION) and is not stored.
        (Read of the contract: §6 fixes the field's shape, the §4 type `json`
        alone would not; see README.)"""
        title = unique_title("tags")
        notes.err(W, "create", {"user_id": uid, "title": title, "tags": bad}, "VALIDATION")
        notes.create(uid, title, tags=["ok"])

    def test_unknown_field_in_data(self, notes, uid):
        """§3: unknown field in data is VALIDATION (and nothing is stored)."""
        title = unique_title("unknown")
        notes.err(W, "create", {"user_id": uid, "title": title, "colour": "red"},
                  "VALIDATION")
        notes.err(W, "create", {"user_id": uid, "title": title, "$where": "1"},
                  "VALIDATION")
        notes.err(W, "create", {"user_id": uid, "title": title, "_id": "a" * 24},
                  "VALIDATION")
        created = notes.create(uid, title)
        notes.err(R, "read", {"id": created["id"], "colour": "red"}, "VALIDATION")

    @pytest.mark.parametrize("bad", [0, 1001, -1, "2", 2.5, True],
                             ids=["zero", "1001", "negative", "string", "float", "bool"])
    def test_limit_out_of_range_or_wrong_type(self, notes, uid, bad):
        """§6: limit is int, 1..1000."""
        notes.err(R, "by_user", {"user_id": uid, "limit": bad}, "VALIDATION")

    def test_limit_null_means_left_out(self, notes, uid):
        """The contract is silent on an explicit null for an optional field.
        BEDS reads null as "left out" (wiki/07-notes.md), on every store, so
        the default limit applies."""
        assert notes.ok(R, "by_user", {"user_id": uid, "limit": None})["data"] == []

    @pytest.mark.parametrize("good", [1, 1000])
    def test_limit_bounds_accepted(self, notes, uid, good):
        assert notes.ok(R, "by_user", {"user_id": uid, "limit": good})["data"] == []


# --------------------------------------------------------------------------
# 3. update
# --------------------------------------------------------------------------

UPDATE_ONE_FIELD = [
    ("title", lambda: unique_title("new")),
    ("body", lambda: "new body"),
    ("tags", lambda: ["new", "tags"]),
]


@needs_note
class TestUpdate:
    @pytest.mark.parametrize("field,value", [(f, v) for f, v in UPDATE_ONE_FIELD],
                             ids=[f for f, _ in UPDATE_ONE_FIELD])
    def test_update_one_field_leaves_the_others(self, notes, uid, field, value):
        """§4: a param left out of the request leaves the field unchanged;
        §6 update returns one row, the document after the update."""
        created = notes.create(uid, body="old body", tags=["old"])
        new = value()
        reply = notes.ok(W, "update", {"id": created["id"], field: new})
        assert reply.get("affected") == 1, "§4: matched-and-modified: %r" % (reply,)
        expected = {"title": created["title"], "body": "old body", "tags": ["old"]}
        expected[field] = new
        row = one_row(reply)
        assert_note(row, uid, expected["title"], body=expected["body"],
                    tags=expected["tags"], note_id=created["id"])
        assert parse_rfc3339_utc(row["created"]) == parse_rfc3339_utc(created["created"])
        again = notes.read(created["id"], until=lambda r: r.get("status") == "ok"
                           and r["data"] and r["data"][0].get(field) == new)
        assert_note(again, uid, expected["title"], body=expected["body"],
                    tags=expected["tags"], note_id=created["id"])

    def test_update_returns_document_after_update(self, notes, uid):
        created = notes.create(uid, body="b0", tags=["t0"])
        title = unique_title("after")
        row = one_row(notes.ok(W, "update", {"id": created["id"], "title": title,
                                             "body": "b1", "tags": ["t1", "t2"]}))
        assert_note(row, uid, title, body="b1", tags=["t1", "t2"], note_id=created["id"])

    def test_update_to_empty_tags(self, notes, uid):
        created = notes.create(uid, tags=["x"])
        row = one_row(notes.ok(W, "update", {"id": created["id"], "tags": []}))
        assert row["tags"] == []

    def test_update_missing_id_is_not_found(self, notes):
        notes.err(W, "update", {"id": missing_oid(), "title": unique_title()}, "NOT_FOUND")

    def test_update_requires_id(self, notes):
        notes.err(W, "update", {"title": unique_title()}, "VALIDATION")

    def test_update_validates_fields(self, notes, uid):
        created = notes.create(uid, body="keep", tags=["keep"])
        for data in ({"title": "t" * 201}, {"body": "b" * 10001}, {"tags": "x"},
                     {"title": 7}, {"colour": "red"}):
            data = dict(data, id=created["id"])
            notes.err(W, "update", data, "VALIDATION")
        row = notes.read(created["id"])
        assert (row["title"], row["body"], row["tags"]) == (created["title"], "keep", ["keep"])

    def test_update_tags_array_of_non_strings(self, notes, uid):
        """As on create: tags must be an array of strings (see README)."""
        created = notes.create(uid, tags=["keep"])
        notes.err(W, "update", {"id": created["id"], "tags": [1]}, "VALIDATION")
        assert notes.read(created["id"])["tags"] == ["keep"]

    def test_update_to_a_taken_title_is_conflict(self, notes, uid):
        """§6 unique (user_id, title) also holds on update; §4 duplicate key
        -> CONFLICT."""
        a = notes.create(uid)
        b = notes.create(uid)
        notes.err(W, "update", {"id": b["id"], "title": a["title"]}, "CONFLICT")
        assert notes.read(b["id"])["title"] == b["title"]

    def test_update_cannot_change_the_owner(self, notes, uid, uid2):
        """user_id is not a param of update (§6): sending it is rejected, or
        at the very least does not move the note to another user."""
        created = notes.create(uid)
        reply, props = notes.send(W, "update", {"id": created["id"], "user_id": uid2})
        assert_envelope(reply, props)
        if reply["status"] == "error":
            assert_error_entry(reply, "VALIDATION")
        assert notes.read(created["id"])["user_id"] == uid
        assert notes.by_user(uid2) == []


# --------------------------------------------------------------------------
# 4. delete
# --------------------------------------------------------------------------


@needs_note
class TestDelete:
    def test_delete_then_repeat(self, notes, uid):
        """§6 delete: none, affected = 1, or 0 when there was no such note;
        §3 data is an (empty) array."""
        created = notes.create(uid)
        first = notes.ok(W, "delete", {"id": created["id"]})
        assert first.get("affected") == 1, first
        assert first["data"] == [], first
        second = notes.ok(W, "delete", {"id": created["id"]})
        assert second.get("affected") == 0, second
        assert second["data"] == [], second
        notes.read_missing(created["id"])
        assert notes.by_user(uid, expect_len=0) == []

    def test_delete_never_existing_id(self, notes):
        reply = notes.ok(W, "delete", {"id": missing_oid()})
        assert reply.get("affected") == 0 and reply["data"] == [], reply

    def test_delete_frees_the_title(self, notes, uid):
        created = notes.create(uid)
        assert notes.ok(W, "delete", {"id": created["id"]})["affected"] == 1
        again = notes.create(uid, created["title"])
        assert again["id"] != created["id"]

    def test_delete_requires_id(self, notes):
        notes.err(W, "delete", {}, "VALIDATION")


# --------------------------------------------------------------------------
# 5. by_user
# --------------------------------------------------------------------------


@needs_note
class TestByUser:
    def test_newest_first_and_limit(self, notes, uid, uid2):
        """§6 by_user: many, newest first; limit caps the rows. Notes are
        created more than a second apart so 'newest' is unambiguous whatever
        the resolution of `created` or of the ObjectId timestamp."""
        made = []
        for i in range(3):
            if i:
                time.sleep(1.1)
            made.append(notes.create(uid, unique_title("n%d" % i)))
        notes.create(uid2)  # another user's note never shows up
        newest_first = [row["id"] for row in reversed(made)]

        rows = notes.by_user(uid, expect_len=3)
        assert [row["id"] for row in rows] == newest_first, rows
        stamps = [parse_rfc3339_utc(row["created"]) for row in rows]
        assert stamps == sorted(stamps, reverse=True), rows
        for row, src in zip(rows, reversed(made)):
            assert_note(row, uid, src["title"], note_id=src["id"])

        assert [r["id"] for r in notes.by_user(uid, limit=2)] == newest_first[:2]
        assert [r["id"] for r in notes.by_user(uid, limit=1)] == newest_first[:1]
        assert [r["id"] for r in notes.by_user(uid, limit=1000)] == newest_first

    def test_limit_two_returns_two(self, notes, uid):
        for _ in range(3):
            notes.create(uid)
        notes.by_user(uid, expect_len=3)
        assert len(notes.by_user(uid, limit=2)) == 2

    def test_default_limit_is_100(self, notes, uid):
        """§6: limit defaults to 100."""
        for i in range(101):
            notes.create(uid, "bulk-%03d-%s" % (i, uuid.uuid4().hex[:8]))
        assert len(notes.by_user(uid, limit=1000, expect_len=101)) == 101
        assert len(notes.by_user(uid)) == 100

    def test_unknown_user_is_empty(self, notes, uid):
        """§3: data is an empty array when there are no rows."""
        assert notes.by_user(uid) == []


# --------------------------------------------------------------------------
# 6. tag_counts
# --------------------------------------------------------------------------


@needs_note
class TestTagCounts:
    def test_counts_desc_then_tag_asc(self, notes, uid, uid2):
        """§6 tag_counts: {tag, count} over that user's notes, count
        descending, then tag ascending."""
        for tags in (["zeta", "beta"], ["alpha", "zeta", "delta"], ["zeta", "alpha"],
                     ["gamma"], ["delta", "beta", "alpha"], []):
            notes.create(uid, tags=tags)
        notes.create(uid)  # no tags at all
        notes.create(uid2, tags=["alpha", "omega", "zeta"])  # another user
        expected = [("alpha", 3), ("zeta", 3), ("beta", 2), ("delta", 2), ("gamma", 1)]
        rows = notes.tag_counts(uid, expect=expected)
        assert counts_of(rows) == expected, rows
        for row in rows:
            assert isinstance(row["tag"], str) and is_int(row["count"]), row

    def test_counts_follow_updates_and_deletes(self, notes, uid):
        a = notes.create(uid, tags=["x", "y"])
        b = notes.create(uid, tags=["x"])
        notes.tag_counts(uid, expect=[("x", 2), ("y", 1)])
        notes.ok(W, "update", {"id": a["id"], "tags": ["y"]})
        notes.ok(W, "delete", {"id": b["id"]})
        assert counts_of(notes.tag_counts(uid, expect=[("y", 1)])) == [("y", 1)]

    def test_unknown_user_is_empty(self, notes, uid):
        assert notes.tag_counts(uid) == []


# --------------------------------------------------------------------------
# 7. unique (user_id, title)
# --------------------------------------------------------------------------


@needs_note
class TestConflict:
    def test_same_title_same_user_is_conflict(self, notes, uid):
        """§6: unique index on (user_id, title) -> CONFLICT (§4), not stored."""
        first = notes.create(uid, body="first")
        notes.err(W, "create", {"user_id": uid, "title": first["title"], "body": "second"},
                  "CONFLICT")
        rows = notes.by_user(uid, expect_len=1)
        assert [(r["id"], r["body"]) for r in rows] == [(first["id"], "first")]

    def test_same_title_other_user_is_fine(self, notes, uid, uid2):
        first = notes.create(uid)
        other = notes.create(uid2, first["title"])
        assert other["id"] != first["id"]


# --------------------------------------------------------------------------
# 8. values are only values (§4)
# --------------------------------------------------------------------------

INJECTED_TAGS = [
    ([{"$gt": ""}], "dollar-key-in-array"),
    ({"$ne": None}, "dollar-key-top"),
    (["a", {"x.y": "b"}], "dotted-key-in-array"),
    ({"a.b": "c"}, "dotted-key-top"),
    ([{"ok": {"$where": "1"}}], "dollar-key-nested"),
    ([{"ok": [{"deep.er": 1}]}], "dotted-key-nested"),
    ([{"$": 1}], "bare-dollar-key"),
    ([{".": 1}], "bare-dot-key"),
]

LITERAL_STRINGS = [
    "$where",
    '{"$gt": ""}',
    "$param:body",
    "$param:user_id",
    "$$ROOT",
    "$set",
    "a.b.c",
    "Ünïcødé ✓ 日本語 \"quoted\" \\ back",
]


@needs_note
class TestInjection:
    @pytest.mark.parametrize("bad", [b for b, _ in INJECTED_TAGS],
                             ids=[i for _, i in INJECTED_TAGS])
    def test_operator_keys_in_json_field_on_create(self, notes, uid, bad):
        """§4: a json field whose value holds any object key starting with $
        or containing . is VALIDATION (at any depth); nothing is stored."""
        title = unique_title("inj")
        notes.err(W, "create", {"user_id": uid, "title": title, "tags": bad}, "VALIDATION")
        notes.create(uid, title, tags=["clean"])  # not CONFLICT: nothing stored

    @pytest.mark.parametrize("bad", [b for b, _ in INJECTED_TAGS[:4]],
                             ids=[i for _, i in INJECTED_TAGS[:4]])
    def test_operator_keys_in_json_field_on_update(self, notes, uid, bad):
        created = notes.create(uid, tags=["clean"])
        notes.err(W, "update", {"id": created["id"], "tags": bad}, "VALIDATION")
        assert notes.read(created["id"])["tags"] == ["clean"]

    @pytest.mark.parametrize("text", LITERAL_STRINGS)
    def test_title_and_body_are_stored_literally(self, notes, uid, text):
        """§4: a string is never parsed as an operator (nor as a template
        "$param:" reference): stored and read back verbatim."""
        row = notes.create(uid, text, body=text)
        assert (row["title"], row["body"]) == (text, text)
        again = notes.read(row["id"])
        assert (again["title"], again["body"]) == (text, text)
        listed = notes.by_user(uid, expect_len=1)
        assert [(r["title"], r["body"]) for r in listed] == [(text, text)]

    def test_literal_title_on_update(self, notes, uid):
        created = notes.create(uid)
        for text in ("$where", '{"$gt": ""}', "$param:title"):
            row = one_row(notes.ok(W, "update", {"id": created["id"], "title": text}))
            assert row["title"] == text, row
            assert notes.read(created["id"], until=lambda r: r.get("status") == "ok"
                              and r["data"] and r["data"][0].get("title") == text
                              )["title"] == text

    def test_operator_like_tag_strings_are_values(self, notes, uid):
        """§4 forbids $ and . only in object keys; strings in the tags array
        are plain values, stored and counted verbatim."""
        tags = ["$where", "a.b", "$param:title", "{\"$gt\": \"\"}"]
        row = notes.create(uid, tags=tags)
        assert notes.read(row["id"])["tags"] == tags
        expected = sorted((t, 1) for t in tags)
        assert counts_of(notes.tag_counts(uid, expect=expected)) == expected

    def test_operator_title_does_not_match_other_notes(self, notes, uid):
        """A second note titled like an operator is a plain title: no
        CONFLICT with the first note's different title."""
        notes.create(uid, unique_title("plain"))
        notes.create(uid, '{"$ne": null}')
        notes.create(uid, "$exists")
        assert len(notes.by_user(uid, expect_len=3)) == 3


# --------------------------------------------------------------------------
# 9. brokers
# --------------------------------------------------------------------------


@needs_note
class TestBrokers:
    def test_create_on_rbroker_is_wrong_broker_and_not_executed(self, notes, uid):
        """§3 WRONG_BROKER: a write sent to rBroker."""
        title = unique_title("wb")
        notes.err(R, "create", {"user_id": uid, "title": title}, "WRONG_BROKER")
        notes.create(uid, title)  # not CONFLICT: the rBroker create did nothing

    @pytest.mark.parametrize("broker,op", [
        (R, "update"), (R, "delete"), (W, "read"), (W, "by_user"), (W, "tag_counts"),
        (M, "create"), (M, "read"), (M, "by_user"),
    ])
    def test_other_wrong_pairs(self, notes, uid, broker, op):
        """§4: read -> rBroker, write -> wBroker; note has no meta ops."""
        created = notes.create(uid, body="keep")
        data = {
            "create": {"user_id": uid, "title": unique_title()},
            "read": {"id": created["id"]},
            "update": {"id": created["id"], "body": "changed"},
            "delete": {"id": created["id"]},
            "by_user": {"user_id": uid},
            "tag_counts": {"user_id": uid},
        }[op]
        notes.err(broker, op, data, "WRONG_BROKER")
        assert notes.read(created["id"])["body"] == "keep"


# --------------------------------------------------------------------------
# 10. v1.1 §2 on note: message_id dedup, duplicate keys, traceparent
# --------------------------------------------------------------------------


@needs_note
class TestNoteV11:
    def test_repeated_message_id_create_is_applied_once(self, notes, uid):
        """§2: a repeated message_id on a write is not applied twice and gets
        the first execution's reply (not CONFLICT from a second insert)."""
        mid = "ct-note-" + uuid.uuid4().hex
        data = {"user_id": uid, "title": unique_title("dedup")}
        first = notes.ok(W, "create", data, message_id=mid)
        second = notes.ok(W, "create", data, message_id=mid)
        assert one_row(first)["id"] == one_row(second)["id"], (first, second)
        assert len(notes.by_user(uid, expect_len=1)) == 1

    def test_repeated_message_id_delete_gets_first_reply(self, notes, uid):
        """§2: the repeat gets the first execution's reply: affected 1, not
        the 0 a second execution would report."""
        created = notes.create(uid)
        mid = "ct-note-" + uuid.uuid4().hex
        first = notes.ok(W, "delete", {"id": created["id"]}, message_id=mid)
        second = notes.ok(W, "delete", {"id": created["id"]}, message_id=mid)
        assert first.get("affected") == 1 and second.get("affected") == 1, (first, second)
        assert second["data"] == first["data"] == []

    def test_duplicate_key_in_note_data_is_bad_payload(self, call, notes, uid):
        """§2: a key twice in the same object, at any depth -> BAD_PAYLOAD,
        and neither reading is acted on."""
        t1, t2 = unique_title("dup1"), unique_title("dup2")
        raw = ('{"template":"note","op":"create","data":{"user_id":%d,"title":%s,'
               '"title":%s}}' % (uid, json.dumps(t1), json.dumps(t2))).encode()
        reply, props = call(W, raw)
        assert_error(reply, props, "BAD_PAYLOAD")
        notes.create(uid, t1)
        notes.create(uid, t2)

    def test_duplicate_key_inside_json_field_is_bad_payload(self, call, notes, uid):
        raw = ('{"template":"note","op":"create","data":{"user_id":%d,"title":"%s",'
               '"tags":[{"k":"a","k":"b"}]}}' % (uid, unique_title())).encode()
        reply, props = call(W, raw)
        assert_error(reply, props, "BAD_PAYLOAD")

    def test_traceparent_is_accepted(self, notes, uid):
        """§2: header traceparent (W3C Trace Context) is optional and
        accepted; if BEDS passes one back on the reply, it is the caller's
        trace."""
        tp = traceparent()
        reply, props = notes.send(W, "create", {"user_id": uid, "title": unique_title()},
                                  headers={"traceparent": tp})
        assert_ok(reply, props)
        assert_same_trace(props, tp)
        row = one_row(reply)
        tp2 = traceparent()
        reply, props = notes.send(R, "read", {"id": row["id"]}, headers={"traceparent": tp2})
        if reply.get("status") != "ok":  # replica lag: retry without the header check
            notes.read(row["id"])
        else:
            assert_same_trace(props, tp2)


# --------------------------------------------------------------------------
# 11. v1.1 §2 wire checks on the usr domain (no BEDS_NOTE needed)
# --------------------------------------------------------------------------

USR_MISSING_ID = 2 ** 62


def assert_same_trace(props, sent):
    back = header(props, "traceparent")
    if back is None:
        return
    m = TRACEPARENT_RE.match(back)
    assert m, "reply traceparent is not W3C: %r" % (back,)
    assert m.group(2) == TRACEPARENT_RE.match(sent).group(2), (
        "reply traceparent %r is not in the caller's trace %r" % (back, sent))


def unique_email():
    return "ct-%s@example.org" % uuid.uuid4().hex


def usr_create_ok(call, email):
    reply, props = call(W, {"template": "usr", "op": "create",
                            "data": {"name": "ct-v11", "email": email}})
    assert_ok(reply, props)
    assert one_row(reply).get("email") == email, reply
    return one_row(reply)


DUP_BODIES = [
    ('{"template":"usr","template":"usr","op":"read","data":{"id":%d}}', "template-twice"),
    ('{"template":"usr","op":"read","op":"read","data":{"id":%d}}', "op-twice"),
    ('{"template":"usr","op":"read","data":{"id":1},"data":{"id":%d}}', "data-twice"),
    ('{"template":"usr","op":"read","data":{"id":%d,"id":%d}}', "data-key-same-value"),
    ('{"template":"usr","op":"read","data":{"id":"x","id":%d}}', "data-key-valid-last"),
    ('{"template":"usr","op":"read","data":{"id":%d,"id":"x"}}', "data-key-valid-first"),
    ('{"template":"usr","op":"read","data":{"id":%d,"\\u0069d":%d}}', "escaped-key"),
    ('{"template":"usr","op":"read","data":{"id":%d},"context":"a","context":"b"}',
     "context-twice"),
    ('{"batch":[{"template":"usr","op":"read","data":{"id":%d,"id":%d}}]}',
     "inside-batch-entry"),
    ('{"batch":[{"template":"usr","op":"read","data":{"id":%d}}],'
     '"batch":[{"template":"usr","op":"read","data":{"id":%d}}]}', "batch-twice"),
]


@pytest.mark.parametrize("template", [b for b, _ in DUP_BODIES], ids=[i for _, i in DUP_BODIES])
def test_duplicate_json_key_is_bad_payload(call, template):
    """§2 v1.1: a key that appears twice in the same object, at any depth, is
    BAD_PAYLOAD (whatever the values, even equal ones)."""
    raw = template.replace("%d", str(USR_MISSING_ID)).encode()
    reply, props = call(R, raw)
    assert_error(reply, props, "BAD_PAYLOAD")


def test_duplicate_json_key_in_a_write_is_not_executed(call):
    """§2 v1.1: BEDS never acts on either reading of a duplicated key."""
    e1, e2 = unique_email(), unique_email()
    raw = ('{"template":"usr","op":"create","data":{"name":"ct-dup",'
           '"email":"%s","email":"%s"}}' % (e1, e2)).encode()
    reply, props = call(W, raw)
    assert_error(reply, props, "BAD_PAYLOAD")
    usr_create_ok(call, e1)  # not CONFLICT: neither email was stored
    usr_create_ok(call, e2)


def test_same_key_in_different_objects_is_not_a_duplicate(call):
    """Only a key twice in the *same* object is a duplicate: sibling batch
    entries with identical keys are fine."""
    raw = ('{"batch":[{"template":"usr","op":"read","data":{"id":%d}},'
           '{"template":"usr","op":"read","data":{"id":%d}}]}'
           % (USR_MISSING_ID, USR_MISSING_ID)).encode()
    reply, props = call(R, raw)
    assert_envelope(reply, props)
    if reply["status"] == "error":
        assert reply["error"].get("code") != "BAD_PAYLOAD", reply
    results = reply.get("results")
    assert isinstance(results, list) and len(results) == 2, reply
    for entry in results:
        assert_error_entry(entry, "NOT_FOUND")


def test_traceparent_header_is_accepted(call):
    """§2 v1.1: the optional W3C traceparent header does not change the
    outcome of a request."""
    email = unique_email()
    tp = traceparent()
    reply, props = call(W, {"template": "usr", "op": "create",
                            "data": {"name": "ct-tp", "email": email}},
                        headers={"traceparent": tp})
    assert_ok(reply, props)
    assert one_row(reply).get("email") == email
    assert_same_trace(props, tp)
    tp2 = traceparent()
    reply, props = call(R, {"template": "usr", "op": "read",
                            "data": {"id": USR_MISSING_ID}},
                        headers={"traceparent": tp2})
    assert_error(reply, props, "NOT_FOUND")
    assert_same_trace(props, tp2)


def test_traceparent_with_tracestate_is_accepted(call):
    tp = traceparent()
    reply, props = call(R, {"template": "usr", "op": "read", "data": {"id": USR_MISSING_ID}},
                        headers={"traceparent": tp, "tracestate": "ct=1"})
    assert_error(reply, props, "NOT_FOUND")
    assert_same_trace(props, tp)
