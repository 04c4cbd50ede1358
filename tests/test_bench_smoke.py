"""The benchmark (``python -m bench``) at a tiny size: it runs real node and handler processes,
writes the JSON result with every expected key, and stops every process it started. No speed
assertions: the benchmark measures, the tests only check that it works."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import main as bench_main
from bench import report, steady
from bench.harness import LIVE
from bench.stats import percentile, step_should_stop

pytestmark = pytest.mark.timeout(120)


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def test_write_and_idle_at_tiny_size_give_positive_figures(tmp_path: Path) -> None:
    code = bench_main(
        ["--quick", "--only", "write,idle", "--scale", "0.05", "--out", str(tmp_path), "--no-plots"]
    )

    assert code == 0
    [result_file] = tmp_path.glob("bench-*.json")
    result = json.loads(result_file.read_text())
    assert result["errors"] == {}
    assert set(result["figures"]) == {"write", "idle"}
    write = result["figures"]["write"]
    for side in ("follower", "leader", "baseline_memory", "baseline_sqlalchemy"):
        assert write[side]["count"] >= 5, side
        assert _positive(write[side]["p50"]) and _positive(write[side]["p99"]), side
    assert write["follower"]["statuses"] == {"201": write["follower"]["count"]}
    idle = result["figures"]["idle"]
    assert set(idle["nodes"]) == {"n1", "n2", "n3"}
    assert sorted(n["role"] for n in idle["nodes"].values()) == ["follower", "follower", "leader"]
    # /proc counts CPU in 10 ms ticks: over a 1 s window one idle node may read 0, but a mesh of
    # three that heartbeats cannot use none at all.
    cpu = [n["cpu_percent"] for n in idle["nodes"].values()]
    assert all(isinstance(c, int | float) and c >= 0 for c in cpu), cpu
    assert any(c > 0 for c in cpu), cpu
    assert "cpu_percent" in idle["baseline_memory"]
    keys = {row["key"] for row in result["table"]}
    assert {"write_p50_ms", "write_p99_ms", "idle_max_cpu_percent"} <= keys
    assert result["machine"]["nproc"] >= 1


def test_only_million_runs_the_million_step_alone_at_a_tiny_size(tmp_path: Path) -> None:
    args = ["--quick", "--only", "million", "--scale", "0.00001", "--out", str(tmp_path)]
    code = bench_main([*args, "--no-plots", "--no-baseline"])

    assert code == 0
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["errors"] == {}
    assert set(result["figures"]) == {"million"}  # not the 100,000-schedule part before it
    million = result["figures"]["million"]
    assert million["schedules"] == million["target_schedules"] == 10
    assert million["create"]["statuses"] == {"200": 1}
    assert _positive(million["max_rss_mb"]) and _positive(million["restart_serving_s"])
    assert million["leader_changes"] >= 0
    keys = {row["key"] for row in result["table"]}
    assert {"scale_1m_max_rss_mb", "scale_1m_restart_serving_s"} <= keys


def test_curve_compares_meshes_with_and_without_keys(tmp_path: Path) -> None:
    code = bench_main(
        ["--quick", "--only", "curve", "--scale", "0.05", "--out", str(tmp_path), "--no-plots"]
    )

    assert code == 0
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["errors"] == {}
    curve = result["figures"]["curve"]
    assert curve["order"] == ["plain", "secured"]
    for mode in ("plain", "secured"):
        figures = curve[mode]
        assert figures["write"]["statuses"] == {"201": figures["write"]["count"]}, mode
        assert _positive(figures["write"]["p50"]) and _positive(figures["fires_max"]), mode
        assert figures["ramps"] and all(s["count"] > 0 for s in figures["ramps"][0]), mode
    assert (
        curve["ratio"]["fires_max"] == curve["secured"]["fires_max"] / curve["plain"]["fires_max"]
    )
    assert _positive(curve["ratio"]["write_p50"])
    rows = {r["key"]: r for r in result["table"] if r["section"] == "curve"}
    assert rows["curve_fires_ratio"]["target"] == ">= 0.85"
    assert isinstance(rows["curve_fires_ratio"]["met"], bool)
    assert rows["curve_write_p50_ms"]["baseline"] == curve["plain"]["write"]["p50"]


def test_bench_meshes_run_with_keys_unless_told_not_to(tmp_path: Path) -> None:
    """Each node's start line is checked: a mesh labelled secured that ran without keys (or
    the reverse) fails its phase instead of giving figures."""
    from bench.harness import BenchMesh

    for secure in (True, False):
        mesh = BenchMesh(tmp_path / str(secure), handlers=1, secure=secure)
        try:
            mesh.start()
            logs = " ".join(n.log.read_text() for n in mesh.nodes)
            assert logs.count("(CURVE keys in ") == (3 if secure else 0)
        finally:
            mesh.stop()
        assert sorted(p.name for p in (mesh.keys_dir or tmp_path / "-").glob("*.key")) == (
            ["h1.key", "n1.key", "n2.key", "n3.key"] if secure else []
        )
    assert not LIVE


def test_every_started_process_is_stopped(tmp_path: Path) -> None:
    bench_main(
        [
            "--quick",
            "--only",
            "idle",
            "--scale",
            "0.05",
            "--out",
            str(tmp_path),
            "--no-baseline",
            "--no-plots",
        ]
    )

    assert not LIVE
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    for pid in (n.get("pid") for n in result["figures"]["idle"]["nodes"].values()):
        assert pid is None or not os.path.exists(f"/proc/{pid}")


def test_unknown_figure_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--only", "speed"]) == 2
    assert "unknown figure 'speed'" in capsys.readouterr().err


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None


def test_ramp_stops_when_the_achieved_rate_stops_growing() -> None:
    steps = [
        {"offered": 100, "achieved": 100, "lateness_p50_ms": 5},
        {"offered": 200, "achieved": 150, "lateness_p50_ms": 50},
    ]
    assert not step_should_stop(steps)
    steps.append({"offered": 400, "achieved": 155, "lateness_p50_ms": 80})
    assert step_should_stop(steps)


def test_ramp_stops_when_lateness_explodes() -> None:
    assert step_should_stop([{"offered": 100, "achieved": 99, "lateness_p50_ms": 1500}])


def test_table_states_target_and_ratio() -> None:
    rows = report.rows(
        {
            "write": {
                "follower": {"p50": 2.0, "p99": 30.0},
                "leader": {"p50": 1.0},
                "baseline_memory": {"p50": 0.5, "p99": 1.0},
            }
        }
    )
    p50 = next(r for r in rows if r["key"] == "write_p50_ms")
    p99 = next(r for r in rows if r["key"] == "write_p99_ms")
    assert (p50["met"], p50["ratio_memory"]) == (True, 4.0)
    assert p99["met"] is False


def test_postgres_baseline_column_and_skip_line() -> None:
    steps = [
        {"offered": 100.0, "achieved": 50.0, "lateness_p50_ms": 300.0, "lateness_p99_ms": 900.0}
    ]
    mesh_steps = [{**steps[0], "achieved": 100.0, "lateness_p50_ms": 30.0}]
    low = {"offered": 100, "achieved": 50.0, "lateness_p50_ms": 300.0, "lateness_p99_ms": 900.0}
    figures = {
        "fires": {
            "mesh": mesh_steps,
            "baseline_postgres": steps,
            "summary": {
                "target_offered": 2000.0,
                "mesh": {"max": 100.0, "at_target": None, "low": {**low, "achieved": 100.0}},
                "baseline_memory": {"max": None, "at_target": None, "low": None},
                "baseline_sqlalchemy": {"max": None, "at_target": None, "low": None},
                "baseline_postgres": {"max": 50.0, "at_target": None, "low": low},
            },
        },
        "lateness": {
            "schedules": 10,
            "mesh": {"p50": 1.0, "p99": 2.0},
            "baseline_postgres": {"skipped": "PostgreSQL is not installed"},
        },
    }
    rows = report.rows(figures)
    top = next(r for r in rows if r["key"] == "fires_max")
    assert (top["postgres"], top["ratio_postgres"]) == (50.0, 2.0)
    notes = report.notes(figures)
    assert notes == [
        "lateness: APScheduler+PostgreSQL x3 baseline skipped: PostgreSQL is not installed"
    ]
    text = report.table(rows, {}, notes)
    assert "APS+PGx3" in text and notes[0] in text


def test_postgres_cluster_starts_and_stops() -> None:
    """The baseline's throwaway cluster: serves with fsync on, then nothing is left running."""
    from bench import postgres

    try:
        postgres.binaries()
    except postgres.PostgresMissing as e:
        pytest.skip(str(e))
    if postgres.drivers_missing():
        pytest.skip(postgres.drivers_missing() or "")
    import psycopg

    with postgres.cluster() as pg:
        with psycopg.connect(pg.conninfo) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    assert pg.proc is not None and pg.proc.poll() is not None
    assert not pg.dir.exists()


