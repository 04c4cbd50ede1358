"""The replica's side of the change feed: follow one voter, keep a durable local copy.

A replica (``schedulezero replica``) never votes or leads. It dials a voter's mesh ROUTER with
its ``replica`` key and asks for its zone's feed (docs/zones.md, "The feed protocol"):

* ``feed_subscribe`` {replica_id, zone, after} → {ok, zone, mode, seq, leader_id, term}: the
  voter either resumes after ``after`` (the last seq this replica applied) or sends a snapshot;
* then, pushed by the voter: ``feed_snapshot`` parts (base64, ≤ 1 MiB each, crc32 of the whole
  on the last), ``feed_change`` {seq, command} for every applied entry after it (seq = the Raft
  index, contiguous; ``command`` null when there is nothing to apply), ``feed_heartbeat`` every
  0.5 s;
* and from the replica, ``feed_ack`` {seq} every 0.5 s.

:class:`FeedFollower` applies all of it to a local :class:`~mesh.scheduling.state.SchedulerState`
(already filtered by the voter: nothing it holds was ever more than the zone may see). A gap in
the seqs or a bad snapshot makes it subscribe again with ``after`` = what it applied; an upstream
silent for ``HEARTBEAT_TIMEOUT`` makes it move to the next ``--upstream``. :class:`ReplicaStore`
keeps the last applied state and its seq in ``DATA_DIR/replica.db``, written every
``SAVE_INTERVAL`` (longer for a large state: ``SAVE_BUDGET``) and on stop, so a restarted replica
serves its copy at once and resumes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from mesh.consensus.messages import COMMAND, Entry
from mesh.contracts import Incoming
from mesh.scheduling.state import SchedulerState

__all__ = [
    "FEED_ACK",
    "FEED_CHANGE",
    "FEED_HEARTBEAT",
    "FEED_SNAPSHOT",
    "FEED_SUBSCRIBE",
    "FeedFollower",
    "FeedTransport",
    "ReplicaStore",
]

log = logging.getLogger("mesh.zones.replica")

FEED_SUBSCRIBE = "feed_subscribe"
FEED_SNAPSHOT = "feed_snapshot"
FEED_CHANGE = "feed_change"
FEED_HEARTBEAT = "feed_heartbeat"
FEED_ACK = "feed_ack"
_PUSHED = frozenset({FEED_SNAPSHOT, FEED_CHANGE, FEED_HEARTBEAT})

HEARTBEAT_TIMEOUT = 2.0  # an upstream silent this long is left for the next one
ACK_INTERVAL = 0.5
SUBSCRIBE_TIMEOUT = 2.0
SAVE_INTERVAL = 2.0  # the durable copy is at most this old (plus one write) after a crash
# Serialising the copy runs on the event loop (the state must not change under it) and pauses
# reads and the feed for its duration: the interval grows so it takes at most 1/SAVE_BUDGET of
# the loop's time (tens of ms at 2,000 schedules, every 2 s; ~0.5 s at 10,000, every ~25 s).
SAVE_BUDGET = 50
RESUBSCRIBE_PAUSE = 0.1  # between two subscriptions to one upstream (a storm of gaps)
ROUND_PAUSE = 0.5  # after every upstream failed once, before trying the first again
MAX_SNAPSHOT_BYTES = 2 * 1024**3
MAX_BUFFERED_CHANGES = 100_000  # changes that arrive while a snapshot is still coming
MAX_HEARTBEATS = 10_000  # heartbeats remembered for the lag (0.5 s each: over an hour)


class FeedTransport(Protocol):
    """What the follower needs of the process's ``MeshTransport`` (a client-only DEALER side)."""

    def connect(self, address: str) -> None: ...

    def disconnect(self, address: str) -> None: ...

    def send(self, address: str, kind: str, payload: dict[str, Any]) -> bool: ...

    async def request(
        self, address: str, kind: str, payload: dict[str, Any], timeout: float
    ) -> dict[str, Any]: ...

    def name_at(self, address: str) -> str | None: ...


