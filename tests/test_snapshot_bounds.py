"""Snapshot chunks are accepted only from the leader of the current term, within a size bound."""

from __future__ import annotations

import base64
import zlib
from typing import Any

from mesh.snapshots import MAX_SNAPSHOT_BYTES, SnapshotReceiver


def chunk(data: bytes, **change: Any) -> dict[str, Any]:
    p = {
        "src": "n1",
        "term": 5,
        "index": 40,
        "snap_term": 4,
        "voters": ["n1", "n2"],
        "offset": 0,
        "size": len(data),
        "data": base64.b64encode(data).decode(),
        "crc": zlib.crc32(data),
    }
    return {**p, **change}


def test_a_chunk_from_a_node_that_is_not_the_leader_is_refused() -> None:
    reply, msg = SnapshotReceiver("n2").on_chunk(chunk(b"{}", src="n3"), 5, "n1")
    assert reply["ok"] is False and reply["reason"] == "snapshot_not_leader" and msg is None


def test_a_chunk_while_no_leader_is_known_yet_is_accepted() -> None:
    # A follower just restarted at term 5 learns its leader from the snapshot itself.
    reply, msg = SnapshotReceiver("n2").on_chunk(chunk(b"{}"), 5, None)
    assert reply["ok"] is True and msg is not None and msg.src == "n1"


def test_a_replayed_chunk_of_an_old_term_is_refused() -> None:
    reply, msg = SnapshotReceiver("n2").on_chunk(chunk(b"{}", term=4), 5, "n1")
    assert reply["reason"] == "snapshot_term" and "stale" in reply["error"] and msg is None


def test_a_chunk_of_a_newer_term_installs_as_raft_would() -> None:
    reply, msg = SnapshotReceiver("n2").on_chunk(chunk(b"{}", term=6, src="n3"), 5, "n1")
    assert reply["ok"] is True and msg is not None and msg.term == 6


def test_huge_terms_and_indexes_are_malformed() -> None:
    rx = SnapshotReceiver("n2")
    for field in ("term", "index", "snap_term", "offset", "size"):
        reply, msg = rx.on_chunk(chunk(b"{}", **{field: 1 << 63}), 5, "n1")
        assert reply["reason"] == "malformed" and msg is None, field


def test_the_default_bound_is_one_gibibyte() -> None:
    assert MAX_SNAPSHOT_BYTES == 1 << 30
    reply, _ = SnapshotReceiver("n2").on_chunk(chunk(b"{}", size=(1 << 30) + 1), 5, "n1")
    assert reply["reason"] == "snapshot_too_large"


def test_the_receive_buffer_never_grows_past_the_bound() -> None:
    rx = SnapshotReceiver("n2", max_bytes=8)
    first = chunk(b"abcd", size=8)
    del first["crc"]
    assert rx.on_chunk(first, 5, "n1")[0]["ok"] is True
    more = chunk(b"efghij", size=8, offset=4)
    reply, msg = rx.on_chunk(more, 5, "n1")
    assert reply["reason"] == "snapshot_too_large" and msg is None and not rx.receiving


def test_the_leaders_chunk_installs_with_the_removed_set() -> None:
    reply, msg = SnapshotReceiver("n2").on_chunk(chunk(b"{}", removed=["n9"]), 5, "n1")
    assert reply["ok"] is True and msg is not None
    assert msg.snapshot.removed == ("n9",) and msg.snapshot.voters == ("n1", "n2")