def test_timing_at_tiny_size_gives_every_row_with_its_target(tmp_path: Path) -> None:
    code = bench_main(
        ["--quick", "--only", "timing", "--scale", "0.05", "--out", str(tmp_path), "--no-plots"]
    )

    assert code == 0
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["errors"] == {}
    timing = result["figures"]["timing"]
    assert set(timing) == {"token_bucket", "sends", "toxiproxy", "no_handler"}
    assert timing["token_bucket"]["grants"] > 0
    assert timing["sends"]["unreachable"]["accepted"] == 0
    assert timing["sends"]["live"]["accepted"] > 0
    for part in ("plain", "plain_50kb", "latency", "jitter", "bandwidth"):
        assert timing["toxiproxy"][part]["count"] >= 1, part
    assert timing["no_handler"]["status"] == "error"
    rows = {r["key"]: r for r in result["table"] if r["section"] == "timing"}
    assert set(rows) == {
        "timing_bucket_grants",
        "timing_bucket_max_1s",
        "timing_sends_unreachable_s",
        "timing_toxiproxy_plain_s",
        "timing_toxiproxy_latency_s",
        "timing_toxiproxy_jitter_max_s",
        "timing_toxiproxy_bandwidth_s",
        "timing_no_handler_s",
    }
    assert all(_positive(r["mesh"]) for r in rows.values())
    for key in set(rows) - {"timing_toxiproxy_plain_s"}:
        assert rows[key]["target"] and isinstance(rows[key]["met"], bool), key
    for key in ("timing_sends_unreachable_s", "timing_toxiproxy_latency_s"):
        assert _positive(rows[key]["ratio_baseline"]), key


