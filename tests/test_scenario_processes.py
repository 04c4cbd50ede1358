"""Scenarios run by a real 3-node mesh (docs/scenarios.md): loaded and run through any node,
results replicated to every node, a run that survives a leader kill (resumed, never run twice),
scheduled runs, chains, and the shipped ``schedule_storm``."""

from __future__ import annotations

import json
import signal
import urllib.request
from typing import Any

import pytest

from mesh.scenarios.format import shipped
from tests.cluster import Cluster, NodeProcess

pytestmark = pytest.mark.timeout(120)

FINISHED = {"passed", "failed", "error", "cancelled"}


def load(node: NodeProcess, text: str) -> dict[str, Any]:
    request = urllib.request.Request(
        node.http + "/api/tests/load",
        data=text.encode(),
        method="POST",
        headers={"Content-Type": "text/yaml"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"load: {e.code} {e.read().decode()}") from None


def run(node: NodeProcess, name: str, parameters: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"name": name}
    if parameters is not None:
        body["parameters"] = parameters
    status, answer = node.request("POST", "/api/tests/run", body, timeout=10)
    assert status == 202, answer
    return answer["run_id"]


def result(node: NodeProcess, run_id: str) -> dict[str, Any] | None:
    status, body = node.request("GET", f"/api/tests/results/{run_id}", timeout=5)
    return body if status == 200 else None


def wait_finished(cluster: Cluster, node: NodeProcess, run_id: str, timeout: float) -> dict:
    def done() -> dict[str, Any] | None:
        try:
            r = result(node, run_id)
        except OSError:
            return None
        return r if r is not None and r["status"] in FINISHED else None

    return cluster.wait_for(done, timeout, f"run {run_id} to finish", interval=0.2)


def scenario_schedules(node: NodeProcess) -> list[str]:
    status, body = node.request("GET", "/api/schedules?limit=1000", timeout=5)
    assert status == 200, body
    return [s["id"] for s in body["schedules"] if s["id"].startswith("scn-")]


STORM = """
test:
  name: tiny_storm
  description: create, wait, delete
  parameters: {count: 20, every: 0.5}
  steps:
    - name: create
      type: loop
      iterations: ${count}
      concurrency: 4
      action:
        method: create_schedule
        args: {task_id: noop, trigger: {type: interval, seconds: "${every}"}}
    - name: wait
      type: action
      action: {method: wait_for_fires, args: {count: 5, timeout: 20}}
    - name: delete
      type: loop
      iterations: ${count}
      action: {method: delete_schedule}
  metrics:
    - creation_rate: schedules/sec
    - deletion_rate
    - scheduler_latency
  assertions:
    - creation_rate > 0
    - deletion_rate > 0
    - fires_success >= 5
"""


# Three schedules, one fire, deleted: a run of a second or so.
TINY = (
    STORM.replace("count: 20", "count: 3")
    .replace("count: 5", "count: 1")
    .replace("fires_success >= 5", "fires_success >= 1")
)


def test_the_shipped_schedule_storm_runs_through_a_follower_and_every_node_has_the_result(
    cluster_factory,
) -> None:
    cluster: Cluster = cluster_factory(3)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.running() if n is not leader)
    loaded = load(follower, shipped()["schedule_storm"].read_text())
    assert loaded["name"] == "schedule_storm"
    run_id = run(
        follower,
        "schedule_storm",
        # Thresholds this test does not judge (a loaded test machine is slow): the mechanism
        # is under test, the figures are make bench's.
        {
            "schedules_count": 200,
            "interval_seconds": 1,
            "duration_seconds": 3,
            "min_creation_rate": 0,
            "min_deletion_rate": 0,
            "max_memory_mb": 100000,
        },
    )
    final = wait_finished(cluster, follower, run_id, 90)
    assert final["status"] == "passed", json.dumps(final)[:3000]
    metrics = final["metrics"]
    for name in ("creation_rate", "deletion_rate", "memory_usage", "scheduler_latency"):
        assert metrics[name]["value"] is not None, (name, final)
    assert metrics["creation_rate"]["unit"] == "schedules/sec"
    # memory_usage: the peak of the voters, each read from its /metrics during the run.
    assert set(final["memory"]) == {n.node_id for n in cluster.nodes}
    assert metrics["memory_usage"]["value"] == max(final["memory"].values()) > 10
    assert [a["passed"] for a in final["assertions"]] == [True, True, True]
    assert metrics["actions_total"]["value"] == 400
    assert metrics["fires_total"]["value"] > 0  # 200 schedules every second for 3 s
    # Replicated: every node answers the same result; nothing of the run is left firing.
    for node in cluster.running():
        cluster.wait_for(
            lambda n=node: (r := result(n, run_id)) is not None and r["status"] == "passed",
            10,
            f"the result on {node.node_id}",
        )
        assert result(node, run_id)["metrics"] == metrics  # type: ignore[index]
    assert scenario_schedules(leader) == []
    status, csv = follower.request("GET", f"/api/tests/results/{run_id}?format=csv")
    assert status == 200 and csv.splitlines()[0] == "kind,name,value,unit,op,threshold,passed"


