"""MeshNode: the driver that runs the Raft core on real I/O.

One asyncio loop owns everything: ticks from a timer, messages from ZeroMQ, durable state in
SQLite. After every input the node drains the core's Ready batch in the order Raft requires
(persist, then send, then apply). See docs/consensus.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs

from mesh.config import Config
from mesh.consensus.core import ConfigChangeInProgress, NotLeader, RaftCore, RaftSettings
from mesh.consensus.messages import (
    CONFIG,
    AppendEntries,
    AppendResponse,
    Entry,
    InstallSnapshot,
    Message,
)
from mesh.membership.discovery import make_discovery
from mesh.observability.eventlog import EventLog
from mesh.observability.state_db import StateDB
from mesh.snapshots import CHUNK_TIMEOUT, SnapshotReceiver, SnapshotSender, write_snapshot
from mesh.statemachine import KVStateMachine, StateMachine
from mesh.storage.raft_store import RaftStore
from mesh.transport.zmq import Incoming, MeshTransport

log = logging.getLogger("mesh.node")

TICK_SECONDS = 0.05  # timer granularity; idle cost is mostly wakeups (docs/performance.md)
METRICS_FLUSH_SECONDS = 10.0  # event_metrics rows in broker_state.db are written this often
# A peer we exchange Raft traffic with is alive without pings; it is still pinged this many ping
# intervals apart to refresh what only pings carry (its HTTP address, bootstrap flag).
PING_REFRESH_ROUNDS = 4


class _StateDBLogHandler(logging.Handler):
    """Warnings and errors of this node also go to broker_state.db's node_log table."""

    def __init__(self, statedb: StateDB) -> None:
        super().__init__(logging.WARNING)
        self.statedb = statedb

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.statedb.log(record.levelname, record.getMessage(), logger=record.name)
        except Exception:  # the log must never take the node down
            self.handleError(record)


class NoLeader(Exception):
    """No leader is known (election in progress, or this node cannot see a quorum)."""


class ProposalFailed(Exception):
    """The command may or may not have been committed: leadership changed while it was pending."""


@attrs.define
class Peer:
    address: str  # mesh address
    node_id: str | None = None
    http: str | None = None
    state: str = "unknown"  # alive | suspect | dead | unknown
    last_seen: float = -1.0  # monotonic
    last_seen_wall: float | None = None
    role: str | None = None
    term: int = 0
    leader_id: str | None = None
    bootstrapped: bool = False
    ping_inflight: bool = False
    pinged_at: float = float("-inf")  # monotonic


def raft_settings(config: Config) -> RaftSettings:
    """Seconds in the config → ticks for the core."""
    r = config.raft

    def ticks(seconds: float) -> int:
        return max(1, round(seconds / TICK_SECONDS))

    return RaftSettings(
        heartbeat_ticks=ticks(r.heartbeat_interval),
        election_ticks_min=ticks(r.election_timeout_min),
        election_ticks_max=max(ticks(r.election_timeout_max), ticks(r.election_timeout_min) + 1),
        pre_vote=r.pre_vote,
        check_quorum=r.check_quorum,
        max_append_entries=r.max_append_entries,
    )


