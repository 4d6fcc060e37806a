"""The observer's checks: seeds a database, asks the running php -S servers
(started by test/run) for every page over HTTP, renders them in headless
Chromium, and prints `ok - …` / `not ok - …` per check. Exit 1 on any failure.

usage: check.py <mongo port> <db> <main url> <fallback url> <down url> <ini url> <shots dir> <secret url> <many url>
       <silent url> <slow url> <bad ini url>

The many url reads msLogsMany: more failure groups than the failures page shows; silent and slow
read test/fake_mongo.py's servers (never answers; every query past maxTimeMS)."""
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from datetime import timezone
from html.parser import HTMLParser

import pymongo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed  # noqa: E402

PORT, DB, MAIN, FALLBACK, DOWN, INI, SHOTS, SECRET, MANY, SILENT, SLOW, BADINI = sys.argv[1:13]
PASSWORD = "zz#pw?zz@x"  # test/run's observers log in with it (DOWN: and tlsCertificateKeyFilePassword=zzsecret)
SECRETS = ["zz#pw", "pw?zz", "zz%40x", "zz@x", "zzsecret"]
FAILED = []
BODIES = []  # every response body, for the checks that span all pages
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
LEAKS = re.compile(r"Warning:|Notice:|Deprecated:|Fatal error|Stack trace|Uncaught|\.php\b|on line \d")
RAW_SCRIPT = '<script>alert("x")</script>'
ESC_SCRIPT = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"


def check(cond, what):
    print(("ok - " if cond else "not ok - ") + what, flush=True)
    if not cond:
        FAILED.append(what)
    return cond


class El:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.kids, self.text = tag, dict(attrs), parent, [], ""

    def cls(self):
        return (self.attrs.get("class") or "").split()

    def ancestors(self):
        p = self.parent
        while p is not None:
            yield p
            p = p.parent

    def find_all(self, tag):
        return [k for k in self.kids if k.tag == tag] + [x for k in self.kids for x in k.find_all(tag)]

    def all_text(self):
        return self.text + "".join(k.all_text() for k in self.kids)


class Dom(HTMLParser):
    """Just enough of a DOM: elements with attributes, parents and text."""

    def __init__(self, html):
        super().__init__(convert_charrefs=True)
        self.root = El("#root", [], None)
        self.cur = self.root
        self.els = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        el = El(tag, attrs, self.cur)
        self.cur.kids.append(el)
        self.els.append(el)
        if tag not in VOID:
            self.cur = el

    def handle_startendtag(self, tag, attrs):
        el = El(tag, attrs, self.cur)
        self.cur.kids.append(el)
        self.els.append(el)

    def handle_endtag(self, tag):
        p = self.cur
        while p is not None and p.tag != tag:
            p = p.parent
        if p is not None and p.parent is not None:
            self.cur = p.parent

    def handle_data(self, data):
        self.cur.text += data

    def find(self, tag=None, cls=None, **attrs):
        out = []
        for e in self.els:
            if tag and e.tag != tag:
                continue
            if cls and cls not in e.cls():
                continue
            if any(e.attrs.get(k.replace("_", "-")) != v for k, v in attrs.items()):
                continue
            out.append(e)
        return out


def get(base, query):
    url = base + "/" + (("?" + query) if query else "")
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            status, headers, body = r.status, r.headers, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        status, headers, body = e.code, e.headers, e.read().decode("utf-8", "replace")
    BODIES.append((query, headers, body))
    return status, headers, body


def q(**kw):
    return urllib.parse.urlencode({"page": "events", **kw})


def rows(dom):
    return [(e.attrs["data-id"], int(e.attrs["data-ts"])) for e in dom.find("tr", cls="ev")]


def keyset_pages(ts_desc, limit):
    """The observer's pages over these ts (newest first): limit rows, plus every row sharing the last one's ts."""
    pages, i = [], 0
    while i < len(ts_desc):
        j = min(i + limit, len(ts_desc))
        while j < len(ts_desc) and ts_desc[j] == ts_desc[j - 1]:
            j += 1
        pages.append(ts_desc[i:j])
        i = j
    return pages


def chromium(args, url, timeout=40):
    prof = tempfile.mkdtemp(prefix="obs-chrome-")
    cmd = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--log-level=3", "--no-first-run",
           "--user-data-dir=" + prof, "--window-size=1280,900", "--virtual-time-budget=2000"] + args + [url]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    finally:
        subprocess.run(["rm", "-rf", prof])


