"""Seed data for the observer's test: events (msLogs), counter windows
(msGraphs) and heartbeats (msNodes), all relative to `now`. check.py
computes every expected count from the same lists, so the two cannot drift."""
from datetime import datetime, timedelta, timezone

NODES = ["app-1", "app-2", "segundo"]
BROKERS = ["rBroker", "wBroker", "mBroker"]
TEMPLATES = ["usr", "ord", "inv", "note"]
OPS = ["get", "create", "update", "list", "delete"]
CODES = ["NOT_FOUND", "VALIDATION", "TIMEOUT", "DB_UNAVAILABLE"]
HOSTILE_TEMPLATE = '<script>alert("x")</script>'
HOSTILE_OP = '"><img src=x onerror=alert(1)>'
HOSTILE_NODE = "<b>n</b>"
HOSTILE_BROKER = '"><svg onload=alert(1)>'
STAR_TEMPLATE = "inv*"  # beds dlq would read the * as a wildcard
BULK = 200  # with the rest, more than the 200 rows a page may hold


def dt(ms):
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def eid(ms, n):
    """A UUIDv7-shaped id: time first, like BEDS's."""
    h = f"{ms:012x}"
    return f"{h[:8]}-{h[8:12]}-7{n % 4096:03x}-8{(n // 4096) % 4096:03x}-{n:012x}"


def event(ms, n, **kw):
    i = eid(ms, n)
    doc = {
        "_id": i, "event_id": i, "parent_event_id": None, "root_event_id": i, "kind": "request",
        "ts": dt(ms), "node": "app-1", "role": "appServer", "broker": "rBroker", "template": "usr",
        "op": "get", "context": None, "status": "ok", "code": None, "message": None,
        "elapsed_us": 1000, "attempt": 1, "message_id": f"m-{n}", "user_id": "app", "traceparent": None,
    }
    doc.update(kw)
    return doc


