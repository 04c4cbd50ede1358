"""The ``dashboard`` phase: how fast the dashboard's pages load with many schedules
(docs/dashboard.md; the issue's target: *the overview of a mesh with 10,000 schedules loads in
under a second, paged, not all at once*). Reported, not asserted.

One secured 3-node mesh without handlers (nothing fires) holding a pool of far-future
schedules (10,000, quick 2,000). Then, on a follower and on the leader:

1. **The API**, on one keep-alive connection, the requests interleaved round robin after a few
   unmeasured ones, n samples each (200, quick 50): ``GET /api/overview`` (the overview page's
   one bounded answer), ``GET /api/schedules?limit=50`` (the schedules page's first page),
   ``GET /api/schedules?limit=50&q=<id part>`` (a search matching 10 schedules) and
   ``...&q=bench_noop`` (a search every schedule matches). A sample is the time from sending
   the request to the answer read and parsed by the client.
2. **The naive baseline**, in the same run: what a dashboard that loads everything would do,
   ``GET /api/schedules?limit=1000`` following ``next`` until it is null (5 rounds, quick 3).

Then **a real browser** (headless Chromium through Playwright) on the follower: for each page
(``#/overview``, ``#/schedules``), N fresh browser contexts (10, quick 5; no cache, no storage)
each load the page once, after one unmeasured load of the overview (the browser's first page
also pays for starting its network service and renderer; reported as ``first_load_ms``). The
bench mesh has no API tokens file (its API is open on loopback), so no token is typed.
An init script watches the document (a MutationObserver) and records
``performance.now()`` (milliseconds since the navigation started) the first time the page is
rendered: for the overview, ``#leader-id`` shows the leader's id and the next-fires table has
rows; for the schedules page, its table has its first 50 rows. Also recorded: the wall-clock
time from ``page.goto`` to the render seen by the benchmark, the requests the page made by
then, and the page's JS heap (Chrome DevTools ``Performance.getMetrics``).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

from bench.browser import CHROMIUM_ARGS, MISSING, chromium_path
from bench.common import Run, create_schedules, far_future_body, wait_caught_up
from bench.harness import HOST, BenchError, Node
from bench.stats import summary

PREFIX = "dash-"
PAGE = 50  # the schedules page's page size (mesh/dashboard/static/page-schedules.js)
NAIVE_PAGE = 1000  # the API's largest page (mesh.api.http.MAX_PAGE)
NEXT_FIRES = 20  # the overview's next fires (mesh.api.dashboard.NEXT_FIRES)
WARMUP = 5
LOAD_TIMEOUT_S = 30.0  # one page load; the browser part stops sampling after BROWSER_BUDGET_S
BROWSER_BUDGET_S = 180.0
API_BUDGET_S = 120.0  # per node, the API samples and the naive rounds each

# Runs in every page before its own script: records when the page is first rendered.
_WATCH = """
(() => {
  const want = %s;
  const firsts = {};  // when the overview's rows, and its leader id, first showed
  const done = () => {
    if (document.documentElement && document.documentElement.dataset.benchRendered) return true;
    let ok = false;
    if (want.page === 'overview') {
      const leader = document.getElementById('leader-id');
      const named = !!leader && leader.textContent.trim() === want.leader;
      const rows = document.querySelectorAll('#next-fires-table tbody tr[data-schedule-id]').length;
      if (rows && firsts.rows === undefined) firsts.rows = performance.now();
      if (named && firsts.leader === undefined) firsts.leader = performance.now();
      ok = named && rows > 0;
    } else {
      ok = document.querySelectorAll('#schedules-table tr[data-schedule-id]').length >= want.rows;
    }
    if (!ok) return false;
    const at = performance.now();
    window.__benchRendered = {
      at_ms: at,
      firsts,
      resources: performance.getEntriesByType('resource').map((e) => ({
        name: e.name, bytes: e.encodedBodySize, start_ms: e.startTime, end_ms: e.responseEnd,
      })),
    };
    document.documentElement.dataset.benchRendered = String(at);
    return true;
  };
  const observer = new MutationObserver(() => { if (done()) observer.disconnect(); });
  observer.observe(document, { childList: true, subtree: true, characterData: true });
})();
"""


def dashboard(run: Run) -> dict[str, Any]:
    pool = run.count(10_000, 2_000, minimum=100)
    samples = run.count(200, 50, minimum=5)
    naive_rounds = run.count(5, 3, minimum=1)
    contexts = run.count(10, 5, minimum=2)
    mesh = run.new_mesh("dashboard", handlers=0, secure=run.secure)
    middle = f"{PREFIX}{pool // 2:05d}"[:-1]  # an id part 10 schedules of the pool contain
    requests = {
        "overview": "/api/overview",
        "schedules_page": f"/api/schedules?limit={PAGE}",
        "search": f"/api/schedules?limit={PAGE}&q={urllib.parse.quote(middle)}",
        "search_all": f"/api/schedules?limit={PAGE}&q=bench_noop",
    }
    out: dict[str, Any] = {"schedules": pool, "requests": requests, "failed": {}}
    api: dict[str, Any] = {}
    try:
        leader = run.start_mesh("dashboard", mesh)
        follower = mesh.followers(leader)[0]
        bodies = [far_future_body(f"{PREFIX}{i:05d}", i) for i in range(pool)]
        created = create_schedules(leader, bodies)
        if created["created"] != pool:
            raise BenchError(f"creating the pool of {pool} schedules: {created['statuses']}")
        run.progress("dashboard", f"{pool} schedules created in {created['seconds']:.1f}s")
        commit = (leader.health() or {}).get("commit_index", 0)
        for node in mesh.followers(leader):
            wait_caught_up(mesh, node, commit, timeout=60.0)
        out["create"] = created
        out["leader"] = leader.node_id
        for label, node in (("follower", follower), ("leader", leader)):
            api[label] = _api(run, node, label, requests, samples, naive_rounds, pool)
        out["api"] = api
        total = api["follower"]["overview"]["schedules_counted"]
        out["schedules_total"] = total
        try:
            out["browser"] = _browser(
                run,
                f"http://{HOST}:{follower.http_port}",
                leader.node_id,
                contexts,
                min(PAGE, total),
            )
            out["browser"]["node"] = follower.name
        except BenchError as e:
            out["failed"]["browser"] = str(e)
            run.progress("dashboard", f"browser: FAILED: {str(e).splitlines()[0]}")
    finally:
        mesh.stop()
    f = api["follower"]
    out["ratio"] = {
        "overview_p50_to_naive_p50": _div(f["overview"]["ms"]["p50"], f["naive"]["ms"]["p50"]),
        "overview_bytes_to_naive_bytes": _div(f["overview"]["bytes"], f["naive"]["bytes"]),
    }
    if not out["failed"]:
        del out["failed"]
    return out


# ---------------------------------------------------------------------------------------- API


class _Client:
    """One keep-alive HTTP/1.1 connection; :meth:`get` times a request until its answer is read
    and parsed."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=30.0)

    def get(self, path: str) -> tuple[float, int, Any]:
        t = time.perf_counter()
        try:
            self.conn.request("GET", path)
            resp = self.conn.getresponse()
            raw = resp.read()
            body = json.loads(raw)
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.conn.close()
            raise BenchError(f"GET {path}: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - t
        if resp.status != 200:
            raise BenchError(f"GET {path} answered {resp.status}: {raw[:200]!r}")
        return seconds, len(raw), body

    def close(self) -> None:
        self.conn.close()


def _api(
    run: Run, node: Node, label: str, requests: dict[str, str], n: int, rounds: int, pool: int
) -> dict[str, Any]:
    client = _Client(node.http_port)
    times: dict[str, list[float]] = {k: [] for k in requests}
    size: dict[str, int] = {}
    last: dict[str, Any] = {}
    try:
        for _ in range(WARMUP):
            for path in requests.values():
                client.get(path)
        stop_at = time.monotonic() + API_BUDGET_S
        for _ in range(n):
            if time.monotonic() > stop_at:
                break
            for key, path in requests.items():
                seconds, nbytes, body = client.get(path)
                times[key].append(seconds)
                size[key], last[key] = nbytes, body
        naive = _naive(client, rounds, pool, time.monotonic() + API_BUDGET_S)
    finally:
        client.close()
    ov = last["overview"]
    if ov.get("leader_id") is None or len(ov.get("next_fires", [])) != NEXT_FIRES:
        raise BenchError(f"{node.name}: GET /api/overview: {json.dumps(ov)[:300]}")
    if len(last["schedules_page"]["schedules"]) != PAGE:
        raise BenchError(f"{node.name}: GET {requests['schedules_page']}: not {PAGE} schedules")
    out: dict[str, Any] = {"node": node.name}
    for key in requests:
        out[key] = {"ms": summary(times[key], 1000.0), "bytes": size[key]}
    out["overview"]["schedules_counted"] = ov["schedules"]
    out["search"]["matched"] = len(last["search"]["schedules"])
    out["naive"] = naive
    o, p, s, v = out["overview"]["ms"], out["schedules_page"]["ms"], out["search"]["ms"], naive
    run.progress(
        "dashboard",
        f"API on {label} {node.name}, "
        f"{len(times['overview'])} samples each: overview p50 {o['p50']:.1f} p99 {o['p99']:.1f} "
        f"max {o['max']:.1f} ms ({size['overview']:,} B); schedules page p50 {p['p50']:.1f} "
        f"p99 {p['p99']:.1f} ms; search p50 {s['p50']:.1f} ms; naive full listing "
        f"({v['pages']} pages, {v['schedules']:,} schedules, {v['bytes']:,} B) p50 "
        f"{v['ms']['p50']:.0f} max {v['ms']['max']:.0f} ms",
    )
    return out


def _naive(client: _Client, rounds: int, pool: int, stop_at: float) -> dict[str, Any]:
    """Every schedule, ``limit=1000`` pages following ``next``: ``rounds`` times."""
    max_pages = pool // NAIVE_PAGE + 10
    totals: list[float] = []
    pages = count = nbytes = 0
    for _ in range(rounds):
        if totals and time.monotonic() > stop_at:
            break
        after: str | None = None
        pages = count = nbytes = 0
        t = time.perf_counter()
        for _ in range(max_pages):
            path = f"/api/schedules?limit={NAIVE_PAGE}"
            if after is not None:
                path += f"&after={urllib.parse.quote(after)}"
            _, size, body = client.get(path)
            pages += 1
            count += len(body["schedules"])
            nbytes += size
            after = body.get("next")
            if after is None:
                break
        else:
            raise BenchError(f"the full listing did not end within {max_pages} pages")
        totals.append(time.perf_counter() - t)
    return {
        "page_limit": NAIVE_PAGE,
        "rounds": len(totals),
        "pages": pages,
        "schedules": count,
        "bytes": nbytes,
        "ms": summary(totals, 1000.0),
    }


# ------------------------------------------------------------------------------------- browser


def _browser(run: Run, base: str, leader_id: str, contexts: int, rows: int) -> dict[str, Any]:
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise BenchError(f"playwright is missing (the dev extra): {e}") from None
    chromium = chromium_path()
    if chromium is None:
        raise BenchError(MISSING)
    out: dict[str, Any] = {"contexts": contexts, "chromium": None}
    stop_at = time.monotonic() + BROWSER_BUDGET_S
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium, args=list(CHROMIUM_ARGS), timeout=LOAD_TIMEOUT_S * 1000
            )
            try:
                out["chromium"] = browser.version
                # The first page a just-started browser loads also pays for starting its network
                # service and renderer: reported apart, left out of the samples.
                first = _load(browser, base, "overview", {"page": "overview", "leader": leader_id})
                out["first_load_ms"] = first["ms"]
                run.progress("dashboard", f"browser: first load (not counted) {first['ms']:.0f} ms")
                for page_name in ("overview", "schedules"):
                    want = {"page": page_name, "leader": leader_id, "rows": rows}
                    loads = []
                    for _ in range(contexts):
                        if loads and time.monotonic() > stop_at:
                            break
                        loads.append(_load(browser, base, page_name, want))
                    out[page_name] = _loads_summary(loads)
                    s = out[page_name]
                    run.progress(
                        "dashboard",
                        f"browser {page_name}: {len(loads)} fresh contexts, rendered after "
                        f"p50 {s['ms']['p50']:.0f} max {s['ms']['max']:.0f} ms from navigation "
                        f"start (p50s: scripts loaded {_ms(s['script_ms']['p50'])}, data "
                        f"requested {_ms(s['data_requested_ms']['p50'])}, answered "
                        f"{_ms(s['data_ms']['p50'])}; goto → seen: p50 "
                        f"{s['wall_ms']['p50']:.0f} ms); "
                        f"{s['requests']} requests, JS heap {_mb(s['heap_mb']['p50'])}",
                    )
            finally:
                browser.close()
    except PlaywrightError as e:
        raise BenchError(f"browser: {str(e).splitlines()[0]}") from e
    return out


