"""``schedulezero replica`` and ``api.read_only`` as real processes.

The replica process follows a fake voter (tests/feedfake.py) that runs in the test's event loop
on loopback; ``api.read_only`` is checked on a real one-node mesh.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from mesh.security.keys import Certificate, create_key
from mesh.supervise import Child, child_env, free_port, wait_for_http
from tests.clierrors import process_error
from tests.cluster import REPO_ROOT
from tests.conftest import ClusterFactory
from tests.feedfake import FakeFeed, FeedLog, add_schedule_command, add_task_command
from tests.netutil import free_mesh_address

READ_ONLY_NODE = {"error": "read-only node: send writes to an admin node"}
SCHEDULE = {"id": "s1", "task": "report", "trigger": {"type": "interval", "seconds": 60}}


def schedulezero(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=child_env(),
        timeout=timeout,
    )


# --------------------------------------------------------------------------- api.read_only


def test_a_read_only_node_refuses_mutations_and_serves_reads(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(1, config={"api": {"read_only": True}})
    node = cluster.node(0)
    cluster.wait_for_leader()
    assert node.request("POST", "/api/schedules", SCHEDULE) == (403, READ_ONLY_NODE)
    assert node.request("DELETE", "/api/schedules/s1") == (403, READ_ONLY_NODE)
    assert node.request("POST", "/api/jobs", {"task": "report"}) == (403, READ_ONLY_NODE)
    assert node.request("DELETE", "/api/cluster/members/n0") == (403, READ_ONLY_NODE)
    assert node.request("GET", "/api/schedules") == (200, {"schedules": [], "next": None})
    assert node.request("GET", "/api/cluster/members")[0] == 200
    health = node.health()
    assert health is not None and health["role"] == "leader"


def test_a_writable_node_still_takes_writes(cluster_factory: ClusterFactory) -> None:
    # The same request as above, on a node without api.read_only: what the 403 stands for.
    cluster = cluster_factory(1, config={"api": {"read_only": False}})
    cluster.wait_for_leader()
    status, body = cluster.node(0).request("POST", "/api/schedules", SCHEDULE, timeout=5)
    assert status == 201, body


# --------------------------------------------------------------------------- refused starts


def test_bad_replica_flags_exit_2_with_one_line(tmp_path: Path) -> None:
    up = free_mesh_address()
    base = ["replica", "--node-id", "r1", "--zone", "dmz", "--data-dir", str(tmp_path / "d")]
    line = process_error(schedulezero(*base, "--http", "127.0.0.1:1"))
    assert "--upstream" in line
    line = process_error(schedulezero(*base, "--upstream", up, "--http", "nonsense"))
    assert "--http" in line
    line = process_error(schedulezero(*base, "--upstream", "udp://x:1", "--http", "127.0.0.1:1"))
    assert "--upstream" in line
    bad_zone = ["replica", "--node-id", "r1", "--zone", "../etc", "--upstream", up]
    line = process_error(schedulezero(*bad_zone, "--http", "127.0.0.1:1"))
    assert "--zone" in line


def test_a_replica_without_keys_dialling_another_host_is_refused(tmp_path: Path) -> None:
    line = process_error(
        schedulezero(
            "replica",
            "--node-id",
            "r1",
            "--zone",
            "dmz",
            "--upstream",
            "tcp://10.1.2.3:7100",
            "--http",
            "127.0.0.1:1",
            "--data-dir",
            str(tmp_path / "d"),
        )
    )
    assert "no CURVE keys" in line and "10.1.2.3" in line


def test_a_replica_needs_a_replica_key_for_its_zone(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    create_key(keys, "n1", "node")
    create_key(keys, "r1", "replica")  # no zone: the strictest filter, not "dmz"
    common = ["--upstream", free_mesh_address(), "--http", "127.0.0.1:1", "--keys", str(keys)]
    common += ["--data-dir", str(tmp_path / "d"), "--zone", "dmz"]
    line = process_error(schedulezero("replica", "--node-id", "n1", *common))
    assert "'node'" in line and "replica" in line
    line = process_error(schedulezero("replica", "--node-id", "r1", *common))
    assert "--zone dmz" in line and "no zone" in line


# --------------------------------------------------------------------------- a replica process


@pytest.fixture
def replica_child() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for child in made:
        child.stop()


async def get(url: str) -> tuple[int, Any] | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session,
            session.get(url) as resp,
        ):
            return resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def schedule_ids(http: str) -> list[str] | None:
    got = await get(http + "/api/schedules")
    return [s["id"] for s in got[1]["schedules"]] if got and got[0] == 200 else None


async def test_a_replica_process_follows_stops_and_resumes_from_its_copy(
    tmp_path: Path, replica_child: list[Child]
) -> None:
    log = FeedLog()
    log.append(None, add_task_command(), add_schedule_command("a"), add_schedule_command("b"))
    feed = await FakeFeed("n0", log).start()
    port = free_port("127.0.0.1")
    http = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "mesh.cli", "replica", "--node-id", "r1", "--zone", "dmz"]
    argv += ["--upstream", feed.address, "--http", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(tmp_path / "r1")]
    child = Child("r1", argv, log=tmp_path / "r1.log", env=child_env())
    replica_child.append(child)
    try:
        child.start()
        await until_equal(lambda: schedule_ids(http), ["a", "b"], 15.0, child)
        log.append(add_schedule_command("c"))
        await until_equal(lambda: schedule_ids(http), ["a", "b", "c"], 5.0, child)
        assert child.stop() == 0
    finally:
        await feed.close()

    # Stopped, its voter gone too: restarted, it serves its copy at once.
    child.start()
    await until_equal(lambda: schedule_ids(http), ["a", "b", "c"], 15.0, child)
    health = (await get(http + "/api/health") or (0, {}))[1]
    assert health["applied_index"] == log.seq and health["following"] is False

    # The voter back on its address: the replica resumes after its copy, no snapshot.
    log.append(add_schedule_command("d"))
    feed = await FakeFeed("n0", log, address=feed.address).start()
    try:
        await until_equal(lambda: schedule_ids(http), ["a", "b", "c", "d"], 10.0, child)
        assert [s["after"] for s in feed.subscribes] == [log.seq - 1]
    finally:
        assert child.stop() == 0
        await feed.close()


async def until_equal(fn: Any, expected: Any, timeout: float, child: Child) -> None:
    """Until ``await fn() == expected``; AssertionError with the child's output otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = None
    while loop.time() < deadline:
        seen = await fn()
        if seen == expected:
            return
        assert child.running, f"the replica exited\n{child.tail()}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"waited {timeout}s for {expected!r}, saw {seen!r}\n{child.tail()}")


@pytest.mark.skipif(
    "zone" not in attrs.fields_dict(Certificate),
    reason="keys with a zone (mesh.security.keys, the feed half of issue 13) not merged yet",
)
def test_a_replica_with_a_key_for_its_zone_starts(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    create_key(keys, "n1", "node")
    create_key(keys, "r1", "replica", zone="dmz")  # type: ignore[call-arg]
    port = free_port("127.0.0.1")
    argv = [sys.executable, "-m", "mesh.cli", "replica", "--node-id", "r1", "--zone", "dmz"]
    argv += ["--upstream", free_mesh_address(), "--http", f"127.0.0.1:{port}"]
    argv += ["--keys", str(keys), "--data-dir", str(tmp_path / "d")]
    child = Child("r1", argv, log=tmp_path / "r1.log", env=child_env()).start()
    try:
        health = wait_for_http(
            f"http://127.0.0.1:{port}/api/health", 15.0, proc=child.proc, what="the replica"
        )
        assert health["zone"] == "dmz" and health["role"] == "replica"
    finally:
        child.stop()
