"""The replica's HTTP API: reads from its local copy, 403 on every mutation, health with zone,
upstream and lag.

A whole replica (``serve_replica``: CURVE transport, follower, replica.db, aiohttp server on a
real port) runs in the test's loop against fake voters (tests/feedfake.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.security.keys import KeyRing, create_key
from mesh.supervise import free_port
from mesh.zones.replica_app import READ_ONLY_REPLICA, ReplicaNode, ReplicaOptions, serve_replica
from tests.feedfake import FakeFeed, FeedLog, add_schedule_command, add_task_command
from tests.waiting import wait_until_async

ZONE = "dmz"


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[tuple[ReplicaNode, FakeFeed, str]]:
    keys = tmp_path / "keys"
    create_key(keys, "n0", "node")
    create_key(keys, "r1", "replica")
    log = FeedLog()
    log.append(
        None, add_task_command(), add_schedule_command("a", args=("x",)), add_schedule_command("b")
    )
    feed = await FakeFeed("n0", log, keys=KeyRing(keys, "n0")).start()
    port = free_port("127.0.0.1")
    opts = ReplicaOptions(
        replica_id="r1",
        zone=ZONE,
        upstreams=(feed.address,),
        http=f"127.0.0.1:{port}",
        data_dir=tmp_path / "r1",
        keys=keys,
    )
    stop = asyncio.Event()
    started: list[ReplicaNode] = []
    task = asyncio.create_task(
        serve_replica(opts, keys=KeyRing(keys, "r1"), stop=stop, ready=started.append)
    )
    try:
        await wait_until_async(lambda: started or task.done(), 5.0, "the replica serving")
        if task.done():
            task.result()
        node = started[0]
        await wait_until_async(lambda: node.follower.applied == log.seq, 5.0, "caught up")
        yield node, feed, f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await feed.close()


async def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, await resp.json(content_type=None)
        except ValueError:
            return resp.status, text


MUTATIONS = [
    ("POST", "/api/schedules", {"id": "c", "task": "report", "trigger": {"interval": 60}}),
    ("PUT", "/api/schedules/a", {"task": "report", "trigger": {"interval": 60}}),
    ("PATCH", "/api/schedules/a", {}),
    ("DELETE", "/api/schedules/a", None),
    ("POST", "/api/schedules/a/pause", None),
    ("POST", "/api/schedules/a/resume", None),
    ("POST", "/api/jobs", {"task": "report"}),
    ("POST", "/api/cluster/members", {"node_id": "n9"}),
    ("DELETE", "/api/cluster/members/n0", None),
    ("POST", "/api/no-such-route", {}),
]


@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS)
async def test_every_mutation_answers_403_read_only(
    replica: tuple[ReplicaNode, FakeFeed, str], method: str, path: str, body: Any
) -> None:
    node, _, url = replica
    before = node.follower.state.snapshot()
    status, answer = await call(method, url + path, body)
    assert (status, answer) == (403, {"error": READ_ONLY_REPLICA})
    assert node.follower.state.snapshot() == before


async def test_a_mutation_is_refused_before_its_body_is_read(
    replica: tuple[ReplicaNode, FakeFeed, str],
) -> None:
    _, _, url = replica
    status, answer = await call("POST", url + "/api/schedules", {"pad": "x" * (2 * 1024 * 1024)})
    assert (status, answer) == (403, {"error": READ_ONLY_REPLICA})


async def test_reads_are_served_from_the_local_copy(
    replica: tuple[ReplicaNode, FakeFeed, str],
) -> None:
    node, feed, url = replica
    status, body = await call("GET", url + "/api/schedules")
    assert status == 200
    assert [(s["id"], s["args"]) for s in body["schedules"]] == [("a", ["x"]), ("b", [])]
    assert (await call("GET", url + "/api/schedules/b"))[1]["id"] == "b"
    assert (await call("GET", url + "/api/schedules/zz"))[0] == 404
    assert await call("GET", url + "/api/executions") == (200, {"executions": [], "next": None})
    assert await call("GET", url + "/api/handlers") == (200, {"handlers": [], "next": None})
    job = "00000000-0000-0000-0000-000000000001"
    assert (await call("GET", f"{url}/api/jobs/{job}"))[0] == 404
    cluster = (await call("GET", url + "/api/cluster"))[1]
    assert cluster["members"][0]["role"] == "replica" and cluster["leader_id"] == "n0"
    assert (await call("GET", url + "/api/cluster/members"))[1]["voters"] == []
    status, metrics = await call("GET", url + "/metrics")
    assert status == 200 and "mesh_replica_lag_seconds" in metrics
    # A change committed upstream shows up in the next read.
    feed.log.append(add_schedule_command("c"))
    await wait_until_async(lambda: "c" in node.follower.state.schedules, 3.0, "schedule c")
    ids = [s["id"] for s in (await call("GET", url + "/api/schedules"))[1]["schedules"]]
    assert ids == ["a", "b", "c"]


async def test_health_says_replica_zone_upstream_and_lag(
    replica: tuple[ReplicaNode, FakeFeed, str],
) -> None:
    node, feed, url = replica
    await wait_until_async(lambda: node.follower.lag_seconds() == 0.0, 2.0, "a heartbeat")
    status, health = await call("GET", url + "/api/health")
    assert status == 200
    assert health["node_id"] == "r1" and health["role"] == "replica" and health["zone"] == ZONE
    assert health["upstream"] == feed.address and health["upstream_node"] == "n0"
    assert health["applied_index"] == feed.log.seq and health["leader_id"] == "n0"
    assert health["lag_seconds"] == 0.0 and health["following"] is True


async def test_a_stopped_replica_leaves_its_copy_in_replica_db(tmp_path: Path) -> None:
    # (The fixture's replica is stopped at teardown; this one checks the file it leaves.)
    keys = tmp_path / "keys"
    create_key(keys, "n0", "node")
    create_key(keys, "r1", "replica")
    log = FeedLog()
    log.append(add_task_command(), add_schedule_command("a"))
    feed = await FakeFeed("n0", log, keys=KeyRing(keys, "n0")).start()
    opts = ReplicaOptions(
        replica_id="r1",
        zone=ZONE,
        upstreams=(feed.address,),
        http=f"127.0.0.1:{free_port('127.0.0.1')}",
        data_dir=tmp_path / "r1",
        keys=keys,
    )
    stop = asyncio.Event()
    started: list[ReplicaNode] = []
    task = asyncio.create_task(
        serve_replica(opts, keys=KeyRing(keys, "r1"), stop=stop, ready=started.append)
    )
    try:
        await wait_until_async(lambda: started and started[0].follower.applied == 2, 5.0, "2")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await feed.close()
    from mesh.zones.replica import ReplicaStore

    store = ReplicaStore(opts.data_dir / "replica.db")
    try:
        applied, image = store.load(ZONE)
        # The voter's image less its alert outbox, which a replica never holds.
        expected = json.loads(log.state.snapshot())
        del expected["alerts"]
        assert applied == 2 and json.loads(image) == expected
    finally:
        store.close()


async def test_the_dashboard_is_served_read_only_on_a_replica(
    replica: tuple[ReplicaNode, FakeFeed, str],
) -> None:
    _, _, url = replica
    status, page = await call("GET", url + "/")
    assert status == 200 and "<html" in page.lower()
    status, me = await call("GET", url + "/api/whoami")
    assert status == 200
    assert (me["node_role"], me["zone"], me["read_only"]) == ("replica", ZONE, True)
    assert (me["may_operate"], me["may_admin"]) == (False, False)
    status, overview = await call("GET", url + "/api/overview")
    assert status == 200
    assert (overview["role"], overview["read_only"], overview["schedules"]) == ("replica", True, 2)
    assert overview["leadership"] == []
