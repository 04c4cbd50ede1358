"""The backup file (checksum, format, truncation, tampering), ``GET /api/backup`` (admin only,
audited, the leader's) and ``schedulezero restore`` (checks everything before writing anything)."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mesh.api.auth import ApiTokens, create_token
from mesh.api.http import create_app
from mesh.backup import (
    FORMAT_VERSION,
    BackupError,
    BackupHeader,
    header_line,
    read_backup,
    trailer,
)
from mesh.cli import main
from mesh.contracts import StateImage
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.observability.state_db import AuditLog
from mesh.restore import RestoreError, restore
from mesh.scheduling.service import SchedulingService
from mesh.scheduling.state import SchedulerState
from mesh.storage.raft_store import RaftStore
from tests.fakes import FakeBus, FakeReplica, embedded_tasks

WAIT = 5.0
TASK = "unit_backup_echo"


def _header(image: bytes, **changes: Any) -> BackupHeader:
    fields: dict[str, Any] = {
        "index": 42,
        "term": 7,
        "snapshot_term": 6,
        "voters": ("n1", "n2", "n3"),
        "image_bytes": len(image),
        "created_at": "2026-01-01T00:00:00+00:00",
        "created_by": {"node_id": "n1", "version": "0.1.0"},
        "leader_id": "n1",
    }
    return BackupHeader(**{**fields, **changes})


def _sealed(head: bytes, image: bytes) -> bytes:
    import hashlib

    return head + image + trailer(hashlib.sha256(head + image).hexdigest())


def write_backup(path: Path, image: bytes | None = None, **changes: Any) -> Path:
    image = SchedulerState().snapshot() if image is None else image
    path.write_bytes(_sealed(header_line(_header(image, **changes)), image))
    return path


# --------------------------------------------------------------------------- the file


def test_a_whole_backup_reads_back_with_its_header(tmp_path: Path) -> None:
    header, offset = read_backup(write_backup(tmp_path / "b.szb"))
    assert (header.index, header.term, header.voters) == (42, 7, ("n1", "n2", "n3"))
    assert offset == len(header_line(header))


@pytest.mark.parametrize("where", ["image", "header"])
def test_a_changed_byte_is_a_checksum_mismatch(tmp_path: Path, where: str) -> None:
    path = write_backup(tmp_path / "b.szb")
    data = path.read_bytes()
    # Same length either way: only the checksum can tell.
    changed = data.replace(b'"index":42', b'"index":43') if where == "header" else data
    if where == "image":
        at = data.index(b"\n") + 3
        changed = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
    assert changed != data
    path.write_bytes(changed)
    with pytest.raises(BackupError, match="checksum mismatch"):
        read_backup(path)


def test_a_truncated_backup_is_refused(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.szb")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BackupError, match="truncated"):
        read_backup(path)


def test_a_backup_with_bytes_appended_is_refused(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.szb")
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(BackupError, match="longer than its header says"):
        read_backup(path)


def test_another_format_version_is_refused_with_the_version_read(tmp_path: Path) -> None:
    image = SchedulerState().snapshot()
    d = json.loads(header_line(_header(image)))
    d["format_version"] = FORMAT_VERSION + 1
    head = json.dumps(d).encode() + b"\n"
    path = tmp_path / "b.szb"
    path.write_bytes(_sealed(head, image))
    with pytest.raises(BackupError, match=f"version {FORMAT_VERSION + 1}.*version 1 only"):
        read_backup(path)


@pytest.mark.parametrize("content", [b"", b"hello\n", b"\x00" * 100_000, b'{"format":"x"}\n'])
def test_a_file_that_is_no_backup_says_so(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "b.szb"
    path.write_bytes(content)
    with pytest.raises(BackupError, match="not a ScheduleZero backup"):
        read_backup(path)


def test_a_header_with_bad_voters_is_refused(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.szb", voters=("n1", "../etc"))
    with pytest.raises(BackupError, match="voters"):
        read_backup(path)


# --------------------------------------------------------------------------- restore


def test_restore_writes_the_image_as_the_stored_snapshot_at_the_backups_index_and_term(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "new"
    done = restore(write_backup(tmp_path / "b.szb"), data_dir, ["m0"])
    assert done["voters"] == ["m0"] and done["index"] == 42
    store = RaftStore(data_dir / "broker_state.db")
    try:
        hard_state, snapshot, entries = store.load()
    finally:
        store.close()
    assert snapshot is not None and (snapshot.index, snapshot.term) == (42, 6)
    assert snapshot.voters == ("m0",) and entries == []
    assert (hard_state.term, hard_state.commit, hard_state.voted_for) == (7, 42, None)
    assert bytes(snapshot.data) == SchedulerState().snapshot()
    assert stat_mode(data_dir) == 0o700


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_restore_defaults_to_the_backups_voters(tmp_path: Path) -> None:
    done = restore(write_backup(tmp_path / "b.szb"), tmp_path / "new")
    assert done["voters"] == ["n1", "n2", "n3"]


def test_restore_refuses_a_data_dir_that_is_not_empty_and_leaves_it_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    (data_dir / "broker_state.db").write_bytes(b"a running node's")
    with pytest.raises(RestoreError, match="not empty"):
        restore(write_backup(tmp_path / "b.szb"), data_dir)
    assert [p.name for p in data_dir.iterdir()] == ["broker_state.db"]
    assert (data_dir / "broker_state.db").read_bytes() == b"a running node's"


def test_restore_of_a_corrupt_backup_writes_nothing(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "b.szb")
    path.write_bytes(path.read_bytes()[:-1] + b"0")
    with pytest.raises(RestoreError, match="checksum"):
        restore(path, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_restore_refuses_a_well_sealed_image_that_is_not_a_scheduler_state(
    tmp_path: Path,
) -> None:
    path = write_backup(tmp_path / "b.szb", image=b'{"not": "a state"}')
    with pytest.raises(RestoreError, match="not a scheduler state"):
        restore(path, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_restore_refuses_a_bad_node_id(tmp_path: Path) -> None:
    with pytest.raises(RestoreError, match="not a node id"):
        restore(write_backup(tmp_path / "b.szb"), tmp_path / "new", ["a b"])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage", ["truncate", "tamper", "version"])
def test_the_restore_command_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    path = write_backup(tmp_path / "b.szb")
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "tamper":
        data = data.replace(b'"term":7', b'"term":9')
    else:
        data = data.replace(b'"format_version":1', b'"format_version":2')
    path.write_bytes(data)
    assert main(["restore", str(path), "--data-dir", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("schedulezero: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- GET /api/backup


class FileImages:
    """An ``ImageSource`` over a FakeReplica's state machine, counting its calls."""

    def __init__(self, replica: FakeReplica) -> None:
        self.replica = replica
        self.calls = 0

    async def state_image(self) -> StateImage:
        self.calls += 1
        fd, path = tempfile.mkstemp()
        os.write(fd, self.replica.state_machine.snapshot())
        os.unlink(path)
        r = self.replica
        return StateImage(
            fd=fd,
            size=os.fstat(fd).st_size,
            index=r.commit_index,
            term=r.term,
            snapshot_term=r.term,
            voters=(r.node_id,),
        )


