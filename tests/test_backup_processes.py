"""Backup and restore on real node processes: a backup taken from a running 3-node mesh
bootstraps a new 3-node cluster with every schedule and the execution history, and the
schedules go on firing there (docs/deployment.md, "Backup and restore")."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from mesh.supervise import child_env
from tests.cluster import REPO_ROOT, Cluster

TASKS = ("--tasks", "tests.fixtures.recorder_tasks")


def _cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=child_env(None),
    )


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _executions(cluster: Cluster, node_index: int) -> set[str]:
    status, page = cluster.node(node_index).request("GET", "/api/executions?limit=10000")
    assert status == 200, page
    return {e["job_id"] for e in page["executions"]}


def _schedule_ids(cluster: Cluster, node_index: int) -> set[str] | None:
    status, page = cluster.node(node_index).request("GET", "/api/schedules")
    return {s["id"] for s in page["schedules"]} if status == 200 else None


def test_a_backup_of_a_running_mesh_restores_into_a_new_cluster_that_goes_on_firing(
    cluster_factory, tmp_path: Path
) -> None:
    old = cluster_factory(3, TASKS)
    leader = old.wait_for_leader()
    follower = next(n for n in old.running() if n is not leader)
    fires = tmp_path / "fires.jsonl"
    bodies = [
        {
            "id": "fast",
            "task": "record",
            "trigger": {"type": "interval", "seconds": 0.2},
            "kwargs": {"path": str(fires)},
        },
        *(
            {
                "id": f"hourly-{i}",
                "task": "record",
                "trigger": {"type": "interval", "hours": 1},
                "kwargs": {"path": str(tmp_path / "hourly.jsonl")},
            }
            for i in range(5)
        ),
    ]
    for body in bodies:
        status, created = follower.request("POST", "/api/schedules", body)
        assert status == 201, created
    old.wait_for(lambda: len(_executions(old, 0)) >= 5, 10, "five executions in the history")

    backup = tmp_path / "mesh.szb"
    done = _cli("backup", "-o", str(backup), "--url", follower.http)  # a follower names the leader
    assert done.returncode == 0, done.stderr
    assert "checksum verified" in done.stdout
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    history = _executions(old, 0)  # the backup holds at least this much of it
    old.stop_all()
    schedules = {b["id"] for b in bodies}

    new = cluster_factory(3, TASKS, id_prefix="m", start=False)
    first = new.node(0)
    done = _cli("restore", str(backup), "--data-dir", str(first.data_dir), "--node-id", "m0")
    assert done.returncode == 0, done.stderr
    assert "restored 6 schedules" in done.stdout
    fired_before = len(_records(fires))
    new.start()  # m1 and m2 start empty: m0 leads alone, adds them and sends them its snapshot

    def all_voters() -> bool:
        h = first.health()
        return h is not None and h.get("voters") == ["m0", "m1", "m2"]

    new.wait_for(all_voters, 15, "m1 and m2 added as voters")
    for i in range(3):
        new.wait_for(lambda i=i: _schedule_ids(new, i) == schedules, 10, f"schedules on m{i}")
        new.wait_for(lambda i=i: history <= _executions(new, i), 10, f"the history on m{i}")
    leader_pid = new.wait_for_leader().pid
    new.wait_for(
        lambda: any(r["pid"] == leader_pid for r in _records(fires)[fired_before:]),
        10,
        "the restored schedule firing on the new cluster's leader",
    )
