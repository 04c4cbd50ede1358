"""Test doubles of the contracts in ``mesh/contracts.py``, for in-process unit tests.

- ``FakeReplica`` (``Replica`` + ``NodeView`` + ``Directory``): a one-node log. A proposal is
  appended as a real consensus ``Entry`` and applied to a real state machine (a
  ``SchedulerState`` by default) in a later loop iteration, so pipelined proposals behave as on
  ``MeshNode``. The test decides the role, term and leader, and can hold commits back or make
  proposals fail.
- ``FakeBus`` (``MessageBus``): records what is sent and delivers what a test (or a
  ``FakeHandler``) sends back to the handlers registered on it.

Two helpers that are not contract doubles: ``FakeHandler``, a scripted handler process at the
other end of a ``FakeBus`` (the handler protocol of ``mesh/dispatch/protocol.py``), and
``ManualClock``, a monotonic clock that moves only when told.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from mesh.consensus.messages import COMMAND, NOOP, Entry
from mesh.contracts import (
    Incoming,
    MembershipRefused,
    MessageHandler,
    NoLeader,
    ProposalFailed,
    RoleListener,
)
from mesh.dispatch import protocol as p
from mesh.scheduling.state import SchedulerState
from mesh.statemachine import StateMachine
from mesh.tasks import REGISTRY, task

WAIT = 2.0  # the default bound of every wait helper below


class ManualClock:
    """A monotonic clock (seconds) that stands still until moved."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --------------------------------------------------------------------------- FakeReplica


