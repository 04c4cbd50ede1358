"""Who may call the HTTP API, in process: tokens, roles, 401/403, audit, redaction, reload.

Nodes are FakeReplicas served by aiohttp's test server (as in test_http_unit.py) with a real
tokens file and a real audit table in a SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mesh.api.auth import (
    RELOAD_CHECK_SECONDS,
    ApiTokens,
    TokenFileError,
    create_token,
    hash_token,
    load_tokens,
    required_role,
)
from mesh.api.http import create_app
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.observability.state_db import AuditLog
from mesh.scheduling.service import SchedulingService
from tests.apierrors import error_of
from tests.fakes import FakeBus, FakeReplica, ManualClock, embedded_tasks

WAIT = 5.0
TASK = "unit_auth_echo"


@pytest.fixture
def tasks() -> Iterator[None]:
    with embedded_tasks(TASK, "unit_auth_blocking"):
        yield


@pytest.fixture
def tokens_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A tokens file with one token per role; returns (path, {role: token})."""
    path = tmp_path / "tokens.json"
    return path, {role: create_token(path, f"{role}-user", role) for role in ROLES}


ROLES = ("read", "operate", "admin")


@attrs.define
class Node:
    replica: FakeReplica
    service: SchedulingService
    client: TestClient
    audit: AuditLog


@pytest.fixture
async def nodes(tasks: None, tmp_path: Path) -> AsyncIterator[Any]:
    """``make(node_id, tokens_path, *, lead=False)`` → a Node served over HTTP with the tokens
    file (None: no tokens) and an audit table in its own SQLite file."""
    made: list[Node] = []

    async def make(
        node_id: str, tokens: Path | None, *, lead: bool = False, sensitive: Any = None
    ) -> Node:
        replica = FakeReplica(node_id)
        state = replica.state_machine
        dispatcher = HandlerDispatcher(replica, FakeBus(), replica, state)
        service = SchedulingService(replica, state, dispatcher=dispatcher)
        audit = AuditLog(tmp_path / f"{node_id}.db")
        app = create_app(
            replica,
            replica,
            service,
            tokens=ApiTokens(tokens) if tokens is not None else None,
            audit=audit,
            sensitive_keys=sensitive,
        )
        client = TestClient(TestServer(app))
        await client.start_server()
        replica.http_address = f"{client.host}:{client.port}"
        node = Node(replica, service, client, audit)
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
            node.audit.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def schedule(schedule_id: str = "s1", **extra: Any) -> dict[str, Any]:
    return {
        "id": schedule_id,
        "task": TASK,
        "trigger": {"type": "interval", "hours": 1},
        "paused": True,
        **extra,
    }


# --------------------------------------------------------------------------- the role table


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/api/health", None),
        ("GET", "/metrics", None),
        ("GET", "/", None),
        ("GET", "/api/schedules", "read"),
        ("GET", "/api/schedules/s1", "read"),
        ("GET", "/api/executions", "read"),
        ("GET", "/api/cluster", "read"),
        ("GET", "/api/cluster/members", "read"),
        ("POST", "/api/schedules", "operate"),
        ("PUT", "/api/schedules/s1", "operate"),
        ("DELETE", "/api/schedules/s1", "operate"),
        ("POST", "/api/schedules/s1/pause", "operate"),
        ("POST", "/api/jobs", "operate"),
        ("POST", "/api/cluster/members", "admin"),
        ("DELETE", "/api/cluster/members/n3", "admin"),
        ("GET", "/api/backup", "admin"),
        ("POST", "/api/restore", "admin"),
        ("GET", "/api/audit", "admin"),
    ],
)
def test_each_route_needs_the_role_of_the_contract(method: str, path: str, role: str) -> None:
    assert required_role(method, path) == role


# --------------------------------------------------------------------------- 401 / 403


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer szt_not-a-token"}, {"Authorization": "Basic dXNlcjpwYXNz"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_a_request_without_a_valid_token_is_a_401_with_a_bearer_challenge(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]], headers: dict[str, str]
) -> None:
    node = await nodes("n1", tokens_file[0], lead=True)
    for method, path in (("GET", "/api/schedules"), ("POST", "/api/schedules")):
        resp = await node.client.request(method, path, json=schedule(), headers=headers)
        assert "API token" in await error_of(resp, 401)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert node.service.state.schedules == {}