class MeshNode:
    def __init__(
        self,
        config: Config,
        *,
        state_machine: StateMachine | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.id = config.node_id
        self.sm: StateMachine = state_machine or KVStateMachine()
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = RaftStore(config.state_db_path)
        self.statedb = StateDB(config.state_db_path, node_id=self.id)
        self.events = EventLog(
            config.eventlog_path,
            self.id,
            max_bytes=config.eventlog.max_bytes,
            backups=config.eventlog.backups,
        )
        hs, snap, entries = self.store.load()
        if snap is not None:
            self.sm.restore(snap.data)
            snap = attrs.evolve(snap, data=b"")  # the file has it; do not hold it in memory
        self.core = RaftCore(
            self.id,
            settings=raft_settings(config),
            rng=self.rng,
            hard_state=hs,
            snapshot=snap,
            entries=entries,
        )
        self.transport = MeshTransport(self.id, config.mesh, max_frame_bytes=config.max_frame_bytes)
        self.discovery = make_discovery(config)
        self.peers: dict[str, Peer] = {}  # by mesh address
        self._waiters: dict[int, tuple[int, asyncio.Future[Any]]] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._role_listeners: list[Callable[[str, int, str | None], None]] = []
        self._message_handlers: dict[str, Callable[[Incoming], Any]] = {}
        self._apply_listeners: list[Callable[[Entry, Any], None]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._process_scheduled = False
        self._last_soft = (self.core.role, self.core.term, self.core.leader_id)
        self._had_quorum: bool | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        # Up to 25 % later per node, so that nodes sharing a machine (or a disk) do not all
        # write their snapshot at the same moment: every node reaches the same index together.
        base = config.raft.snapshot_threshold
        self._snapshot_threshold = base + self.rng.randrange(base // 4 + 1) if base else 0
        self._persisted_hs = hs
        self._snapshots_out = SnapshotSender(
            snapshot_file=self.store.snapshot_file,
            request=lambda addr, payload: self.transport.request(
                addr, "snap_chunk", payload, timeout=CHUNK_TIMEOUT
            ),
            address_of=lambda node_id: p.address if (p := self.peer_by_id(node_id)) else None,
            still_leader=lambda term: self.core.is_leader and self.core.term == term,
            on_sent=lambda peer, index, size: self.events.emit(
                "snapshot_sent", peer=peer, index=index, bytes=size
            ),
        )
        self._snapshots_in = SnapshotReceiver(self.id)
        self._started_at = 0.0
        self._stopping = False
        self.leader_since: float | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.transport.set_handler(self._on_message)
        await self.transport.start()
        self.discovery.set_listener(self._on_peers_changed)
        await self.discovery.start()
        self._on_peers_changed(self.discovery.peers())
        self._started_at = self.clock()
        self.statedb.upsert_instance(
            self.id,
            pid=os.getpid(),
            mesh_address=self.config.advertise_mesh,
            http_address=self.config.advertise_http,
            state="alive",
            role=self.core.role,
        )
        self.events.emit(
            "node_started",
            pid=os.getpid(),
            mesh=self.config.advertise_mesh,
            http=self.config.advertise_http,
            term=self.core.term,
            commit_index=self.core.commit,
            last_index=self.core.last_index,
        )
        self._log_handler = _StateDBLogHandler(self.statedb)
        logging.getLogger("mesh").addHandler(self._log_handler)
        self._process()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._tick_loop(), name="raft-tick"),
            loop.create_task(self._membership_loop(), name="membership"),
        ]

    async def stop(self, *, transfer: bool = True) -> None:
        """Stop the node; a leader first hands leadership to the most up-to-date follower."""
        if self._stopping:
            return
        self._stopping = True
        if transfer and self.core.is_leader and len(self.core.voters) > 1:
            target = self.core.transfer_leadership()
            self._process()
            if target is not None:
                stepped_down = asyncio.Event()
                self.on_role_change(lambda role, _t, _l: role != "leader" and stepped_down.set())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        stepped_down.wait(), 2 * self.config.raft.election_timeout_max
                    )
                self.events.emit(
                    "leadership_transferred",
                    target=target,
                    succeeded=not self.core.is_leader,
                    term=self.core.term,
                )
                if not self.core.is_leader:
                    self.statedb.record_leadership(
                        self.id, self.core.term, "transferred", detail=f"to {target}"
                    )
        if self._snapshot_task is not None:
            self._tasks.append(self._snapshot_task)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self._snapshots_out.close()
        self._fail_waiters(ProposalFailed("node is shutting down"))
        await self.discovery.close()
        await self.transport.close()
        self.statedb.upsert_instance(
            self.id,
            pid=os.getpid(),
            mesh_address=self.config.advertise_mesh,
            http_address=self.config.advertise_http,
            state="stopped",
            role=None,
        )
        final = self.core.hard_state()
        if final != self._persisted_hs:  # the commit index skipped by _persist
            self.store.save(hard_state=final)
        self.events.emit("node_stopped", term=self.core.term, commit_index=self.core.commit)
        logging.getLogger("mesh").removeHandler(self._log_handler)
        self.statedb.close()
        self.events.close()
        self.store.close()

    # ------------------------------------------------------------------ public API

    def on_role_change(self, fn: Callable[[str, int, str | None], None]) -> None:
        """fn(role, term, leader_id) after every change of role, term or leader."""
        self._role_listeners.append(fn)

    def handle(self, kind: str, fn: Callable[[Incoming], Any]) -> None:
        """Route incoming mesh messages of ``kind`` (e.g. from handler processes) to ``fn``."""
        self._message_handlers[kind] = fn

    def on_apply(self, fn: Callable[[Entry, Any], None]) -> None:
        self._apply_listeners.append(fn)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def is_leader(self) -> bool:
        return self.core.is_leader

    @property
    def leader_id(self) -> str | None:
        return self.core.leader_id

    def has_quorum(self) -> bool:
        voters = self.core.voters
        if not voters:
            return False
        seen = sum(1 for p in self.peers.values() if p.state == "alive" and p.node_id in voters)
        return seen + (1 if self.id in voters else 0) >= self.core.quorum

    def peer_by_id(self, node_id: str) -> Peer | None:
        for p in self.peers.values():
            if p.node_id == node_id:
                return p
        return None

    def leader_http(self) -> str | None:
        if self.core.leader_id is None:
            return None
        if self.core.leader_id == self.id:
            return self.config.advertise_http
        p = self.peer_by_id(self.core.leader_id)
        return p.http if p else None

    def propose_nowait(self, command: Any) -> asyncio.Future[Any]:
        """Append a command and return at once; the future resolves once it is applied.

        Entries commit in log order, so awaiting a later proposal also confirms this one:
        callers pipeline many proposals and wait for the last.
        """
        try:
            index, term = self.core.propose(command)
        except NotLeader as e:
            raise NoLeader(str(e)) from e
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[index] = (term, fut)
        fut.add_done_callback(lambda _f: self._waiters.pop(index, None))
        self._schedule_process()
        return fut

    async def propose(self, command: Any, *, timeout: float = 5.0) -> Any:
        """Replicate a command; returns the state machine's answer once committed and applied."""
        fut = self.propose_nowait(command)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError as e:
            fut.cancel()
            raise ProposalFailed(f"not committed within {timeout:.1f}s (no quorum?)") from e

    async def wait_applied(self, index: int, timeout: float) -> bool:
        """Wait until this node has applied ``index``; False on timeout."""
        if self.core.applied >= index:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied_waiters.append((index, fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if not fut.done():
                fut.cancel()
            self._applied_waiters = [w for w in self._applied_waiters if w[1] is not fut]

    def health(self) -> dict[str, Any]:
        return {
            "node_id": self.id,
            "role": self.core.role,
            "term": self.core.term,
            "leader_id": self.core.leader_id,
            "commit_index": self.core.commit,
            "applied_index": self.core.applied,
            "last_index": self.core.last_index,
            "has_quorum": self.has_quorum(),
            "voters": sorted(self.core.voters),
        }

    def cluster(self) -> dict[str, Any]:
        members = [
            {
                "node_id": self.id,
                "mesh_address": self.config.advertise_mesh,
                "http_address": self.config.advertise_http,
                "state": "alive",
                "role": self.core.role,
                "last_seen": _iso(self.wall_clock()),
                "voter": self.id in self.core.voters,
            }
        ]
        for p in sorted(self.peers.values(), key=lambda p: (p.node_id or "~", p.address)):
            members.append(
                {
                    "node_id": p.node_id,
                    "mesh_address": p.address,
                    "http_address": p.http,
                    "state": p.state,
                    "role": p.role,
                    "last_seen": _iso(p.last_seen_wall) if p.last_seen_wall else None,
                    "voter": p.node_id in self.core.voters,
                }
            )
        return {
            "leader_id": self.core.leader_id,
            "term": self.core.term,
            "has_quorum": self.has_quorum(),
            "members": members,
        }

    def metrics(self) -> dict[str, Any]:
        return {
            "term": self.core.term,
            "commit_index": self.core.commit,
            "applied_index": self.core.applied,
            "last_index": self.core.last_index,
            "snapshot_index": self.core.snap_index,
            "is_leader": int(self.core.is_leader),
            "has_quorum": int(self.has_quorum()),
            "peers_alive": sum(1 for p in self.peers.values() if p.state == "alive"),
            "transport": dict(self.transport.counters),
        }

    # ------------------------------------------------------------------ the Ready loop

    def _schedule_process(self) -> None:
        # Coalesce: messages arriving in one loop iteration share one fsync (group commit).
        if not self._process_scheduled:
            self._process_scheduled = True
            asyncio.get_running_loop().call_soon(self._process)

    def _process(self) -> None:
        self._process_scheduled = False
        core = self.core
        while core.has_ready():
            rd = core.ready()
            self._persist(rd)
            for m in rd.messages:
                self._send(m)
            if rd.snapshot is not None:
                self.sm.restore(rd.snapshot.data)
                self.events.emit(
                    "snapshot_installed", index=rd.snapshot.index, term=rd.snapshot.term
                )
            for e in rd.committed:
                self._apply(e)
            core.advance(rd)
            if rd.snapshot is not None:
                core.drop_snapshot_data()
        if self._applied_waiters:
            for index, fut in self._applied_waiters:
                if index <= core.applied and not fut.done():
                    fut.set_result(None)
        threshold = self._snapshot_threshold
        if (
            threshold
            and core.applied - core.snap_index >= threshold
            and self._snapshot_task is None
            and not self._stopping
        ):
            self._snapshot_task = asyncio.get_running_loop().create_task(
                self._take_snapshot(core.applied), name="snapshot"
            )
        self._observe_soft_state()

    def _persist(self, rd: Any) -> None:
        """Write one Ready batch durably, skipping the fsync a lone commit-index change would
        cost: Raft needs term, vote and entries on disk before answering, not the commit index
        (a restarted node learns it again from the leader). It is written with the next
        entries, and on stop; one fsync per write instead of two on every node."""
        hs = rd.hard_state
        persisted = self._persisted_hs
        if hs is not None and not rd.entries and rd.snapshot is None and persisted is not None:
            if (hs.term, hs.voted_for) == (persisted.term, persisted.voted_for):
                hs = None
        if hs is None and (rd.entries or rd.snapshot is not None):
            current = self.core.hard_state()
            if current != persisted:
                hs = current
        self.store.save(hard_state=hs, entries=rd.entries, snapshot=rd.snapshot)
        if hs is not None:
            self._persisted_hs = hs

    async def _take_snapshot(self, index: int) -> None:
        """Compact the log up to ``index`` (applied now) without blocking the loop: a forked
        child writes the image (mesh/snapshots.py); then the file is recorded, one transaction."""
        started = self.clock()
        try:
            term, voters = self.core.snapshot_point(index)
            name = await write_snapshot(self.sm, self.store.snapshot_dir, index, term)
            if index <= self.core.snap_index:
                return  # a leader's snapshot was installed meanwhile; ours is older
            self.store.record_snapshot(index, term, voters, name)
            self.core.create_snapshot(index, b"")
            self.events.emit(
                "snapshot_taken",
                index=index,
                term=term,
                seconds=round(self.clock() - started, 3),
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("snapshot at %d failed; the log keeps growing until one succeeds", index)
        finally:
            self._snapshot_task = None

    def _apply(self, e: Entry) -> None:
        try:
            result = self.sm.apply(e)
            error: BaseException | None = None
        except Exception as exc:  # a bad command must not stop the log
            log.exception("state machine failed to apply entry %d", e.index)
            result, error = None, exc
        if e.kind == CONFIG:
            self.events.emit("config_changed", index=e.index, voters=e.data["voters"])
        waiter = self._waiters.get(e.index)
        if waiter is not None:
            term, fut = waiter
            if not fut.done():
                if term != e.term:
                    fut.set_exception(ProposalFailed("superseded by another leader's entry"))
                elif error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
        for fn in self._apply_listeners:
            fn(e, result)

    def _send(self, m: Message) -> None:
        if isinstance(m, InstallSnapshot):
            self._snapshots_out.send(m)  # streamed in chunks from the snapshot file
            return
        peer = self.peer_by_id(m.dst)
        if peer is None:
            return  # address not learned yet; Raft retries
        self.transport.send(peer.address, "raft", m.to_dict())

    def _observe_soft_state(self) -> None:
        soft = (self.core.role, self.core.term, self.core.leader_id)
        if soft == self._last_soft:
            return
        old_role, old_term, old_leader = self._last_soft
        self._last_soft = soft
        role, term, leader = soft
        if term != old_term:
            self.events.emit("term_changed", old_term=old_term, term=term)
        if role == "candidate" and old_role != "candidate":
            self.events.emit("election_started", term=term)
        if role == "leader" and old_role != "leader":
            self.leader_since = self.clock()
            self.events.emit("leader_elected", term=term, leader=self.id)
            self.statedb.record_leadership(self.id, term, "elected")
            log.info("%s is leader for term %d", self.id, term)
        elif old_role == "leader" and role != "leader":
            self.leader_since = None
            self.events.emit("stepped_down", term=term, new_leader=leader)
            self.statedb.record_leadership(self.id, term, "stepped_down", detail=str(leader))
            self._fail_waiters(ProposalFailed("leadership lost while the write was pending"))
        elif leader != old_leader and leader is not None and role != "leader":
            self.statedb.record_leadership(leader, term, "observed")
        for fn in self._role_listeners:
            fn(role, term, leader)

    def _fail_waiters(self, exc: Exception) -> None:
        for _, fut in list(self._waiters.values()):
            if not fut.done():
                fut.set_exception(exc)

    # ------------------------------------------------------------------ inputs

    async def _tick_loop(self) -> None:
        next_at = self.clock()
        while True:
            next_at += TICK_SECONDS
            delay = next_at - self.clock()
            if delay < -TICK_SECONDS:  # we were stalled (SIGSTOP, GC): do not burst ticks
                next_at = self.clock()
                delay = 0
            await asyncio.sleep(max(0.0, delay))
            self.core.tick()
            self._process()

    def _on_message(self, msg: Incoming) -> dict[str, Any] | None:
        if msg.kind == "raft":
            try:
                m = Message.from_dict(msg.payload)
            except (KeyError, TypeError, ValueError) as e:
                self.transport.counters["dropped_frames.raft"] += 1
                log.debug("dropping malformed raft message: %s", e)
                return None
            if m.dst != self.id:
                return None
            peer = self.peer_by_id(m.src)
            if peer is None and m.src not in self.core.voters:
                # Only members speak Raft: a stranger's message could depose the leader.
                self.transport.counters["dropped_frames.raft_stranger"] += 1
                return None
            if peer is not None:
                self._seen(peer)
                self._learn_from_raft(peer, m)
            self.core.step(m)
            self._schedule_process()
            return None
        if msg.kind == "snap_chunk":
            return self._on_snapshot_chunk(msg.payload)
        if msg.kind == "ping":
            self._on_ping(msg.payload)
            return self._ping_payload()
        handler = self._message_handlers.get(msg.kind)
        if handler is not None:
            return handler(msg)
        return None

    def _learn_from_raft(self, peer: Peer, m: Message) -> None:
        # What a ping would say, from traffic that flows anyway between a leader and followers.
        if m.term < peer.term:
            return
        if isinstance(m, AppendEntries):
            peer.term, peer.role, peer.leader_id = m.term, "leader", m.src
        elif isinstance(m, AppendResponse) and m.term == self.core.term and self.core.is_leader:
            peer.term, peer.role, peer.leader_id = m.term, "follower", self.id

    def _on_snapshot_chunk(self, payload: dict[str, Any]) -> dict[str, Any]:
        src = payload.get("src")
        peer = self.peer_by_id(src) if isinstance(src, str) else None
        if peer is None and src not in self.core.voters:
            self.transport.counters["dropped_frames.snapshot_stranger"] += 1
            return {"ok": False, "error": "not a member"}
        if peer is not None:
            self._seen(peer)
        reply, complete = self._snapshots_in.on_chunk(payload, self.core.term)
        if complete is not None:
            self.core.step(complete)
            self._schedule_process()
        return reply

    def _ping_payload(self) -> dict[str, Any]:
        return {
            "node_id": self.id,
            "mesh": self.config.advertise_mesh,
            "http": self.config.advertise_http,
            "role": self.core.role,
            "term": self.core.term,
            "leader_id": self.core.leader_id,
            "bootstrapped": bool(self.core.voters),
        }

    def _on_ping(self, info: dict[str, Any]) -> None:
        addr = info.get("mesh")
        node_id = info.get("node_id")
        if not isinstance(addr, str) or addr == self.config.advertise_mesh:
            return
        # A node is known by its id: the address we reach it at (a static entry, a proxy) may
        # differ from the one it advertises, and must not get a second, bypassing connection.
        peer = self.peers.get(addr) or (
            self.peer_by_id(node_id) if isinstance(node_id, str) else None
        )
        if peer is None:
            if not self.config.membership.learn_peers:
                return
            # Someone knows us that we did not know: the peer set is symmetric.
            peer = self._add_peer(addr)
        self._update_peer(peer, info)

    def _update_peer(self, peer: Peer, info: dict[str, Any]) -> None:
        node_id = info.get("node_id")
        if isinstance(node_id, str) and node_id and node_id != self.id:
            peer.node_id = node_id
        if isinstance(info.get("http"), str):
            peer.http = info["http"]
        peer.role = info.get("role") if isinstance(info.get("role"), str) else None
        peer.term = info.get("term") if isinstance(info.get("term"), int) else 0
        peer.leader_id = info.get("leader_id") if isinstance(info.get("leader_id"), str) else None
        peer.bootstrapped = bool(info.get("bootstrapped"))
        self._seen(peer)

    def _seen(self, peer: Peer) -> None:
        peer.last_seen = self.clock()
        peer.last_seen_wall = self.wall_clock()
        if peer.state != "alive":
            self._set_peer_state(peer, "alive")

    def _on_peers_changed(self, addresses: frozenset[str]) -> None:
        for addr in addresses:
            if addr not in self.peers and addr != self.config.advertise_mesh:
                self._add_peer(addr)

    def _add_peer(self, addr: str) -> Peer:
        peer = Peer(address=addr)
        self.peers[addr] = peer
        self.transport.connect(addr)
        return peer

    # ------------------------------------------------------------------ membership

    async def _membership_loop(self) -> None:
        interval = self.config.membership.ping_interval
        flush_every = max(1, round(METRICS_FLUSH_SECONDS / interval))
        rounds = 0
        while True:
            rounds += 1
            if rounds % flush_every == 0:
                self.statedb.flush_metrics()
            now = self.clock()
            for peer in list(self.peers.values()):
                if peer.ping_inflight:
                    continue
                if (
                    now - peer.last_seen < interval
                    and peer.http is not None
                    and now - peer.pinged_at < PING_REFRESH_ROUNDS * interval
                ):
                    continue  # heard from it through Raft just now: idle CPU is wakeups
                peer.ping_inflight = True
                peer.pinged_at = now
                asyncio.get_running_loop().create_task(self._ping(peer))
            self._check_liveness()
            self._maybe_bootstrap()
            self._maybe_add_voters()
            self._check_quorum_visibility()
            await asyncio.sleep(interval)

    async def _ping(self, peer: Peer) -> None:
        try:
            reply = await self.transport.request(
                peer.address,
                "ping",
                self._ping_payload(),
                timeout=self.config.membership.dead_after,
            )
            self._update_peer(peer, reply)
        except TimeoutError:
            pass
        except Exception:  # a bad reply must not kill membership
            log.exception("ping to %s failed", peer.address)
        finally:
            peer.ping_inflight = False

    def _check_liveness(self) -> None:
        now = self.clock()
        m = self.config.membership
        for peer in self.peers.values():
            if peer.last_seen < 0:
                continue
            age = now - peer.last_seen
            state = (
                "alive" if age <= m.suspect_after else "suspect" if age <= m.dead_after else "dead"
            )
            if state != peer.state:
                self._set_peer_state(peer, state)

    def _set_peer_state(self, peer: Peer, state: str) -> None:
        old, peer.state = peer.state, state
        name = {"alive": "peer_up", "suspect": "peer_suspect", "dead": "peer_down"}[state]
        self.events.emit(name, peer=peer.node_id, address=peer.address, previous=old)
        self.statedb.count(name)
        if peer.node_id:
            self.statedb.upsert_instance(
                peer.node_id,
                pid=None,
                mesh_address=peer.address,
                http_address=peer.http,
                state=state,
                role=peer.role,
            )

    def _check_quorum_visibility(self) -> None:
        if not self.core.voters:
            return
        has = self.has_quorum()
        if has != self._had_quorum:
            if self._had_quorum is not None or not has:
                alive = sorted(
                    p.node_id for p in self.peers.values() if p.state == "alive" and p.node_id
                )
                self.events.emit(
                    "quorum_regained" if has else "quorum_lost",
                    visible=[self.id, *alive],
                    voters=sorted(self.core.voters),
                )
            self._had_quorum = has

    def _maybe_bootstrap(self) -> None:
        """A brand-new cluster: the smallest node id among ``bootstrap_expect`` fresh nodes writes
        the first configuration; the others receive it by replication (one writer, no conflict)."""
        core = self.core
        if core.voters or core.last_index or core.term:
            return
        alive = [p for p in self.peers.values() if p.state == "alive" and p.node_id]
        if any(p.bootstrapped for p in alive):
            return  # a cluster exists: its leader will add us
        ids = sorted({self.id, *(p.node_id for p in alive if p.node_id)})
        if len(ids) >= self.config.bootstrap_expect and ids[0] == self.id:
            core.bootstrap(ids)
            log.info("%s bootstrapped a new cluster with voters %s", self.id, ids)
            self._process()

    def _maybe_add_voters(self) -> None:
        core = self.core
        if not core.is_leader or core.pending_conf_index > core.commit:
            return
        for p in sorted(self.peers.values(), key=lambda p: p.node_id or ""):
            if p.state == "alive" and p.node_id and p.node_id not in core.voters:
                try:
                    core.change_voters(core.voters | {p.node_id})
                except (NotLeader, ConfigChangeInProgress):
                    return
                log.info("%s adds %s as a voter", self.id, p.node_id)
                self._process()
                return


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------- process entry point


def build_scheduling(node: MeshNode, state: Any) -> Any:
    """Attach the handler registry, dispatcher and scheduler service to a node."""
    import mesh.dispatch.webhook  # noqa: F401  (registers the built-in "webhook" task)
    from mesh.dispatch import protocol
    from mesh.dispatch.dispatcher import HandlerDispatcher
    from mesh.dispatch.governors import Governors
    from mesh.dispatch.registry import HandlerRegistry
    from mesh.scheduling.broker import ZMQEventBroker
    from mesh.scheduling.service import SchedulingService

    registry = HandlerRegistry()

    def hello(msg: Incoming) -> dict[str, Any]:
        registry.on_hello(msg.payload)
        leader = node.leader_id
        leader_mesh = None
        if leader == node.id:
            leader_mesh = node.config.advertise_mesh
        elif leader is not None and (peer := node.peer_by_id(leader)) is not None:
            leader_mesh = peer.address
        return {
            "node_id": node.id,
            "leader_id": leader,
            "term": node.core.term,
            "leader_mesh": leader_mesh,
            "nodes": [node.config.advertise_mesh, *sorted(node.peers)],
        }

    node.handle(protocol.HELLO, hello)
    dispatcher = HandlerDispatcher(
        node,
        registry,
        governors=Governors(node.config.governors),
        settings=node.config.dispatch,
    )

    dispatcher.state = state

    from apscheduler import (
        ScheduleAdded,
        ScheduleRemoved,
        SchedulerStarted,
        SchedulerStopped,
        ScheduleUpdated,
        TaskAdded,
        TaskRemoved,
        TaskUpdated,
    )

    # Schedule and task changes go to every node; per-job events (thousands per second under
    # load) stay on the leader: their outcomes reach every node through the replicated log.
    lifecycle = frozenset(
        {
            ScheduleAdded,
            ScheduleUpdated,
            ScheduleRemoved,
            TaskAdded,
            TaskUpdated,
            TaskRemoved,
            SchedulerStarted,
            SchedulerStopped,
        }
    )

    def broker(n: MeshNode) -> Any:
        return ZMQEventBroker(transport=n.transport, peers=sorted(n.peers), remote_events=lifecycle)

    return SchedulingService(node, state, broker_factory=broker, dispatcher=dispatcher)


async def serve(config: Config, *, ready: Callable[[MeshNode], None] | None = None) -> None:
    """Run a node with its scheduler and HTTP API until SIGINT/SIGTERM, then shut down."""
    from mesh.api.http import HttpServer, create_app
    from mesh.scheduling.state import SchedulerState

    state = SchedulerState(
        max_executions=config.history.max_executions, max_results=config.history.max_results
    )
    node = MeshNode(config, state_machine=state)
    service = build_scheduling(node, state)
    await node.start()
    http = HttpServer(node, create_app(node, service))
    try:
        await http.start()
    except BaseException:
        await service.close()
        await node.stop(transfer=False)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"schedulezero node {node.id}: mesh {config.advertise_mesh}, "
        f"http http://{config.advertise_http}/api/health",
        flush=True,
    )
    if ready:
        ready(node)
    await stop.wait()
    await node.stop(transfer=True)
    await service.close()
    await http.stop()


def run_node(config: Config) -> int:
    from mesh.tasks import TaskModuleError, load_task_modules

    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        load_task_modules(config.tasks)
    except TaskModuleError as e:
        print(f"schedulezero: error: --tasks: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except OSError as e:
        print(f"schedulezero: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
