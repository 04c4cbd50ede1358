"""The overlap policy on a real mesh: 3 node processes, one handler process, a leader kill while
a fire waits in the buffer (docs/scheduling.md, "overlap")."""

from __future__ import annotations

import itertools
import signal
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import HandlerProc
from tests.test_dispatch_processes import _meshes, _records, _wait_alive, handler_factory

__all__ = ["handler_factory"]  # the fixture, used by name

TASKS = "tests.fixtures.dispatch_tasks"
INTERVAL = 1.0
RUN_SECONDS = 2.2  # longer than two intervals: every run has a fire held and one skipped
pytestmark = pytest.mark.timeout(60)


def _runs(out: Path) -> dict[str, dict[str, float]]:
    """Idempotency key → {"start": t, "end": t} of every run the handler recorded."""
    runs: dict[str, dict[str, float]] = defaultdict(dict)
    starts: Counter[str] = Counter()
    for r in _records(out):
        runs[r["idempotency_key"]][r["event"]] = r["at"]
        if r["event"] == "start":
            starts[r["idempotency_key"]] += 1
    assert [k for k, n in starts.items() if n > 1] == [], "a fire ran twice"
    return dict(runs)


def _fire(key: str) -> datetime:
    return datetime.fromisoformat(key.split("@", 1)[1])


def test_buffer_one_across_a_leader_kill_runs_the_held_fire_once_without_overlap(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3)
    out = tmp_path / "runs"
    out.mkdir()
    handler: HandlerProc = handler_factory("h1", _meshes(cluster), concurrency=4)
    _wait_alive(cluster, [handler])
    leader = cluster.wait_for_leader()
    body = {
        "id": "overlap",
        "task": "tally",
        "trigger": {"type": "interval", "seconds": INTERVAL},
        "kwargs": {"out_dir": str(out), "seconds": RUN_SECONDS},
        "overlap": "buffer_one",
        "coalesce": "all",  # the fire times missed during the election fire afterwards
        "misfire_grace_time": 30,
    }
    status, created = leader.request("POST", "/api/schedules", body)
    assert status == 201, created

    # A run going for over an interval has a fire held behind it: kill the leader then.
    def running_with_one_held() -> str | None:
        runs = _runs(out)
        going = [k for k, r in runs.items() if "end" not in r]
        started = [runs[k]["start"] for k in going]
        return going[0] if going and time.time() - started[0] > INTERVAL * 1.3 else None

    killed_run = cluster.wait_for(running_with_one_held, 15, "a run with a fire held behind it")
    term = leader.health()["term"]
    leader.kill(signal.SIGKILL)
    new = cluster.wait_for_leader(among=cluster.running(), newer_than_term=term)

    # Settled: the run after the killed one, and the one after that, have run to their end.
    def two_more_runs() -> dict[str, dict[str, float]] | None:
        runs = _runs(out)
        later = [k for k in runs if _fire(k) > _fire(killed_run) and "end" in runs[k]]
        return runs if len(later) >= 2 else None

    cluster.wait_for(two_more_runs, 20, "two runs after the failover")
    assert new.request("DELETE", "/api/schedules/overlap")[0] == 204
    runs = cluster.wait_for(lambda: _all_ended(out), 10, "the runs in flight to end")

    # No two runs overlapped: each starts after the previous one ended.
    ordered = sorted(runs.values(), key=lambda r: r["start"])
    for a, b in itertools.pairwise(ordered):
        assert b["start"] >= a["end"], f"runs overlapped: {a} and {b}"
    # The fire held when the leader died ran once (``_runs`` checks "once"), after that run.
    held = min(k for k in runs if _fire(k) > _fire(killed_run))
    assert runs[held]["start"] >= runs[killed_run]["end"]

    # Every fire time between the first and the last run either ran or was recorded skipped.
    executions = _executions(new)
    skipped = {e["scheduled_fire_time"] for e in executions if e["outcome"] == "skipped"}
    assert all(e["reason"] == "overlap" for e in executions if e["outcome"] == "skipped")
    ran = {_fire(k).isoformat() for k in runs}
    assert not ran & skipped
    assert skipped, "no skipped fire recorded"
    fires = sorted(datetime.fromisoformat(f) for f in ran | skipped)
    step = timedelta(seconds=INTERVAL)
    last_run = max(_fire(k) for k in runs)
    gaps = [(a, b) for a, b in itertools.pairwise(fires) if b <= last_run and b - a != step]
    assert gaps == [], f"fire times neither run nor skipped between {gaps[:3]}"


def _all_ended(out: Path) -> dict[str, dict[str, float]] | None:
    runs = _runs(out)
    return runs if all("end" in r for r in runs.values()) else None


def _executions(node: Any) -> list[dict[str, Any]]:
    body = node.get_json("/api/executions?schedule_id=overlap&limit=1000", timeout=5.0)
    assert body is not None
    return body["executions"]
