"""The observer over events a real BEDS node wrote (not seeded by hand):
run by utilities/dev after the contract suite, on that run's database, so a
drift between BEDS's event documents and what the observer reads shows.

    real.py URL EXPECTED_TEMPLATE
"""
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

URL, TEMPLATE = sys.argv[1], sys.argv[2]
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


st, body = get("page=events&limit=200")
ids = re.findall(r'<tr class="ev[^"]*" data-id="([^"]+)"', body)
check(st == 200 and clean(body) and len(ids) > 0, f"the events page lists them ({len(ids)} rows)")
st, body = get(urllib.parse.urlencode({"page": "events", "template": TEMPLATE, "limit": 200}))
n = len(re.findall(r'<tr class="ev', body))
check(st == 200 and n > 0, f"the template filter finds the {TEMPLATE} events ({n})")
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
check("<svg" in body and "From the event log" not in body and len(app_series) >= 2,
      f"graphs drawn from the admin node's counter windows, a line per broker of bc-app ({sorted(app_series)})")
st, body = get("page=nodes")
state = dict(re.findall(r'<tr class="node[^"]*" data-node="([^"]+)" data-state="([^"]+)"', body))
check(state.get("bc-app") == "stopped" and state.get("bc-admin") == "stopped",
      f"the node list has both nodes from msNodes, both stopped cleanly ({state})")
sys.exit(1 if failed else 0)