def _load(browser: Any, base: str, page_name: str, want: dict[str, Any]) -> dict[str, Any]:
    context = browser.new_context()
    try:
        context.add_init_script(_WATCH % json.dumps(want))
        page = context.new_page()
        paths: list[str] = []
        page.on("request", lambda r: paths.append(urllib.parse.urlsplit(r.url).path))
        t = time.perf_counter()
        page.goto(f"{base}/#/{page_name}", wait_until="commit", timeout=LOAD_TIMEOUT_S * 1000)
        page.wait_for_selector(
            "html[data-bench-rendered]", state="attached", timeout=LOAD_TIMEOUT_S * 1000
        )
        wall = time.perf_counter() - t
        seen = list(paths)
        rendered = page.evaluate("() => window.__benchRendered")
        cdp = context.new_cdp_session(page)
        cdp.send("Performance.enable")
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        resources = [r for r in rendered["resources"] if r["end_ms"] <= rendered["at_ms"]]
        data = "/api/overview" if want["page"] == "overview" else "/api/schedules?"
        return {
            "ms": rendered["at_ms"],
            "wall_ms": wall * 1000.0,
            "requests": seen,
            "bytes": sum(r["bytes"] or 0 for r in resources),
            "api": sorted(_path(r["name"]) for r in resources if "/api/" in r["name"]),
            # Where the time went: the script loaded, then the page's data answered.
            "script_ms": _end(resources, ".js"),  # the last of the page's script modules
            # The request whose answer was rendered (the last one sent before the render).
            "data_requested_ms": _end(resources, data, "start_ms"),
            "data_ms": _end(resources, data),
            "firsts_ms": rendered.get("firsts") or {},
            "timeline": [
                {"path": _path(r["name"]), "start_ms": r["start_ms"], "end_ms": r["end_ms"]}
                for r in resources
            ],
            "heap_mb": metrics.get("JSHeapUsedSize", 0.0) / 2**20 or None,
            "nodes": metrics.get("Nodes"),
        }
    finally:
        context.close()


