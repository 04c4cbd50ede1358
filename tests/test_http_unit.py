"""The HTTP API on FakeReplicas, through aiohttp's test server and client (in-process).

A leader is a FakeReplica that leads term 1 with a running SchedulingService (a real
AsyncScheduler on the fake log); a follower is a FakeReplica that knows the leader's HTTP
address and applies the leader's entries as they commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestClient, TestServer

import mesh.api.forward as forward
from mesh.api.http import COMMIT_HEADER, SERVED_BY_HEADER, create_app
from mesh.config import GovernorConfig
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.dispatch.governors import Governors
from mesh.scheduling.service import SchedulingService
from tests.apierrors import error_of
from tests.fakes import FakeBus, FakeReplica, embedded_tasks

WAIT = 5.0
TASK = "unit_http_echo"
BLOCKING = "unit_http_blocking"


@pytest.fixture
def gate() -> Iterator[asyncio.Event]:
    """Two embedded tasks: ``TASK`` returns its argument, ``BLOCKING`` waits for the gate."""
    with embedded_tasks(TASK, BLOCKING) as gate:
        yield gate


@attrs.define
class Node:
    replica: FakeReplica
    service: SchedulingService
    client: TestClient


@pytest.fixture
async def nodes(gate: asyncio.Event) -> AsyncIterator[Any]:
    """``make(node_id, *, lead=False, max_queued_jobs=...)`` → a Node served over HTTP."""
    made: list[Node] = []

    async def make(node_id: str, *, lead: bool = False, max_queued_jobs: int = 100) -> Node:
        replica = FakeReplica(node_id)
        state = replica.state_machine
        governors = Governors(GovernorConfig(max_queued_jobs=max_queued_jobs))
        dispatcher = HandlerDispatcher(replica, FakeBus(), replica, state, governors=governors)
        service = SchedulingService(replica, state, dispatcher=dispatcher)
        client = TestClient(TestServer(create_app(replica, replica, service)))
        await client.start_server()
        replica.http_address = f"{client.host}:{client.port}"
        node = Node(replica, service, client)
        made.append(node)
        if lead:
            replica.become_leader(1)
            await service.wait_ready(WAIT)
        return node

    try:
        yield make
    finally:
        for node in made:
            async with asyncio.timeout(WAIT):
                await node.service.close()
            await node.client.close()


def schedule(schedule_id: str = "s1") -> dict[str, Any]:
    # Paused: it never fires, so the test's writes are the only ones in the log.
    return {
        "id": schedule_id,
        "task": TASK,
        "trigger": {"type": "interval", "hours": 1},
        "paused": True,
    }


# --------------------------------------------------------------------------- errors


async def test_a_body_that_is_not_json_is_a_400_json_error(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    resp = await leader.client.post(
        "/api/schedules", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert "not valid JSON" in await error_of(resp, 400)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/schedules/nope", None),
        ("DELETE", "/api/schedules/nope", None),
        ("PUT", "/api/schedules/nope", schedule("nope")),
        ("POST", "/api/schedules/nope/pause", None),
    ],
    ids=["get", "delete", "put", "pause"],
)
async def test_an_unknown_schedule_is_a_404_json_error(
    nodes: Any, method: str, path: str, body: Any
) -> None:
    leader = await nodes("n1", lead=True)
    resp = await leader.client.request(method, path, json=body)
    assert await error_of(resp, 404) == "no schedule with id 'nope'"


async def test_creating_a_schedule_whose_id_exists_is_a_409_json_error(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    assert (await leader.client.post("/api/schedules", json=schedule("s1"))).status == 201
    resp = await leader.client.post("/api/schedules", json=schedule("s1"))
    assert "already exists" in await error_of(resp, 409)


async def test_a_write_without_a_leader_is_a_503_json_error_after_the_wait(
    nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forward, "NO_LEADER_WAIT", 0.2)
    follower = await nodes("n1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await follower.client.post("/api/schedules", json=schedule())
    assert "no leader available" in await error_of(resp, 503)
    assert loop.time() - started >= 0.2
    assert follower.replica.log == []


async def test_a_job_beyond_the_queue_limit_is_a_429_json_error(
    nodes: Any, gate: asyncio.Event
) -> None:
    leader = await nodes("n1", lead=True, max_queued_jobs=1)
    first = await leader.client.post("/api/jobs", json={"task": BLOCKING})
    assert first.status == 202  # its job stays queued until the gate opens
    resp = await leader.client.post("/api/jobs", json={"task": TASK, "args": ["x"]})
    assert "retry later" in await error_of(resp, 429)


# --------------------------------------------------------------------------- leader and follower


async def test_a_write_on_the_leader_says_which_commit_and_which_term_served_it(
    nodes: Any,
) -> None:
    leader = await nodes("n1", lead=True)
    resp = await leader.client.post("/api/schedules", json=schedule("s1"))
    assert resp.status == 201
    replica = leader.replica
    [written] = [
        e.index
        for what, e in replica.journal
        if what == "applied" and e.kind == "command" and e.data["op"] == "add_schedule"
    ]
    assert written <= int(resp.headers[COMMIT_HEADER]) <= replica.commit_index
    assert resp.headers[SERVED_BY_HEADER] == "n1@1"


async def test_a_follower_forwards_a_write_to_the_leaders_http_address(nodes: Any) -> None:
    follower = await nodes("n1")
    leader = await nodes("n2")
    leader.replica.replicate_to(follower.replica)
    leader.replica.become_leader(1)
    await leader.service.wait_ready(WAIT)
    follower.replica.add_peer("n2", leader.replica.mesh_address, leader.replica.http_address)
    follower.replica.step_down("n2", term=1)

    resp = await follower.client.post("/api/schedules", json=schedule("s1"))
    assert resp.status == 201, await resp.text()
    assert resp.headers[SERVED_BY_HEADER] == "n2@1"
    assert "s1" in leader.replica.state_machine.schedules
    assert follower.replica.log == leader.replica.log  # committed there, applied here
    got = await follower.client.get("/api/schedules/s1")  # a read is served locally
    assert got.status == 200
    assert (await got.json())["id"] == "s1"
