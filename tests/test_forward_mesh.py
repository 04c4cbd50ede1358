"""A follower forwards writes to the leader over the mesh (``api_forward``), in process.

Nodes are FakeReplicas served by aiohttp's test server with a real tokens file and audit table
(as in test_api_auth_unit.py). The leader's API answers ``api_forward`` on its FakeBus; a
follower's ``MeshLink`` hands its requests to that handler as the mesh would, from a key of the
test's choosing. The same writes forwarded over HTTP (a follower without a link) are the
reference: the mesh must answer exactly as they do.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mesh.api.auth import ApiTokens, create_token
from mesh.api.forward import FORWARD_KIND, SERVED_BY_HEADER
from mesh.api.http import create_app
from mesh.api.limits import ApiLimits
from mesh.contracts import Incoming
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.observability.state_db import AuditLog
from mesh.scheduling.service import SchedulingService
from tests.apierrors import error_of
from tests.fakes import FakeBus, FakeReplica, embedded_tasks

WAIT = 5.0
TASK = "unit_forward_echo"
ROLES = ("read", "operate", "admin")
LEADER_MESH = "tcp://127.0.0.1:7101"


@attrs.define
class MeshLink:
    """A follower's mesh link to the leader (``contracts.LeaderLink``).

    Requests reach the leader's handler as messages from the key ``sender`` with ``role`` (None:
    an unsecured mesh); a request it drops times out. ``accepts=False`` is a leader that never
    said it takes ``api_forward`` (an older version).
    """

    leader_bus: FakeBus
    sender: str | None = "n2"
    role: str | None = "node"
    accepts: bool = True
    max_body_chars: int | None = None  # a larger request is refused unsent (the frame limit)
    down: bool = False  # the leader's connection is down: nothing can be sent
    sent: list[dict[str, Any]] = attrs.Factory(list)
    _rids: Iterator[int] = attrs.Factory(lambda: itertools.count(1))

    def leader_accepting(self, kind: str) -> str | None:
        taken = self.accepts and kind in self.leader_bus.handlers
        return LEADER_MESH if taken else None

    async def request(
        self,
        address: str,
        kind: str,
        payload: dict[str, Any],
        *,
        timeout: float,
        connect_timeout: float,
    ) -> dict[str, Any]:
        assert address == LEADER_MESH
        if self.max_body_chars is not None and len(payload["body"]) > self.max_body_chars:
            raise ValueError("larger than one mesh message")
        if self.down:
            raise ConnectionError(f"request {kind!r} to {address}: peer not connected")
        self.sent.append(payload)
        identity = (self.sender or "n2").encode()
        msg = Incoming(
            kind, payload, b"%d" % next(self._rids), identity, "", self.sender, self.role
        )
        answer = self.leader_bus.handlers[kind](msg)
        if inspect.isawaitable(answer):
            answer = await answer
        if answer is None:
            raise TimeoutError(f"request {kind!r} to {address}: no answer")
        return answer


@attrs.define
class Node:
    replica: FakeReplica
    service: SchedulingService
    client: TestClient
    audit: AuditLog
    bus: FakeBus


@pytest.fixture
def tasks() -> Iterator[None]:
    with embedded_tasks(TASK, "unit_forward_blocking"):
        yield


@pytest.fixture
def tokens_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens.json"
    return path, {role: create_token(path, f"{role}-user", role) for role in ROLES}


@pytest.fixture
async def nodes(tasks: None, tmp_path: Path) -> AsyncIterator[Any]:
    """``make(node_id, tokens_path, *, link=None, max_body_bytes=...)`` → a Node over HTTP."""
    made: list[Node] = []
    dbs = itertools.count(1)

    async def make(
        node_id: str,
        tokens: Path | None,
        *,
        link: MeshLink | None = None,
        max_body_bytes: int = 1024 * 1024,
    ) -> Node:
        replica = FakeReplica(node_id)
        state = replica.state_machine
        service = SchedulingService(
            replica, state, dispatcher=HandlerDispatcher(replica, FakeBus(), replica, state)
        )
        audit = AuditLog(tmp_path / f"{node_id}-{next(dbs)}.db")
        bus = FakeBus()
        app = create_app(
            replica,
            replica,
            service,
            tokens=ApiTokens(tokens) if tokens is not None else None,
            audit=audit,
            limits=ApiLimits(max_body_bytes=max_body_bytes),
            bus=bus,
            link=link,
        )
        client = TestClient(TestServer(app))
        await client.start_server()
        replica.http_address = f"{client.host}:{client.port}"
        node = Node(replica, service, client, audit, bus)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            async with asyncio.timeout(WAIT):
                await node.service.close()
            await node.client.close()
            node.audit.close()


async def lead(leader: Node, *followers: Node) -> None:
    """``leader`` leads term 1; each follower knows it and applies what it commits."""
    for f in followers:
        leader.replica.replicate_to(f.replica)
    leader.replica.become_leader(1)
    await leader.service.wait_ready(WAIT)
    for f in followers:
        f.replica.add_peer("n1", LEADER_MESH, leader.replica.http_address)
        f.replica.step_down("n1", term=1)


def schedule(schedule_id: str = "s1", **extra: Any) -> dict[str, Any]:
    return {
        "id": schedule_id,
        "task": TASK,
        "trigger": {"type": "interval", "hours": 1},
        "paused": True,
        **extra,
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def forward_payload(**changes: Any) -> dict[str, Any]:
    """A valid ``api_forward`` request creating schedule ``hostile`` (no tokens file)."""
    body = base64.b64encode(
        b'{"id": "hostile", "task": "%s", "trigger": {"type": "interval",'
        b' "hours": 1}, "paused": true}' % TASK.encode()
    ).decode()
    payload = {
        "node": "n2",
        "method": "POST",
        "target": "/api/schedules",
        "headers": {"Content-Type": "application/json"},
        "body": body,
        "client": "127.0.0.1",
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


# --------------------------------------------------------------------------- the follower


async def test_a_follower_forwards_a_write_over_the_mesh_audited_as_the_caller_on_the_leader(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    leader = await nodes("n1", path)
    link = MeshLink(leader.bus)
    follower = await nodes("n2", path, link=link)
    await lead(leader, follower)

    resp = await follower.client.post(
        "/api/schedules", json=schedule("fw"), headers=bearer(tokens["operate"])
    )
    assert resp.status == 201, await resp.text()
    assert resp.headers[SERVED_BY_HEADER] == "n1@1"
    assert [p["target"] for p in link.sent] == ["/api/schedules"]
    # Read your writes: the follower applied it before answering.
    assert "fw" in follower.replica.state_machine.schedules
    [row] = leader.audit.page(after=0, limit=10)
    assert (row["token"], row["role"], row["schedule_id"], row["status"]) == (
        "operate-user",
        "operate",
        "fw",
        201,
    )
    assert (row["node_id"], row["received_by"], row["client"], row["peer"]) == (
        "n1",
        "n2",
        "127.0.0.1",
        "mesh:n2",
    )
    assert follower.audit.page(after=0, limit=10) == []


WRITES = [
    pytest.param("POST", "/api/schedules", schedule("a"), "operate", id="create-201"),
    pytest.param("POST", "/api/schedules", schedule("dup"), "operate", id="exists-409"),
    pytest.param("POST", "/api/schedules", b"{not json", "operate", id="not-json-400"),
    pytest.param("POST", "/api/schedules", b"[" * 100 + b"]" * 100, "operate", id="deep-400"),
    pytest.param("POST", "/api/schedules", b"x" * 3000, "operate", id="leader-limit-413"),
    pytest.param("PUT", "/api/schedules/nope", schedule("nope"), "operate", id="unknown-404"),
    pytest.param("PUT", "/api/schedules/dup", schedule("dup"), "operate", id="replace-200"),
    pytest.param("POST", "/api/schedules/dup/pause", None, "operate", id="pause-200"),
    pytest.param("DELETE", "/api/schedules/dup", None, "operate", id="delete-204"),
    pytest.param("POST", "/api/cluster/members", {"node_id": "zz"}, "operate", id="role-403"),
    pytest.param("POST", "/api/schedules", schedule("b"), "wrong", id="token-401"),
    pytest.param("PATCH", "/api/schedules/dup", None, "operate", id="method-405"),
    pytest.param("POST", "/api/schedules?x=%20y", schedule("q"), "operate", id="query-201"),
]


def normalised(raw: bytes) -> Any:
    """A JSON answer without the fields that depend on when it was made."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(data, dict):
        data.pop("next_fire_time", None)
        if isinstance(data.get("trigger"), dict):
            data["trigger"].pop("start_time", None)
    return data


