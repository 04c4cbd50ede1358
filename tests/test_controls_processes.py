"""The schedule controls without a process test of their own, on a real mesh: 3 node processes
and one handler process (docs/scheduling.md, "Controls"): ``timeout``, ``remaining_runs``,
``history`` limits, and ``trigger`` sent to a follower (forwarded to the leader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cluster import HandlerProc
from tests.test_dispatch_processes import _meshes, _records, _wait_alive, handler_factory

__all__ = ["handler_factory"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(90)


def _executions(node: Any, sid: str) -> list[dict[str, Any]]:
    status, body = node.request("GET", f"/api/executions?schedule_id={sid}&limit=1000")
    assert status == 200, body
    return body["executions"]


def test_timeout_run_limit_history_and_a_forwarded_trigger_on_a_real_mesh(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3)
    out = tmp_path / "runs"
    out.mkdir()
    handler: HandlerProc = handler_factory("h1", _meshes(cluster), concurrency=8)
    _wait_alive(cluster, [handler])
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.running() if n is not leader)
    every = {"type": "interval", "seconds": 0.3}
    bodies = [
        # Runs 2 s, limited to 0.4 s: each run ends `timeout` (the async task is cancelled).
        {"id": "slow", "task": "tally", "trigger": every, "timeout": 0.4,
         "kwargs": {"out_dir": str(out), "seconds": 2.0}},
        # Fires 3 times, then stops (and stays).
        {"id": "thrice", "task": "tally", "trigger": every, "remaining_runs": 3,
         "kwargs": {"out_dir": str(out)}},
        # Keeps only its 2 newest successes in the history.
        {"id": "short-memory", "task": "tally", "trigger": every,
         "history": {"keep_success": 2}, "kwargs": {"out_dir": str(out)}},
        # Paused: runs only when triggered.
        {"id": "on-demand", "task": "tally", "trigger": {"type": "interval", "hours": 1},
         "paused": True, "kwargs": {"out_dir": str(out)}},
    ]  # fmt: skip
    for body in bodies:
        status, created = follower.request("POST", "/api/schedules", body)
        assert status == 201, created

    status, answer = follower.request("POST", "/api/schedules/on-demand/trigger", {})
    assert status == 202, answer
    assert answer["idempotency_key"].endswith("#trigger")

    def settled() -> dict[str, list[dict[str, Any]]] | None:
        got = {b["id"]: _executions(follower, b["id"]) for b in bodies}
        done = (
            len([e for e in got["slow"] if e["outcome"] == "timeout"]) >= 2
            and len(got["thrice"]) == 3
            and len(got["on-demand"]) == 1
            and sum(1 for r in _records(out) if r["event"] == "end") >= 12
        )
        return got if done else None

    got = cluster.wait_for(settled, 30, "timeouts, three runs, history trimmed, the trigger")

    assert {e["outcome"] for e in got["slow"]} == {"timeout"}
    assert all(e["error"]["type"] == "TimeoutError" for e in got["slow"])
    assert all("exceeded its 0.4s timeout" in e["error"]["message"] for e in got["slow"])

    status, thrice = follower.request("GET", "/api/schedules/thrice")
    assert status == 200 and thrice["remaining_runs"] == 0 and thrice["next_fire_time"] is None
    assert [e["outcome"] for e in got["thrice"]] == ["success"] * 3

    # Many successes ran; the history keeps the 2 newest of this schedule.
    ran = {r["idempotency_key"] for r in _records(out) if r["event"] == "end"}
    assert len([k for k in ran if k.startswith("short-memory@")]) > 2
    assert len(got["short-memory"]) == 2

    (run,) = got["on-demand"]
    assert run["outcome"] == "success" and run["idempotency_key"] == answer["idempotency_key"]
    status, on_demand = follower.request("GET", "/api/schedules/on-demand")
    assert on_demand["paused"] is True  # a trigger leaves the schedule as it was

    # The limit holds: no fourth run of "thrice" after a while.
    cluster.wait_for(lambda: len(_executions(leader, "slow")) >= 4, 15, "more slow runs")
    assert len(_executions(leader, "thrice")) == 3