# --------------------------------------------------------------------------- the durable copy


class ReplicaStore:
    """``replica.db``: one row, the last applied (filtered) state and its seq, for one zone.

    The pair is always written together, so a restart resumes exactly after what it holds. A
    copy made for another zone (the replica was re-keyed) is not used: its filter was another.
    The file is private (0600 in a 0700 directory), as the node's own data directory is.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS copy (id INTEGER PRIMARY KEY CHECK (id = 1), "
            "zone TEXT NOT NULL, seq INTEGER NOT NULL, snapshot BLOB NOT NULL, "
            "saved_at REAL NOT NULL)"
        )

    def load(self, zone: str) -> tuple[int, bytes] | None:
        """``(seq, snapshot)`` last saved for ``zone``, or None."""
        row = self._db.execute("SELECT zone, seq, snapshot FROM copy WHERE id = 1").fetchone()
        if row is None:
            return None
        if row[0] != zone:
            log.warning(
                "%s holds a copy for zone %r, not %r: starting from a fresh snapshot",
                self.path,
                row[0],
                zone,
            )
            return None
        return int(row[1]), bytes(row[2])

    def save(self, zone: str, seq: int, snapshot: bytes) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO copy (id, zone, seq, snapshot, saved_at) "
            "VALUES (1, ?, ?, ?, ?)",
            (zone, seq, snapshot, time.time()),
        )

    def close(self) -> None:
        self._db.close()


# --------------------------------------------------------------------------- the follower


@attrs.define
class _SnapshotParts:
    seq: int
    size: int
    data: bytearray = attrs.field(factory=bytearray)


def _count(value: Any) -> int | None:
    """A non-negative integer from a feed message, or None (bool is not a number here)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


