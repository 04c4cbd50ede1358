"""A backfill on a real 3-node mesh with a handler process, across a leader kill: each fire time
runs exactly once, in fire-time order."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.cluster import Cluster, HandlerProc

pytestmark = pytest.mark.timeout(90)

TIMES = 20
START = datetime(2024, 1, 1, tzinfo=UTC)
STEP = timedelta(minutes=1)


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[list[HandlerProc]]:
    made: list[HandlerProc] = []
    yield made
    for h in made:
        if h.running:
            h.kill(signal.SIGKILL)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_backfill_runs_each_fire_time_once_in_order_across_a_leader_kill(
    cluster_factory, handler: list[HandlerProc], tmp_path: Path
) -> None:
    cluster: Cluster = cluster_factory(3)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.running() if n is not leader)
    h = HandlerProc(
        "h-backfill",
        [n.mesh for n in cluster.nodes],
        ["tests.fixtures.handler_tasks"],
        tmp_path / "handler",
    )
    handler.append(h)
    h.start()
    out = tmp_path / "keys.txt"
    body = {
        "id": "late",
        "task": "count_to_file",
        "kwargs": {"path": str(out), "seconds": 0.25},
        "trigger": {"type": "interval", "minutes": 1, "start_time": START.isoformat()},
        "paused": True,  # only the backfill runs it
    }
    assert follower.request("POST", "/api/schedules", body)[0] == 201
    cluster.wait_for(
        lambda: any(x.get("handler_id") == "h-backfill" for x in _handlers(leader)),
        15,
        "the handler registered on the leader",
    )

    span = {"start": START.isoformat(), "end": (START + TIMES * STEP).isoformat()}
    status, answer = follower.request("POST", "/api/schedules/late/backfill", span, timeout=10)
    assert status == 202, answer
    assert (answer["fire_times"], answer["already_run"], len(answer["job_ids"])) == (
        TIMES,
        0,
        TIMES,
    )

    cluster.wait_for(lambda: len(_lines(out)) >= 6, 20, "a few backfilled runs")
    term = leader.health()["term"]
    leader.kill(signal.SIGKILL)
    cluster.wait_for_leader(among=cluster.running(), newer_than_term=term)
    cluster.wait_for(lambda: len(_lines(out)) >= TIMES, 30, f"{TIMES} backfilled runs")

    expected = [f"late@{(START + k * STEP).isoformat()}" for k in range(TIMES)]
    assert _lines(out) == expected  # each once, in fire-time order
    node = cluster.wait_for_leader(among=cluster.running())
    status, again = node.request("POST", "/api/schedules/late/backfill", span, timeout=10)
    assert (status, again["already_run"], again["job_ids"]) == (202, TIMES, [])


def _handlers(node) -> list[dict]:
    status, body = node.request("GET", "/api/handlers")
    return body.get("handlers", []) if status == 200 else []