def _loads_summary(loads: list[dict[str, Any]]) -> dict[str, Any]:
    first = loads[0]
    return {
        "loads": len(loads),
        "ms": summary([x["ms"] for x in loads]),
        "wall_ms": summary([x["wall_ms"] for x in loads]),
        "samples_ms": [x["ms"] for x in loads],
        "script_ms": summary([x["script_ms"] for x in loads if x["script_ms"] is not None]),
        "data_requested_ms": summary(
            [x["data_requested_ms"] for x in loads if x["data_requested_ms"] is not None]
        ),
        "data_ms": summary([x["data_ms"] for x in loads if x["data_ms"] is not None]),
        "heap_mb": summary([x["heap_mb"] for x in loads if x["heap_mb"] is not None]),
        "requests": len(first["requests"]),
        "request_paths": first["requests"],
        "api_answers_before_render": first["api"],
        "bytes_before_render": first["bytes"],
        "dom_nodes": first["nodes"],
        "timeline": first["timeline"],
        "firsts_ms": first["firsts_ms"],  # of the first load: what it fetched before the render
    }


def _end(resources: list[dict[str, Any]], part: str, key: str = "end_ms") -> float | None:
    return max(
        (r[key] for r in resources if part in r["name"] or r["name"].endswith(part)), default=None
    )


def _path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _div(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} MB"
