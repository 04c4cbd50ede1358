"""The table (terminal and JSON) and the PNG plots."""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.node import TICK_SECONDS

Target = tuple[str, float] | tuple[str, float, float]  # ("<=", x) ... or ("in", low, high)

# The APScheduler baselines of the main table, in its column order.
BASELINES = ("baseline_memory", "baseline_sqlalchemy", "baseline_postgres")
BASELINE_NAMES = {
    "baseline_memory": "APScheduler+memory",
    "baseline_sqlalchemy": "APScheduler+SQLite",
    "baseline_postgres": "APScheduler+PostgreSQL x3",
}

# comparison of a target → whether a value meets it
_MEETS: dict[str, Callable[..., bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
    "in": lambda v, low, high: low <= v <= high,
    "==": operator.eq,
}

# figure key → target: the mesh figures' from issue 6; the timing figures' are the bounds the
# unit tests asserted before they became benchmark figures (the token bucket's grants in its
# window scale with the window, so that target is set where the row is made).
TARGETS: dict[str, Target] = {
    "fires_at_2000": (">=", 2000.0),
    "fires_max": (">=", 2000.0),
    "fires_ratio_memory": (">=", 1.2),
    "write_p50_ms": ("<=", 3.0),
    "write_p99_ms": ("<=", 15.0),
    "failover_p50_s": ("<=", 0.6),
    "failover_max_s": ("<=", 1.5),
    "lateness_p50_ms": ("<=", 2.0),
    "lateness_p99_ms": ("<=", 20.0),
    # Issue 15: no spurious leader change in a long run at 1,000 fires/s; the lateness targets.
    "steady_leader_changes": ("==", 0.0),
    "steady_lateness_p50_ms": ("<=", 2.0),
    "steady_lateness_p99_ms": ("<=", 20.0),
    "scale_max_rss_mb": ("<=", 400.0),
    "scale_restart_s": ("<=", 10.0),
    # The performance issue: creating schedules in bulk (POST /api/schedules/bulk).
    "scale_create_bulk_per_s": (">=", 5000.0),
    # Issue 15: the 1,000,000-schedule step (--only million).
    "scale_1m_max_rss_mb": ("<=", 1536.0),
    "scale_1m_restart_serving_s": ("<=", 20.0),
    "idle_max_cpu_percent": ("<=", 1.0),
    "timing_bucket_max_1s": ("<=", 21.0),
    "timing_sends_unreachable_s": ("<", 0.5),
    "timing_toxiproxy_latency_s": ("<", 0.4),
    "timing_toxiproxy_jitter_max_s": ("<", 0.3),
    "timing_toxiproxy_bandwidth_s": ("<", 1.5),
    "timing_no_handler_s": ("<", 10.0),
    # Issue 11: CURVE may cost at most 15 % of the throughput (secured ÷ plain max fires/s).
    "curve_fires_ratio": (">=", 0.85),
    # Issue 13: a replica's reads never reach the voters.
    "replica_voter_requests": ("==", 0.0),
}


def _target_text(target: Target) -> str:
    if target[0] == "in":
        return f"{target[1]:g}..{target[2]:g}"
    return f"{target[0]} {target[1]:g}"


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return a / b
    return None


def rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: mesh value, target, met, and each baseline with mesh/baseline.

    Rows of the ``timing`` and ``curve`` sections compare with a baseline measured in the same
    run (``baseline``, ``ratio_baseline``) instead of APScheduler; ``mesh`` is their value (for
    ``curve``: the mesh with CURVE keys, its baseline the same mesh without).
    """
    out: list[dict[str, Any]] = []

    def row(
        key: str,
        label: str,
        unit: str,
        mesh: Any,
        memory: Any = None,
        sqlite: Any = None,
        postgres: Any = None,
        *,
        section: str = "mesh",
        baseline: Any = None,
        target: Target | None = None,
        met: bool | None = None,
    ) -> None:
        target = target or TARGETS.get(key)
        if met is None and target is not None and isinstance(mesh, int | float):
            met = _MEETS[target[0]](mesh, *target[1:])
        out.append(
            {
                "key": key,
                "section": section,
                "figure": label,
                "unit": unit,
                "mesh": mesh,
                "target": _target_text(target) if target else None,
                "met": met,
                "memory": memory,
                "ratio_memory": _ratio(mesh, memory),
                "sqlite": sqlite,
                "ratio_sqlite": _ratio(mesh, sqlite),
                "postgres": postgres,
                "ratio_postgres": _ratio(mesh, postgres),
                "baseline": baseline,
                "ratio_baseline": _ratio(mesh, baseline),
            }
        )

    f = figures.get("fires")
    if isinstance(f, dict) and "summary" in f:
        s = f["summary"]
        pg = s.get("baseline_postgres", {})
        row(
            "fires_at_2000",
            f"fires/s at {s['target_offered']:.0f} offered",
            "/s",
            s["mesh"]["at_target"],
            s["baseline_memory"]["at_target"],
            s["baseline_sqlalchemy"]["at_target"],
            pg.get("at_target"),
        )
        row(
            "fires_max",
            "fires/s max (ramp)",
            "/s",
            s["mesh"]["max"],
            s["baseline_memory"]["max"],
            s["baseline_sqlalchemy"]["max"],
            pg.get("max"),
        )
        row(
            "fires_ratio_memory",
            "max fires/s / APScheduler+memory max",
            "x",
            _ratio(s["mesh"]["max"], s["baseline_memory"]["max"]),
        )
        low = {k: _get(s, k, "low") or {} for k in ("mesh", *BASELINES)}
        if low["mesh"] or low["baseline_postgres"]:
            offered = next(v["offered"] for v in low.values() if v)
            row(
                "fires_low_achieved",
                f"fires/s at {offered:.0f} offered (ramp)",
                "/s",
                low["mesh"].get("achieved"),
                *(low[k].get("achieved") for k in BASELINES),
            )
            for q in ("p50", "p99"):
                row(
                    f"fires_low_lateness_{q}_ms",
                    f"  lateness {q} at {offered:.0f} fires/s offered",
                    "ms",
                    low["mesh"].get(f"lateness_{q}_ms"),
                    *(low[k].get(f"lateness_{q}_ms") for k in BASELINES),
                )
    w = figures.get("write")
    if isinstance(w, dict) and "follower" in w:
        for q in ("p50", "p99"):
            row(
                f"write_{q}_ms",
                f"write {q} (POST to follower → 201)",
                "ms",
                w["follower"][q],
                _get(w, "baseline_memory", q),
                _get(w, "baseline_sqlalchemy", q),
            )
        row(
            "write_leader_p50_ms",
            "write p50 (POST to leader)",
            "ms",
            w["leader"]["p50"],
            _get(w, "baseline_memory", "p50"),
            _get(w, "baseline_sqlalchemy", "p50"),
        )
    fo = figures.get("failover")
    if isinstance(fo, dict) and "p50_s" in fo:
        row("failover_p50_s", f"failover p50 ({fo['kills']} leader SIGKILLs)", "s", fo["p50_s"])
        row("failover_max_s", "failover max", "s", fo["max_s"])
        row(
            "failover_election_p50_s",
            "  of which: new leader elected, p50",
            "s",
            _get(fo, "election", "p50"),
        )
    st = figures.get("steady")
    if isinstance(st, dict) and "leader_changes" in st:
        _steady_rows(st, row)
    la = figures.get("lateness")
    if isinstance(la, dict) and "mesh" in la:
        for q in ("p50", "p99"):
            row(
                f"lateness_{q}_ms",
                f"lateness {q} ({la['schedules']} schedules)",
                "ms",
                la["mesh"][q],
                _get(la, "baseline_memory", q),
                _get(la, "baseline_sqlalchemy", q),
                _get(la, "baseline_postgres", q),
            )
    sc = figures.get("scale")
    if isinstance(sc, dict) and "max_rss_mb" in sc:
        n = sc["schedules"]
        row(
            "scale_create_s",
            f"create {n} schedules (64 parallel POSTs)",
            "s",
            _get(sc, "create", "seconds"),
            _get(sc, "baseline_memory", "create_s"),
        )
        row(
            "scale_create_per_s",
            f"create {n} schedules, one per POST (64 parallel)",
            "/s",
            _get(sc, "create", "per_s"),
        )
        row(
            "scale_create_bulk_per_s",
            f"create {n} more with POST /api/schedules/bulk"
            f" ({_get(sc, 'create_bulk', 'per_request')} per request,"
            f" {_get(sc, 'create_bulk', 'concurrency')} in flight)",
            "/s",
            _get(sc, "create_bulk", "per_s"),
        )
        row(
            "scale_max_rss_mb",
            f"RSS per node (max) with {n}",
            "MB",
            sc["max_rss_mb"],
            _get(sc, "baseline_memory", "rss_mb"),
            _get(sc, "baseline_sqlalchemy", "rss_mb"),
        )
        row(
            "scale_restart_s",
            "follower restart → serving + caught up",
            "s",
            sc.get("restart_s"),
            None,
            _get(sc, "baseline_sqlalchemy", "restart_s"),
        )
        row(
            "scale_cpu_per_tick_ms",
            f"leader CPU per tick (idle, {round(1 / TICK_SECONDS)} ticks/s)",
            "ms",
            sc.get("leader_cpu_ms_per_tick"),
        )
        row(
            "scale_leader_cpu_percent",
            f"leader idle CPU with {n}",
            "%",
            _get(sc, "cpu_percent", sc.get("leader", "")),
            _get(sc, "baseline_memory", "idle_cpu_percent"),
            _get(sc, "baseline_sqlalchemy", "idle_cpu_percent"),
        )
    m = _get(sc, "million") or figures.get("million")
    if isinstance(m, dict) and "max_rss_mb" in m:
        _million_rows(m, row)
    i = figures.get("idle")
    if isinstance(i, dict) and "max_node_cpu_percent" in i:
        row(
            "idle_max_cpu_percent",
            "idle CPU per node (max of 3)",
            "%",
            i["max_node_cpu_percent"],
            _get(i, "baseline_memory", "cpu_percent"),
        )
    t = figures.get("timing")
    if isinstance(t, dict):
        _timing_rows(t, row)
    c = figures.get("curve")
    if isinstance(c, dict) and "ratio" in c:
        _curve_rows(c, row)
    r = figures.get("replica")
    if isinstance(r, dict) and "steps" in r:
        _replica_rows(r, row)
    d = figures.get("dashboard")
    if isinstance(d, dict) and "api" in d:
        _dashboard_rows(d, row)
    return out


def _steady_rows(st: dict[str, Any], row: Callable[..., None]) -> None:
    """The steady phase: leader changes over the whole window, then what the load got."""
    row(
        "steady_leader_changes",
        f"leader changes in {st['window_s']:.0f} s at {st['offered']:,.0f} fires/s offered",
        "",
        st["leader_changes"],
    )
    row("steady_fires_per_s", "  achieved fires/s over that window", "/s", st["achieved"])
    # Fires that left no record (skipped or coalesced behind a backlog) show only here.
    row(
        "steady_due_recorded_percent",
        "  fires due in the window with a record",
        "%",
        100.0 * st["due_in_window"] / st["expected_due"] if st.get("expected_due") else None,
    )
    for q in ("p50", "p99", "max"):
        row(f"steady_lateness_{q}_ms", f"  lateness {q}", "ms", _get(st, "lateness_ms", q))
    row("steady_leader_cpu_percent", "  leader CPU", "%", st.get("leader_cpu_percent"))
    row(
        "steady_failures",
        "  failures (not success, unanswered health, history gaps)",
        "",
        st.get("failures"),
    )


def _million_rows(m: dict[str, Any], row: Callable[..., None]) -> None:
    """The scale phase's 1,000,000-schedule step (full runs, or --only million): issue 15's
    targets (1.5 GB per node, serving again 20 s after a restart); caught up keeps the
    100,000 step's. Fewer schedules than asked for (no bulk API: single POSTs, capped) show in
    the labels."""
    n = m["schedules"]
    how = "bulk, 1,000 per request" if _get(m, "create", "api") == "bulk" else "single POSTs"
    short = "" if n >= m["target_schedules"] else f" (of {m['target_schedules']:,} asked)"
    row(
        "scale_1m_create_per_s",
        f"create {n:,} schedules ({how}){short}",
        "/s",
        _get(m, "create", "per_s"),
    )
    row(
        "scale_1m_max_rss_mb",
        f"  RSS per node (max) with {n:,}",
        "MB",
        m["max_rss_mb"],
        target=TARGETS["scale_1m_max_rss_mb"],
    )
    row(
        "scale_1m_peak_rss_mb",
        "  peak RSS per node (max VmHWM)",
        "MB",
        m.get("max_peak_rss_mb"),
    )
    row(
        "scale_1m_leader_changes",
        "  leader changes while creating",
        "",
        m.get("leader_changes"),
    )
    row(
        "scale_1m_restart_serving_s",
        "  follower restart → serving",
        "s",
        m.get("restart_serving_s"),
        target=TARGETS["scale_1m_restart_serving_s"],
    )
    row(
        "scale_1m_restart_s",
        "  follower restart → serving + caught up",
        "s",
        m.get("restart_s"),
        target=TARGETS["scale_restart_s"],
    )
    row(
        "scale_1m_leader_cpu_percent",
        f"  leader idle CPU with {n:,} far-future schedules",
        "%",
        m.get("leader_cpu_percent"),
    )


def _dashboard_rows(d: dict[str, Any], row: Callable[..., None]) -> None:
    """The dashboard's reads on a follower against what a naive dashboard would fetch (every
    schedule, in pages of 1,000; its p50 in the same run is the baseline of the p50 rows), and
    the browser's load times. The issue's target, *the overview of a mesh with 10,000 schedules
    loads in under a second*, is on the browser's overview rows (reported, not asserted; the
    pool is smaller with --quick or --scale, as the first row says)."""
    n = d["schedules"]
    follower, leader = d["api"]["follower"], d["api"]["leader"]
    naive = follower["naive"]

    def api_rows(key: str, label: str) -> None:
        ms = follower[key]["ms"]
        row(
            f"dashboard_{key}_p50_ms",
            f"{label}, p50",
            "ms",
            ms["p50"],
            section="dashboard",
            baseline=naive["ms"]["p50"],
        )
        indent = " " * (len(label) - len(label.lstrip()) + 2)
        row(f"dashboard_{key}_p99_ms", f"{indent}p99", "ms", ms["p99"], section="dashboard")

    api_rows("overview", f"GET /api/overview on a follower ({n:,} schedules)")
    row(
        "dashboard_overview_leader_p50_ms",
        "  on the leader, p50 (baseline: its own full listing)",
        "ms",
        leader["overview"]["ms"]["p50"],
        section="dashboard",
        baseline=leader["naive"]["ms"]["p50"],
    )
    row(
        "dashboard_overview_bytes",
        "  answer size",
        "B",
        follower["overview"]["bytes"],
        section="dashboard",
        baseline=naive["bytes"],
    )
    api_rows("schedules_page", "GET /api/schedules?limit=50 (schedules page)")
    api_rows("search", f"  &q= matching {follower['search'].get('matched')}")
    api_rows("search_all", "  &q= matching every schedule")
    row(
        "dashboard_naive_p50_ms",
        f"naive: every schedule, {naive['pages']} pages of {naive['page_limit']:,}, p50",
        "ms",
        naive["ms"]["p50"],
        section="dashboard",
    )
    row(
        "dashboard_naive_max_ms",
        f"  max of {naive['rounds']}",
        "ms",
        naive["ms"]["max"],
        section="dashboard",
    )
    b = d.get("browser")
    if not isinstance(b, dict):
        return
    for page, what, target in (
        ("overview", "overview (issue: < 1 s at 10,000)", ("<", 1000.0)),
        ("schedules", "schedules page, 50 rows", None),
    ):
        s = b.get(page)
        if not isinstance(s, dict):
            continue
        row(
            f"dashboard_browser_{page}_p50_ms",
            f"browser: {what}, p50 of {s['loads']}",
            "ms",
            s["ms"]["p50"],
            section="dashboard",
            target=target,
        )
        row(
            f"dashboard_browser_{page}_max_ms",
            "  max",
            "ms",
            s["ms"]["max"],
            section="dashboard",
            target=target,
        )


def _replica_rows(r: dict[str, Any], row: Callable[..., None]) -> None:
    """Issue 13: the replica's lag stays under 1 s at 1,000 changes/s (a target on each step's
    max), and its reads leave the voters' request counts where they were. The lag rows are for
    a replica following a follower voter; their baseline, the same following the leader."""
    via_leader = {s["offered"]: s for s in r.get("steps_via_leader", [])}
    for s in r["steps"]:
        k, v = f"replica_{s['offered']}", s["visible_ms"]
        other = via_leader.get(s["offered"], {})
        row(
            f"{k}_committed",
            f"changes/s at {s['offered']}/s offered (PUT to the leader; baseline: via leader)",
            "/s",
            s["achieved"],
            section="replica",
            baseline=other.get("achieved"),
        )
        for q in ("p50", "p99", "max"):
            row(
                f"{k}_visible_{q}_ms",
                f"  commit → visible on the replica, {q}",
                "ms",
                v[q],
                section="replica",
                baseline=_get(other, "visible_ms", q),
                target=("<", 1000.0) if q == "max" else None,
            )
        row(
            f"{k}_pause_max_ms",
            "  the replica's longest pause (no /api/health answer)",
            "ms",
            s["pause_max_ms"],
            section="replica",
            baseline=other.get("pause_max_ms"),
        )
    row(
        "replica_health_lag_max_s",
        "replica /api/health lag_seconds, max over every step",
        "s",
        r["max_health_lag_s"],
        section="replica",
        target=("<", 1.0),
    )
    rep, fol = r["reads"]["replica"], r["reads"]["follower"]
    row(
        "replica_reads_per_s",
        f"GET /api/schedules/{{id}} per s, {rep['clients']} clients (baseline: a follower)",
        "/s",
        rep["gets_per_s"],
        section="replica",
        baseline=fol["gets_per_s"],
    )
    for q in ("p50", "p99"):
        row(
            f"replica_read_{q}_ms",
            f"  read latency {q}",
            "ms",
            rep["latency_ms"][q],
            section="replica",
            baseline=fol["latency_ms"][q],
        )
    row(
        "replica_voter_requests",
        "voters' API requests meanwhile (baseline: while the follower served)",
        "",
        sum(rep["voter_requests"].values()),
        section="replica",
        baseline=sum(fol["voter_requests"].values()),
    )


def _curve_rows(c: dict[str, Any], row: Callable[..., None]) -> None:
    s, p = c["secured"], c["plain"]
    n = c["rounds"]
    row(
        "curve_fires_max",
        f"fires/s max (ramp; mean of {n} meshes each)",
        "/s",
        s["fires_max"],
        section="curve",
        baseline=p["fires_max"],
    )
    row(
        "curve_fires_ratio",
        "  secured ÷ plain (issue 11: CURVE costs ≤ 15 %)",
        "x",
        c["ratio"]["fires_max"],
        section="curve",
    )
    row(
        "curve_cpu_ms_per_fire",
        "leader CPU per fire at the max",
        "ms",
        s["cpu_ms_per_fire"],
        section="curve",
        baseline=p["cpu_ms_per_fire"],
    )
    for q in ("p50", "p99"):
        row(
            f"curve_write_{q}_ms",
            f"write {q} (POST to follower → 201; {s['write']['count']} each)",
            "ms",
            s["write"][q],
            section="curve",
            baseline=p["write"][q],
        )


def _timing_rows(t: dict[str, Any], row: Callable[..., None]) -> None:
    b = t.get("token_bucket")
    if isinstance(b, dict):
        expected = b["expected"]
        row(
            "timing_bucket_grants",
            f"token bucket {b['rate']:g}/s, {b['workers']} workers: grants in {b['seconds']:g} s",
            "",
            b["grants"],
            section="timing",
            target=("in", 0.9 * expected, 1.1 * expected),
        )
        row(
            "timing_bucket_max_1s",
            "  max grants in any 1 s window",
            "",
            b["max_in_1s"],
            section="timing",
        )
    s = t.get("sends")
    if isinstance(s, dict):
        row(
            "timing_sends_unreachable_s",
            f"{s['count']:,} sends to an unreachable peer (baseline: a live peer)",
            "s",
            s["unreachable"]["seconds"],
            section="timing",
            baseline=s["live"]["seconds"],
        )
    x = t.get("toxiproxy")
    if isinstance(x, dict):
        plain, plain_large = _get(x, "plain", "p50"), _get(x, "plain_50kb", "p50")
        row(
            "timing_toxiproxy_plain_s",
            "toxiproxy round trip, no toxic (p50: the baseline)",
            "s",
            plain,
            section="timing",
        )
        lat, jit, bw = x.get("latency", {}), x.get("jitter", {}), x.get("bandwidth", {})
        row(
            "timing_toxiproxy_latency_s",
            f"  with {_get(lat, 'attributes', 'latency')} ms latency (max of {lat.get('count')})",
            "s",
            lat.get("max"),
            section="timing",
            baseline=plain,
        )
        attrs = jit.get("attributes", {})
        row(
            "timing_toxiproxy_jitter_max_s",
            f"  with {attrs.get('latency')}±{attrs.get('jitter')} ms jitter "
            f"(max of {jit.get('count')})",
            "s",
            jit.get("max"),
            section="timing",
            baseline=plain,
        )
        row(
            "timing_toxiproxy_bandwidth_s",
            f"  {bw.get('bytes', 0) // 1000} KB at {_get(bw, 'attributes', 'rate')} KB/s "
            f"(max of {bw.get('count')}; baseline: no toxic)",
            "s",
            bw.get("max"),
            section="timing",
            baseline=plain_large,
        )
    n = t.get("no_handler")
    if isinstance(n, dict):
        ended = n.get("ended_after_s")
        row(
            "timing_no_handler_s",
            f"job no handler offers → {n.get('status') or 'not ended'} "
            f"(no_handler_wait {n['no_handler_wait_s']:g} s)",
            "s",
            ended,
            section="timing",
            met=False if ended is None else None,  # not ended within the wait given up after
        )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.2g}"
    return str(v)


def notes(figures: dict[str, Any]) -> list[str]:
    """One line per baseline that did not run (PostgreSQL missing...) or failed, per phase."""
    out = []
    for phase, fig in figures.items():
        if not isinstance(fig, dict):
            continue
        for key, name in BASELINE_NAMES.items():
            res = fig.get(key)
            if isinstance(res, dict) and res.get("skipped"):
                out.append(f"{phase}: {name} baseline skipped: {res['skipped']}")
            elif isinstance(res, dict) and res.get("error"):
                out.append(f"{phase}: {name} baseline failed: {res['error'].splitlines()[0]}")
    return out


def table(
    table_rows: list[dict[str, Any]], errors: dict[str, str], note_lines: list[str] | None = None
) -> str:
    """The rows as text: the mesh figures against APScheduler, then the timing figures against
    their same-run baselines, then one line per skipped baseline and per failed phase."""
    mesh = [r for r in table_rows if r.get("section", "mesh") == "mesh"]
    timing = [r for r in table_rows if r.get("section") == "timing"]
    curve = [r for r in table_rows if r.get("section") == "curve"]
    others = [r for r in table_rows if r.get("section", "mesh") != "mesh"]
    lines: list[str] = []
    if mesh or not others:
        head = ["figure", "unit", "mesh", "target", "met"]
        head += ["APS+memory", "mesh÷", "APS+SQLite", "mesh÷"]
        with_pg = any(r.get("postgres") is not None for r in mesh)
        if with_pg:
            head += ["APS+PGx3", "mesh÷"]
        lines += _columns(
            head,
            [
                [
                    *_leading(r),
                    _fmt(r["memory"]),
                    _fmt(r["ratio_memory"]),
                    _fmt(r["sqlite"]),
                    _fmt(r["ratio_sqlite"]),
                    *([_fmt(r.get("postgres")), _fmt(r.get("ratio_postgres"))] if with_pg else []),
                ]
                for r in mesh
            ],
        )
    if timing:
        if lines:
            lines.append("")
        head = ["timing (bounds once asserted by unit tests)", "unit", "value", "target", "met"]
        head += ["baseline", "value÷"]
        lines += _columns(
            head,
            [[*_leading(r), _fmt(r["baseline"]), _fmt(r["ratio_baseline"])] for r in timing],
        )
    if curve:
        if lines:
            lines.append("")
        head = ["CURVE keys vs none (same run)", "unit", "secured", "target", "met"]
        head += ["plain", "secured÷plain"]
        lines += _columns(
            head,
            [[*_leading(r), _fmt(r["baseline"]), _fmt(r["ratio_baseline"])] for r in curve],
        )
    replica = [r for r in table_rows if r.get("section") == "replica"]
    if replica:
        if lines:
            lines.append("")
        head = ["read-only replica (lag: following a follower)", "unit", "replica", "target"]
        head += ["met", "baseline", "replica÷"]
        lines += _columns(
            head,
            [[*_leading(r), _fmt(r["baseline"]), _fmt(r["ratio_baseline"])] for r in replica],
        )
    dash = [r for r in table_rows if r.get("section") == "dashboard"]
    if dash:
        if lines:
            lines.append("")
        head = ["dashboard (baseline: naive full listing, same run)", "unit", "value"]
        head += ["target", "met", "baseline", "value÷"]
        lines += _columns(
            head,
            [[*_leading(r), _fmt(r["baseline"]), _fmt(r["ratio_baseline"])] for r in dash],
        )
    for note in note_lines or []:
        lines.append(note)
    for phase, err in errors.items():
        lines.append(f"{phase}: FAILED: {err.splitlines()[0] if err else err}")
    return "\n".join(lines)


def _leading(r: dict[str, Any]) -> list[str]:
    return [r["figure"], r["unit"], _fmt(r["mesh"]), r["target"] or "-", _fmt(r["met"])]


def _columns(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    lines = []
    for k, r in enumerate([head, *body]):
        cells = [
            str(c).ljust(w) if j < 2 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


# ------------------------------------------------------------------------------------- plots


def plots(figures: dict[str, Any], out_dir: Path, stem: str) -> list[str] | None:
    """Write the PNGs; returns their paths (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    paths: list[str] = []
    labels = {
        "mesh": "mesh (3 nodes, 2 handlers)",
        "baseline_memory": "APScheduler + memory",
        "baseline_sqlalchemy": "APScheduler + SQLite",
        "baseline_postgres": "APScheduler + PostgreSQL, 3 schedulers",
    }

    f = figures.get("fires")
    if isinstance(f, dict) and isinstance(f.get("mesh"), list):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        top = 0.0
        for key, label in labels.items():
            steps = f.get(key)
            if isinstance(steps, list) and steps:
                xs = [s["offered"] for s in steps]
                ys = [s["achieved"] for s in steps]
                top = max(top, *xs)
                ax.plot(xs, ys, marker="o", label=label)
        ax.plot([0, top], [0, top], ls=":", color="grey", label="achieved = offered")
        ax.axhline(2000, ls="--", color="red", lw=0.8, label="target 2,000/s")
        ax.set_xlabel("offered fires/s")
        ax.set_ylabel("achieved fires/s (recorded + replicated)")
        ax.set_title("Sustained fire rate vs offered rate")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / f"{stem}-throughput.png"))
        plt.close(fig)

    def cdf(
        title: str,
        series: dict[str, list[float]],
        xlabel: str,
        name: str,
        target: float | None = None,
    ) -> None:
        series = {k: v for k, v in series.items() if v}
        if not series:
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, values in series.items():
            v = sorted(max(x, 1e-3) for x in values)
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=f"{label} (n={len(v)})")
        if target is not None:
            unit = "s" if "seconds" in xlabel else "ms"
            ax.axvline(target, ls="--", color="red", lw=0.8, label=f"target p50 {target:g} {unit}")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction ≤ x")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        paths.append(_save(fig, out_dir / f"{stem}-{name}.png"))
        plt.close(fig)

    w = figures.get("write")
    if isinstance(w, dict) and "follower" in w:
        cdf(
            "Write latency (sequential add_schedule / POST → 201)",
            {
                "mesh: POST to follower": w["follower"].get("samples_ms", []),
                "mesh: POST to leader": w["leader"].get("samples_ms", []),
                "APScheduler + memory": _get(w, "baseline_memory", "samples_ms") or [],
                "APScheduler + SQLite": _get(w, "baseline_sqlalchemy", "samples_ms") or [],
            },
            "latency (ms, log)",
            "write-latency",
            3.0,
        )
    la = figures.get("lateness")
    if isinstance(la, dict) and "mesh" in la:
        cdf(
            f"Lateness at {la['schedules']} schedules (start - scheduled fire time)",
            {
                "mesh": la["mesh"].get("samples_ms", []),
                "APScheduler + memory": _get(la, "baseline_memory", "samples_ms") or [],
                "APScheduler + SQLite": _get(la, "baseline_sqlalchemy", "samples_ms") or [],
                "APScheduler + PostgreSQL, 3 schedulers": (
                    _get(la, "baseline_postgres", "samples_ms") or []
                ),
            },
            "lateness (ms, log)",
            "lateness",
            2.0,
        )
    c = figures.get("curve")
    if isinstance(c, dict) and "ratio" in c:
        paths.append(_curve_plot(plt, c, out_dir / f"{stem}-curve.png"))
    r = figures.get("replica")
    if isinstance(r, dict) and "steps" in r:
        paths.append(_replica_plot(plt, r, out_dir / f"{stem}-replica.png"))
    d = figures.get("dashboard")
    if isinstance(d, dict) and "api" in d:
        paths.append(_dashboard_plot(plt, d, out_dir / f"{stem}-dashboard.png"))
    fo = figures.get("failover")
    if isinstance(fo, dict) and fo.get("samples_s"):
        cdf(
            f"Failover: leader SIGKILL → first fire by the new leader ({fo['kills']} kills)",
            {"mesh": fo["samples_s"]},
            "seconds (log)",
            "failover",
            0.6,
        )
    return paths