@pytest.mark.parametrize(("method", "target", "body", "role"), WRITES)
async def test_the_mesh_answers_every_write_exactly_as_the_http_forward(
    nodes: Any,
    tokens_file: tuple[Path, dict[str, str]],
    method: str,
    target: str,
    body: Any,
    role: str,
) -> None:
    """Status, body and relayed headers, errors included, from two equal leaders: one reached
    over the mesh, one over HTTP. The followers have no tokens file, so what the leader refuses
    (401 with its challenge, 403) reaches it and comes back."""
    path, tokens = tokens_file
    token = tokens.get(role, "szt_wrong")
    answers = []
    for over_mesh in (True, False):
        leader = await nodes("n1", path, max_body_bytes=2048)
        link = MeshLink(leader.bus, accepts=over_mesh)
        follower = await nodes("n2", None, link=link)
        await lead(leader, follower)
        await leader.client.post("/api/schedules", json=schedule("dup"), headers=bearer(token))
        kwargs: dict[str, Any] = {"headers": bearer(token)}
        if isinstance(body, bytes):
            kwargs["data"] = body
            kwargs["headers"]["Content-Type"] = "application/json"
        elif body is not None:
            kwargs["json"] = body
        resp = await follower.client.request(method, target, **kwargs)
        headers = {
            k: resp.headers.get(k)
            for k in ("Content-Type", SERVED_BY_HEADER, "WWW-Authenticate", "Allow")
        }
        answers.append((resp.status, normalised(await resp.read()), headers))
        assert len(link.sent) == (1 if over_mesh else 0)
    assert answers[0] == answers[1]
    assert answers[0][0] < 500