class FakeReplica:
    """A single-node replicated log with a real state machine; role and term are the test's."""

    def __init__(
        self,
        node_id: str = "n1",
        state_machine: StateMachine | None = None,
        *,
        mesh_address: str = "tcp://127.0.0.1:7100",
        http_address: str = "127.0.0.1:8100",
    ) -> None:
        self._node_id = node_id
        self.state_machine: Any = state_machine if state_machine is not None else SchedulerState()
        self.mesh_address = mesh_address
        self.http_address = http_address
        self.peers: dict[str, tuple[str, str | None]] = {}  # node id → (mesh, http)
        self.removed: set[str] = set()  # peers removed as voters (remove_voter)
        self._role = "follower"
        self._term = 0
        self._leader: str | None = None
        self._handing_over = False
        self.log: list[Entry] = []
        # ("proposed" | "applied", entry), in the order it happened: what tests read.
        self.journal: list[tuple[str, Entry]] = []
        self._applied = 0
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._listeners: list[RoleListener] = []
        self._held = False
        self._failures: list[tuple[BaseException, str | None]] = []
        self._followers: list[FakeReplica] = []
        self._progress = asyncio.Event()

    # ------------------------------------------------------------------ test controls

    def add_peer(self, node_id: str, mesh_address: str, http_address: str | None = None) -> None:
        self.peers[node_id] = (mesh_address, http_address)

    def become_leader(self, term: int | None = None) -> None:
        """Win an election: append the term's no-op entry and tell the role listeners."""
        term = self._term + 1 if term is None else term
        if term < self._term or (term == self._term and self._role == "leader"):
            raise ValueError(f"cannot lead term {term} from term {self._term}")
        self._term, self._role, self._leader = term, "leader", self._node_id
        self._append(NOOP, None)
        self._notify()

    def step_down(self, leader_id: str | None = None, term: int | None = None) -> None:
        """Become a follower (of ``leader_id``, if known): pending proposals fail, as on a node
        that lost leadership, and their uncommitted entries are dropped."""
        self._term = max(self._term, term or self._term)
        self._role, self._leader = "follower", leader_id
        del self.log[self._applied :]
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(ProposalFailed("leadership lost while the write was pending"))
        self._futures.clear()
        self._notify()

    def replicate_to(self, follower: FakeReplica) -> None:
        """``follower`` (created empty) applies every entry this replica commits, at once."""
        self._followers.append(follower)

    def set_handing_over(self, value: bool) -> None:
        self._handing_over = value

    def fail_next_proposals(
        self, exc: BaseException, count: int = 1, *, op: str | None = None
    ) -> None:
        """The next ``count`` proposals (of command ``op``, if given) fail with ``exc`` through
        their future, without reaching the log."""
        self._failures.extend([(exc, op)] * count)

    def hold_commits(self) -> None:
        """Proposals are appended but not committed until ``release_commits``."""
        self._held = True

    def release_commits(self) -> None:
        self._held = False
        if self.log:
            asyncio.get_running_loop().call_soon(self._commit_through, self.log[-1].index)

    def commands(self, op: str | None = None, *, event: str = "applied") -> list[dict[str, Any]]:
        """The commands ``proposed`` or ``applied`` so far (of ``op``, if given), in order."""
        return [
            e.data
            for what, e in self.journal
            if what == event and e.kind == COMMAND and (op is None or e.data.get("op") == op)
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Wait until ``predicate()`` holds, re-checked after every proposal and commit."""
        async with asyncio.timeout(timeout):
            while not predicate():
                event = self._progress
                await event.wait()

    # ------------------------------------------------------------------ Replica

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def role(self) -> str:
        return self._role

    @property
    def term(self) -> int:
        return self._term

    @property
    def leader_id(self) -> str | None:
        return self._leader

    @property
    def is_leader(self) -> bool:
        return self._role == "leader"

    @property
    def commit_index(self) -> int:
        return self._applied  # one node: committed is applied

    @property
    def handing_over(self) -> bool:
        return self._handing_over

    def propose_nowait(self, command: Any) -> asyncio.Future[Any]:
        if not self.is_leader:
            raise NoLeader(f"{self._node_id} is a {self._role}, not the leader")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        op = command.get("op") if isinstance(command, dict) else None
        for i, (exc, only) in enumerate(self._failures):
            if only is None or only == op:
                del self._failures[i]
                loop.call_soon(_fail, fut, exc)
                return fut
        entry = self._append(COMMAND, command)
        self._futures[entry.index] = fut
        return fut

    async def propose(self, command: Any, *, timeout: float = 5.0) -> Any:
        fut = self.propose_nowait(command)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError as e:
            fut.cancel()
            raise ProposalFailed(f"not committed within {timeout:.1f}s") from e

    async def wait_applied(self, index: int, timeout: float) -> bool:
        try:
            await self.wait_for(lambda: self._applied >= index, timeout)
        except TimeoutError:
            return False
        return True

    def on_role_change(self, fn: RoleListener) -> None:
        self._listeners.append(fn)

    def _voters(self) -> list[str]:
        return sorted({self._node_id, *self.peers} - self.removed)

    async def add_voter(self, node_id: str) -> dict[str, Any]:
        if not self.is_leader:
            raise NoLeader(f"{self._node_id} is a {self._role}, not the leader")
        if node_id != self._node_id and node_id not in self.peers:
            raise MembershipRefused(404, f"no known node {node_id!r}")
        self.removed.discard(node_id)
        return self.cluster_members()

    async def remove_voter(self, node_id: str) -> dict[str, Any]:
        if not self.is_leader:
            raise NoLeader(f"{self._node_id} is a {self._role}, not the leader")
        voters = self._voters()
        if node_id not in voters:
            raise MembershipRefused(404, f"{node_id!r} is not a voter")
        if len(voters) == 1:
            raise MembershipRefused(409, f"{node_id!r} is the last voter")
        self.removed.add(node_id)
        return self.cluster_members()

    # ------------------------------------------------------------------ Directory

    def address_of(self, node_id: str) -> str | None:
        if node_id == self._node_id:
            return self.mesh_address
        peer = self.peers.get(node_id)
        return peer[0] if peer else None

    def mesh_addresses(self) -> list[str]:
        return [self.mesh_address, *sorted(mesh for mesh, _ in self.peers.values())]

    # ------------------------------------------------------------------ NodeView

    def leader_http(self) -> str | None:
        if self._leader is None:
            return None
        if self._leader == self._node_id:
            return self.http_address
        peer = self.peers.get(self._leader)
        return peer[1] if peer else None

    def health(self) -> dict[str, Any]:
        return {
            "node_id": self._node_id,
            "role": self._role,
            "term": self._term,
            "leader_id": self._leader,
            "commit_index": self._applied,
            "applied_index": self._applied,
            "last_index": len(self.log),
            "has_quorum": self._leader is not None,
            "voters": self._voters(),
        }

    def cluster_members(self) -> dict[str, Any]:
        return {
            "leader_id": self._leader,
            "term": self._term,
            "voters": self._voters(),
            "removed": sorted(self.removed),
            "members": self.cluster()["members"],
        }

    def cluster(self) -> dict[str, Any]:
        members = [{"node_id": self._node_id, "mesh_address": self.mesh_address}]
        members += [{"node_id": n, "mesh_address": m} for n, (m, _) in sorted(self.peers.items())]
        return {
            "leader_id": self._leader,
            "term": self._term,
            "has_quorum": self._leader is not None,
            "members": members,
        }

    def metrics(self) -> dict[str, Any]:
        return {
            "term": self._term,
            "commit_index": self._applied,
            "applied_index": self._applied,
            "last_index": len(self.log),
            "snapshot_index": 0,
            "is_leader": int(self.is_leader),
            "has_quorum": int(self._leader is not None),
            "peers_alive": len(self.peers),
            "transport": {},
        }

    # ------------------------------------------------------------------ the log

    def _append(self, kind: str, data: Any) -> Entry:
        entry = Entry(term=self._term, index=len(self.log) + 1, kind=kind, data=data)
        self.log.append(entry)
        self.journal.append(("proposed", entry))
        if not self._held:
            # Committed in a later loop iteration, as the node's Ready loop does.
            asyncio.get_running_loop().call_soon(self._commit_through, entry.index)
        self._wake()
        return entry

    def _commit_through(self, index: int) -> None:
        if self._held:
            return
        for entry in self.log[self._applied : index]:
            try:
                result, error = self.state_machine.apply(entry), None
            except Exception as exc:  # the node answers the proposer with it, and goes on
                result, error = None, exc
            self._applied = entry.index
            self.journal.append(("applied", entry))
            fut = self._futures.pop(entry.index, None)
            if fut is not None and not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
            for follower in self._followers:
                follower._apply_replicated(entry)
        self._wake()

    def _apply_replicated(self, entry: Entry) -> None:
        if entry.index != len(self.log) + 1:
            raise ValueError(f"{self._node_id} cannot follow from index {entry.index}")
        self.log.append(entry)
        self.journal.append(("proposed", entry))
        self._commit_through(entry.index)

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn(self._role, self._term, self._leader)
        self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


# --------------------------------------------------------------------------- FakeBus


@attrs.frozen
class Sent:
    identity: bytes
    kind: str
    payload: dict[str, Any]


class FakeBus:
    """Messages to handlers, recorded; messages from them, delivered by the test."""

    def __init__(self) -> None:
        self.handlers: dict[str, MessageHandler] = {}
        self.sent: list[Sent] = []
        self.unreachable: set[bytes] = set()  # identities whose sends are refused
        self.rejected: list[tuple[Incoming, str]] = []  # (message, reason) refused by the code
        self._listeners: list[Callable[[Sent], None]] = []
        self._rids = itertools.count(1)
        self._changed = asyncio.Event()

    def handle(self, kind: str, fn: MessageHandler) -> None:
        self.handlers[kind] = fn

    def reject(self, msg: Incoming, reason: str, detail: str = "") -> None:
        self.rejected.append((msg, reason))

    def send_to_identity(self, identity: bytes, kind: str, payload: dict[str, Any]) -> bool:
        if identity in self.unreachable:
            return False
        msg = Sent(identity, kind, payload)
        self.sent.append(msg)
        for fn in list(self._listeners):
            fn(msg)
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    def on_send(self, fn: Callable[[Sent], None]) -> None:
        """Call ``fn`` with every message sent (after it is recorded)."""
        self._listeners.append(fn)

    def deliver(
        self, kind: str, payload: dict[str, Any], *, identity: bytes = b"", address: str = ""
    ) -> dict[str, Any] | None:
        """Hand a received message to the handler registered for ``kind``; returns its answer."""
        rid = str(next(self._rids)).encode()
        return self.handlers[kind](Incoming(kind, payload, rid, identity, address))

    def sent_of(self, kind: str, identity: bytes | None = None) -> list[Sent]:
        return [m for m in self.sent if m.kind == kind and identity in (None, m.identity)]

    async def wait_sent(
        self, kind: str, count: int = 1, *, identity: bytes | None = None, timeout: float = WAIT
    ) -> list[Sent]:
        """Wait until ``count`` messages of ``kind`` (to ``identity``) were sent; returns them."""
        async with asyncio.timeout(timeout):
            while len(self.sent_of(kind, identity)) < count:
                event = self._changed
                await event.wait()
        return self.sent_of(kind, identity)


# --------------------------------------------------------------------------- FakeHandler

RUN = "run"  # acknowledge (needs_start), then answer with success once started; a dispatch
# with ``start_by`` (the one-message dispatch) is started at once, without an acknowledgement
HOLD = "hold"  # acknowledge and start, but answer only on finish()
SILENT = "silent"  # never acknowledge
BUSY = "busy"  # refuse: at_capacity
FAIL = "fail"  # acknowledge, then answer with the task's error


class FakeHandler:
    """A handler process seen from the leader through a ``FakeBus``.

    Each dispatch to it is answered by the next behaviour of its script (``script(...)``), or
    ``RUN`` when the script is used up; like a real handler it refuses (``at_capacity``) while
    ``concurrency`` accepted dispatches are unfinished. Answers arrive in a later loop
    iteration, as over the network. A successful job returns its first argument.
    """

    def __init__(
        self, bus: FakeBus, handler_id: str, tasks: tuple[str, ...], *, concurrency: int = 1
    ) -> None:
        self.bus = bus
        self.handler_id = handler_id
        self.identity = handler_id.encode()
        self.tasks = tasks
        self.concurrency = concurrency
        self.dispatches: list[dict[str, Any]] = []
        self.starts: dict[str, bool] = {}  # dispatch id → the start answer it got
        self.held: dict[str, dict[str, Any]] = {}  # started, not yet finished
        self.batches: list[int] = []  # the size of each ``dispatches`` message it got
        self._script: list[str] = []
        self._slots: set[str] = set()  # accepted dispatches not finished: at most concurrency
        self._behaviour: dict[str, str] = {}
        bus.on_send(self._on_send)

    def script(self, *behaviours: str) -> None:
        self._script.extend(behaviours)

    def hello(self, **fields: Any) -> dict[str, Any] | None:
        payload = {
            "handler_id": self.handler_id,
            "tasks": list(self.tasks),
            "concurrency": self.concurrency,
            "pid": 4242,
            "started_at": "2024-01-01T00:00:00Z",
            **fields,
        }
        return self.bus.deliver(p.HELLO, payload, identity=self.identity)

    def ack(self, dispatch_id: str, *, accepted: bool = True, reason: str | None = None) -> None:
        payload = {
            "dispatch_id": dispatch_id,
            "handler_id": self.handler_id,
            "accepted": accepted,
            "reason": reason,
            "needs_start": accepted,
        }
        self.bus.deliver(p.DISPATCH_ACK, payload, identity=self.identity)

    def finish(self, dispatch_id: str, *, error: str | None = None) -> None:
        d = self.held.pop(dispatch_id)
        self._slots.discard(dispatch_id)
        payload: dict[str, Any] = {
            "dispatch_id": dispatch_id,
            "handler_id": self.handler_id,
            "job_id": d["job_id"],
            "idempotency_key": d["idempotency_key"],
            "outcome": "success" if error is None else "error",
            "return_value": d["args"][0] if error is None and d["args"] else None,
            "error": None if error is None else {"type": "RuntimeError", "message": error},
        }
        self.bus.deliver(p.JOB_RESULT, payload, identity=self.identity)

    def finish_all(self) -> None:
        for dispatch_id in list(self.held):
            self.finish(dispatch_id)

    def _on_send(self, msg: Sent) -> None:
        if msg.identity != self.identity:
            return
        if msg.kind == p.DISPATCHES:
            self.batches.append(len(msg.payload["items"]))
            for item in msg.payload["items"]:
                self._on_send(Sent(msg.identity, p.DISPATCH, item))
            return
        loop = asyncio.get_running_loop()
        if msg.kind == p.DISPATCH:
            self.dispatches.append(msg.payload)
            dispatch_id = msg.payload["dispatch_id"]
            if len(self._slots) >= self.concurrency:
                behaviour = BUSY  # as a real handler: every slot is taken
            else:
                behaviour = self._script.pop(0) if self._script else RUN
            self._behaviour[dispatch_id] = behaviour
            if behaviour == BUSY:
                loop.call_soon(lambda: self.ack(dispatch_id, accepted=False, reason=p.AT_CAPACITY))
            elif behaviour != SILENT:
                self._slots.add(dispatch_id)  # held from the acknowledgement on
                if msg.payload.get("start_by") is None:
                    loop.call_soon(self.ack, dispatch_id)  # the two-phase start
                else:
                    self._start(dispatch_id)  # one message: runs at once, answers its result
        elif msg.kind == p.DISPATCH_START:
            dispatch_id, start = msg.payload["dispatch_id"], msg.payload["start"]
            self.starts[dispatch_id] = start
            if not start:
                self._slots.discard(dispatch_id)
                return
            self._start(dispatch_id)

    def _start(self, dispatch_id: str) -> None:
        loop = asyncio.get_running_loop()
        self.held[dispatch_id] = next(d for d in self.dispatches if d["dispatch_id"] == dispatch_id)
        behaviour = self._behaviour.get(dispatch_id, RUN)
        if behaviour == RUN:
            loop.call_soon(self.finish, dispatch_id)
        elif behaviour == FAIL:
            loop.call_soon(lambda: self.finish(dispatch_id, error="boom"))


@contextlib.contextmanager
def embedded_tasks(echo: str, blocking: str) -> Iterator[asyncio.Event]:
    """Two embedded ``@mesh.task`` functions for a test: ``echo`` returns its argument,
    ``blocking`` waits for the yielded event. Unregistered afterwards."""
    gate = asyncio.Event()

    async def echo_fn(value: Any = None) -> Any:
        return value

    async def blocking_fn() -> None:
        await gate.wait()

    task(name=echo)(echo_fn)
    task(name=blocking)(blocking_fn)
    try:
        yield gate
    finally:
        gate.set()
        REGISTRY.pop(echo, None)
        REGISTRY.pop(blocking, None)