def _curve_plot(plt: Any, c: dict[str, Any], path: Path) -> str:
    """Achieved vs offered fires/s and the follower write latency, with keys and without."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = {"plain": "tab:blue", "secured": "tab:red"}
    for mode, color in colors.items():
        for k, ramp in enumerate(c[mode]["ramps"]):
            left.plot(
                [s["offered"] for s in ramp],
                [s["achieved"] for s in ramp],
                marker="o",
                color=color,
                alpha=0.8,
                label=mode if k == 0 else None,
            )
        v = sorted(max(x, 1e-3) for x in c[mode]["write_samples_ms"])
        if v:
            right.plot(v, [(i + 1) / len(v) for i in range(len(v))], color=color, label=mode)
    ratio = c["ratio"]["fires_max"]
    left.set_title(
        "Fires/s, CURVE keys vs none"
        + (f" (max secured ÷ plain = {ratio:.2f})" if ratio is not None else "")
    )
    left.set_xlabel("offered fires/s")
    left.set_ylabel("achieved fires/s")
    right.set_title("Write latency, POST to a follower → 201")
    right.set_xscale("log")
    right.set_xlabel("latency (ms, log)")
    right.set_ylabel("fraction ≤ x")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    out = _save(fig, path)
    plt.close(fig)
    return out


def _replica_plot(plt: Any, r: dict[str, Any], path: Path) -> str:
    """Commit → visible on the replica per offered rate; reads/s on the replica vs a follower."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = {}
    for key, via, style in (("steps", "follower", "-"), ("steps_via_leader", "leader", ":")):
        for s in r.get(key, []):
            v = sorted(max(x, 0.1) for x in s["visible_samples_ms"])
            if v:
                color = colors.setdefault(s["offered"], f"C{len(colors)}")
                left.plot(
                    v,
                    [(i + 1) / len(v) for i in range(len(v))],
                    ls=style,
                    color=color,
                    label=f"via {via}: {s['offered']}/s offered ({s['achieved']:.0f}/s done)",
                )
    left.axvline(1000, ls="--", color="red", lw=0.8, label="1 s")
    left.set_xscale("log")
    left.set_xlabel("leader's answer → visible on the replica (ms, log; 0 drawn at 0.1)")
    left.set_ylabel("fraction ≤ x")
    left.set_title(f"Replica lag under writes ({r['schedules']} schedules, zone {r['zone']})")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, which="both")
    names = ["replica", "follower"]
    reads = [r["reads"][n] for n in names]
    bars = right.bar(
        [f"{n} {x['target']}" for n, x in zip(names, reads, strict=True)],
        [x["gets_per_s"] for x in reads],
        color=["tab:green", "tab:blue"],
    )
    for bar, x in zip(bars, reads, strict=True):
        right.annotate(
            f"voters' requests: {sum(x['voter_requests'].values())}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    right.set_ylabel("GET /api/schedules/{id} per s")
    right.set_title(f"Reads, {reads[0]['clients']} clients")
    right.grid(alpha=0.3, axis="y")
    out = _save(fig, path)
    plt.close(fig)
    return out


def _dashboard_plot(plt: Any, d: dict[str, Any], path: Path) -> str:
    """API answer times (p50 and p99, follower and leader) next to the naive full listing;
    the browser's load times per fresh context."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    keys = [
        ("overview", "overview"),
        ("schedules_page", "schedules\nlimit=50"),
        ("search", "search"),
        ("search_all", "search\n(all match)"),
        ("naive", "every\nschedule"),
    ]
    width = 0.2
    for k, (side, q) in enumerate(
        (("follower", "p50"), ("follower", "p99"), ("leader", "p50"), ("leader", "p99"))
    ):
        values = [d["api"][side][key]["ms"][q] or 0.0 for key, _ in keys]
        left.bar(
            [i + (k - 1.5) * width for i in range(len(keys))],
            values,
            width,
            label=f"{side} {q}",
            color=f"C{k}",
        )
    left.set_xticks(range(len(keys)), [label for _, label in keys])
    left.set_yscale("log")
    left.set_ylabel("ms (log)")
    left.set_title(f"API answer times, {d['schedules']:,} schedules")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, axis="y", which="both")
    b = d.get("browser") or {}
    pages = [p for p in ("overview", "schedules") if isinstance(b.get(p), dict)]
    for i, p in enumerate(pages):
        v = b[p]["samples_ms"]
        right.scatter([i] * len(v), v, alpha=0.6, color=f"C{i}")
        right.hlines(b[p]["ms"]["p50"], i - 0.2, i + 0.2, color="black", lw=1)
    right.axhline(1000, ls="--", color="red", lw=0.8, label="target: overview < 1 s")
    right.set_xticks(range(len(pages)), pages)
    right.set_xlim(-0.5, max(1, len(pages)) - 0.5)
    right.set_ylim(bottom=0)
    right.set_ylabel("navigation start → rendered (ms)")
    right.set_title("Headless Chromium, fresh contexts (line: p50)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    out = _save(fig, path)
    plt.close(fig)
    return out


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)
