"""MeshNode: the driver that runs the Raft core on real I/O.

One asyncio loop owns everything: ticks from a timer, messages from ZeroMQ, durable state in
SQLite. The timer wakes only when the core's next tick with an effect is due (a heartbeat, an
election timeout), not every tick; the ticks slept through are handed to the core before it sees
anything else. After every input the node drains the core's Ready batch in the order Raft requires
(persist, then send, then apply), and reacts to the batch's soft state (role, term, leader).
See docs/consensus.md.

The node is handed its collaborators (log store, transport, discovery, event sink, clock, RNG)
by the composition root (``mesh.app``); it implements the ``Replica``, ``MessageBus`` and
``NodeView`` contracts (``mesh.contracts``) the upper layers use. Membership (who is alive, who
votes) lives in ``mesh.membership``; recording events lives in ``mesh.observability``.

Why this file is long: one node implements three contracts (``Replica`` with the admin voter
changes, ``MessageBus``, ``NodeView``) and admits every mesh message (identity checks) before
the core sees it; each part is a thin adapter over the core, membership and snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from mesh.config import Config
from mesh.consensus.core import (
    ConfigChangeInProgress,
    EntryTooLarge,
    NotLeader,
    RaftCore,
    RaftSettings,
    Ready,
    SoftState,
)
from mesh.consensus.messages import (
    CONFIG,
    AppendEntries,
    AppendResponse,
    Entry,
    InstallSnapshot,
    Message,
)
from mesh.contracts import (
    EventSink,
    Incoming,
    MembershipRefused,
    MessageHandler,
    NoLeader,
    ProposalFailed,
    ProposalTooLarge,
    RoleListener,
    StateImage,
    refusal,
)
from mesh.membership.discovery import Discovery
from mesh.membership.members import Members, node_id_or_none
from mesh.membership.voters import apply_voter_policy
from mesh.security.audit import Rejections
from mesh.snapshots import (
    CHUNK_TIMEOUT,
    SnapshotReceiver,
    SnapshotSender,
    compact,
    write_image,
)
from mesh.statemachine import StateMachine
from mesh.storage.raft_store import RaftStore
from mesh.transport.zmq import MeshTransport

log = logging.getLogger("mesh.node")

# The mesh messages only nodes may send, and where each names its sender.
_NODE_MESSAGES = {"raft": "src", "snap_chunk": "src", "ping": "node_id"}

TICK_SECONDS = 0.05  # the core's unit of time; the timer wakes only at due ticks
# A timer may fire this much before its tick (the loop's clock is coarser than ours): counted as
# on time, or it would wake again a moment later for the same tick.
_TICK_EARLY = TICK_SECONDS / 10
# A Raft timer this late means the event loop (or the machine) stalled: heartbeats and election
# timeouts were late by as much. Counted, and logged at most every STALL_LOG_SECONDS.
STALL_WARN_SECONDS = 0.2
BACKUP_DIR = "backup"  # beside the state database: a backup image while it is written
STALL_LOG_SECONDS = 10.0

# Exit status of a node stopped by an internal fault (BSD EX_SOFTWARE): a supervisor restarts it
# from its durable state, which is always consistent (one transaction per Ready batch).
EXIT_NODE_FAILED = 70

__all__ = [
    "EXIT_NODE_FAILED",
    "TICK_SECONDS",
    "MeshNode",
    "NoLeader",
    "ProposalFailed",
    "raft_settings",
]


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
        max_append_bytes=r.max_append_bytes,
        max_entry_bytes=r.max_entry_bytes,
        # Two full appends in flight: the next one is on its way while the follower decodes.
        max_inflight_bytes=2 * r.max_append_bytes,
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class MeshNode:
    def __init__(
        self,
        config: Config,
        *,
        store: RaftStore,
        transport: MeshTransport,
        discovery: Discovery,
        events: EventSink,
        state_machine: StateMachine,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.id = config.node_id
        self.sm = state_machine
        self.store = store
        self.transport = transport
        self.rejections: Rejections = transport.rejections  # one counter per process
        self.discovery = discovery
        self.events = events
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        hs, snap, entries = store.load()
        if snap is not None:
            self.sm.restore(snap.data)
            snap = msgspec.structs.replace(
                snap, data=b""
            )  # the file has it; do not hold it in memory
        self.core = RaftCore(
            self.id,
            settings=raft_settings(config),
            rng=self.rng,
            hard_state=hs,
            snapshot=snap,
            entries=entries,
        )
        self.members = Members(
            self.id,
            config.advertise_mesh,
            dialer=transport,
            events=events,
            settings=config.membership,
            local_info=self._local_info,
            clock=clock,
            wall_clock=wall_clock,
        )
        self._soft = self.core.soft_state()
        self._persisted_hs = hs
        self._waiters: dict[int, tuple[int, asyncio.Future[Any]]] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._role_listeners: list[RoleListener] = []
        self._message_handlers: dict[str, MessageHandler] = {}
        self._apply_listeners: list[Callable[[Entry, Any], None]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._process_scheduled = False
        # The core has been handed every tick up to this instant (clock()); the timer is armed
        # for the next due tick (_arm_timer).
        self._ticked_to = clock()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stall_logged_at = float("-inf")
        self._ticking = False  # from start() until stop() has handed over
        self._snapshot_task: asyncio.Task[None] | None = None
        # Up to 25 % later per node, so that nodes sharing a machine (or a disk) do not all
        # write their snapshot at the same moment: every node reaches the same index together.
        base = config.raft.snapshot_threshold
        self._snapshot_threshold = base + self.rng.randrange(base // 4 + 1) if base else 0
        base = config.raft.snapshot_threshold_bytes
        self._snapshot_threshold_bytes = base + self.rng.randrange(base // 4 + 1)
        self._snapshots_out = SnapshotSender(
            snapshot_file=store.snapshot_file,
            request=lambda addr, payload: transport.request(
                addr, "snap_chunk", payload, timeout=CHUNK_TIMEOUT
            ),
            address_of=lambda node_id: p.address if (p := self.members.by_id(node_id)) else None,
            still_leader=lambda term: self.core.is_leader and self.core.term == term,
            on_sent=lambda peer, index, size: events.emit(
                "snapshot_sent", peer=peer, index=index, bytes=size
            ),
        )
        self._snapshots_in = SnapshotReceiver(self.id)
        self._image_lock = asyncio.Lock()  # one backup image written at a time (state_image)
        self._stopping = False
        self.leader_since: float | None = None
        # Set when the Ready loop, the timer or a background task failed (a save raised: disk
        # full, a database locked past its busy timeout, a value JSON cannot hold). The node then
        # does nothing more: its memory may be ahead of its disk. The process must exit
        # (``mesh.app.serve`` waits on ``failed``) rather than live on as a zombie.
        self.failure: BaseException | None = None
        self.failed = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.transport.set_handler(self._on_message)
        await self.transport.start()
        self.discovery.set_listener(self.members.on_discovered)
        await self.discovery.start()
        self.members.on_discovered(self.discovery.peers())
        self.events.emit(
            "node_started",
            pid=os.getpid(),
            mesh=self.config.advertise_mesh,
            http=self.config.advertise_http,
            term=self.core.term,
            commit_index=self.core.commit,
            last_index=self.core.last_index,
            role=self.core.role,
        )
        self._ticked_to = self.clock()
        self._ticking = True
        self._process()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.members.run(self._after_membership_round), name="membership"),
        ]
        for t in self._tasks:
            t.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        # A background loop of the node must run until stop(): one that ended otherwise failed.
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        self._fail(exc or RuntimeError("the task returned"), f"task {task.get_name()}")

    def _fail(self, exc: BaseException, where: str) -> None:
        """Stop the node for good after an internal fault, loudly: one critical log line that
        says what failed and that the process exits, an event, and ``failed`` set."""
        if self.failure is not None:
            return
        self.failure = exc
        log.critical(
            "FATAL: %s failed on node %s: %s: %s; the node stops and the process exits with "
            "status %d so that a supervisor restarts it from its durable state",
            where,
            self.id,
            type(exc).__name__,
            exc,
            EXIT_NODE_FAILED,
            exc_info=exc,
        )
        with contextlib.suppress(Exception):
            self.events.emit("node_failed", where=where, error=f"{type(exc).__name__}: {exc}")
        self.failed.set()

    async def stop(self, *, transfer: bool = True) -> None:
        """Stop the node; a leader first hands leadership to the most up-to-date follower."""
        if self._stopping:
            return
        self._stopping = True
        if transfer and self.failure is None and self.core.is_leader and len(self.core.voters) > 1:
            await self._hand_over()
        if self._snapshot_task is not None:
            self._tasks.append(self._snapshot_task)
        self._ticking = False
        self._disarm_timer()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self._snapshots_out.close()
        self._fail_waiters(ProposalFailed("node is shutting down"))
        await self.discovery.close()
        await self.transport.close()
        final = self.core.hard_state()
        # The commit index skipped by _persist; after a failure memory is not to be trusted.
        if final != self._persisted_hs and self.failure is None:
            self.store.save(hard_state=final)
        self.events.emit("node_stopped", term=self.core.term, commit_index=self.core.commit)
        self.store.close()

    async def _hand_over(self) -> None:
        self._catch_up()
        target = self.core.transfer_leadership()
        self._process()
        if target is None:
            return
        stepped_down = asyncio.Event()
        self.on_role_change(lambda role, _t, _l: role != "leader" and stepped_down.set())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stepped_down.wait(), 2 * self.config.raft.election_timeout_max)
        self.events.emit(
            "leadership_transferred",
            target=target,
            succeeded=not self.core.is_leader,
            term=self.core.term,
        )

    # ------------------------------------------------------------------ Replica

    @property
    def node_id(self) -> str:
        return self.id

    @property
    def role(self) -> str:
        return self.core.role

    @property
    def term(self) -> int:
        return self.core.term

    @property
    def leader_id(self) -> str | None:
        return self.core.leader_id

    @property
    def is_leader(self) -> bool:
        return self.core.is_leader

    @property
    def commit_index(self) -> int:
        return self.core.commit

    @property
    def handing_over(self) -> bool:
        return self.core.transferee is not None or self._stopping

    @property
    def stopping(self) -> bool:
        return self._stopping

    def on_role_change(self, fn: RoleListener) -> None:
        """fn(role, term, leader_id) after every change of role, term or leader."""
        self._role_listeners.append(fn)

    def on_apply(self, fn: Callable[[Entry, Any], None]) -> None:
        self._apply_listeners.append(fn)

    def propose_nowait(self, command: Any) -> asyncio.Future[Any]:
        """Append a command and return at once; the future resolves once it is applied.

        Entries commit in log order, so awaiting a later proposal also confirms this one:
        callers pipeline many proposals and wait for the last.
        """
        try:
            index, term = self.core.propose(command)
        except NotLeader as e:
            raise NoLeader(str(e)) from e
        except EntryTooLarge as e:
            raise ProposalTooLarge(str(e)) from None
        return self._wait_for(index, term)

    def _wait_for(self, index: int, term: int) -> asyncio.Future[Any]:
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

    # ------------------------------------------------------------------ backups (admin API)

    async def state_image(self, *, timeout: float = 5.0) -> StateImage:
        """``ImageSource``: the leader first commits a ``barrier`` command, which proves it still
        leads and covers every entry committed before the call; then a forked child writes the
        image as of the applied index at that moment (mesh.snapshots.write_image), so the loop
        keeps serving meanwhile. One at a time: each costs a fork and a full serialization."""
        async with self._image_lock:
            if not self.core.is_leader:
                raise NoLeader(f"{self.id} is not the leader (leader: {self.core.leader_id})")
            await self.propose({"op": "barrier"}, timeout=timeout)
            core = self.core
            index, term = core.applied, core.term
            snapshot_term, voters, _removed = core.snapshot_point(index)
            directory = self.store.path.parent / BACKUP_DIR
            fd = await write_image(self.sm, directory, index, snapshot_term)
        return StateImage(
            fd=fd,
            size=os.fstat(fd).st_size,
            index=index,
            term=term,
            snapshot_term=snapshot_term,
            voters=voters,
        )

    # ------------------------------------------------------------------ voters (admin API)

    async def add_voter(self, node_id: str) -> dict[str, Any]:
        core = self.core
        if node_id in core.voters:
            return self.cluster_members()  # already one: nothing to change
        if node_id != self.id and self.members.by_id(node_id) is None:
            raise MembershipRefused(404, f"no known node {node_id!r} (see /api/cluster/members)")
        if self._secure() and not self._holds_node_key(node_id):
            raise MembershipRefused(
                400, f"{node_id!r} holds no node key in this node's key directory"
            )
        await self._change_voters(core.voters | {node_id}, core.removed - {node_id})
        return self.cluster_members()

    async def remove_voter(self, node_id: str) -> dict[str, Any]:
        core = self.core
        if node_id not in core.voters:
            raise MembershipRefused(404, f"{node_id!r} is not a voter")
        if len(core.voters) == 1:
            raise MembershipRefused(409, f"{node_id!r} is the last voter; it cannot be removed")
        await self._change_voters(core.voters - {node_id}, core.removed | {node_id})
        return self.cluster_members()

    async def _change_voters(self, voters: frozenset[str], removed: frozenset[str]) -> None:
        try:
            index, term = self.core.change_voters(voters, removed=removed)
        except NotLeader as e:
            raise NoLeader(str(e)) from e
        except ConfigChangeInProgress as e:
            raise MembershipRefused(409, f"{e}; retry once it is") from e
        fut = self._wait_for(index, term)
        try:
            await asyncio.wait_for(asyncio.shield(fut), 5.0)
        except TimeoutError as e:
            fut.cancel()
            raise ProposalFailed("the membership change was not committed within 5.0s") from e

    def _secure(self) -> bool:
        return self.transport.secure

    def _holds_node_key(self, node_id: str) -> bool:
        keys = self.transport.keys
        cert = keys.get(node_id) if keys is not None else None
        return cert is not None and cert.role == "node"

    def _may_vote(self, node_id: str) -> bool:
        """Whether automatic growth (and bootstrap) may make ``node_id`` a voter: on a secured
        mesh only a node key holder (every peer is authenticated there)."""
        return not self._secure() or self._holds_node_key(node_id)

    # ------------------------------------------------------------------ MessageBus

    def reject(self, msg: Incoming, reason: str, detail: str = "") -> None:
        """Count a refused message and log it (at most once a minute per peer); dropped."""
        peer = msg.sender or msg.identity.decode("utf-8", "replace") or msg.address
        self.rejections.reject(reason, peer=peer, detail=detail)

    def handle(self, kind: str, fn: MessageHandler) -> None:
        """Route incoming mesh messages of ``kind`` (e.g. from handler processes) to ``fn``."""
        self._message_handlers[kind] = fn

    def send_to_identity(self, identity: bytes, kind: str, payload: dict[str, Any]) -> bool:
        return self.transport.send_to_identity(identity, kind, payload)

    # ------------------------------------------------------------------ LeaderLink

    def leader_accepting(self, kind: str) -> str | None:
        """The leader's mesh address if it said (in a ping or ping reply) that it answers
        ``kind``; None when no leader is known or it did not (an older node)."""
        leader = self.core.leader_id
        if leader is None or leader == self.id:
            return None
        peer = self.members.by_id(leader)
        return peer.address if peer is not None and kind in peer.accepts else None

    async def request(
        self,
        address: str,
        kind: str,
        payload: dict[str, Any],
        *,
        timeout: float,
        connect_timeout: float,
    ) -> dict[str, Any]:
        """One request over the mesh (sent at most once; see ``MeshTransport.request``)."""
        return await self.transport.request(
            address, kind, payload, timeout, connect_timeout=connect_timeout
        )

    # ------------------------------------------------------------------ views

    def address_of(self, node_id: str) -> str | None:
        """The mesh address of a node (this one's own included), if known."""
        return self.members.address_of(node_id)

    def mesh_addresses(self) -> list[str]:
        """This node's mesh address, then every peer's."""
        return [self.config.advertise_mesh, *sorted(self.members.peers)]

    def has_quorum(self) -> bool:
        return self.members.has_quorum(self.core.voters, self.core.quorum)

    def leader_http(self) -> str | None:
        leader = self.core.leader_id
        if leader is None:
            return None
        if leader == self.id:
            return self.config.advertise_http
        p = self.members.by_id(leader)
        return p.http if p else None

    def cluster_members(self) -> dict[str, Any]:
        """Who votes, who was removed, and every node this one knows."""
        core = self.core
        known = [
            {
                "node_id": self.id,
                "mesh_address": self.config.advertise_mesh,
                "http_address": self.config.advertise_http,
                "state": "alive",
            },
            *(
                {
                    "node_id": p.node_id,
                    "mesh_address": p.address,
                    "http_address": p.http,
                    "state": p.state,
                }
                for p in sorted(self.members.peers.values(), key=lambda p: p.address)
            ),
        ]
        for m in known:
            m["voter"] = m["node_id"] in core.voters
            m["removed"] = m["node_id"] in core.removed
        return {
            "leader_id": core.leader_id,
            "term": core.term,
            "voters": sorted(core.voters),
            "removed": sorted(core.removed),
            "auto_join": self.config.membership.auto_join,
            "members": known,
        }

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
        me = {
            "node_id": self.id,
            "mesh_address": self.config.advertise_mesh,
            "http_address": self.config.advertise_http,
            "state": "alive",
            "role": self.core.role,
            "last_seen": _iso(self.wall_clock()),
            "voter": self.id in self.core.voters,
        }
        return {
            "leader_id": self.core.leader_id,
            "term": self.core.term,
            "has_quorum": self.has_quorum(),
            "members": [me, *self.members.to_json(self.core.voters, _iso)],
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
            "peers_alive": sum(1 for p in self.members.peers.values() if p.state == "alive"),
            "transport": dict(self.transport.counters),
            "security_rejected": dict(self.transport.rejections.counts),
        }

    # ------------------------------------------------------------------ the Ready loop

    def _schedule_process(self) -> None:
        # Coalesce: messages arriving in one loop iteration share one fsync (group commit).
        if not self._process_scheduled:
            self._process_scheduled = True
            asyncio.get_running_loop().call_soon(self._process)

    def _process(self) -> None:
        self._process_scheduled = False
        if self.failure is not None:
            return  # a failed node neither persists, sends nor applies anything more
        try:
            self._drain_ready()
        except Exception as e:  # called from loop callbacks: nothing above would see it
            self._fail(e, "the Ready loop (persist, send, apply)")
            return
        self._arm_timer()

    def _drain_ready(self) -> None:
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
            if rd.soft_state is not None:
                self._on_soft_state(rd.soft_state)
        if self._applied_waiters:
            for index, fut in self._applied_waiters:
                if index <= core.applied and not fut.done():
                    fut.set_result(None)
        if self._snapshot_task is None and not self._stopping and self._snapshot_due():
            self._snapshot_task = asyncio.get_running_loop().create_task(
                self._take_snapshot(core.applied), name="snapshot"
            )

    def _snapshot_due(self) -> bool:
        """Enough applied log since the last snapshot, in entries or in bytes."""
        core = self.core
        applied = core.applied - core.snap_index
        if applied <= 0:
            return False
        if self._snapshot_threshold and applied >= self._snapshot_threshold:
            return True
        return self.store.log_bytes(core.snap_index, core.applied) >= self._snapshot_threshold_bytes

    def _persist(self, rd: Ready) -> None:
        """Write one Ready batch durably when the core says it must be (term, vote, entries or a
        snapshot changed). A lone commit-index change is skipped: it is written with the next
        entries, and on stop — one fsync per write instead of two on every node."""
        if not rd.must_sync:
            return
        hs = rd.hard_state
        self.store.save(hard_state=hs, entries=rd.entries, snapshot=rd.snapshot)
        if hs is not None:
            self._persisted_hs = hs

    async def _take_snapshot(self, index: int) -> None:
        try:
            await compact(
                self.core, self.sm, self.store, index, events=self.events, clock=self.clock
            )
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
        address = self.members.address_of(m.dst)
        if address is None:
            return  # address not learned yet; Raft retries
        self.transport.send_json(address, "raft", m.to_json())

    def _on_soft_state(self, soft: SoftState) -> None:
        old_role, old_term, old_leader = self._soft.role, self._soft.term, self._soft.leader_id
        role, term, leader = soft.role, soft.term, soft.leader_id
        self._soft = soft
        if term != old_term:
            self.events.emit("term_changed", old_term=old_term, term=term)
        if role == "candidate" and old_role != "candidate":
            self.events.emit("election_started", term=term)
        if role == "leader" and old_role != "leader":
            self.leader_since = self.clock()
            self.events.emit("leader_elected", term=term, leader=self.id)
            log.info("%s is leader for term %d", self.id, term)
        elif old_role == "leader" and role != "leader":
            self.leader_since = None
            self.events.emit("stepped_down", term=term, new_leader=leader)
            self._fail_waiters(ProposalFailed("leadership lost while the write was pending"))
        elif leader != old_leader and leader is not None and role != "leader":
            self.events.emit("leader_observed", leader=leader, term=term)
        for fn in self._role_listeners:
            fn(role, term, leader)

    def _fail_waiters(self, exc: Exception) -> None:
        for _, fut in list(self._waiters.values()):
            if not fut.done():
                fut.set_exception(exc)

    # ------------------------------------------------------------------ inputs

    def _catch_up(self) -> None:
        """Hand the core the ticks elapsed since the last call. Called before anything that
        steps the core or reads or resets its tick counters (a vote request is judged by the
        time since the leader was last heard), so the core sees the ticks it slept through in
        the order a tick every ``TICK_SECONDS`` would have given them.

        More than a tick past the due one means the loop could not run (SIGSTOP, a long pause):
        the stall counts as one tick, as it did when the node ticked every ``TICK_SECONDS``. A
        burst would fire elections or quorum checks before the messages queued meanwhile are
        read (a follower would campaign although its leader's heartbeats are waiting)."""
        ticks = int((self.clock() - self._ticked_to + _TICK_EARLY) / TICK_SECONDS)
        if ticks <= 0:
            return
        self._ticked_to += ticks * TICK_SECONDS
        due = self.core.ticks_until_due()
        if due is not None and ticks > due + 1:
            ticks = 1
        for _ in range(ticks):
            self.core.tick()

    def _arm_timer(self) -> None:
        """Wake at the core's next due tick (or never, if none is due); re-armed after every
        batch, since a message or a proposal moves it (a heartbeat defers the election)."""
        due = self.core.ticks_until_due() if self._ticking else None
        at = None if due is None else self._ticked_to + due * TICK_SECONDS
        if at == self._timer_at:
            return
        self._disarm_timer()
        if at is not None:
            self._timer_at = at
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, at - self.clock()), self._on_timer)

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _on_timer(self) -> None:
        if self._timer_at is not None:
            self._note_stall(self.clock() - self._timer_at)
        self._timer = self._timer_at = None
        if self.failure is not None:
            return
        try:
            self._catch_up()
        except Exception as e:  # a loop callback: nothing above would see it
            self._fail(e, "the Raft timer")
            return
        self._process()

    def _note_stall(self, late: float) -> None:
        if late < STALL_WARN_SECONDS:
            return
        counters = self.transport.counters
        counters["loop_stalls"] += 1
        now = self.clock()
        if now - self._stall_logged_at >= STALL_LOG_SECONDS:
            self._stall_logged_at = now
            log.warning(
                "%s: the Raft timer ran %.0f ms late (%d such stalls so far): the event loop or "
                "the machine is overloaded, and heartbeats and election timeouts were as late",
                self.node_id, late * 1000, counters["loop_stalls"],
            )  # fmt: skip

    def _on_message(self, msg: Incoming) -> dict[str, Any] | None:
        field = _NODE_MESSAGES.get(msg.kind)
        if field is None:
            handler = self._message_handlers.get(msg.kind)
            return handler(msg) if handler is not None else None
        # Identity is the key: only a node's own key may speak for it (contracts.refusal).
        claimed = msg.payload.get(field)
        reason = refusal(msg, claimed, "node")
        if reason is not None:
            self.reject(msg, reason, f"{msg.kind} claiming to be {str(claimed)[:130]!r}")
            return None
        if msg.kind == "raft":
            return self._on_raft(msg)
        if msg.kind == "snap_chunk":
            return self._on_snapshot_chunk(msg)
        self.members.on_ping(msg.payload)
        return self._local_info()

    def _on_raft(self, msg: Incoming) -> None:
        try:
            m = Message.from_dict(msg.payload)
        except msgspec.ValidationError as e:
            self.transport.counters["dropped_frames.raft"] += 1
            self.reject(msg, "malformed", f"raft: {e}")
            return
        if m.dst != self.id:
            return
        peer = self.members.heard_from(m.src)
        if peer is None and m.src not in self.core.voters:
            # Only members speak Raft: a stranger's message could depose the leader.
            self.transport.counters["dropped_frames.raft_stranger"] += 1
            self.reject(msg, "stranger", f"raft {m.type} from {m.src!r}, not a member")
            return
        self._catch_up()
        if peer is not None:
            # What a ping would say, from traffic that flows anyway between leader and followers.
            if isinstance(m, AppendEntries):
                self.members.learn_role(peer, term=m.term, role="leader", leader_id=m.src)
            elif isinstance(m, AppendResponse) and m.term == self.core.term and self.is_leader:
                self.members.learn_role(peer, term=m.term, role="follower", leader_id=self.id)
        self.core.step(m)
        self._schedule_process()

    def _on_snapshot_chunk(self, msg: Incoming) -> dict[str, Any]:
        src = node_id_or_none(msg.payload.get("src"))
        peer = self.members.heard_from(src) if src is not None else None
        if peer is None and src not in self.core.voters:
            self.transport.counters["dropped_frames.snapshot_stranger"] += 1
            self.reject(msg, "stranger", f"snapshot chunk from {src!r}, not a member")
            return {"ok": False, "error": "not a member"}
        # Only the leader of our current term may replace our state (SnapshotReceiver).
        reply, complete = self._snapshots_in.on_chunk(
            msg.payload, self.core.term, self.core.leader_id
        )
        if "reason" in reply:
            self.reject(msg, reply.pop("reason"), reply["error"])
        if complete is not None:
            self._catch_up()
            self.core.step(complete)
            self._schedule_process()
        return reply

    def _local_info(self) -> dict[str, Any]:
        """What this node says about itself in pings and ping replies."""
        return {
            "node_id": self.id,
            "mesh": self.config.advertise_mesh,
            "http": self.config.advertise_http,
            "role": self.core.role,
            "term": self.core.term,
            "leader_id": self.core.leader_id,
            "bootstrapped": bool(self.core.voters),
            # The request kinds the layers above registered (e.g. the API's forwarded writes):
            # a peer uses a kind only once we said we answer it (rolling upgrades).
            "accepts": sorted(self._message_handlers),
        }

    # ------------------------------------------------------------------ voters

    def _after_membership_round(self) -> None:
        self._catch_up()
        if apply_voter_policy(
            self.core,
            self.members.alive(),
            self.config.bootstrap_expect,
            auto_join=self.config.membership.auto_join,
            may_vote=self._may_vote,
        ):
            self._process()
        self.members.check_quorum_visibility(self.core.voters, self.core.quorum)