@pytest.fixture
def tasks() -> Iterator[None]:
    with embedded_tasks(TASK, "unit_backup_blocking"):
        yield


@pytest.fixture
async def api(tasks: None, tmp_path: Path) -> AsyncIterator[Any]:
    """``(client, replica, images, audit, {role: token})`` of one node serving the API."""
    tokens_path = tmp_path / "tokens.json"
    tokens = {role: create_token(tokens_path, f"{role}-user", role) for role in ROLES}
    replica = FakeReplica("n1")
    state = replica.state_machine
    dispatcher = HandlerDispatcher(replica, FakeBus(), replica, state)
    service = SchedulingService(replica, state, dispatcher=dispatcher)
    audit = AuditLog(tmp_path / "n1.db")
    images = FileImages(replica)
    app = create_app(
        replica, replica, service, tokens=ApiTokens(tokens_path), audit=audit, images=images
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, replica, service, images, audit, tokens
    finally:
        async with asyncio.timeout(WAIT):
            await service.close()
        await client.close()
        audit.close()


ROLES = ("read", "operate", "admin")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_an_admin_gets_a_backup_that_restores_the_schedules_and_the_download_is_audited(
    api: Any, tmp_path: Path
) -> None:
    client, replica, service, _images, audit, tokens = api
    replica.become_leader(1)
    await service.wait_ready(WAIT)
    body = {"id": "s1", "task": TASK, "trigger": {"type": "interval", "hours": 1}, "paused": True}
    body["kwargs"] = {"password": "hunter2"}
    resp = await client.post("/api/schedules", json=body, headers=bearer(tokens["operate"]))
    assert resp.status == 201
    resp = await client.get("/api/backup", headers=bearer(tokens["admin"]))
    assert resp.status == 200 and resp.content_type == "application/octet-stream"
    path = tmp_path / "b.szb"
    path.write_bytes(await resp.read())
    header, _ = read_backup(path)
    assert header.voters == ("n1",) and header.created_by["node_id"] == "n1"
    restore(path, tmp_path / "new", ["m0"])
    store = RaftStore(tmp_path / "new" / "broker_state.db")
    try:
        _, snapshot, _ = store.load()
    finally:
        store.close()
    assert snapshot is not None
    restored = SchedulerState()
    restored.restore(snapshot.data)
    assert restored.schedules["s1"].kwargs == {"password": "hunter2"}  # an admin's: unmasked
    [entry] = [e for e in audit.page(after=0, limit=100) if e["path"] == "/api/backup"]
    assert (entry["method"], entry["token"], entry["status"]) == ("GET", "admin-user", 200)


@pytest.mark.parametrize("role", ["read", "operate"])
async def test_a_backup_needs_an_admin_token_and_a_refusal_is_audited(api: Any, role: str) -> None:
    client, replica, _service, images, audit, tokens = api
    replica.become_leader(1)
    assert (await client.get("/api/backup")).status == 401
    resp = await client.get("/api/backup", headers=bearer(tokens[role]))
    assert resp.status == 403 and images.calls == 0
    statuses = [(e["token"], e["status"]) for e in audit.page(after=0, limit=100)]
    assert (f"{role}-user", 403) in statuses and (None, 401) in statuses


async def test_a_follower_names_the_leader_instead_of_serving_a_backup(api: Any) -> None:
    client, replica, _service, images, _audit, tokens = api
    replica.add_peer("n2", "tcp://127.0.0.1:7200", "127.0.0.1:8200")
    replica.step_down("n2", term=3)
    resp = await client.get("/api/backup", headers=bearer(tokens["admin"]))
    assert resp.status == 421 and images.calls == 0
    answer = await resp.json()
    assert answer["leader_http"] == "127.0.0.1:8200" and "not the leader" in answer["error"]


async def test_a_backup_with_query_parameters_is_a_400(api: Any) -> None:
    client, replica, _service, images, _audit, tokens = api
    replica.become_leader(1)
    resp = await client.get("/api/backup?x=1", headers=bearer(tokens["admin"]))
    assert resp.status == 400 and images.calls == 0


# --------------------------------------------------------------------------- the backup command


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the server's ``answer``: (status, content type, body)."""

    def do_GET(self) -> None:
        status, ctype, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def fake_node() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _url(server: http.server.HTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_a_backup_the_node_sent_broken_is_exit_1_and_leaves_no_file(
    fake_node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_backup(tmp_path / "good.szb").read_bytes()
    fake_node.answer = (200, "application/octet-stream", good[:-3] + b"00\n")
    out = tmp_path / "out" / "b.szb"
    out.parent.mkdir()
    assert main(["backup", "-o", str(out), "--url", _url(fake_node)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []  # neither the file nor its temporary


def test_a_backup_is_saved_mode_0600_over_an_older_one(fake_node: Any, tmp_path: Path) -> None:
    good = write_backup(tmp_path / "good.szb").read_bytes()
    fake_node.answer = (200, "application/octet-stream", good)
    out = tmp_path / "b.szb"
    out.write_bytes(b"yesterday's")
    assert main(["backup", "-o", str(out), "--url", _url(fake_node)]) == 0
    assert out.read_bytes() == good and stat_mode(out) == 0o600


@pytest.mark.parametrize("leader_http", ["evil/path:80", "", None, 5])
def test_a_421_naming_no_usable_leader_is_exit_1_without_a_second_request(
    fake_node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], leader_http: Any
) -> None:
    body = {"error": "n2 is not the leader", "leader_id": "n1", "leader_http": leader_http}
    fake_node.answer = (421, "application/json", json.dumps(body).encode())
    assert main(["backup", "-o", str(tmp_path / "b.szb"), "--url", _url(fake_node)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("schedulezero: error: 421: n2 is not the leader") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