def build(now_ms):
    """Returns (events, graphs, nodes, names) where names holds the ids the checks ask for."""
    ev = []
    start = now_ms - 55 * 60 * 1000
    for n in range(BULK):
        ms = start + n * 16000 + n  # distinct, increasing, all in the past
        err = n % 7 == 3
        code = CODES[(n // 7) % 4] if err else None
        ev.append(event(
            ms, n, node=NODES[n % 3], role="segundo" if n % 3 == 2 else "appServer",
            broker=BROKERS[(n // 3) % 3], template=TEMPLATES[n % 4], op=OPS[n % 5],
            status="error" if err else "ok", code=code, message=f"failed: {code}" if err else None,
            elapsed_us=200 + (n * 37) % 5000, outcome="parked" if code == "DB_UNAVAILABLE" else None,
        ))
    # a chain: root -> child -> grandchild (an error), and a batch under the root with 3 entries
    r = now_ms - 30 * 60 * 1000 + 500
    root = event(r, 1001, node="app-1", broker="wBroker", template="ord", op="create", elapsed_us=1500)
    rid = root["_id"]
    child = event(r + 5, 1002, node="app-2", broker="rBroker", template="inv", op="reserve", elapsed_us=2000,
                  parent_event_id=rid, root_event_id=rid, message_id="m-shared")
    grand = event(r + 15, 1003, node="app-1", broker="wBroker", template="pay", op="charge", elapsed_us=30000,
                  parent_event_id=child["_id"], root_event_id=rid, status="error", code="TIMEOUT",
                  message="gave up after 30 ms")
    batch = event(r + 20, 1004, node="app-2", broker="wBroker", template="ord", op="batch", elapsed_us=4000,
                  parent_event_id=rid, root_event_id=rid)
    entries = []
    for k in range(3):
        e = event(r + 20, 1005 + k, node="app-2", broker="wBroker", template="ord",
                  op=["create", "update", "create"][k], elapsed_us=900 + k, parent_event_id=batch["_id"],
                  root_event_id=rid, entry=k, message_id=None,
                  status="error" if k == 1 else "ok", code="VALIDATION" if k == 1 else None)
        e["_id"] = e["event_id"] = f"{batch['_id']}.{k}"
        entries.append(e)
    ev += [root, child, grand, batch] + entries
    ev[10]["message_id"] = "m-shared"  # a second event with the shared message id
    # hostile client strings
    hostile = event(now_ms - 20 * 60 * 1000, 2001, node="app-1", broker="wBroker", template=HOSTILE_TEMPLATE,
                    op=HOSTILE_OP, status="error", code="DB_UNAVAILABLE", message=HOSTILE_TEMPLATE + HOSTILE_OP,
                    outcome="parked")
    ev.append(hostile)
    # one failure repeated, so a group holds several events (5 parked of 6)
    for k in range(6):
        ev.append(event(now_ms - (40 - k) * 60 * 1000 + 11, 2100 + k, node="app-2", broker="mBroker", template="note",
                        op=["create", "update"][k % 2], status="error", code="DB_UNAVAILABLE",
                        message="database docs unavailable", outcome="parked" if k else "retry", attempt=1 + k % 3))
    # a node and a broker with hostile names: in the events, the counter windows and the heartbeats
    ev.append(event(now_ms - 14 * 60 * 1000 + 17, 2400, node=HOSTILE_NODE, broker=HOSTILE_BROKER, status="error",
                    code="OVERLOADED", message="slow", outcome="parked"))
    # parked failures whose dlq line needs care: no template (an empty --filter), a * in the template (no line)
    ev.append(event(now_ms - 17 * 60 * 1000 + 13, 2200, node="app-1", broker="mBroker", template=None, op=None,
                    status="error", code="BAD_MESSAGE", message="not a request", outcome="parked"))
    ev.append(event(now_ms - 16 * 60 * 1000 + 13, 2201, node="app-2", broker="wBroker", template=STAR_TEMPLATE,
                    op="create", status="error", code="VALIDATION", message="bad field", outcome="parked"))
    ev.append(event(now_ms - 19 * 60 * 1000, 2002, node="app-2", broker="rBroker", template=HOSTILE_TEMPLATE,
                    op="get", message_id=HOSTILE_OP))
    # lifecycle and admin events
    for k, (node, op) in enumerate([("app-1", "ipl"), ("app-2", "ipl"), ("segundo", "drain"), ("segundo", "stop")]):
        ev.append(event(now_ms - (50 - k) * 60 * 1000 + 7, 3000 + k, kind="lifecycle", node=node, broker=None,
                        template=None, op=op, elapsed_us=50000, message_id=None, user_id=None))
    for k, op in enumerate(["pause", "resume"]):
        ev.append(event(now_ms - (10 - k) * 60 * 1000 + 9, 4000 + k, kind="admin", node="adm", role="admin",
                        broker="adminBrokerIn", template="admin", op=op, user_id="ops", elapsed_us=800))

    # bad data: a 2-cycle (each the other's parent) under a root id no event has
    cyc = [event(now_ms - 12 * 60 * 1000 + k * 3, 2300 + k, node="app-1", broker="rBroker", template="usr", op="get",
                 root_event_id="cycle-root") for k in range(2)]
    cyc[0]["parent_event_id"], cyc[1]["parent_event_id"] = cyc[1]["_id"], cyc[0]["_id"]
    ev += cyc

    # three more events sharing the ts of the 50th newest: a tie across the first page's boundary
    at_boundary = sorted(ev, key=lambda e: e["ts"], reverse=True)[49]
    ties = []
    for k in range(3):
        e = event(round(at_boundary["ts"].timestamp() * 1000), 5000 + k, node="app-2", broker="rBroker", template="usr", op="list", elapsed_us=300 + k)
        e["ts"] = at_boundary["ts"]
        ties.append(e)
    ev += ties

    graphs = []
    for node in ["app-1", "app-2"]:
        for w in range(60):
            end = now_ms - w * 60000 - 1000
            brokers = []
            for b, broker in enumerate(["rBroker", "wBroker"]):
                req = 600 + 40 * ((w + b * 7) % 11) + (200 if node == "app-2" else 0)
                k = b + (2 if node == "app-2" else 0)  # four distinct latency levels
                brokers.append({"broker": broker, "requests": req, "errors": (w + b) % 5,
                                "p50_us": 700 + 30 * (w % 9) + 350 * k, "p95_us": 3000 + 150 * (w % 13) + 1100 * k,
                                "p99_us": 7000 + 400 * (w % 17) + 2500 * k, "max_us": 30000})
            if node == "app-1" and w % 10 == 0:  # mBroker is idle (left out) in 9 windows of 10
                brokers.append({"broker": "mBroker", "requests": 120, "errors": 0, "p50_us": 900, "p95_us": 1900,
                                "p99_us": 2900, "max_us": 3000})
            graphs.append({"node": node, "role": "appServer", "ts": dt(end), "window_ms": 60000,
                           "in_flight": w % 4, "brokers": brokers})
    graphs.append({"node": HOSTILE_NODE, "role": "appServer", "ts": dt(now_ms - 5 * 60000), "window_ms": 60000,
                   "in_flight": 0, "brokers": [{"broker": HOSTILE_BROKER, "requests": 42, "errors": 1, "p50_us": 800,
                                                "p95_us": 1600, "p99_us": 2400, "max_us": 3000}]})

    def nodedoc(name, role, brokers, last_ago, alive, missing_after=15000):
        return {"_id": name, "node": name, "role": role, "brokers": brokers, "version": "0.9.0",
                "templates": "6f2a0c9d11b3", "started": dt(now_ms - 3 * 3600 * 1000),
                "last_seen": dt(now_ms - last_ago), "alive": alive, "missing_after_ms": missing_after}
    nodes = [nodedoc("app-1", "appServer", ["rBroker", "wBroker"], 2000, True, 300000),
             nodedoc("app-2", "appServer", ["rBroker", "wBroker"], 10 * 60 * 1000, True),
             nodedoc("segundo", "segundo", ["mBroker"], 3600 * 1000, False),
             nodedoc(HOSTILE_NODE, "appServer", [HOSTILE_BROKER], 1000, True, 300000)]
    names = {"root": rid, "child": child["_id"], "grand": grand["_id"], "batch": batch["_id"],
             "entries": [e["_id"] for e in entries], "hostile": hostile["_id"],
             "ties": [at_boundary["_id"]] + [e["_id"] for e in ties], "cycle": [e["_id"] for e in cyc]}
    return ev, graphs, nodes, names


def insert(db, now_ms):
    ev, graphs, nodes, names = build(now_ms)
    db.msLogs.insert_many(ev)
    db.msGraphs.insert_many(graphs)
    db.msNodes.insert_many(nodes)
    for keys in (["root_event_id", "ts"], ["template", "op", "ts"], ["status", "code", "ts"], ["node", "ts"]):
        db.msLogs.create_index([(k, -1 if k == "ts" and keys[0] != "root_event_id" else 1) for k in keys])
    db.msLogs.create_index("message_id")
    db.msGraphs.create_index([("node", 1), ("ts", -1)])
    return ev, graphs, nodes, names