async def test_a_leader_that_does_not_take_the_kind_gets_the_write_over_http(
    nodes: Any,
) -> None:
    """A rolling upgrade: the leader never said it answers ``api_forward``."""
    leader = await nodes("n1", None)
    link = MeshLink(leader.bus, accepts=False)
    follower = await nodes("n2", None, link=link)
    await lead(leader, follower)
    resp = await follower.client.post("/api/schedules", json=schedule("old"))
    assert resp.status == 201, await resp.text()
    assert link.sent == []
    assert [row["peer"] for row in leader.audit.page(after=0, limit=10)] == ["127.0.0.1"]


async def test_a_write_too_large_for_one_mesh_message_goes_over_http(nodes: Any) -> None:
    leader = await nodes("n1", None)
    link = MeshLink(leader.bus, max_body_chars=100)
    follower = await nodes("n2", None, link=link)
    await lead(leader, follower)
    resp = await follower.client.post(
        "/api/schedules", json=schedule("big", metadata={"n": "n" * 200})
    )
    assert resp.status == 201, await resp.text()
    assert link.sent == []
    assert [row["peer"] for row in leader.audit.page(after=0, limit=10)] == ["127.0.0.1"]


async def test_a_write_the_mesh_message_cannot_carry_goes_over_http_not_unanswered(
    nodes: Any,
) -> None:
    """HTTP allows a header value the leader refuses in an ``api_forward`` (non-ASCII here):
    the follower must not send what would be dropped, and leave its caller waiting."""
    leader = await nodes("n1", None)
    link = MeshLink(leader.bus)
    follower = await nodes("n2", None, link=link)
    await lead(leader, follower)
    headers = {"Content-Type": "application/json; x=\u00e9"}
    resp = await follower.client.post(
        "/api/schedules", data=json.dumps(schedule("odd")), headers=headers
    )
    assert resp.status == 201, await resp.text()
    assert link.sent == []
    assert leader.bus.rejected == []