class FeedFollower:
    """Follows the zone's feed from one of ``upstreams`` into ``state`` (see the module doc).

    Read by the API: ``applied`` (the seq of the state as it is now), ``upstream`` (the
    address followed, None while looking for one), ``upstream_name`` (its certificate name),
    ``leader_id``/``term``/``commit`` (from its heartbeats), :meth:`lag_seconds` and
    ``counters``. ``on_message`` must receive every message the transport gets.
    """

    def __init__(
        self,
        replica_id: str,
        zone: str,
        upstreams: Sequence[str],
        state: SchedulerState,
        transport: FeedTransport,
        store: ReplicaStore | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        ack_interval: float = ACK_INTERVAL,
        subscribe_timeout: float = SUBSCRIBE_TIMEOUT,
        save_interval: float = SAVE_INTERVAL,
    ) -> None:
        if not upstreams:
            raise ValueError("a replica needs at least one upstream")
        self.replica_id = replica_id
        self.zone = zone
        self.upstreams = tuple(dict.fromkeys(upstreams))
        self.state = state
        self.transport = transport
        self.store = store
        self.clock = clock
        self.heartbeat_timeout = heartbeat_timeout
        self.ack_interval = ack_interval
        self.subscribe_timeout = subscribe_timeout
        self.save_interval = save_interval

        self.applied = 0
        self.snapshot_seq = 0  # seq of the last snapshot installed (or loaded)
        self.upstream: str | None = None
        self.leader_id: str | None = None
        self.term = 0
        self.commit = 0
        self.counters: collections.Counter[str] = collections.Counter()
        self._subscribing = False  # a subscribe is in flight: gaps are the old stream's
        self._awaiting_snapshot = False
        self._snapshots_installed = 0
        self._parts: _SnapshotParts | None = None
        self._buffered: list[tuple[int, Any]] = []
        self._last_contact = 0.0
        self._beats: collections.deque[tuple[int, float]] = collections.deque(maxlen=MAX_HEARTBEATS)
        self._resubscribe = asyncio.Event()
        self._saved_seq = -1
        self.last_save_seconds = 0.0  # how long the last copy took to serialise (loop time)
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> bool:
        """Restore the durable copy, if there is one for this zone; True when restored."""
        if self.store is None:
            return False
        try:
            saved = self.store.load(self.zone)
        except sqlite3.Error:
            log.exception("cannot read the replica's copy %s; starting empty", self.store.path)
            return False
        if saved is None:
            return False
        seq, snapshot = saved
        try:
            self.state.restore(snapshot)
        except Exception:
            log.exception(
                "the replica's copy in %s cannot be read; starting empty", self.store.path
            )
            self.state.restore(b"")
            return False
        self.applied = self.snapshot_seq = self._saved_seq = seq
        log.info("replica %s: local copy restored at seq %d", self.replica_id, seq)
        return True

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow_loop(), name="replica-follow"),
            loop.create_task(self._ack_loop(), name="replica-ack"),
            loop.create_task(self._save_loop(), name="replica-save"),
        ]

    async def stop(self) -> None:
        """Stop following and write the copy one last time."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.save()
        if self.upstream is not None:
            self.transport.disconnect(self.upstream)
            self.upstream = None

    async def save(self) -> None:
        """Write the state as applied now to the durable copy (if it changed)."""
        if self.store is None or self.applied == self._saved_seq:
            return
        started = self.clock()
        seq, snapshot = self.applied, self.state.snapshot()  # one consistent pair
        self.last_save_seconds = self.clock() - started
        try:
            await asyncio.to_thread(self.store.save, self.zone, seq, snapshot)
        except sqlite3.Error:
            # The replica keeps serving from memory; after a restart it resumes from an older copy.
            self.counters["save_failed"] += 1
            log.exception("cannot write the replica's copy %s", self.store.path)
            return
        self._saved_seq = seq

    # ------------------------------------------------------------------ what the API reads

    @property
    def following(self) -> bool:
        """An upstream answered the subscription and is not silent."""
        return (
            self.upstream is not None
            and not self._subscribing
            and self.clock() - self._last_contact <= self.heartbeat_timeout
        )

    @property
    def upstream_name(self) -> str | None:
        return self.transport.name_at(self.upstream) if self.upstream is not None else None

    def lag_seconds(self) -> float | None:
        """How far behind the mesh the local copy may be: now minus the arrival of the last
        heartbeat whose seq was applied; 0 when every heartbeat's seq is applied and the
        upstream is not silent; None before the first heartbeat.

        Arrival on our clock rather than the voter's ``time``: two hosts' wall clocks differ,
        and the heartbeat's travel is part of the staleness anyway.
        """
        if not self._beats:
            return None
        now = self.clock()
        latest_seq, _ = self._beats[-1]
        if self.applied >= latest_seq and now - self._last_contact <= self.heartbeat_timeout:
            return 0.0
        since = self._beats[0][1]  # older than everything remembered: at least this much
        for seq, at in reversed(self._beats):
            if seq <= self.applied:
                since = at
                break
        return max(0.0, now - since)

    # ------------------------------------------------------------------ following

    async def _follow_loop(self) -> None:
        i = 0
        failed_in_a_row = 0
        while True:
            address = self.upstreams[i % len(self.upstreams)]
            followed = await self._follow(address)
            failed_in_a_row = 0 if followed else failed_in_a_row + 1
            if failed_in_a_row and failed_in_a_row % len(self.upstreams) == 0:
                await asyncio.sleep(ROUND_PAUSE)
            i += 1
            if len(self.upstreams) > 1:
                self.counters["failovers"] += 1

    async def _follow(self, address: str) -> bool:
        """Subscribe to ``address`` and follow it until it is silent or refuses; True when it
        was followed for a while (so the next upstream is tried at once)."""
        self._switch_to(address)
        followed = False
        while True:
            reply = await self._subscribe(address)
            if reply is None:
                return followed
            followed = True
            while True:
                silent_at = self._last_contact + self.heartbeat_timeout
                remaining = silent_at - self.clock()
                if remaining <= 0:
                    log.warning(
                        "replica %s: upstream %s silent for %.1fs; trying the next one",
                        self.replica_id,
                        address,
                        self.heartbeat_timeout,
                    )
                    return True
                try:
                    async with asyncio.timeout(remaining):
                        await self._resubscribe.wait()
                except TimeoutError:
                    continue
                break  # a gap or a bad snapshot: subscribe again, after what was applied
            await asyncio.sleep(RESUBSCRIBE_PAUSE)

    def _switch_to(self, address: str) -> None:
        old = self.upstream
        if old is not None and old != address:
            self.transport.disconnect(old)
        self.upstream = address
        self._parts = None
        self._awaiting_snapshot = False
        self._buffered.clear()
        self.transport.connect(address)

    async def _subscribe(self, address: str) -> dict[str, Any] | None:
        self._resubscribe.clear()
        self._subscribing = True
        installed_before = self._snapshots_installed
        after = self.applied
        self.counters["subscribes"] += 1
        try:
            reply = await self.transport.request(
                address,
                FEED_SUBSCRIBE,
                {"replica_id": self.replica_id, "zone": self.zone, "after": after},
                timeout=self.subscribe_timeout,
            )
        except (TimeoutError, ConnectionError) as e:
            log.warning("replica %s: upstream %s did not answer: %s", self.replica_id, address, e)
            return None
        finally:
            self._subscribing = False
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            why = reply.get("error") if isinstance(reply, dict) else None
            self.counters["refused"] += 1
            log.error(
                "replica %s: upstream %s refused the subscription: %s",
                self.replica_id,
                address,
                why if isinstance(why, str) else repr(reply)[:200],
            )
            return None
        mode, seq = reply.get("mode"), _count(reply.get("seq"))
        if reply.get("zone") != self.zone or mode not in ("snapshot", "resume") or seq is None:
            self.counters["refused"] += 1
            log.error(
                "replica %s: upstream %s answered a subscription for zone %r with %r",
                self.replica_id,
                address,
                self.zone,
                {k: reply.get(k) for k in ("zone", "mode", "seq")},
            )
            return None
        self._learn_leader(reply)
        self._last_contact = self.clock()
        # A snapshot pushed before the answer is already in place.
        if mode == "snapshot" and self._snapshots_installed == installed_before:
            self._awaiting_snapshot = True
        log.info(
            "replica %s: following %s (%s after %d; its seq %d)",
            self.replica_id,
            address,
            mode,
            after,
            seq,
        )
        return reply

    def _learn_leader(self, p: dict[str, Any]) -> None:
        leader, term = p.get("leader_id"), _count(p.get("term"))
        if leader is None or isinstance(leader, str):
            self.leader_id = leader
        if term is not None:
            self.term = term

    def _again(self, why: str) -> None:
        """Subscribe again after what was applied (not while a subscription is in flight: what
        arrives then may still be the previous stream's)."""
        self.counters[why] += 1
        self._parts = None
        if not self._subscribing and not self._resubscribe.is_set():
            log.info(
                "replica %s: %s at seq %d; subscribing again", self.replica_id, why, self.applied
            )
            self._resubscribe.set()

    # ------------------------------------------------------------------ messages

    def on_message(self, msg: Incoming) -> None:
        """Every message the replica's transport receives (its requests' replies excepted)."""
        if msg.kind not in _PUSHED:
            self.counters["unexpected"] += 1
            return
        if msg.address != self.upstream or self.upstream is None:
            self.counters["stale"] += 1  # from an upstream we left
            return
        if msg.sender is not None and msg.sender_role != "node":
            self.counters["not_from_a_voter"] += 1
            return
        self._last_contact = self.clock()
        p = msg.payload
        if msg.kind == FEED_HEARTBEAT:
            self._on_heartbeat(p)
        elif msg.kind == FEED_CHANGE:
            self._on_change(p)
        else:
            self._on_snapshot_part(p)

    def _on_heartbeat(self, p: dict[str, Any]) -> None:
        seq = _count(p.get("seq"))
        if seq is None:
            self.counters["malformed"] += 1
            return
        self._learn_leader(p)
        self.commit = _count(p.get("commit")) or self.commit
        self._beats.append((seq, self.clock()))
        self._forget_beats()

    def _forget_beats(self) -> None:
        # Keep the last heartbeat already applied (the lag counts from it) and every later one.
        beats = self._beats
        while len(beats) > 1 and beats[1][0] <= self.applied:
            beats.popleft()

    def _on_change(self, p: dict[str, Any]) -> None:
        seq, command = _count(p.get("seq")), p.get("command")
        if seq is None or not (command is None or isinstance(command, dict)):
            self._again("malformed")
            return
        if self._awaiting_snapshot:
            if len(self._buffered) >= MAX_BUFFERED_CHANGES:
                self._buffered.clear()
                self._again("snapshot_too_slow")
                return
            self._buffered.append((seq, command))
            return
        self._apply(seq, command)

    def _apply(self, seq: int, command: dict[str, Any] | None) -> None:
        if seq <= self.applied:
            self.counters["duplicates"] += 1
            return
        if seq != self.applied + 1:
            self._again("gaps")
            return
        if command is not None:
            try:
                self.state.apply(Entry(self.term, seq, COMMAND, command))
            except Exception:  # as on a voter: a bad command must not stop the feed
                self.counters["apply_errors"] += 1
                log.exception("replica %s: cannot apply seq %d", self.replica_id, seq)
        self.applied = seq
        self.counters["changes"] += 1

    def _on_snapshot_part(self, p: dict[str, Any]) -> None:
        seq, offset, size = _count(p.get("seq")), _count(p.get("offset")), _count(p.get("size"))
        data = p.get("data")
        if seq is None or offset is None or size is None or not isinstance(data, str):
            self._again("bad_snapshots")
            return
        if offset == 0:
            if size > MAX_SNAPSHOT_BYTES:
                self._again("bad_snapshots")
                return
            self._parts = _SnapshotParts(seq, size)
        parts = self._parts
        if parts is None or (seq, size) != (parts.seq, parts.size) or offset != len(parts.data):
            self._again("bad_snapshots")
            return
        try:
            parts.data += base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._again("bad_snapshots")
            return
        if len(parts.data) > size:
            self._again("bad_snapshots")
        elif len(parts.data) == size:
            self._parts = None
            crc = _count(p.get("crc"))
            if crc is None or zlib.crc32(parts.data) != crc:
                self._again("bad_snapshots")
                return
            self._install(seq, bytes(parts.data))

    def _install(self, seq: int, snapshot: bytes) -> None:
        # Parsed once aside first: a snapshot that does not load must leave the copy as it was.
        try:
            SchedulerState().restore(snapshot)
        except Exception:
            log.exception("replica %s: snapshot at seq %d does not load", self.replica_id, seq)
            self._again("bad_snapshots")
            return
        self.state.restore(snapshot)
        self.applied = self.snapshot_seq = seq
        self._snapshots_installed += 1
        self._awaiting_snapshot = False
        self.counters["snapshots"] += 1
        log.info("replica %s: snapshot installed at seq %d", self.replica_id, seq)
        buffered, self._buffered = sorted(self._buffered, key=lambda c: c[0]), []
        for s, command in buffered:
            self._apply(s, command)
        self._forget_beats()

    # ------------------------------------------------------------------ background

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ack_interval)
            if self.upstream is not None and not self._subscribing:
                self.transport.send(self.upstream, FEED_ACK, {"seq": self.applied})

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.save_interval, SAVE_BUDGET * self.last_save_seconds))
            await self.save()
