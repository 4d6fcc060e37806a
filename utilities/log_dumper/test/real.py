"""The observer over events a real BEDS node wrote (not seeded by hand):
run by utilities/dev after the contract suite, on that run's database, so a
drift between BEDS's event documents and what the observer reads shows.

    real.py URL EXPECTED_TEMPLATE MONGO_PORT DB
"""
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone

import pymongo

URL, TEMPLATE, PORT, DB = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
LOGS = pymongo.MongoClient(f"mongodb://127.0.0.1:{PORT}/?directConnection=true",
                           serverSelectionTimeoutMS=5000)[DB]["msLogs"]
failed = 0


def check(cond, what):
    global failed
    print(("ok - " if cond else "not ok - ") + "real events: " + what)
    failed += 0 if cond else 1


def get(query):
    try:
        with urllib.request.urlopen(URL + "/?" + query, timeout=15) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def clean(body):
    return not re.search(r"(Warning|Notice|Fatal error|Deprecated|Stack trace)\b", body)


def first_page(query, match):
    """Page 1 must be exactly the events matching `match` at or after its
    last row's time (none missing, none extra), and hold at least 200 or all."""
    st, body = get(urllib.parse.urlencode({"page": "events", "limit": 200, **query}))
    rows = re.findall(r'<tr class="ev[^"]*" data-id="([^"]+)" data-ts="(\d+)"', body)
    total = LOGS.count_documents(match)
    if not rows:
        return st, body, [], False  # a real node wrote events: an empty page is wrong
    oldest = datetime.fromtimestamp(min(int(t) for _, t in rows) / 1000, tz=timezone.utc)
    want = {d["_id"] for d in LOGS.find({**match, "ts": {"$gte": oldest}}, {"_id": 1})}
    ok = st == 200 and clean(body) and {i for i, _ in rows} == want and len(rows) >= min(200, total)
    return st, body, [i for i, _ in rows], ok


st, body, ids, ok = first_page({}, {})
check(ok, f"the events page holds exactly the newest events ({len(ids)} rows of {LOGS.count_documents({})})")
_, _, tids, ok = first_page({"template": TEMPLATE}, {"template": TEMPLATE})
check(ok, f"the template filter holds exactly the newest {TEMPLATE} events ({len(tids)} rows)")
st, body = get(urllib.parse.urlencode({"page": "events", "status": "error", "limit": 200}))
check(st == 200 and clean(body), "the status filter answers")
# Every event's own page, lineage included, renders cleanly (at most 40).
bad = []
for i in ids[:40]:
    st, body = get(urllib.parse.urlencode({"page": "event", "id": i}))
    if st != 200 or not clean(body) or "Chain" not in body:
        bad.append((i, st))
check(not bad, f"each event's page and chain render ({min(len(ids), 40)} pages; bad: {bad[:3]})")
for page in ("failures", "graphs", "nodes"):
    st, body = get(f"page={page}")
    check(st == 200 and clean(body), f"the {page} page answers")
# The counter windows and node records the admin node beside that node
# stored (utilities/dev: bc-app serves, bc-admin records).
st, body = get("page=graphs&since=1h")
series = set(re.findall(r'<tr data-series="([^"]+)" data-requests="(\d+)"', body))
app_series = {name for name, req in series if name.startswith("bc-app") and int(req) > 0}
check("<svg" in body and "From the event log" not in body
      and app_series == {"bc-app · rBroker", "bc-app · wBroker", "bc-app · mBroker"},
      f"graphs drawn from the admin node's counter windows, a line per broker of bc-app ({sorted(app_series)})")
st, body = get("page=nodes")
state = dict(re.findall(r'<tr class="node[^"]*" data-node="([^"]+)" data-state="([^"]+)"', body))
check(state.get("bc-app") == "stopped" and state.get("bc-admin") == "stopped",
      f"the node list has both nodes from msNodes, both stopped cleanly ({state})")
sys.exit(1 if failed else 0)
