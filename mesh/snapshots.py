"""Snapshots that never stop the event loop: written by a forked child, streamed in chunks.

A node compacts its log every ``raft.snapshot_threshold`` applied entries. Serializing 100,000
schedules takes seconds of pure Python, and the leader's event loop must answer heartbeats every
100 ms, so the image is written the way Redis writes an RDB file: ``fork()`` gives a child an
exact copy-on-write image of the state machine at the applied index; the child serializes it,
writes and fsyncs the file, and exits; the parent, which kept serving, records the file and
compacts its log. Without ``fork`` (Windows) the image is serialized in the loop and written by a
thread.

A follower too far behind receives the image as ``snap_chunk`` requests of 1 MiB, each
acknowledged before the next is sent, checked by size and CRC-32, and handed to Raft as one
InstallSnapshot once complete: the message size limit stays 16 MiB however large the state.
A chunk is accepted only from the leader of the receiver's current term, at the next offset of
the transfer, for an image of at most ``MAX_SNAPSHOT_BYTES``: a replayed chunk of an old term, a
chunk from any other node, or an oversized transfer is refused (and counted by the node).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gc
import logging
import os
import signal
import sys
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import attrs
import msgspec

from mesh.consensus.core import RaftCore
from mesh.consensus.messages import MAX_VOTERS, Index, InstallSnapshot, NodeId, Snapshot
from mesh.contracts import EventSink
from mesh.statemachine import StateMachine
from mesh.storage.raft_store import RaftStore, snapshot_file_name, write_snapshot_file

log = logging.getLogger("mesh.snapshots")

CHUNK_BYTES = 1 << 20
# A receiver refuses a transfer announcing more than this: the image is held in memory while it
# arrives, so the bound is what a forged transfer could make a follower allocate.
MAX_SNAPSHOT_BYTES = 1 << 30
CHUNK_TIMEOUT = 5.0  # seconds to wait for one chunk's acknowledgement
# After a snapshot: entries freed per loop iteration, rows deleted per transaction. A bulk entry
# of 1,000 schedules is ~2 MB decoded and ~0.6 MB stored: a few ms each.
RELEASE_BATCH = 4
TRIM_BATCH = 8


class SnapshotFailed(Exception):
    pass


# --------------------------------------------------------------------------- writing


async def compact(
    core: RaftCore,
    sm: StateMachine,
    store: RaftStore,
    index: int,
    *,
    events: EventSink,
    clock: Callable[[], float],
) -> None:
    """Compact the log up to ``index`` (applied now) without blocking the loop: a forked child
    writes the image; then the file is recorded in one transaction and the core drops the
    entries it covers. A failure is logged: the log keeps growing until a snapshot succeeds."""
    started = clock()
    try:
        term, voters, removed = core.snapshot_point(index)
        name = await write_snapshot(sm, store.snapshot_dir, index, term)
        if index <= core.snap_index:
            return  # a leader's snapshot was installed meanwhile; ours is older
        store.record_snapshot(index, term, voters, name, removed)
        # The entries the core drops are freed here, a few per loop iteration, and their rows
        # deleted a few per transaction: at once, 128 MiB of log (~0.5 GB of decoded entries)
        # held the loop for over a second, long enough for the followers to elect a new leader.
        dropped = core.entries_from(core.snap_index + 1, index - core.snap_index)
        core.create_snapshot(index, b"")
        events.emit("snapshot_taken", index=index, term=term, seconds=round(clock() - started, 3))
        while dropped:
            del dropped[-RELEASE_BATCH:]
            await asyncio.sleep(0)
        trimmed = TRIM_BATCH
        while trimmed == TRIM_BATCH:
            trimmed = store.trim(TRIM_BATCH)
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("snapshot at %d failed; the log keeps growing until one succeeds", index)


async def write_snapshot(sm: StateMachine, directory: Path, index: int, term: int) -> str:
    """Write the state machine's image as of now (applied ``index``) to a file in ``directory``
    and return the file's name. The caller's loop keeps running meanwhile."""
    if not hasattr(os, "fork"):
        data = sm.snapshot()
        return await asyncio.to_thread(write_snapshot_file, directory, index, term, data)
    sys.stderr.flush()
    # Everything alive now is long-lived state: keep the collector away from it, in the parent
    # (a full collection would touch, and so copy, every page the child shares) and for good
    # (a 100,000-schedule replica makes each full collection cost ~0.1 s of the event loop).
    gc.freeze()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        _child(sm, directory, index, term)
    loop = asyncio.get_running_loop()
    try:
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SnapshotFailed(f"snapshot writer (pid {pid}) exited with {code}")
    return snapshot_file_name(index, term)


async def write_image(sm: StateMachine, directory: Path, index: int, term: int) -> int:
    """Write the state machine's image as of now (applied ``index``) as ``write_snapshot`` does,
    into ``directory`` (never the snapshot directory: a compaction deletes other files there), and
    return it open for reading and already unlinked: a backup being streamed leaves nothing behind
    (docs/deployment.md). Files left in ``directory`` are the leftovers of a node killed while
    writing one: the caller writes one image at a time, so they are removed first."""
    _empty_dir(directory)
    return _open_unlinked(directory / await write_snapshot(sm, directory, index, term))


def _empty_dir(directory: Path) -> None:
    if directory.is_dir():
        for leftover in directory.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _open_unlinked(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    path.unlink()
    return fd


def _child(sm: StateMachine, directory: Path, index: int, term: int) -> NoReturn:
    code = 1
    try:
        # Signals meant for the node must not be relayed to the parent's loop through the
        # inherited wakeup fd, and a stop of the node must stop the writer.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        # The writer must never take CPU from a node's event loop (heartbeats are due every
        # 100 ms), nor copy shared pages by collecting garbage: it is short-lived.
        gc.disable()
        _lowest_priority()
        write_snapshot_file(directory, index, term, sm.snapshot_chunks())
        code = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            sys.stderr.flush()
    finally:
        os._exit(code)


def _lowest_priority() -> None:
    with contextlib.suppress(Exception):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # Linux: only idle CPU
        return
    with contextlib.suppress(Exception):
        os.nice(19)


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------- sending


class SnapshotSender:
    """Leader side: one chunked transfer per follower, restarted by Raft when it fails."""

    def __init__(
        self,
        *,
        snapshot_file: Callable[[], tuple[int, int, Path] | None],
        request: Callable[[str, dict[str, Any]], Any],
        address_of: Callable[[str], str | None],
        still_leader: Callable[[int], bool],
        on_sent: Callable[[str, int, int], None] = lambda _peer, _index, _size: None,
    ) -> None:
        self._snapshot_file = snapshot_file
        self._request = request
        self._address_of = address_of
        self._still_leader = still_leader
        self._on_sent = on_sent
        self._transfers: dict[str, tuple[int, asyncio.Task[None]]] = {}

    def send(self, m: InstallSnapshot) -> None:
        """Start streaming ``m.snapshot`` to ``m.dst`` unless that very transfer is running."""
        running = self._transfers.get(m.dst)
        if running is not None and not running[1].done():
            if running[0] == m.snapshot.index:
                return  # Raft's resend while the transfer is still going
            running[1].cancel()
        task = asyncio.get_running_loop().create_task(
            self._transfer(m), name=f"snapshot-to-{m.dst}"
        )
        self._transfers[m.dst] = (m.snapshot.index, task)

    def active(self) -> int:
        return sum(1 for _, t in self._transfers.values() if not t.done())

    async def close(self) -> None:
        tasks = [t for _, t in self._transfers.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _transfer(self, m: InstallSnapshot) -> None:
        snap = m.snapshot
        found = self._snapshot_file()
        if found is None or found[:2] != (snap.index, snap.term):
            return  # replaced meanwhile: Raft asks again with the current one
        try:
            # The open file survives its replacement by a newer snapshot (unlink keeps the inode).
            fd = await asyncio.to_thread(os.open, found[2], os.O_RDONLY)
            try:
                await self._stream(m, fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.warning("snapshot %d to %s: a chunk was not acknowledged", snap.index, m.dst)
        except Exception:
            log.exception("snapshot %d to %s failed", snap.index, m.dst)

    async def _stream(self, m: InstallSnapshot, fd: int, size: int) -> None:
        snap = m.snapshot
        offset, crc = 0, 0
        while True:
            if not self._still_leader(m.term):
                return
            address = self._address_of(m.dst)
            if address is None:
                return
            chunk = await asyncio.to_thread(os.pread, fd, CHUNK_BYTES, offset)
            if not chunk and offset < size:
                raise SnapshotFailed(f"snapshot file ended at {offset} of {size} bytes")
            crc = zlib.crc32(chunk, crc)
            done = offset + len(chunk) >= size
            payload: dict[str, Any] = {
                "src": m.src,
                "term": m.term,
                "index": snap.index,
                "snap_term": snap.term,
                "voters": list(snap.voters),
                "removed": list(snap.removed),
                "offset": offset,
                "size": size,
                "data": base64.b64encode(chunk).decode("ascii"),
            }
            if done:
                payload["crc"] = crc
            reply = await self._request(address, payload)
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                error = reply.get("error") if isinstance(reply, dict) else reply
                log.info("snapshot %d to %s refused: %s", snap.index, m.dst, error)
                return
            offset += len(chunk)
            if done:
                self._on_sent(m.dst, snap.index, size)
                return


# --------------------------------------------------------------------------- receiving


@attrs.define
class _Partial:
    key: tuple[str, int, int, int]  # (leader, term, index, snapshot term)
    voters: tuple[str, ...]
    removed: tuple[str, ...]
    size: int
    buf: bytearray = attrs.field(factory=bytearray)
    crc: int = 0


class SnapChunk(msgspec.Struct, frozen=True, kw_only=True):
    """A ``snap_chunk`` request: ``data`` (base64) at ``offset`` of a ``size``-byte image."""

    src: NodeId
    term: Index
    index: Index
    snap_term: Index
    voters: Annotated[tuple[NodeId, ...], msgspec.Meta(max_length=MAX_VOTERS)]
    offset: Index
    size: Index
    data: str  # decoded once the transfer checks pass: "not base64" is its own answer
    crc: Index | None = None  # CRC-32 of the whole image, on the last chunk
    removed: Annotated[tuple[NodeId, ...], msgspec.Meta(max_length=MAX_VOTERS)] = ()


class SnapshotReceiver:
    """Follower side: reassembles one transfer at a time; validates every field of every chunk.

    ``on_chunk`` returns the reply to send and, when the last chunk checked out, the complete
    InstallSnapshot to step into Raft (which applies its own term rules to it). A refused chunk's
    reply has ``ok: false``, an ``error`` and a ``reason`` (the rejection counter's label).
    """

    def __init__(self, node_id: str, *, max_bytes: int = MAX_SNAPSHOT_BYTES) -> None:
        self.node_id = node_id
        self.max_bytes = max_bytes
        self._cur: _Partial | None = None

    @property
    def receiving(self) -> bool:
        return self._cur is not None

    def on_chunk(
        self, p: dict[str, Any], current_term: int, leader_id: str | None
    ) -> tuple[dict[str, Any], InstallSnapshot | None]:
        """One chunk, checked against this node's ``current_term`` and the ``leader_id`` it
        follows in that term, as Raft checks an InstallSnapshot: a stale term is refused; in
        the current term only the leader we follow may send one (none known yet, e.g. just
        after a restart: Raft allows one leader per term, and the sender's key is checked by
        the node); a newer term is accepted like any Raft message of a newer term (the core
        then follows the sender). The sender is an authenticated ``node`` key either way."""
        try:
            c = msgspec.convert(p, SnapChunk)
        except msgspec.ValidationError as e:
            return _refused("malformed", f"malformed snapshot chunk: {e}"), None
        if c.term < current_term:
            error = f"stale term {c.term}: this node is at term {current_term}"
            return _refused("snapshot_term", error), None
        if c.term == current_term and leader_id is not None and c.src != leader_id:
            error = f"{c.src} is not the leader of term {c.term} (leader: {leader_id})"
            return _refused("snapshot_not_leader", error), None
        if c.size > self.max_bytes:
            error = f"snapshot of {c.size} bytes exceeds {self.max_bytes}"
            return _refused("snapshot_too_large", error), None
        key = (c.src, c.term, c.index, c.snap_term)
        cur = self._cur
        if c.offset == 0 and (cur is None or cur.key != key or cur.size != c.size):
            cur = self._cur = _Partial(key, c.voters, c.removed, c.size)
        if cur is None or cur.key != key:
            return _refused("snapshot_offset", "no transfer in progress at this offset"), None
        if c.offset < len(cur.buf):
            return {"ok": True, "next": len(cur.buf)}, None  # a duplicate of an acknowledged chunk
        if c.offset > len(cur.buf):
            return _refused("snapshot_offset", f"gap: expected offset {len(cur.buf)}"), None
        try:
            chunk = base64.b64decode(c.data, validate=True)
        except (binascii.Error, ValueError):
            return _refused("malformed", "chunk data is not base64"), None
        if len(cur.buf) + len(chunk) > cur.size:
            self._cur = None
            return _refused("snapshot_too_large", "chunk runs past the announced size"), None
        cur.buf += chunk
        cur.crc = zlib.crc32(chunk, cur.crc)
        if len(cur.buf) < cur.size:
            return {"ok": True, "next": len(cur.buf)}, None
        self._cur = None
        if c.crc != cur.crc:
            return _refused("snapshot_checksum", "checksum mismatch"), None
        # The buffer itself, not a copy: an image can be tens of megabytes, and the store, the
        # state machine (json.loads) and the core all accept a bytearray.
        snapshot = Snapshot(
            index=c.index, term=c.snap_term, voters=cur.voters, data=cur.buf, removed=cur.removed
        )
        msg = InstallSnapshot(src=c.src, dst=self.node_id, term=c.term, snapshot=snapshot)
        return {"ok": True, "next": cur.size, "complete": True}, msg


def _refused(reason: str, error: str) -> dict[str, Any]:
    return {"ok": False, "error": error, "reason": reason}