async def test_a_leader_that_does_not_answer_is_a_503_and_the_write_is_not_sent_again(
    nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No second try over HTTP: a request that timed out may have been applied."""
    leader = await nodes("n1", None)
    link = MeshLink(leader.bus, role="handler")  # the leader drops what this key sends
    follower = await nodes("n2", None, link=link)
    await lead(leader, follower)
    resp = await follower.client.post("/api/schedules", json=schedule("lost"))
    assert "did not answer: TimeoutError" in await error_of(resp, 503)
    assert len(link.sent) == 1
    assert leader.audit.page(after=0, limit=10) == []  # HTTP would have been audited


async def test_a_leader_whose_connection_is_down_is_a_503_and_nothing_sent(nodes: Any) -> None:
    """Its process died: the follower answers at once (``FORWARD_CONNECT_TIMEOUT``), as an
    HTTP forward whose connection was refused did."""
    leader = await nodes("n1", None)
    link = MeshLink(leader.bus, down=True)
    follower = await nodes("n2", None, link=link)
    await lead(leader, follower)
    resp = await follower.client.post("/api/schedules", json=schedule("gone"))
    assert "did not answer: ConnectionError" in await error_of(resp, 503)
    assert link.sent == []
    assert leader.audit.page(after=0, limit=10) == []


async def test_leadership_moving_before_the_forward_arrives_is_a_503_and_nothing_applied(
    nodes: Any,
) -> None:
    leader = await nodes("n1", None)
    link = MeshLink(leader.bus)
    follower = await nodes("n2", None, link=link)
    await lead(leader, follower)
    leader.replica.step_down("n3", term=2)  # the follower has not heard of it yet
    resp = await follower.client.post("/api/schedules", json=schedule("moved"))
    assert "leadership moved during forwarding" in await error_of(resp, 503)
    assert len(link.sent) == 1
    assert "moved" not in leader.replica.state_machine.schedules


# --------------------------------------------------------------------------- the leader


async def test_the_leader_takes_forwards_only_once_its_application_started(
    nodes: Any, tasks: None
) -> None:
    """Before aiohttp froze the application its middlewares are not built: nothing may run."""
    replica = FakeReplica("n1")
    bus = FakeBus()
    create_app(replica, replica, bus=bus)
    assert FORWARD_KIND not in bus.handlers
    leader = await nodes("n1", None)
    assert FORWARD_KIND in leader.bus.handlers


async def answer_of(leader: Node, msg: Incoming) -> dict[str, Any] | None:
    answer = leader.bus.handlers[FORWARD_KIND](msg)
    return await answer if inspect.isawaitable(answer) else answer


def incoming(payload: dict[str, Any], sender: str | None, role: str | None) -> Incoming:
    return Incoming(FORWARD_KIND, payload, b"1", (sender or "n2").encode(), "", sender, role)


async def test_a_valid_forward_from_a_node_key_is_applied(nodes: Any) -> None:
    """The reference for the refusals below: the same message from n2's node key works."""
    leader = await nodes("n1", None)
    await lead(leader)
    answer = await answer_of(leader, incoming(forward_payload(), "n2", "node"))
    assert answer is not None and answer["status"] == 201
    assert "hostile" in leader.replica.state_machine.schedules


@pytest.mark.parametrize(
    ("sender", "role", "reason"),
    [
        pytest.param("h1", "handler", "role", id="handler-key"),
        pytest.param("r1", "replica", "role", id="replica-key"),
        pytest.param("n3", "node", "sender_mismatch", id="other-node-key"),
    ],
)
async def test_a_forward_from_a_key_that_may_not_send_it_is_refused_and_counted(
    nodes: Any, sender: str, role: str, reason: str
) -> None:
    leader = await nodes("n1", None)
    await lead(leader)
    assert await answer_of(leader, incoming(forward_payload(), sender, role)) is None
    assert [r for _, r in leader.bus.rejected] == [reason]
    assert "hostile" not in leader.replica.state_machine.schedules
    assert leader.audit.page(after=0, limit=10) == []


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"method": "GET"}, id="read-method"),
        pytest.param({"method": "CONNECT"}, id="other-method"),
        pytest.param({"target": "/metrics"}, id="not-api"),
        pytest.param({"target": "/metrics?/api/"}, id="query-not-path"),
        pytest.param({"target": "/api/schedules x"}, id="space-in-target"),
        pytest.param({"target": "/api/" + "a" * 9000}, id="long-target"),
        pytest.param({"target": 7}, id="target-not-str"),
        pytest.param({"headers": {"X-ScheduleZero-Forwarded-By": "n9"}}, id="other-header"),
        pytest.param({"headers": {"Content-Type": "a\r\nX-Evil: 1"}}, id="header-crlf"),
        pytest.param({"headers": {"Authorization": "B" * 9000}}, id="long-header"),
        pytest.param({"headers": []}, id="headers-not-dict"),
        pytest.param({"body": "not base64!"}, id="body-not-base64"),
        pytest.param({"body": None}, id="no-body"),
        pytest.param({"client": "x" * 200}, id="long-client"),
        pytest.param({"client": "a\nb"}, id="client-newline"),
        pytest.param({"node": "../n2"}, id="node-not-an-id"),
        pytest.param({"extra": 1}, id="unknown-field"),
    ],
)
async def test_a_malformed_forward_is_refused_and_counted(
    nodes: Any, changes: dict[str, Any]
) -> None:
    leader = await nodes("n1", None)
    await lead(leader)
    msg = incoming(forward_payload(**changes), None, None)  # unsecured: only the shape decides
    assert await answer_of(leader, msg) is None
    assert [r for _, r in leader.bus.rejected] == ["malformed"]
    assert leader.replica.state_machine.schedules == {}
    assert leader.audit.page(after=0, limit=10) == []
