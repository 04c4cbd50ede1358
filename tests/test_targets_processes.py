"""Targets on a real mesh: three node processes and three handler processes started with
different ``--tag``s (``tests.fixtures.target_tasks`` records who ran what, with its shard).

The nodes offer the task embedded too: a tag target must still never run on the leader.
One mesh serves the module's tests (each uses its own schedule and output directory).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, HandlerProc

TASKS = "tests.fixtures.target_tasks"
HANDLER_TAGS = {
    "h-eu": {"region": "eu", "pool": "batch"},
    "h-us": {"region": "us", "pool": "batch"},
    "h-plain": {},
}

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("targets")
    cluster = Cluster(root / "cluster", 3, ("--tasks", TASKS))
    handlers = [
        HandlerProc(hid, [n.mesh for n in cluster.nodes], [TASKS], root / hid, tags=tags)
        for hid, tags in HANDLER_TAGS.items()
    ]
    try:
        cluster.start()
        for h in handlers:
            h.start()
        cluster.wait_for(lambda: _all_alive(cluster), 20, "every handler alive with its tags")
        yield cluster
    finally:
        for h in handlers:
            if h.running:
                h.kill(signal.SIGKILL)
        cluster.stop_all()


def _all_alive(cluster: Cluster) -> bool:
    leader = cluster.leader_now()
    body = leader.get_json("/api/handlers") if leader is not None else None
    if not body:
        return False
    seen = {h["handler_id"]: h for h in body["handlers"]}
    return all(
        hid in seen and seen[hid]["state"] == "alive" and seen[hid]["tags"] == tags
        for hid, tags in HANDLER_TAGS.items()
    )


def _create(cluster: Cluster, schedule_id: str, out: Path, trigger: dict, target: dict) -> None:
    out.mkdir()
    body = {
        "id": schedule_id,
        "task": "where",
        "trigger": trigger,
        "kwargs": {"out_dir": str(out)},
        "target": target,
    }
    status, created = cluster.wait_for_leader().request("POST", "/api/schedules", body)
    assert status == 201, created
    assert created["target"] == {"tags": target.get("tags", {}), "broadcast": False} | target


def _executions(cluster: Cluster, schedule_id: str) -> list[dict[str, Any]]:
    body = cluster.wait_for_leader().get_json(f"/api/executions?schedule_id={schedule_id}")
    return body["executions"] if body else []


def _runs(out: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(out.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_a_targeted_schedule_runs_only_on_the_handler_having_its_tags(
    mesh: Cluster, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    _create(mesh, "to-us", out, {"type": "interval", "seconds": 0.3}, {"tags": {"region": "us"}})
    done = mesh.wait_for(
        lambda: (ex := _executions(mesh, "to-us")) and len(ex) >= 4 and ex,
        20,
        "four runs of to-us",
    )
    mesh.wait_for_leader().request("DELETE", "/api/schedules/to-us")
    assert {(ex["outcome"], ex["handler_id"]) for ex in done} == {("success", "h-us")}
    assert {r["handler_id"] for r in _runs(out)} == {"h-us"}


def test_a_target_no_handler_has_is_recorded_as_no_handler_and_runs_nowhere(
    mesh: Cluster, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    _create(
        mesh, "to-mars", out, {"type": "interval", "seconds": 0.3}, {"tags": {"region": "mars"}}
    )
    done = mesh.wait_for(
        lambda: (ex := _executions(mesh, "to-mars")) and len(ex) >= 2 and ex,
        20,
        "two fires of to-mars recorded",
    )
    mesh.wait_for_leader().request("DELETE", "/api/schedules/to-mars")
    assert {ex["outcome"] for ex in done} == {"no_handler"}
    assert _runs(out) == []  # not on a handler, not embedded on the leader


def test_a_broadcast_runs_once_on_every_matching_handler_with_its_shard(
    mesh: Cluster, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    target = {"tags": {"pool": "batch"}, "broadcast": True}
    _create(mesh, "fan-out", out, {"type": "date", "run_time": at}, target)
    done = mesh.wait_for(
        lambda: (ex := _executions(mesh, "fan-out")) and len(ex) >= 2 and ex,
        20,
        "the broadcast's two runs recorded",
    )
    runs = sorted(_runs(out), key=lambda r: r["shard_index"])
    assert [(r["shard_index"], r["shard_count"]) for r in runs] == [(0, 2), (1, 2)]
    assert [r["handler_id"] for r in runs] == ["h-eu", "h-us"]  # by handler id
    assert [r["idempotency_key"][-4:] for r in runs] == ["#0/2", "#1/2"]
    assert sorted((ex["handler_id"], ex["shard"], ex["outcome"]) for ex in done) == [
        ("h-eu", [0, 2], "success"),
        ("h-us", [1, 2], "success"),
    ]


def test_a_broadcast_whose_leader_dies_mid_run_finishes_each_run_once(
    mesh: Cluster, tmp_path: Path
) -> None:
    """Last in this module: it kills the leader (two nodes go on)."""
    out = tmp_path / "runs"
    out.mkdir()
    at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    body = {
        "id": "fan-out-failover",
        "task": "slow_where",
        "trigger": {"type": "date", "run_time": at},
        "kwargs": {"out_dir": str(out), "seconds": 2.0},
        "target": {"tags": {"pool": "batch"}, "broadcast": True},
    }
    leader = mesh.wait_for_leader()
    status, created = leader.request("POST", "/api/schedules", body)
    assert status == 201, created
    mesh.wait_for(
        lambda: len([r for r in _runs(out) if r.get("event") == "start"]) >= 2,
        15,
        "both runs started",
    )
    term = leader.health()["term"]
    leader.kill(signal.SIGKILL)
    done = mesh.wait_for(
        lambda: (ex := _executions(mesh, "fan-out-failover")) and len(ex) >= 2 and ex,
        25,
        "both runs recorded by the next leader",
    )
    runs = [r for r in _runs(out) if "shard_index" in r]
    starts = [r["idempotency_key"] for r in _runs(out) if r.get("event") == "start"]
    assert sorted(starts) == sorted(set(starts))  # no run started twice
    assert sorted((r["handler_id"], r["shard_index"], r["shard_count"]) for r in runs) == [
        ("h-eu", 0, 2),
        ("h-us", 1, 2),
    ]
    assert sorted((ex["shard"], ex["outcome"]) for ex in done) == [
        ([0, 2], "success"),
        ([1, 2], "success"),
    ]
    assert all(ex["term"] > term for ex in done)  # finished under the next leader