def shot(name, base, query, height=900):
    path = os.path.join(SHOTS, name + ".png")
    if os.path.exists(path):
        os.remove(path)
    chromium(["--screenshot=" + path, f"--window-size=1280,{height}"], base + "/?" + query)
    check(os.path.exists(path) and os.path.getsize(path) > 5000, f"screenshot {path}")


def main():
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{PORT}/?directConnection=true", serverSelectionTimeoutMS=5000)
    db = client[DB]
    now_ms = int(time.time() * 1000) // 1000 * 1000 - 5000
    ev, graphs, nodes, names = seed.insert(db, now_ms)
    byid = {e["_id"]: e for e in ev}
    ms = {e["_id"]: int(e["ts"].replace(tzinfo=timezone.utc).timestamp() * 1000) for e in ev}
    print(f"# seeded {len(ev)} events, {len(graphs)} counter windows, {len(nodes)} nodes into {DB}")

    # ---- events: newest first, paging -------------------------------------------------
    st, hd, body = get(MAIN, q())
    d = Dom(body)
    r1 = rows(d)
    check(st == 200, "events page answers 200")
    csp = hd.get("Content-Security-Policy", "")
    check("default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
          and "img-src" not in csp and "data:" not in csp, "Content-Security-Policy is strict (no images at all)")
    check(hd.get("X-Content-Type-Options") == "nosniff", "X-Content-Type-Options: nosniff")
    newest = sorted(ev, key=lambda e: -ms[e["_id"]])
    want_pages = keyset_pages([ms[e["_id"]] for e in newest], 50)
    check(len(r1) == len(want_pages[0]) == 53, f"events page 1: the 50 newest and the 3 more sharing the 50th's ts (got {len(r1)})")
    check([t for _, t in r1] == want_pages[0], "page 1 is the newest events, newest first")
    check(set(names["ties"]) <= {i for i, _ in r1}, "the 4 events sharing the boundary's ts are all on page 1")
    got_pages, url_q, prev_last = [], q(), None
    ordered = True
    while url_q is not None and len(got_pages) < 20:
        pd = Dom(get(MAIN, url_q)[2])
        pr = rows(pd)
        if prev_last is not None and pr and pr[0][1] >= prev_last:
            ordered = False
        if any(b[1] > a[1] for a, b in zip(pr, pr[1:])):
            ordered = False
        prev_last = pr[-1][1] if pr else prev_last
        got_pages.append(pr)
        older = pd.find("a", cls="older")
        url_q = urllib.parse.urlparse(older[0].attrs["href"]).query if older else None
    seen = [i for pr in got_pages for i, _ in pr]
    check([len(p) for p in got_pages] == [len(p) for p in want_pages],
          f"{len(ev)} events make pages of {[len(p) for p in want_pages]} (got {[len(p) for p in got_pages]})")
    check(len(seen) == len(ev) and set(seen) == set(byid), "the pages together hold every event exactly once")
    check(ordered, "each page continues below the previous one's last ts (ts descending)")
    older = d.find("a", cls="older")
    hq = urllib.parse.parse_qs(urllib.parse.urlparse(older[0].attrs["href"]).query) if older else {}
    check(hq.get("before") == [str(want_pages[0][-1])], f"the older link carries before=<last row's ts> ({hq.get('before')})")
    p2 = Dom(get(MAIN, urllib.parse.urlparse(older[0].attrs["href"]).query)[2]) if older else None
    newer = p2.find("a", cls="newer") if p2 else []
    check(newer and "before" not in newer[0].attrs["href"], "page 2 links back to the newest events")

    # ---- events: filters (exact) ------------------------------------------------------
    t_from, t_to = now_ms - 40 * 60000, now_ms - 25 * 60000
    iso = lambda m: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(m / 1000))  # noqa: E731
    filters = [
        ({"status": "error"}, lambda e: e["status"] == "error"),
        ({"code": "TIMEOUT"}, lambda e: e["code"] == "TIMEOUT"),
        ({"code": "DB_UNAVAILABLE"}, lambda e: e["code"] == "DB_UNAVAILABLE"),
        ({"template": "usr"}, lambda e: e["template"] == "usr"),
        ({"template": seed.HOSTILE_TEMPLATE}, lambda e: e["template"] == seed.HOSTILE_TEMPLATE),
        ({"op": "get"}, lambda e: e["op"] == "get"),
        ({"node": "app-2"}, lambda e: e["node"] == "app-2"),
        ({"broker": "mBroker"}, lambda e: e["broker"] == "mBroker"),
        ({"kind": "lifecycle"}, lambda e: e["kind"] == "lifecycle"),
        ({"from": iso(t_from), "to": iso(t_to)}, lambda e: t_from <= ms[e["_id"]] <= t_to),
        ({"event": names["grand"]}, lambda e: e["_id"] == names["grand"]),
        ({"message_id": "m-shared"}, lambda e: e["message_id"] == "m-shared"),
        ({"status": "error", "node": "app-1", "template": "ord"},
         lambda e: e["status"] == "error" and e["node"] == "app-1" and e["template"] == "ord"),
        ({"status": "ok", "code": "TIMEOUT"}, lambda e: False),
    ]
    for params, pred in filters:
        want = {e["_id"] for e in ev if pred(e)}
        got = rows(Dom(get(MAIN, q(limit=200, **params))[2]))
        check({i for i, _ in got} == want and len(got) == len(want),
              f"filter {params} shows exactly the {len(want)} matching events (got {len(got)})")
    d = Dom(get(MAIN, q(broker="mBroker"))[2])
    older = d.find("a", cls="older")
    check(d.find(id="default-range") and older and "since=24h" in older[0].attrs["href"],
          "broker alone (no index) defaults to the last 24 h, says so, and keeps it on the links")
    check(not Dom(get(MAIN, q(template="usr"))[2]).find(id="default-range")
          and not Dom(get(MAIN, q(broker="mBroker", since="7d"))[2]).find(id="default-range"),
          "an indexed filter or a chosen range gets no default range")
    hrefs = [a_.attrs["href"] for a_ in Dom(get(FALLBACK, "page=nodes")[2]).find("a") if "kind=lifecycle" in a_.attrs["href"]]
    check(hrefs == ["?page=events&kind=lifecycle&since=24h"], f"nodes: the lifecycle link has a time range ({hrefs})")
    d = Dom(get(MAIN, q(status="ok", broker="wBroker", limit=20))[2])
    older = d.find("a", cls="older")
    href = older[0].attrs["href"] if older else ""
    hq = urllib.parse.parse_qs(urllib.parse.urlparse(href).query)
    last_ts = rows(d)[-1][1] if rows(d) else None
    check(hq.get("status") == ["ok"] and hq.get("broker") == ["wBroker"] and hq.get("limit") == ["20"]
          and hq.get("before") == [str(last_ts)], f"paging links keep the filter in the URL ({href})")
    d = Dom(get(MAIN, q(refresh=0))[2])
    box = d.find("input", id="autorefresh")
    check(box and box[0].attrs.get("data-url-off") == "1"
          and "refresh=0" in (d.find("a", cls="older") or [El("a", [], None)])[0].attrs.get("href", ""),
          "refresh=0 turns auto-refresh off and stays on the links")

    # ---- one event and its chain --------------------------------------------------------
    st, _, body = get(MAIN, urllib.parse.urlencode({"page": "event", "id": names["grand"]}))
    d = Dom(body)
    check(st == 200, "event page of the grandchild answers 200")
    li = {e.attrs["data-id"]: e for e in d.find("li", cls="hop")}
    want_chain = {names["root"], names["child"], names["grand"], names["batch"], *names["entries"]}
    check(set(li) == want_chain, f"the tree holds the whole chain ({len(want_chain)} events, got {len(li)})")
    g = li.get(names["grand"])
    anc = [a.attrs.get("data-id") for a in g.ancestors() if a.tag == "li"] if g else []
    check(anc == [names["child"], names["root"]], "grandchild sits under child under root")
    ent = li.get(names["entries"][0])
    check(ent is not None and [a.attrs.get("data-id") for a in ent.ancestors() if a.tag == "li"]
          == [names["batch"], names["root"]], "batch entries sit under their batch")
    links = {urllib.parse.parse_qs(urllib.parse.urlparse(a.attrs.get("href", "")).query).get("id", [""])[0]
             for a in d.find("a")}
    check(want_chain <= links, "every tree node links to its own detail")
    check(g is not None and "err" in g.cls() and "asked" in g.cls(), "the failed grandchild is highlighted (class err)")
    check(li.get(names["child"]) is not None and "err" not in li[names["child"]].cls(), "the ok child is not highlighted")
    check(li[names["child"]].attrs.get("data-wait-us") == "3500" and g.attrs.get("data-wait-us") == "8000"
          and li[names["batch"]].attrs.get("data-wait-us") == "18500",
          "wait after parent's reply = child.ts - (parent.ts + parent.elapsed): 3.5 ms, 8 ms, 18.5 ms")
    check(all("data-wait-us" not in li[i].attrs for i in names["entries"]) and "data-wait-us" not in li[names["root"]].attrs,
          "no wait shown for batch entries (shared ts) or the root")
    check(g.attrs.get("data-exec-us") == "30000" and "exec 30.0 ms" in g.all_text()
          and "wait after parent's reply 8.0 ms" in g.all_text(), "exec and wait are printed per hop")
    a_, b_ = names["cycle"]
    d = Dom(get(MAIN, urllib.parse.urlencode({"page": "event", "id": a_}))[2])
    li = {e.attrs["data-id"]: e for e in d.find("li", cls="hop")}
    top = [e for e in li.values() if not any(x.tag == "li" for x in e.ancestors())]
    check(set(li) == {a_, b_} and [t.attrs["data-id"] for t in top] == [a_]
          and [x.attrs.get("data-id") for x in li[b_].ancestors() if x.tag == "li"] == [a_]
          and "parent not in chain / cycle" in top[0].all_text(),
          "a 2-cycle is drawn: the older event at the top level, marked, the other under it")
    st, _, body = get(MAIN, urllib.parse.urlencode({"page": "event", "id": "no-such-event"}))
    check(st == 404 and "No event no-such-event" in body, "an unknown event id is a 404 with a message")

    # ---- failures -----------------------------------------------------------------------
    st, _, body = get(MAIN, "page=failures")
    d = Dom(body)
    want = Counter(tuple(e[k] or "" for k in ("code", "template", "node", "broker")) for e in ev if e["status"] == "error")
    got = {(r.attrs.get("data-code"), r.attrs.get("data-template"), r.attrs.get("data-node"), r.attrs.get("data-broker")):
           int(r.attrs.get("data-count") or -1) for r in d.find("tr", cls="grp")}
    check(st == 200 and got == dict(want), f"failures: {len(want)} groups with exact counts (got {len(got)})")
    counts = [int(r.attrs["data-count"]) for r in d.find("tr", cls="grp")]
    check(counts == sorted(counts, reverse=True), "failure groups sorted by count")
    check(counts[0] == 6, f"the repeated failure is one group of 6, first (got {counts[:3]})")
    cmds = [p.all_text() for p in d.find("pre", cls="cmd")]
    check("beds dlq replay mBroker --filter code=DB_UNAVAILABLE --filter template=note --filter node=app-2 --dry-run" in cmds
          and "beds dlq replay mBroker --filter code=DB_UNAVAILABLE --filter template=note --filter node=app-2" in cmds,
          "failures show the dlq replay lines (dry run and real) for a parked group")
    parked_groups = len({(e["code"], e["template"], e["node"], e["broker"]) for e in ev
                         if e.get("outcome") == "parked" and e["template"] != seed.STAR_TEMPLATE})
    check(len(cmds) == 2 * parked_groups and not any("code=TIMEOUT" in x for x in cmds)
          and "nothing in the dead-letter queue" in body,
          f"replay lines only for the {parked_groups} groups with parked messages (and no *)")
    check("beds dlq replay mBroker --filter code=BAD_MESSAGE --filter template= --filter node=app-1" in cmds,
          "a group without a template replays with an empty --filter template= (not the whole broker)")
    star = [r for r in d.find("tr", cls="grp") if r.attrs["data-template"] == seed.STAR_TEMPLATE]
    star_cmds = star[0].parent.kids[star[0].parent.kids.index(star[0]) + 1] if star else None
    check(star_cmds is not None and "replay by event id or message id instead" in star_cmds.all_text()
          and not star_cmds.find_all("pre") and not any("inv*" in x for x in cmds),
          "a group with * in a value gets a warning, no replay line")
    check("--filter 'template=<script>alert(\"x\")</script>'" in " ".join(cmds), "hostile template shell-quoted in the dlq line")
    t_ms = now_ms - 2 * 3600000 + 250  # from/to keep their milliseconds in the form and the links
    d2 = Dom(get(MAIN, urllib.parse.urlencode({"page": "failures", "from": iso(t_ms) + ".250"}))[2])
    a_ = next((x for x in d2.find("a") if "status=error" in x.attrs.get("href", "")), None)
    lf = urllib.parse.parse_qs(urllib.parse.urlparse(a_.attrs["href"]).query).get("from") if a_ else None
    field = [x.attrs.get("value") for x in d2.find("input") if x.attrs.get("name") == "from"]
    check(lf == [iso(t_ms) + ".250"] and field == lf, f"from with milliseconds is kept in the form and links ({lf}, {field})")
    grp = [r for r in d.find("tr", cls="grp") if r.attrs["data-code"] == "DB_UNAVAILABLE"]
    link = next((x.attrs["href"] for x in d.els if x.tag == "a" and grp and grp[0] in x.ancestors()), "")
    lq = urllib.parse.urlparse(link).query
    got_rows = rows(Dom(get(MAIN, lq + "&limit=200")[2])) if lq else []
    check(lq != "" and len(got_rows) == int(grp[0].attrs["data-count"]),
          f"a failure group links to the events list filtered to it ({len(got_rows)} events)")

    # more groups than shown (msLogsMany: 505 single failures and a group of 15): the total still counts all
    many = [seed.event(now_ms - 60000 - k, 9000 + k, status="error", code=f"E{k:03d}") for k in range(505)]
    many += [seed.event(now_ms - 120000 - k, 9600 + k, status="error", code="BIG") for k in range(15)]
    db.msLogsMany.insert_many(many)
    d = Dom(get(MANY, "page=failures")[2])
    sm = d.find(id="summary")[0].attrs if d.find(id="summary") else {}
    check(sm.get("data-total") == "520" and sm.get("data-groups") == "500" and d.find(id="more-groups"),
          f"failures over 506 groups: the largest 500 shown, the total counts all 520 (got {sm.get('data-total')})")

    # ---- graphs -------------------------------------------------------------------------
    st, _, body = get(MAIN, "page=graphs")
    d = Dom(body)
    svgs = d.find("svg", cls="chart")
    series = {f"{n} · {b}" for n in ("app-1", "app-2") for b in ("rBroker", "wBroker")}
    check(st == 200 and len(svgs) == 5, f"graphs page draws 5 SVG charts from msGraphs (got {len(svgs)})")
    check(d.find(id="source") and d.find(id="source")[0].attrs.get("data-source") == "msGraphs", "graphs read msGraphs")
    ok = bool(svgs) and all(series <= {p.attrs.get("data-series") for p in d.find("polyline") if s in p.ancestors()} for s in svgs)
    check(ok, "every chart has a polyline per seeded node · broker")
    tot = {r.attrs["data-series"]: int(r.attrs["data-requests"]) for r in d.find("tr") if "data-requests" in r.attrs}
    want_tot = Counter()
    for gdoc in graphs:
        for b in gdoc["brokers"]:
            want_tot[f"{gdoc['node']} · {b['broker']}"] += b["requests"]
    check(tot == dict(want_tot), "graph totals equal the seeded counter windows")
    # throughput = requests / all of the node's windows, also those where the broker was idle (left out)
    bucket = 600000  # 6 h in 10-minute buckets
    d = Dom(get(MAIN, "page=graphs&since=6h")[2])
    node_ms, m_req = Counter(), Counter()
    for gdoc in graphs:
        if gdoc["node"] == "app-1":
            b = int(gdoc["ts"].replace(tzinfo=timezone.utc).timestamp() * 1000) // bucket
            node_ms[b] += gdoc["window_ms"]
            m_req[b] += sum(x["requests"] for x in gdoc["brokers"] if x["broker"] == "mBroker")
    want_rate = [round(m_req[b] / (node_ms[b] / 1000), 3) for b in sorted(node_ms)]
    chart = d.find("svg", cls="chart")[0]
    got_rate = [[float(v) for v in p.attrs["data-values"].split()] for p in d.find("polyline", data_series="app-1 · mBroker")
                if chart in p.ancestors()]
    check(len(got_rate) == 1 and len(got_rate[0]) == len(want_rate)
          and all(abs(a - b) < 0.0011 for a, b in zip(got_rate[0], want_rate)), f"throughput of a mostly idle broker per 10 min: {want_rate} /s (got {got_rate})")
    rate = [r.attrs.get("data-rate") for r in d.find("tr", data_series="app-1 · mBroker")]
    check(rate == ["0.2"], f"its average over the node's windows: 6 × 120 requests in 60 min = 0.2/s (got {rate})")
    st, _, body = get(FALLBACK, "page=graphs")
    d = Dom(body)
    want_tot = Counter(f"{e['node']} · {e['broker']}" for e in ev if e["broker"] is not None)
    svgs = d.find("svg", cls="chart")
    check(st == 200 and "From the event log" in body and d.find(id="source")[0].attrs.get("data-source") == "log",
          "without msGraphs the graphs say they come from the event log")
    ok = all(set(want_tot) <= {p.attrs.get("data-series") for p in d.find("polyline") if s in p.ancestors()} for s in svgs)
    check(len(svgs) == 5 and ok, f"log fallback draws a polyline per node · broker ({len(want_tot)} series)")
    tot = {r.attrs["data-series"]: int(r.attrs["data-requests"]) for r in d.find("tr") if "data-requests" in r.attrs}
    check(tot == dict(want_tot), "log fallback counts every event with a broker")
    # the range cuts its first and last buckets: their rate is over the covered part only
    g_to = ms[names["hostile"]]  # a whole second, so `to` is exact; the hostile event falls in the last bucket
    g_from, bucket = g_to - 30 * 60000, 30000  # 30 min in 30 s buckets
    d = Dom(get(FALLBACK, urllib.parse.urlencode({"page": "graphs", "from": iso(g_from), "to": iso(g_to)}))[2])
    chart = d.find("svg", cls="chart")[0]
    got = {p.attrs["data-series"]: [float(v) for v in p.attrs["data-values"].split()] for p in d.find("polyline")
           if chart in p.ancestors()}
    per = Counter((f"{e['node']} · {e['broker']}", ms[e["_id"]] // bucket * bucket) for e in ev
                  if e["broker"] is not None and g_from <= ms[e["_id"]] <= g_to)
    want = {}
    for key in {k for k, _ in per}:
        want[key] = [round(per[(key, b)] / ((min(b + bucket, g_to + 1) - max(b, g_from)) / 1000), 3)
                     for b in range(g_from // bucket * bucket, g_to + 1, bucket)]
    last = want.get(f"app-1 · wBroker", [0])[-1]
    # PHP rounds halves away from zero, Python to even (0.0625 -> 0.063 / 0.062):
    # equal within the last digit.
    same = set(got) == set(want) and all(
        len(got[k]) == len(want[k]) and all(abs(a - b) < 0.0011 for a, b in zip(got[k], want[k])) for k in want)
    check(same and last == round(1000 / (g_to % bucket + 1), 3),
          f"log fallback: the first and last buckets' rate is over the part the range covers (last {last}/s)"
          + ("" if same else f"; differ: {[(k, got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)][:2]}; g_from={g_from} g_to={g_to}"))
    # a long range is refused; the longest allowed has a bounded number of points and ticks
    st, _, body = get(FALLBACK, "page=graphs&from=1970-01-01&to=2200-01-01")
    check(st == 400 and "at most 90 days" in body and len(body) < 10000, f"graphs over 230 years: 400 ({st}, {len(body)} bytes)")
    g_from, g_to, day = now_ms - 90 * 86400000, now_ms, 86400000
    st, _, body = get(FALLBACK, urllib.parse.urlencode({"page": "graphs", "from": iso(g_from), "to": iso(g_to)}))
    d = Dom(body)
    bucket, step = 2 * day, 14 * day
    n_points = len(range(g_from // bucket * bucket, g_to + 1, bucket))
    n_ticks = len(range(-(-g_from // step) * step, g_to + 1, step))
    chart = d.find("svg", cls="chart")[0] if d.find("svg", cls="chart") else None
    pts = [len(p.attrs["points"].split()) for p in d.find("polyline") if chart in p.ancestors()]
    ticks = [t for t in d.find("text", cls="tick") if chart in t.ancestors()]
    check(st == 200 and "one point per 2 d" in body and pts and set(pts) == {n_points},
          f"graphs over 90 days: one point per 2 days, {n_points} per line (got {sorted(set(pts))})")
    check(len(ticks) == n_ticks, f"graphs over 90 days: {n_ticks} axis ticks, one per 14 days (got {len(ticks)})")

    # ---- nodes --------------------------------------------------------------------------
    st, _, body = get(MAIN, "page=nodes")
    d = Dom(body)
    state = {r.attrs["data-node"]: (r.attrs["data-state"], r.cls()) for r in d.find("tr", cls="node")}
    check(st == 200 and state.get("app-1", ("",))[0] == "up", "nodes: the fresh node is up")
    check(state.get("app-2", ("", []))[0] == "MISSING" and "missing" in state["app-2"][1], "nodes: the stale node is MISSING (red)")
    check(state.get("segundo", ("",))[0] == "stopped", "nodes: alive=false is shown as stopped")
    st, _, body = get(FALLBACK, "page=nodes")
    check(st == 200 and "No admin node has recorded heartbeats" in body, "nodes: an absent collection says no heartbeats")

    # ---- escaping -----------------------------------------------------------------------
    hostile_q = [q(template=seed.HOSTILE_TEMPLATE), urllib.parse.urlencode({"page": "event", "id": names["hostile"]}),
                 q(op=seed.HOSTILE_OP), q(message_id=seed.HOSTILE_OP), "page=failures"]
    for hq_ in hostile_q:
        body = get(MAIN, hq_)[2]
        check(RAW_SCRIPT not in body and ESC_SCRIPT in body and "<img" not in body,
              f"hostile strings escaped: {hq_[:60]}")
    # a hostile node and broker name: events, failures (dlq lines), graphs (legend, data-series), nodes
    raw_node, raw_broker = seed.HOSTILE_NODE, seed.HOSTILE_BROKER
    esc_node, esc_broker = "&lt;b&gt;n&lt;/b&gt;", "&quot;&gt;&lt;svg onload=alert(1)&gt;"
    node_q = [(MAIN, q(node=raw_node)), (MAIN, q(broker=raw_broker)), (MAIN, "page=failures"), (MAIN, "page=graphs"),
              (FALLBACK, "page=graphs"), (MAIN, "page=nodes")]
    for base, hq_ in node_q:
        body = get(base, hq_)[2]
        check(raw_node not in body and "<svg onload" not in body and esc_node in body and esc_broker in body,
              f"hostile node and broker names escaped: {hq_[:60]}")
    d = Dom(get(MAIN, "page=graphs")[2])
    key = f"{raw_node} · {raw_broker}"
    check(d.find("polyline", data_series=key) and any(t.attrs.get("data-name") == key for t in d.find("text", cls="legend")),
          "the hostile series is drawn and named in the legend, escaped")
    check("'node=<b>n</b>'" in " ".join(x.all_text() for x in Dom(get(MAIN, "page=failures")[2]).find("pre", cls="cmd")),
          "hostile node shell-quoted in the dlq line")
    for name, base, qq in [("events-hostile", MAIN, hostile_q[0]), ("event-hostile", MAIN, hostile_q[1]),
                           ("events-hostile-node", MAIN, q(node=raw_node)), ("graphs-hostile", MAIN, "page=graphs"),
                           ("graphs-log-hostile", FALLBACK, "page=graphs"), ("nodes-hostile", MAIN, "page=nodes"),
                           ("failures-hostile", MAIN, "page=failures")]:
        dom = Dom(chromium(["--dump-dom"], base + "/?" + qq))
        bad_el = [e for e in dom.els if "onerror" in e.attrs or "onload" in e.attrs
                  or (e.tag == "b" and e.all_text() == "n")]
        scripts = [e for e in dom.find("script") if e.attrs.get("src") != "observer.js"]
        check(dom.find("table") or dom.find("ul"), f"chromium rendered the {name} page")
        check(not bad_el and not scripts, f"chromium DOM of {name}: no on* handler, no injected element, no foreign script")

    # ---- hostile parameters -------------------------------------------------------------
    bad = ["page=events&status[]=x", "page=events&status[$ne]=x", "page=events&code[$gt]=", "page=events&template="
           + "A" * 10240, "page=events&from=yesterday", "page=events&from=2024-02-30", "page=events&to=2024-13-01T99:00",
           "page=-1", "page=events&before=-1", "page=events&before=abc", "page=event", "page[]=events", "page=event&id[]=1",
           "page=events&status=maybe", "page=events&node=%00x", "page=events&template=%C0%AF", "page=graphs&since=2y",
           "page=failures&from=2024-05-02&to=2024-05-01", "page=events&before=99999999999999"]
    for b in bad:
        st, hd, body = get(MAIN, b)
        check(st == 400 and 'id="error"' in body and not LEAKS.search(body) and "Content-Security-Policy" in hd,
              f"bad input {b[:50]!r} -> 400 with a message (got {st})")
    st, _, body = get(MAIN, "page=events&limit=99999")
    want = len(keyset_pages([ms[e["_id"]] for e in newest], 200)[0])
    check(len(ev) > 200 and st == 200 and len(rows(Dom(body))) == want == 200,
          f"limit is clamped to 200 ({len(ev)} events; got {len(rows(Dom(body)))})")

    # ---- MongoDB down ------------------------------------------------------------------
    t0 = time.time()
    st, hd, body = get(DOWN, "page=events")
    took = time.time() - t0
    check(st == 503 and "MongoDB unavailable" in body and "127.0.0.1:1" in body and DB in body,
          "MongoDB down: 503 naming the host and database")
    check(not LEAKS.search(body) and not any(x in body for x in SECRETS) and "observer:" not in body,
          "MongoDB down: no stack trace, warning, user, password or secret option")
    check(took < 6, f"MongoDB down answers quickly ({took:.1f} s)")
    t0 = time.time()
    st, hd, body = get(SILENT, "page=events")
    took = time.time() - t0
    check(st == 503 and "MongoDB unavailable" in body and took < 6,
          f"a MongoDB that accepts and never answers: 503 in {took:.1f} s (got {st})")
    st, hd, body = get(SLOW, "page=failures")
    check(st == 504 and "took longer than 8 s: narrow the filter or the time range" in body
          and "MongoDB unavailable" not in body, f"a query past maxTimeMS: 504 saying so, not 'unavailable' (got {st})")

    # ---- a password with # ? @ in the URI: the header shows the host list only ------------
    db.command("createUser", "observer", pwd=PASSWORD, roles=[{"role": "read", "db": DB}])
    for qq in (q(), "page=failures", "page=graphs", "page=nodes"):
        st, _, body = get(SECRET, qq)
        meta = Dom(body).find("span", cls="meta")
        check(st == 200 and meta and meta[0].all_text().startswith(f"127.0.0.1:{PORT} / {DB} ·")
              and not any(x in body for x in SECRETS), f"logged in with a password holding # ? @: {qq} names only the hosts")

    # ---- the ini file --------------------------------------------------------------------
    st, _, body = get(INI, "page=events")
    check(st == 200 and "Observer from ini" in body and len(rows(Dom(body))) == len(want_pages[0]), "config from the ini file works")
    st, _, body = get(BADINI, "page=events")
    check(st == 500 and "Configuration error" in body and "cannot parse the ini file" in body and "(line 2)" in body
          and "mongodb://x" not in body, f"a malformed ini file: the configuration error page, with the line (got {st})")

    # ---- static files, no external requests ----------------------------------------------
    for f in ("observer.css", "observer.js"):
        try:
            with urllib.request.urlopen(MAIN + "/" + f, timeout=10) as r:
                check(r.status == 200, f"{f} is served")
        except urllib.error.HTTPError as e:
            check(False, f"{f} is served ({e.code})")
    ext = [qq for qq, _, b in BODIES if re.search(r"https?://", b)]
    check(not ext, f"no response names an external URL ({len(BODIES)} responses; offenders: {ext[:3]})")
    nocsp = [qq for qq, h_, _ in BODIES if "frame-ancestors 'none'" not in (h_.get("Content-Security-Policy") or "")]
    check(not nocsp, f"every response carries the CSP ({nocsp[:3]})")
    internal = [qq for qq, _, b in BODIES if "<h2>Internal error</h2>" in b]
    check(not internal, f"no request ended in an internal error ({internal[:3]})")
    secret = [qq for qq, _, b in BODIES if any(x in b for x in SECRETS)]
    check(not secret, f"no response shows the password or a secret option ({secret[:3]})")
    leaks = [qq for qq, _, b in BODIES if LEAKS.search(b)]
    check(not leaks, f"no response shows PHP warnings, notices or paths ({leaks[:3]})")

    # ---- screenshots ---------------------------------------------------------------------
    os.makedirs(SHOTS, exist_ok=True)
    shot("events", MAIN, q(), 1500)
    shot("events-filtered", MAIN, q(status="error"), 900)
    shot("event-chain", MAIN, urllib.parse.urlencode({"page": "event", "id": names["grand"]}), 1100)
    shot("event-cycle", MAIN, urllib.parse.urlencode({"page": "event", "id": names["cycle"][0]}), 950)
    shot("failures", MAIN, "page=failures", 1300)
    shot("graphs", MAIN, "page=graphs", 1700)
    shot("graphs-from-log", FALLBACK, "page=graphs", 1700)
    shot("nodes", MAIN, "page=nodes", 500)
    shot("bad-input", MAIN, "page=events&from=yesterday", 400)
    shot("mongodb-down", DOWN, "page=events", 400)
    shot("query-too-slow", SLOW, "page=events", 400)
    print(f"# screenshots in {SHOTS}")

    if FAILED:
        print(f"# {len(FAILED)} check(s) failed")
        sys.exit(1)
    print("# all checks passed")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a page so broken the checks cannot read it: a failure, said plainly
        import traceback
        traceback.print_exc()
        print(f"not ok - the checks stopped: {type(exc).__name__}: {exc}")
        sys.exit(1)
