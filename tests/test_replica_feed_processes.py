"""A ``schedulezero replica`` process following the real feed of a secured 3-node mesh.

Zone ``dmz`` drops arguments, results and errors and masks ``api_key``: a secret planted in a
schedule's kwargs and metadata must appear nowhere on the replica (its API, replica.db, its
log). The replica keeps serving through the loss of its upstream voter and catches up after
being stopped for a while.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.supervise import Child, child_env, free_port, get_json, http_request, wait_until
from tests.cluster import Cluster

pytest.importorskip("mesh.zones.feed", reason="the voters' feed (issue 13, feed half) not merged")
pytestmark = pytest.mark.timeout(180)

SECRET = "PLANTED-S3CRET-replica-41d7"
META_SECRET = "PLANTED-META-S3CRET-replica-0c3e"
ZONES = {"dmz": {"drop": ["args", "kwargs", "results", "errors"], "sensitive_keys": ["api_key"]}}
READ_ONLY = {"error": "read-only replica: send writes to an admin node"}


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Cluster]:
    (tmp_path / "mesh").mkdir()
    c = Cluster(tmp_path / "mesh", 3, secure=True, config={"zones": ZONES})
    c.add_key("r1", "replica", zone="dmz")
    try:
        c.start()
        c.wait_for_leader(20)
        yield c
    finally:
        c.stop_all()


class ReplicaProcess(Child):
    def __init__(self, mesh: Cluster, root: Path) -> None:
        assert mesh.keys_dir is not None
        self.port = free_port("127.0.0.1")
        self.http = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / "r1"
        self.log_path = root / "r1.log"
        argv = ["-m", "mesh.cli", "replica", "--node-id", "r1", "--zone", "dmz"]
        argv += ["--keys", str(mesh.keys_dir), "--http", f"127.0.0.1:{self.port}"]
        argv += ["--data-dir", str(self.data_dir)]
        for node in mesh.nodes:
            argv += ["--upstream", node.mesh]
        super().__init__("r1", [sys.executable, *argv], log=self.log_path, env=child_env())

    def get(self, path: str) -> Any:
        return get_json(self.http + path, timeout=1.0)

    def wait(self, check: Any, timeout: float, what: str) -> Any:
        def probe() -> Any:
            if not self.running:
                raise AssertionError(f"the replica exited while waiting for {what}\n{self.tail()}")
            return check()

        return wait_until(
            probe, timeout, what, error=AssertionError, diagnostics=lambda: self.tail(40)
        )

    def schedule(self, sid: str) -> dict[str, Any] | None:
        return self.get(f"/api/schedules/{sid}")


def create(mesh: Cluster, sid: str) -> float:
    leader = mesh.wait_for_leader(15)
    status, body = leader.request(
        "POST",
        "/api/schedules",
        {
            "id": sid,
            "task": "replica_task",
            "trigger": {"type": "interval", "hours": 1},
            "args": [SECRET],
            "kwargs": {"password": SECRET},
            "metadata": {"api_key": META_SECRET, "label": "visible-label"},
            "paused": True,
        },
        timeout=10,
    )
    assert status == 201, body
    return time.monotonic()


@pytest.fixture
def replica(mesh: Cluster, tmp_path: Path) -> Iterator[ReplicaProcess]:
    r = ReplicaProcess(mesh, tmp_path)
    try:
        yield r
    finally:
        r.stop()


def test_a_dmz_replica_follows_the_mesh_and_never_holds_a_planted_secret(
    mesh: Cluster, replica: ReplicaProcess
) -> None:
    create(mesh, "before")
    replica.start()
    seen = replica.wait(lambda: replica.schedule("before"), 20, "the snapshot on the replica")
    assert seen["args"] == [] and seen["kwargs"] == {}
    assert seen["metadata"] == {"api_key": "***", "label": "visible-label"}
    committed = create(mesh, "after")
    replica.wait(lambda: replica.schedule("after"), 5, "a change on the replica")
    assert time.monotonic() - committed < 2.0  # within a second, with room for a loaded host
    health = replica.get("/api/health")
    assert health["role"] == "replica" and health["zone"] == "dmz" and health["following"]
    assert health["upstream"] in [n.mesh for n in mesh.nodes]
    # The voter it follows lists it, with its zone and lag (the dashboard's cluster page).
    upstream = next(n for n in mesh.nodes if n.mesh == health["upstream"])
    listed = replica.wait(
        lambda: [r for r in (upstream.get_json("/api/cluster") or {}).get("replicas", [])
                 if r["replica_id"] == "r1" and r["lag_changes"] == 0],
        5,
        "the replica listed by its upstream voter, caught up",
    )  # fmt: skip
    assert listed[0]["zone"] == "dmz"
    status, _ = http_request(replica.http + "/api/schedules", "POST", {"id": "x"})[:2]
    assert status == 403
    assert http_request(replica.http + "/api/schedules/after", "DELETE")[:2] == (403, READ_ONLY)

    replica.stop()  # writes replica.db and its log is complete
    answers = str(seen) + str(health)
    files = [p for p in replica.data_dir.rglob("*") if p.is_file()] + [replica.log_path]
    assert (replica.data_dir / "replica.db").exists()
    for secret in (SECRET, META_SECRET):
        assert secret not in answers
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


def test_a_replica_survives_its_upstream_and_catches_up_after_a_stop(
    mesh: Cluster, replica: ReplicaProcess
) -> None:
    create(mesh, "s1")
    replica.start()
    replica.wait(lambda: replica.schedule("s1"), 20, "s1 on the replica")
    upstream = replica.get("/api/health")["upstream_node"]
    mesh.by_id(upstream).kill()
    create(mesh, "s2")  # on the remaining two voters (a new leader if the upstream led)
    replica.wait(lambda: replica.schedule("s2"), 15, "s2 after losing the upstream voter")
    health = replica.get("/api/health")
    assert health["upstream_node"] != upstream and health["following"]

    assert replica.stop() == 0
    for i in range(3, 8):
        create(mesh, f"s{i}")
    replica.start()
    assert replica.wait(lambda: replica.schedule("s1"), 10, "the copy served at restart")
    replica.wait(lambda: replica.schedule("s7"), 15, "caught up after the stop")
    replica.wait(lambda: (replica.get("/api/health") or {}).get("lag_seconds") == 0.0, 5, "lag 0")
