"""Retries on a real mesh: three node processes and a handler process on 127.0.0.1.

A schedule's fire fails and is retried after its backoff; the leader is killed during the
backoff, and the new leader runs the retry from the replicated state: each try runs exactly
once, none before its backoff. A schedule whose tries are exhausted with ``on_exhausted:
pause`` ends paused, with a note saying why.
"""

from __future__ import annotations

import itertools
import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, HandlerProc, NodeProcess

TASKS = "tests.fixtures.retry_tasks"
BACKOFF = 3.0  # seconds: longer than a new leader takes to be elected and start

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def handler() -> Iterator[list[HandlerProc]]:
    """The test's handler processes, killed after it, pass or fail."""
    made: list[HandlerProc] = []
    yield made
    for h in made:
        if h.running:
            h.kill(signal.SIGKILL)


def runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def create(node: NodeProcess, sid: str, path: Path, fail_tries: int, retry: dict[str, Any]) -> None:
    start = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    body = {
        "id": sid,
        "task": "flaky",
        "trigger": {"type": "interval", "hours": 1, "start_time": start},
        "kwargs": {"path": str(path), "fail_tries": fail_tries},
        "misfire_grace_time": 60,
        "retry": retry,
    }
    status, reply = node.request("POST", "/api/schedules", body, timeout=10)
    assert status == 201, reply


def records(node: NodeProcess, sid: str) -> list[dict[str, Any]]:
    body = node.get_json(f"/api/executions?schedule_id={sid}", timeout=3.0)
    return list(reversed(body["executions"])) if body else []


def test_a_retry_survives_a_leader_kill_in_its_backoff_and_exhausted_tries_pause(
    cluster_factory, handler: list[HandlerProc], tmp_path: Path
) -> None:
    cluster: Cluster = cluster_factory(3)
    leader = cluster.wait_for_leader()
    h = HandlerProc("h1", [n.mesh for n in cluster.nodes], [TASKS], tmp_path / "h1")
    handler.append(h)
    h.start()
    cluster.wait_for(
        lambda: any(x["state"] == "alive" for x in leader.get_json("/api/handlers")["handlers"]),
        15,
        "the handler alive on the leader",
    )
    retried, paused = tmp_path / "retried.jsonl", tmp_path / "paused.jsonl"
    retry = {"max_attempts": 3, "initial_delay": BACKOFF, "multiplier": 1}
    create(leader, "retried", retried, 2, retry)  # fails twice, the third try succeeds
    create(leader, "paused", paused, 9, {"max_attempts": 2, "initial_delay": 1,
                                         "on_exhausted": "pause"})  # fmt: skip
    follower = next(n for n in cluster.running() if n is not leader)

    # The first try failed and its retry is committed (a follower has the record): kill the
    # leader in the middle of the backoff.
    first = cluster.wait_for(
        lambda: next((r for r in records(follower, "retried") if r["retry_at"]), None),
        15,
        "the first try's record with its retry time",
    )
    term = leader.health()["term"]
    leader.kill(signal.SIGKILL)
    new = cluster.wait_for_leader(among=cluster.running(), newer_than_term=term)

    cluster.wait_for(lambda: len(records(new, "retried")) >= 3, 20, "the third try's record")
    ran = runs(retried)
    assert [r["try"] for r in ran] == [1, 2, 3]  # each try once, in order
    assert len({r["key"] for r in ran}) == 1  # one fire, one idempotency key
    attempts = [r["attempt"] for r in ran]
    assert attempts == sorted(attempts) and len(set(attempts)) == 3
    for before, after in itertools.pairwise(ran):
        assert after["at"] - before["at"] >= BACKOFF, ran
    done = records(new, "retried")
    assert [(r["try"], r["outcome"]) for r in done] == [(1, "error"), (2, "error"), (3, "success")]
    assert first["retry_at"] == done[0]["retry_at"]
    assert done[1]["retry_at"] is not None and done[2]["retry_at"] is None

    # On a leader that stays, a failed run wakes the scheduler for its retry (the schedule's
    # next fire is an hour away: nothing else would start it).
    steady = tmp_path / "steady.jsonl"
    create(new, "steady", steady, 1, {"max_attempts": 2, "initial_delay": 1})
    cluster.wait_for(lambda: len(runs(steady)) >= 2, 10, "the steady schedule's retry")
    assert [r["try"] for r in runs(steady)] == [1, 2]

    # The other schedule: two failed tries, then paused with a note saying why.
    schedule = cluster.wait_for(
        lambda: (s := new.get_json("/api/schedules/paused")) and s["paused"] and s,
        15,
        "the exhausted schedule paused",
    )
    assert "2 of 2 tries" in schedule["note"], schedule
    assert "try 2 fails on purpose" in schedule["note"], schedule
    assert [r["try"] for r in runs(paused)] == [1, 2]
