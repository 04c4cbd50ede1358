"""Per-schedule fire metrics (mesh.scheduling.firemetrics) as GET /metrics exports them: the
names and labels, the lateness histogram, and the bound on schedule_id labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.api.metrics import NodeCollector
from mesh.scheduling.firemetrics import OTHER, FireMetrics

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RAFT = {"term": 1, "commit_index": 1, "applied_index": 1, "last_index": 1, "snapshot_index": 0,
        "is_leader": 1, "has_quorum": 1, "peers_alive": 2, "transport": {}}  # fmt: skip


def record(sid: str | None, outcome: str, late: float | None = 0.2, **extra: Any) -> dict:
    started = (T0 + timedelta(seconds=late)).isoformat() if late is not None else None
    return {"schedule_id": sid, "outcome": outcome, "scheduled_fire_time": T0.isoformat(),
            "started_at": started, **extra}  # fmt: skip


class View:
    def __init__(self, fires: FireMetrics) -> None:
        self.fires = fires

    def metrics(self) -> dict[str, Any]:
        return {**RAFT, "fires": self.fires.export(), "alerts_pending": 2,
                "scheduling": {"alerts_sent": 3}}  # fmt: skip


def scrape(fires: FireMetrics) -> dict[str, Any]:
    """name -> list of (sample name, labels, value), from the text /metrics would serve."""
    registry = CollectorRegistry()
    registry.register(NodeCollector("n1", View(fires)))
    text = generate_latest(registry).decode()
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }


def test_fires_by_outcome_skipped_and_missed_by_reason() -> None:
    m = FireMetrics()
    m.record(record("a", "success"))
    m.record(record("a", "success"))
    m.record(record("a", "error"))
    m.record(record("a", "skipped", late=None, reason="overlap"))
    m.record(record("b", "missed_start_deadline", late=None))
    m.missed_by_catch_up("b", 7)
    m.record(record(None, "success"))  # a run-now job: not a schedule's fire
    got = scrape(m)
    fires = {(s[1]["schedule_id"], s[1]["outcome"]): s[2]
             for s in got["schedulezero_schedule_fires"] if s[0].endswith("_total")}  # fmt: skip
    assert fires == {("a", "success"): 2, ("a", "error"): 1, ("a", "skipped"): 1,
                     ("b", "missed_start_deadline"): 1}  # fmt: skip
    skipped = got["schedulezero_schedule_skipped"]
    assert [(s[1]["schedule_id"], s[1]["reason"], s[2]) for s in skipped if
            s[0] == "schedulezero_schedule_skipped_total"] == [("a", "overlap", 1)]  # fmt: skip
    missed = {(s[1]["schedule_id"], s[1]["reason"]): s[2]
              for s in got["schedulezero_schedule_missed"] if s[0].endswith("_total")}  # fmt: skip
    assert missed == {("b", "start_deadline"): 1, ("b", "catch_up_cap"): 7}
    assert all(s[1]["node_id"] == "n1" for s in got["schedulezero_schedule_fires"])


def test_lateness_is_a_histogram_globally_and_per_schedule() -> None:
    m = FireMetrics()
    for late in (0.003, 0.2, 0.2, 4.0):
        m.record(record("a", "success", late=late))
    m.record(record("b", "error", late=-0.5))  # a start a skewed clock puts early: on time
    got = scrape(m)
    overall = {(s[0], s[1].get("le")): s[2] for s in got["schedulezero_fire_lateness_seconds"]}
    assert overall[("schedulezero_fire_lateness_seconds_count", None)] == 5
    assert overall[("schedulezero_fire_lateness_seconds_bucket", "0.005")] == 2
    assert overall[("schedulezero_fire_lateness_seconds_bucket", "0.25")] == 4
    assert overall[("schedulezero_fire_lateness_seconds_bucket", "+Inf")] == 5
    assert abs(overall[("schedulezero_fire_lateness_seconds_sum", None)] - 4.403) < 1e-9
    per = got["schedulezero_schedule_fire_lateness_seconds"]
    counts = {s[1]["schedule_id"]: s[2] for s in per if s[0].endswith("_count")}
    assert counts == {"a": 4, "b": 1}


def test_schedules_past_the_bound_are_counted_as_other() -> None:
    m = FireMetrics(max_schedules=2)
    for sid in ("a", "b", "c", "d", "a"):
        m.record(record(sid, "success"))
    got = scrape(m)
    fires = {s[1]["schedule_id"]: s[2] for s in got["schedulezero_schedule_fires"]
             if s[0].endswith("_total")}  # fmt: skip
    assert fires == {"a": 2, "b": 1, OTHER: 2}


def test_alert_counters_and_the_pending_gauge_are_exported() -> None:
    got = scrape(FireMetrics())
    assert got["schedulezero_alerts_pending"][0][2] == 2
    assert got["schedulezero_alerts_sent"][0][:2] == (
        "schedulezero_alerts_sent_total",
        {"node_id": "n1"},
    )