def test_a_run_survives_a_leader_kill_resumed_once_and_never_run_twice(cluster_factory) -> None:
    cluster: Cluster = cluster_factory(3)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.running() if n is not leader)
    text = STORM.replace("count: 20", "count: 1000").replace("every: 0.5", "every: 2")
    load(follower, text)
    run_id = run(follower, "tiny_storm")

    def creating() -> bool:
        r = result(follower, run_id)
        return r is not None and r["step"]["index"] == 0 and r["step"]["done"] >= 40

    cluster.wait_for(creating, 30, "the run to be creating schedules")
    leader.kill(signal.SIGKILL)
    final = wait_finished(cluster, follower, run_id, 90)
    assert final["status"] == "passed", json.dumps(final)[:3000]
    assert final["resumed"] == 1
    assert final["leader"] != leader.node_id
    # Exactly the scenario's actions: 1000 creates + 1 wait + 1000 deletes, none twice.
    assert final["metrics"]["actions_total"]["value"] == 2001, final
    assert final["metrics"]["action_errors"]["value"] == 0, final
    assert scenario_schedules(follower) == []


def test_a_run_that_must_not_continue_on_another_leader_ends_with_an_error_saying_why(
    cluster_factory,
) -> None:
    cluster: Cluster = cluster_factory(3)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.running() if n is not leader)
    text = STORM.replace("parameters:", "on_leader_change: fail\n  parameters:").replace(
        "count: 20", "count: 1000"
    )
    load(follower, text)
    run_id = run(follower, "tiny_storm")
    cluster.wait_for(
        lambda: (r := result(follower, run_id)) is not None and r["step"]["done"] >= 40,
        30,
        "the run to be creating schedules",
    )
    leader.kill(signal.SIGKILL)
    final = wait_finished(cluster, follower, run_id, 60)
    assert final["status"] == "error"
    assert "leader changed" in final["error"] and "on_leader_change: fail" in final["error"]
    assert scenario_schedules(follower) == []  # cleaned up all the same


def test_a_scheduled_scenario_queues_one_run_per_fire(cluster_factory) -> None:
    cluster: Cluster = cluster_factory(3)
    leader = cluster.wait_for_leader()
    load(leader, TINY)
    body = {"name": "tiny_storm", "trigger": {"type": "interval", "seconds": 3}}
    status, schedule = leader.request("POST", "/api/tests/schedule", body, timeout=10)
    assert status == 201, schedule
    assert schedule["id"] == "scenario-tiny_storm" and schedule["task"] == "schedulezero.scenario"

    def two_passed() -> list[dict[str, Any]] | None:
        status, body = leader.request("GET", "/api/tests/runs?name=tiny_storm")
        done = [r for r in body["runs"] if r["status"] == "passed"] if status == 200 else []
        return done if len(done) >= 2 else None

    runs = cluster.wait_for(two_passed, 40, "two scheduled runs to pass")
    assert {r["source"] for r in runs} == {"schedule"}
    assert len({r["run_id"] for r in runs}) == len(runs)
    # A schedule with the mesh's own task cannot be made through the schedules API.
    bad = {"task": "schedulezero.scenario", "trigger": {"type": "interval", "seconds": 5}}
    status, error = leader.request("POST", "/api/schedules", bad)
    assert status == 400 and "/api/tests/schedule" in error["error"]


def test_a_chain_runs_its_dependency_first_and_stops_when_it_fails(cluster_factory) -> None:
    cluster: Cluster = cluster_factory(3)
    leader = cluster.wait_for_leader()
    load(leader, TINY)
    load(
        leader,
        """
test:
  name: after_storm
  depends_on: tiny_storm
  steps:
    - {type: action, action: {method: http_get, args: {path: /api/health}}}
  metrics: [http_latency]
  assertions: [http_errors == 0]
""",
    )
    run_id = run(leader, "after_storm")
    final = wait_finished(cluster, leader, run_id, 60)
    assert final["status"] == "passed", json.dumps(final)[:3000]
    (dep,) = final["depends_on"]
    assert result(leader, dep)["status"] == "passed"  # type: ignore[index]
    assert final["metrics"]["http_latency"]["value"] is not None
    # A run shorter than a checkpoint has every voter's memory all the same.
    assert set(final["memory"]) == {n.node_id for n in cluster.nodes}

    # The dependency cannot pass now (impossible assertion): the chain ends with an error.
    load(leader, TINY.replace("creation_rate > 0", "creation_rate > 1000000000"))
    run_id = run(leader, "after_storm")
    final = wait_finished(cluster, leader, run_id, 60)
    assert final["status"] == "error"
    assert "dependency tiny_storm did not pass" in final["error"]