def test_timing_rows_state_targets_and_same_run_baselines() -> None:
    rows = report.rows(
        {
            "timing": {
                "token_bucket": {
                    "rate": 20.0,
                    "workers": 8,
                    "seconds": 5.0,
                    "grants": 120,
                    "expected": 100.0,
                    "max_in_1s": 21,
                },
                "sends": {"count": 1000, "unreachable": {"seconds": 0.2}, "live": {"seconds": 0.1}},
                "no_handler": {"no_handler_wait_s": 1.0, "ended_after_s": None, "status": None},
            }
        }
    )
    by_key = {r["key"]: r for r in rows}
    grants = by_key["timing_bucket_grants"]
    assert (grants["target"], grants["met"]) == ("90..110", False)
    assert by_key["timing_bucket_max_1s"]["met"] is True
    sends = by_key["timing_sends_unreachable_s"]
    assert (sends["met"], sends["ratio_baseline"]) == (True, 2.0)
    assert by_key["timing_no_handler_s"]["met"] is False  # never ended: the target is missed
    text = report.table(rows, {})
    assert "timing (bounds once asserted by unit tests)" in text and "APS+memory" not in text


def test_replica_phase_measures_lag_and_reads_that_never_reach_the_voters(tmp_path: Path) -> None:
    code = bench_main(
        ["--quick", "--only", "replica", "--scale", "0.05", "--out", str(tmp_path), "--no-plots"]
    )

    assert code == 0
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["errors"] == {}
    fig = result["figures"]["replica"]
    via_follower, via_leader = fig["steps"], fig["steps_via_leader"]
    assert [s["offered"] for s in via_follower] == [s["offered"] for s in via_leader] != []
    for step in via_follower + via_leader:
        assert step["statuses"] == {"200": step["writes"]}, step["statuses"]
        # Every answered write was seen applied on the replica, through its own health poll.
        assert step["visible_ms"]["count"] == step["writes"] and step["visible_ms"]["unseen"] == 0
        assert step["visible_ms"]["max"] >= 0 and step["probe_ms"]["count"] >= 1
        assert step["replica_counters"]["changes"] >= step["writes"]
    assert {s["upstream_node"] for s in via_follower}.isdisjoint(
        {s["upstream_node"] for s in via_leader}
    )
    replica, follower = fig["reads"]["replica"], fig["reads"]["follower"]
    assert replica["statuses"] == {"200": replica["ok"]} and replica["ok"] > 0
    assert replica["target_counted"] == replica["ok"]
    assert replica["voter_requests"] == {"n1": 0, "n2": 0, "n3": 0}
    # The same reads on a voter move its counter by exactly as many: the zero above is a count.
    assert follower["voter_requests"][follower["target"]] == follower["ok"] > 0
    assert sum(follower["voter_requests"].values()) == follower["ok"]
    rows = {r["key"]: r for r in result["table"] if r["section"] == "replica"}
    assert rows["replica_voter_requests"]["met"] is True
    assert rows["replica_voter_requests"]["baseline"] == follower["ok"]
    assert not LIVE


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_dashboard_phase_times_the_api_the_naive_listing_and_the_browser(tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api")
    code = bench_main(
        ["--quick", "--only", "dashboard", "--scale", "0.05", "--out", str(tmp_path), "--no-plots"]
    )

    assert code == 0
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["errors"] == {}
    fig = result["figures"]["dashboard"]
    pool = fig["schedules"]
    for side in ("follower", "leader"):
        api = fig["api"][side]
        for key in ("overview", "schedules_page", "search", "search_all"):
            assert api[key]["ms"]["count"] >= 5 and _positive(api[key]["ms"]["p50"]), (side, key)
        assert api["search"]["matched"] == 10
        # The naive listing saw every schedule (the pool and the harness's write probe).
        assert api["naive"]["schedules"] == api["overview"]["schedules_counted"] >= pool
        assert api["naive"]["bytes"] > api["overview"]["bytes"]
    for page in ("overview", "schedules"):
        loads = fig["browser"][page]
        assert loads["loads"] >= 2 and _positive(loads["ms"]["max"]), page
        assert "/api/events" not in loads["api_answers_before_render"]
    assert "/api/overview" in fig["browser"]["overview"]["api_answers_before_render"]
    assert "/api/schedules?limit=50" in fig["browser"]["schedules"]["api_answers_before_render"]
    rows = {r["key"]: r for r in result["table"] if r["section"] == "dashboard"}
    assert rows["dashboard_browser_overview_max_ms"]["target"] == "< 1000"
    assert isinstance(rows["dashboard_browser_overview_max_ms"]["met"], bool)
    assert (
        rows["dashboard_overview_p50_ms"]["baseline"]
        == fig["api"]["follower"]["naive"]["ms"]["p50"]
    )
    assert not LIVE


def test_steady_at_tiny_size_reports_leader_changes_fires_and_lateness(tmp_path: Path) -> None:
    code = bench_main(
        [
            "--quick",
            "--only",
            "steady",
            "--scale",
            "0.05",
            "--out",
            str(tmp_path),
            "--no-baseline",
            "--no-plots",
        ]
    )

    assert code == 0
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["errors"] == {}
    fig = result["figures"]["steady"]
    assert (fig["schedules"], fig["offered"], fig["window_s"]) == (5, 50.0, 3.0)
    # Every node was polled and some leader seen; the count is the pairs seen minus one.
    assert fig["health_polls"] >= 3 and fig["leadership"]
    assert fig["leader_changes"] == len(fig["leadership"]) - 1
    assert fig["count"] > 0 and _positive(fig["achieved"]) and fig["outcomes"]
    assert fig["lateness_ms"]["count"] > 0 and fig["history_reads"] >= 1
    assert _positive(fig["leader_cpu_percent"])
    rows = {r["key"]: r for r in result["table"] if r["key"].startswith("steady_")}
    assert rows["steady_leader_changes"]["target"] == "== 0"
    assert rows["steady_lateness_p50_ms"]["target"] == "<= 2"
    assert rows["steady_lateness_p99_ms"]["target"] == "<= 20"
    assert rows["steady_fires_per_s"]["mesh"] == fig["achieved"]
    assert _positive(rows["steady_due_recorded_percent"]["mesh"])
    assert not LIVE


def _execution(job: int, due: float) -> dict[str, object]:
    fire = datetime.fromtimestamp(due, UTC).isoformat()
    return {
        "job_id": f"j{job}",
        "schedule_id": "st0",
        "scheduled_fire_time": fire,
        "started_at": datetime.fromtimestamp(due + 0.001, UTC).isoformat(),
        "finished_at": datetime.fromtimestamp(due + 0.002, UTC).isoformat(),
        "outcome": "success",
    }


class _FakeHistory:
    """GET /api/executions over a list (newest first), paged as the API pages it."""

    def __init__(self, records: list[dict[str, object]], limit: int) -> None:
        self.records, self.limit, self.queries = records, limit, []

    def get(self, query: str) -> dict[str, object]:
        self.queries.append(query)
        start = 0
        if "&after=" in query:
            after = query.split("&after=")[1]
            start = next(i for i, r in enumerate(self.records) if r["job_id"] == after) + 1
        page = self.records[start : start + self.limit]
        more = start + self.limit < len(self.records)
        return {"executions": page, "next": page[-1]["job_id"] if more else None}


def test_steady_history_reads_pages_and_takes_each_record_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(steady, "PAGE_LIMIT", 2)
    records = [_execution(i, 100.0 + i) for i in range(3)][::-1]
    fake = _FakeHistory(records, limit=2)
    history = steady.History(fake.get, "st", ws=100.0, we=200.0)

    history.read()
    fake.records = [_execution(i, 100.0 + i) for i in range(6)][::-1]
    history.read()

    assert (history.finished_in_window, history.due_in_window, history.gaps) == (6, 6, 0)
    assert history.outcomes == {"success": 6}
    assert len(fake.queries) == 4 and "&after=j4" in fake.queries[-1]


def test_steady_history_counts_a_gap_when_the_previous_read_left_the_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(steady, "PAGE_LIMIT", 2)
    fake = _FakeHistory([_execution(0, 100.0)], limit=2)
    history = steady.History(fake.get, "st", ws=100.0, we=200.0)
    history.read()
    fake.records = [_execution(i, 100.0 + i) for i in range(5, 8)][::-1]  # j0 expired

    history.read()

    assert (history.gaps, history.finished_in_window) == (1, 4)


def test_steady_history_failed_read_takes_nothing_and_keeps_its_place() -> None:
    answers: list[object] = [None, {"executions": [_execution(0, 100.0)], "next": None}]
    history = steady.History(lambda _q: answers.pop(0), "st", ws=100.0, we=200.0)

    history.read()
    history.read()

    assert (history.failed_reads, history.reads, history.finished_in_window) == (1, 1, 1)


def test_steady_counts_a_new_term_of_the_same_leader_as_a_change() -> None:
    watch = steady.LeaderWatch([], until=0.0)
    for node, health in [
        ("n1", {"term": 2, "leader_id": "n1"}),
        ("n2", {"term": 2, "leader_id": "n1"}),
        ("n3", None),
        ("n2", {"term": 3, "leader_id": None}),
        ("n1", {"term": 3, "leader_id": "n1"}),
    ]:
        watch.poll(node, health)

    assert watch.changes == 1
    assert [(s["term"], s["leader_id"]) for s in watch.seen] == [(2, "n1"), (3, "n1")]
    assert (watch.polls, watch.unanswered, watch.leaderless) == (5, 1, 1)