async def test_health_and_metrics_stay_open_with_tokens(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    node = await nodes("n1", tokens_file[0], lead=True)
    assert (await node.client.get("/api/health")).status == 200
    assert (await node.client.get("/metrics")).status == 200


@pytest.mark.parametrize(
    ("role", "method", "path", "expected"),
    [
        ("read", "GET", "/api/schedules", 200),
        ("read", "POST", "/api/schedules", 403),
        ("read", "POST", "/api/jobs", 403),
        ("read", "GET", "/api/audit", 403),
        ("operate", "POST", "/api/schedules", 201),
        ("operate", "POST", "/api/cluster/members", 403),
        ("operate", "DELETE", "/api/cluster/members/n9", 403),
        ("operate", "GET", "/api/audit", 403),
        ("admin", "POST", "/api/schedules", 201),
        ("admin", "GET", "/api/audit", 200),
        ("admin", "GET", "/api/cluster/members", 200),
    ],
)
async def test_a_token_may_do_what_its_role_allows_and_gets_403_above_it(
    nodes: Any,
    tokens_file: tuple[Path, dict[str, str]],
    role: str,
    method: str,
    path: str,
    expected: int,
) -> None:
    path_, tokens = tokens_file
    node = await nodes("n1", path_, lead=True)
    body = schedule() if path == "/api/schedules" else {"node_id": "n9"}
    resp = await node.client.request(
        method, path, json=body if method == "POST" else None, headers=bearer(tokens[role])
    )
    if expected == 403:
        message = await error_of(resp, 403)
        assert f"{role}-user" in message and "needs" in message
    else:
        assert resp.status == expected, await resp.text()


async def test_without_a_tokens_file_every_request_is_allowed(nodes: Any) -> None:
    node = await nodes("n1", None, lead=True)
    assert (await node.client.post("/api/schedules", json=schedule())).status == 201
    assert (await node.client.get("/api/audit")).status == 200


# --------------------------------------------------------------------------- redaction


async def test_a_read_caller_sees_sensitive_values_masked_and_operate_sees_them(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    node = await nodes("n1", path, lead=True)
    secret = {
        "kwargs": {"message": "hi", "password": "hunter2", "nested": {"api_key": "k-1"}},
        "metadata": {"owner": "ops", "webhook_url": "https://x/y"},
    }
    created = await node.client.post(
        "/api/schedules", json=schedule(**secret), headers=bearer(tokens["operate"])
    )
    assert created.status == 201, await created.text()
    for url in ("/api/schedules/s1", "/api/schedules"):
        as_reader = await (await node.client.get(url, headers=bearer(tokens["read"]))).json()
        as_operator = await (await node.client.get(url, headers=bearer(tokens["operate"]))).json()
        seen = as_reader if url.endswith("s1") else as_reader["schedules"][0]
        full = as_operator if url.endswith("s1") else as_operator["schedules"][0]
        assert seen["kwargs"] == {"message": "hi", "password": "***", "nested": {"api_key": "***"}}
        assert seen["metadata"] == {"owner": "ops", "webhook_url": "***"}
        assert full["kwargs"] == secret["kwargs"] and full["metadata"] == secret["metadata"]


async def test_the_configured_sensitive_keys_replace_the_defaults_for_readers(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    node = await nodes("n1", path, lead=True, sensitive=("pin",))
    kwargs = {"pin": "1234", "password": "shown"}
    created = await node.client.post(
        "/api/schedules", json=schedule(kwargs=kwargs), headers=bearer(tokens["admin"])
    )
    assert created.status == 201
    seen = await (await node.client.get("/api/schedules/s1", headers=bearer(tokens["read"]))).json()
    assert seen["kwargs"] == {"pin": "***", "password": "shown"}


# --------------------------------------------------------------------------- audit


async def test_every_mutation_is_audited_with_who_what_where_and_outcome(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    node = await nodes("n1", path, lead=True)
    c = node.client
    operate, read = bearer(tokens["operate"]), bearer(tokens["read"])
    assert (await c.post("/api/schedules", json=schedule("a"), headers=operate)).status == 201
    assert (await c.post("/api/schedules", json=schedule("b"), headers=read)).status == 403
    assert (await c.delete("/api/schedules/a")).status == 401
    assert (await c.post("/api/schedules/a/pause", headers=bearer(tokens["admin"]))).status == 200
    assert (await c.get("/api/schedules", headers=bearer(tokens["read"]))).status == 200  # a read
    resp = await c.get("/api/audit", headers=bearer(tokens["admin"]))
    body = await resp.json()
    rows = [
        (e["token"], e["role"], e["method"], e["path"], e["schedule_id"], e["status"])
        for e in body["audit"]
    ]
    assert rows == [
        ("operate-user", "operate", "POST", "/api/schedules", "a", 201),
        ("read-user", "read", "POST", "/api/schedules", None, 403),
        (None, None, "DELETE", "/api/schedules/a", "a", 401),
        ("admin-user", "admin", "POST", "/api/schedules/a/pause", "a", 200),
    ]
    for e in body["audit"]:
        assert e["node_id"] == e["received_by"] == "n1"
        assert e["client"] == e["peer"] == "127.0.0.1"
        assert e["ts"].endswith("Z")
    assert body["next_after"] is None


async def test_the_audit_pages_with_limit_and_after(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    node = await nodes("n1", path, lead=True)
    admin = bearer(tokens["admin"])
    for i in range(5):
        await node.client.post("/api/schedules", json=schedule(f"s{i}"), headers=admin)
    seen: list[str] = []
    after = 0
    for _ in range(5):
        resp = await node.client.get(f"/api/audit?limit=2&after={after}", headers=admin)
        body = await resp.json()
        seen += [e["schedule_id"] for e in body["audit"]]
        if body["next_after"] is None:
            break
        after = body["next_after"]
    assert seen == ["s0", "s1", "s2", "s3", "s4"]
    for query in ("limit=0", "limit=abc", "after=-1", "after=²", "limit=5000", "page=2"):
        resp = await node.client.get(f"/api/audit?{query}", headers=admin)
        await error_of(resp, 400)


async def test_a_forwarded_write_keeps_the_callers_identity_in_the_leaders_audit(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    follower = await nodes("n2", path)
    leader = await nodes("n1", path)
    leader.replica.replicate_to(follower.replica)
    leader.replica.become_leader(1)
    await leader.service.wait_ready(WAIT)
    follower.replica.add_peer("n1", leader.replica.mesh_address, leader.replica.http_address)
    follower.replica.step_down("n1", term=1)

    resp = await follower.client.post(
        "/api/schedules", json=schedule("fw"), headers=bearer(tokens["operate"])
    )
    assert resp.status == 201, await resp.text()
    [row] = leader.audit.page(after=0, limit=10)
    assert (row["token"], row["role"], row["schedule_id"], row["status"]) == (
        "operate-user",
        "operate",
        "fw",
        201,
    )
    assert (row["node_id"], row["received_by"], row["client"]) == ("n1", "n2", "127.0.0.1")
    # The write the leader answered is in the leader's audit only.
    assert follower.audit.page(after=0, limit=10) == []


async def test_the_leader_checks_a_forwarded_request_itself(
    nodes: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    """Claiming to be a forwarding node grants nothing: the caller's own token decides."""
    path, tokens = tokens_file
    leader = await nodes("n1", path, lead=True)
    spoofed = {"X-ScheduleZero-Forwarded-By": "n2", "X-ScheduleZero-Client": "10.9.9.9"}
    resp = await leader.client.post("/api/schedules", json=schedule(), headers=spoofed)
    await error_of(resp, 401)
    resp = await leader.client.post(
        "/api/schedules", json=schedule(), headers={**spoofed, **bearer(tokens["read"])}
    )
    await error_of(resp, 403)
    assert leader.service.state.schedules == {}
    rows = leader.audit.page(after=0, limit=10)
    # What the "forwarder" reported is kept, next to the TCP peer the leader really saw.
    assert [(e["status"], e["received_by"], e["client"], e["peer"]) for e in rows] == [
        (401, "n2", "10.9.9.9", "127.0.0.1"),
        (403, "n2", "10.9.9.9", "127.0.0.1"),
    ]


# --------------------------------------------------------------------------- the tokens file


def test_the_tokens_file_holds_only_a_sha256_of_each_token_with_mode_600(tmp_path: Path) -> None:
    path = tmp_path / "t" / "tokens.json"
    token = create_token(path, "ci", "operate")
    assert token.startswith("szt_") and len(token) >= 40
    text = path.read_text()
    assert token not in text and token[4:] not in text
    assert json.loads(text)["tokens"][0]["sha256"] == hash_token(token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [entry] = load_tokens(path)
    assert (entry.name, entry.role) == ("ci", "operate")
    assert create_token(path, "ci2", "read") != token


def test_a_token_name_can_be_created_only_once(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "ci", "read")
    with pytest.raises(TokenFileError, match="exists"):
        create_token(path, "ci", "admin")


@pytest.mark.parametrize(
    "content",
    ["not json", '{"tokens": {}}', '{"tokens": [{"name": "a", "role": "root", "sha256": "0"}]}'],
)
def test_a_broken_tokens_file_is_refused_with_its_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(TokenFileError, match=str(path)):
        ApiTokens(path)


def test_a_tokens_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "ci", "read")
    path.chmod(0o666)
    with pytest.raises(TokenFileError, match="chmod 600"):
        ApiTokens(path)


def test_the_tokens_file_is_reread_when_it_changes_and_fails_closed_when_broken(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.json"
    first = create_token(path, "first", "read")
    clock = ManualClock()
    tokens = ApiTokens(path, clock=clock)
    second = create_token(path, "second", "admin")
    assert tokens.authenticate(second) is None  # not looked at again yet
    clock.advance(RELOAD_CHECK_SECONDS)
    caller = tokens.authenticate(second)
    assert caller is not None and (caller.name, caller.role) == ("second", "admin")
    path.write_text("{broken")
    clock.advance(RELOAD_CHECK_SECONDS)
    assert tokens.authenticate(first) is None and tokens.authenticate(second) is None
