"""mesh/snapshots.py: the forked snapshot writer and the chunked snapshot transfer."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

from mesh.app import build_node
from mesh.config import Config
from mesh.consensus.messages import HardState, InstallSnapshot, Snapshot
from mesh.snapshots import CHUNK_BYTES, SnapshotReceiver, SnapshotSender, write_snapshot
from mesh.statemachine import KVStateMachine
from mesh.storage.raft_store import RaftStore, snapshot_file_name, write_snapshot_file
from tests.netutil import free_mesh_address


def chunks(data: bytes, *, term: int = 3, index: int = 40, snap_term: int = 2, size=None):
    size = len(data) if size is None else size
    out, crc = [], 0
    for offset in range(0, max(len(data), 1), CHUNK_BYTES):
        piece = data[offset : offset + CHUNK_BYTES]
        crc = zlib.crc32(piece, crc)
        p: dict[str, Any] = {
            "src": "n1",
            "term": term,
            "index": index,
            "snap_term": snap_term,
            "voters": ["n1", "n2", "n3"],
            "offset": offset,
            "size": size,
            "data": base64.b64encode(piece).decode(),
        }
        if offset + len(piece) >= size:
            p["crc"] = crc
        out.append(p)
    return out


def test_receiver_reassembles_a_multi_chunk_snapshot_into_one_install() -> None:
    data = os.urandom(CHUNK_BYTES * 2 + 123)
    rx = SnapshotReceiver("n2")
    parts = chunks(data)
    assert len(parts) == 3
    for p in parts[:-1]:
        reply, msg = rx.on_chunk(p, current_term=3, leader_id="n1")
        assert reply["ok"] is True and msg is None
    reply, msg = rx.on_chunk(parts[-1], current_term=3, leader_id="n1")
    assert reply == {"ok": True, "next": len(data), "complete": True}
    assert msg == InstallSnapshot(
        src="n1",
        dst="n2",
        term=3,
        snapshot=Snapshot(index=40, term=2, voters=("n1", "n2", "n3"), data=data),
    )
    assert not rx.receiving


def test_a_repeated_chunk_is_acknowledged_and_not_appended_twice() -> None:
    data = os.urandom(CHUNK_BYTES + 10)
    rx = SnapshotReceiver("n2")
    first, last = chunks(data)
    rx.on_chunk(first, current_term=3, leader_id="n1")
    reply, msg = rx.on_chunk(first, current_term=3, leader_id="n1")
    assert reply == {"ok": True, "next": CHUNK_BYTES} and msg is None
    reply, msg = rx.on_chunk(last, current_term=3, leader_id="n1")
    assert msg is not None and msg.snapshot.data == data


def test_an_empty_snapshot_is_one_chunk() -> None:
    rx = SnapshotReceiver("n2")
    (only,) = chunks(b"")
    reply, msg = rx.on_chunk(only, current_term=3, leader_id="n1")
    assert reply["ok"] is True and msg is not None and msg.snapshot.data == b""


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"term": "3"}, "malformed"),
        ({"offset": -1}, "malformed"),
        ({"voters": "n1"}, "malformed"),
        ({"data": 5}, "malformed"),
        ({"src": None}, "malformed"),
        ({"data": "!!not base64!!"}, "not base64"),
        ({"term": 2}, "stale term"),
        ({"size": 1 << 40}, "exceeds"),
    ],
)
def test_bad_chunks_are_refused_with_a_reason(change: dict[str, Any], error: str) -> None:
    rx = SnapshotReceiver("n2")
    (p,) = chunks(b"abc")
    reply, msg = rx.on_chunk({**p, **change}, current_term=3, leader_id="n1")
    assert reply["ok"] is False and error in reply["error"] and msg is None


def test_a_gap_a_wrong_checksum_and_an_overrun_are_refused() -> None:
    data = os.urandom(CHUNK_BYTES * 2)
    first, second = chunks(data)
    rx = SnapshotReceiver("n2")
    # Nothing is in progress at that offset.
    reply, _ = rx.on_chunk(second, current_term=3, leader_id="n1")
    assert reply["ok"] is False
    rx.on_chunk(first, current_term=3, leader_id="n1")
    reply, msg = rx.on_chunk({**second, "crc": second["crc"] ^ 1}, current_term=3, leader_id="n1")
    assert reply["ok"] is False and reply["error"] == "checksum mismatch" and msg is None
    rx.on_chunk(first, current_term=3, leader_id="n1")
    too_long = base64.b64encode(data[CHUNK_BYTES:] + b"x").decode()
    reply, msg = rx.on_chunk({**second, "data": too_long}, current_term=3, leader_id="n1")
    assert reply["ok"] is False and "past the announced size" in reply["error"] and msg is None


def test_chunks_of_another_transfer_do_not_mix() -> None:
    rx = SnapshotReceiver("n2")
    a_first, _ = chunks(os.urandom(CHUNK_BYTES + 1), index=40)
    _, b_second = chunks(os.urandom(CHUNK_BYTES + 1), index=41)
    rx.on_chunk(a_first, current_term=3, leader_id="n1")
    reply, msg = rx.on_chunk(b_second, current_term=3, leader_id="n1")
    assert reply["ok"] is False and msg is None


def test_sender_streams_the_file_to_the_receiver(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_BYTES * 3 + 7)
    name = write_snapshot_file(tmp_path, 40, 2, data)
    rx = SnapshotReceiver("n2")
    installed: list[InstallSnapshot] = []
    sent: list[tuple[str, int, int]] = []

    async def request(address: str, payload: dict[str, Any]) -> dict[str, Any]:
        assert address == "tcp://n2"
        # Through JSON, as on the wire.
        reply, msg = rx.on_chunk(json.loads(json.dumps(payload)), current_term=3, leader_id="n1")
        if msg is not None:
            installed.append(msg)
        return reply

    async def main() -> None:
        tx = SnapshotSender(
            snapshot_file=lambda: (40, 2, tmp_path / name),
            request=request,
            address_of=lambda node_id: f"tcp://{node_id}",
            still_leader=lambda term: term == 3,
            on_sent=lambda *a: sent.append(a),
        )
        snap = Snapshot(index=40, term=2, voters=("n1", "n2"))
        m = InstallSnapshot(src="n1", dst="n2", term=3, snapshot=snap)
        tx.send(m)
        tx.send(m)  # Raft's resend while it runs: not a second transfer
        assert tx.active() == 1
        await asyncio.wait_for(tx._transfers["n2"][1], 10)
        await tx.close()

    asyncio.run(main())
    assert [m.snapshot.data for m in installed] == [data]
    assert sent == [("n2", 40, len(data))]


def test_sender_stops_when_it_is_no_longer_leader(tmp_path: Path) -> None:
    name = write_snapshot_file(tmp_path, 40, 2, os.urandom(CHUNK_BYTES * 3))
    calls: list[int] = []
    leader = [True]

    async def request(_address: str, payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload["offset"])
        leader[0] = False  # deposed after the first chunk
        return {"ok": True}

    async def main() -> None:
        tx = SnapshotSender(
            snapshot_file=lambda: (40, 2, tmp_path / name),
            request=request,
            address_of=lambda node_id: node_id,
            still_leader=lambda _term: leader[0],
        )
        tx.send(InstallSnapshot(src="n1", dst="n2", term=3, snapshot=Snapshot(40, 2, ("n1",))))
        await asyncio.wait_for(tx._transfers["n2"][1], 10)

    asyncio.run(main())
    assert calls == [0]


def test_forked_writer_writes_the_state_as_of_the_fork(tmp_path: Path) -> None:
    sm = KVStateMachine()
    sm.data.update({f"k{i}": i for i in range(1000)})
    expected = sm.snapshot()

    async def main() -> str:
        task = asyncio.ensure_future(write_snapshot(sm, tmp_path, 1000, 4))
        await asyncio.sleep(0)
        sm.data["changed-after-the-fork"] = True  # the parent goes on; the image does not
        return await task

    name = asyncio.run(main())
    assert name == snapshot_file_name(1000, 4)
    assert (tmp_path / name).read_bytes() == expected
    assert list(tmp_path.iterdir()) == [tmp_path / name]


async def test_a_node_restarted_with_a_snapshot_on_disk_restores_it(tmp_path: Path) -> None:
    config = Config(node_id="n1", data_dir=tmp_path / "n1", mesh=free_mesh_address())
    config.data_dir.mkdir(parents=True)
    image = json.dumps({"k": "v"}).encode()
    store = RaftStore(config.state_db_path)
    store.save(
        snapshot=Snapshot(index=3, term=1, voters=("n1",), data=image),
        hard_state=HardState(1, "n1", 3),
    )
    store.close()
    sm = KVStateMachine()
    node = build_node(config, state_machine=sm)
    await node.start()
    try:
        assert sm.data == {"k": "v"}
        assert (node.core.snap.index, node.core.snap.data) == (3, b"")  # the file keeps the image
    finally:
        await node.stop(transfer=False)
