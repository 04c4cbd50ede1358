"""A seeded, deterministic simulated network for ``RaftCore``.

The simulator is the second driver of the consensus core (the ZeroMQ node is the first). Time is a
tick counter; every random choice comes from one ``random.Random(seed)``, so a failing seed replays
the exact same interleaving. The network can drop, delay, duplicate and reorder messages and cut
links in either direction; nodes can crash (losing everything not yet persisted) and restart from
what they persisted.

Safety properties are checked continuously and raise ``SafetyViolation``:
- at most one leader per term (election safety);
- every node applies the same entry at the same index (state machine safety);
- a new leader holds every entry committed before it was elected (leader completeness).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
from collections.abc import Iterable

import attrs

from mesh.consensus.core import NotLeader, RaftCore, RaftSettings
from mesh.consensus.messages import COMMAND, Entry, HardState, Message, Snapshot


class SafetyViolation(AssertionError):
    pass


@attrs.define
class _Durable:
    """What a node has made durable: survives a crash."""

    hard_state: HardState = attrs.Factory(HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = attrs.Factory(list)

    def save(self, hs: HardState | None, entries: list[Entry], snap: Snapshot | None) -> None:
        if snap is not None:
            self.snapshot = snap
            self.entries = [e for e in self.entries if e.index > snap.index]
        if entries:
            first = entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(entries)
        if hs is not None:
            self.hard_state = hs


@attrs.define
class SimNode:
    id: str
    core: RaftCore
    durable: _Durable
    alive: bool = True
    applied_index: int = 0
    digest: str = ""
    applied_commands: list[object] = attrs.Factory(list)
    checked_term: int = -1  # the term whose leadership was last checked for completeness

    def restore(self, snap: Snapshot) -> None:
        state = json.loads(snap.data)
        self.applied_index = snap.index
        self.digest = state["digest"]


def _digest(prev: str, e: Entry) -> str:
    blob = json.dumps([prev, e.index, e.term, e.kind, e.data], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@attrs.define
class NetworkFaults:
    drop: float = 0.0
    duplicate: float = 0.0
    min_delay: int = 0
    max_delay: int = 2


class SimCluster:
    def __init__(
        self,
        ids: Iterable[str],
        seed: int,
        *,
        settings: RaftSettings | None = None,
        faults: NetworkFaults | None = None,
        snapshot_every: int | None = None,
        serialize: bool = True,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.settings = settings or RaftSettings(
            heartbeat_ticks=2, election_ticks_min=10, election_ticks_max=20
        )
        self.faults = faults or NetworkFaults()
        self.snapshot_every = snapshot_every
        self.serialize = serialize
        self.now = 0
        self._seq = 0
        self._queue: list[tuple[int, int, Message]] = []
        self.blocked: set[tuple[str, str]] = set()
        self.nodes: dict[str, SimNode] = {}
        self.leaders_by_term: dict[int, str] = {}
        self.committed: dict[int, tuple[int, str, object]] = {}  # index -> (term, kind, data)
        self.digests: dict[int, str] = {}
        self.max_committed = 0
        self.history: list[str] = []
        ids = sorted(ids)
        for nid in ids:
            core = self._new_core(nid, _Durable())
            core.bootstrap(ids)
            self.nodes[nid] = SimNode(id=nid, core=core, durable=_Durable())
            self._process(self.nodes[nid])

    def _new_core(self, nid: str, d: _Durable) -> RaftCore:
        return RaftCore(
            nid,
            settings=self.settings,
            rng=random.Random(self.rng.getrandbits(64)),
            hard_state=d.hard_state,
            snapshot=d.snapshot,
            entries=list(d.entries),
        )

    def add_node(self, nid: str) -> SimNode:
        """A brand-new, empty node (not bootstrapped): the leader must add it as a voter."""
        node = SimNode(id=nid, core=self._new_core(nid, _Durable()), durable=_Durable())
        self.nodes[nid] = node
        return node

    # ------------------------------------------------------------------ faults

    def crash(self, nid: str) -> None:
        self.nodes[nid].alive = False
        self.history.append(f"t={self.now} crash {nid}")

    def restart(self, nid: str) -> None:
        node = self.nodes[nid]
        if node.alive:
            return
        d = node.durable
        node.core = self._new_core(nid, d)
        node.alive = True
        node.applied_index, node.digest = 0, ""
        if d.snapshot is not None:
            node.restore(d.snapshot)
        self.history.append(f"t={self.now} restart {nid}")
        self._process(node)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between different groups (both directions)."""
        gs = [set(g) for g in groups]
        for a in gs:
            for b in gs:
                if a is not b:
                    self.blocked |= {(x, y) for x in a for y in b}
        self.history.append(f"t={self.now} partition {[sorted(g) for g in gs]}")

    def cut(self, src: str, dst: str) -> None:
        self.blocked.add((src, dst))
        self.history.append(f"t={self.now} cut {src}->{dst}")

    def heal(self) -> None:
        self.blocked.clear()
        self.history.append(f"t={self.now} heal")

    # ------------------------------------------------------------------ driving

    def leaders(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive and n.core.is_leader]

    def leader(self) -> SimNode | None:
        ls = self.leaders()
        return max(ls, key=lambda n: n.core.term) if ls else None

    def propose(self, data: object) -> tuple[str, int, int] | None:
        """Propose to the current (highest-term) leader; returns (leader, index, term)."""
        ld = self.leader()
        if ld is None:
            return None
        try:
            index, term = ld.core.propose(data)
        except NotLeader:
            return None
        self._process(ld)
        return ld.id, index, term

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.step()

    def step(self) -> None:
        self.now += 1
        for node in self.nodes.values():
            if node.alive:
                self._tick(node)
                self._process(node)
        due: list[Message] = []
        while self._queue and self._queue[0][0] <= self.now:
            due.append(heapq.heappop(self._queue)[2])
        self.rng.shuffle(due)  # messages due at the same tick arrive in any order
        for msg in due:
            node = self.nodes.get(msg.dst)
            if node is None or not node.alive:
                continue
            node.core.step(msg)
            self._process(node)

    def _tick(self, node: SimNode) -> None:
        """One tick, checking ``ticks_until_due``: a tick before the due one must have no
        effect and bring the due tick one closer (the ZeroMQ node sleeps through such ticks)."""
        core = node.core
        due = core.ticks_until_due()
        pending = core.has_ready()  # a test may change the core without processing it
        core.tick()
        if pending or (due is not None and due <= 1):
            return
        after = core.ticks_until_due()
        if core.has_ready() or after != (None if due is None else due - 1):
            raise SafetyViolation(
                f"seed {self.seed}: {node.id} ({core.role}) acted on a tick {due} ticks before "
                f"the due one (now due in {after}, ready: {core.has_ready()})"
            )

    def _enqueue(self, msg: Message) -> None:
        f = self.faults
        if (msg.src, msg.dst) in self.blocked or self.rng.random() < f.drop:
            return
        copies = 2 if self.rng.random() < f.duplicate else 1
        for _ in range(copies):
            if self.serialize:
                msg = Message.from_dict(json.loads(json.dumps(msg.to_dict())))
            delay = self.rng.randint(f.min_delay, f.max_delay)
            self._seq += 1
            heapq.heappush(self._queue, (self.now + max(1, delay), self._seq, msg))

    def _process(self, node: SimNode) -> None:
        core = node.core
        while core.has_ready():
            was_leader_term = core.term if core.is_leader else None
            rd = core.ready()
            node.durable.save(rd.hard_state, rd.entries, rd.snapshot)
            for m in rd.messages:
                self._enqueue(m)
            if rd.snapshot is not None:
                node.restore(rd.snapshot)
            for e in rd.committed:
                self._apply(node, e)
            core.advance(rd)
            self._observe(node, was_leader_term)
            if self.snapshot_every and node.applied_index - core.snap_index >= self.snapshot_every:
                data = json.dumps({"digest": node.digest}).encode()
                snap = core.create_snapshot(node.applied_index, data)
                node.durable.save(None, [], snap)
        self._observe(node, None)

    def _observe(self, node: SimNode, _prev: int | None) -> None:
        core = node.core
        if core.is_leader:
            holder = self.leaders_by_term.setdefault(core.term, node.id)
            if holder != node.id:
                raise SafetyViolation(
                    f"seed {self.seed}: two leaders in term {core.term}: {holder} and {node.id}"
                )
            if node.checked_term != core.term:
                self._check_leader_completeness(node)
                node.checked_term = core.term

    def _check_leader_completeness(self, node: SimNode) -> None:
        core = node.core
        for idx in range(core.snap_index + 1, self.max_committed + 1):
            want = self.committed.get(idx)
            if want is None:
                continue
            got = core.term_at(idx)
            if got != want[0]:
                raise SafetyViolation(
                    f"seed {self.seed}: leader {node.id} (term {core.term}) lacks committed entry "
                    f"{idx} (term {want[0]}, has {got})"
                )

    def _apply(self, node: SimNode, e: Entry) -> None:
        if e.index != node.applied_index + 1:
            raise SafetyViolation(
                f"seed {self.seed}: {node.id} applied {e.index} after {node.applied_index}"
            )
        node.digest = _digest(node.digest, e)
        node.applied_index = e.index
        if e.kind == COMMAND:
            node.applied_commands.append(e.data)
        known = self.committed.get(e.index)
        if known is None:
            self.committed[e.index] = (e.term, e.kind, e.data)
            self.digests[e.index] = node.digest
            self.max_committed = max(self.max_committed, e.index)
        elif known != (e.term, e.kind, e.data) or self.digests[e.index] != node.digest:
            raise SafetyViolation(
                f"seed {self.seed}: {node.id} applied {e.index} as {(e.term, e.kind, e.data)}, "
                f"others applied {known}"
            )

    # ------------------------------------------------------------------ liveness

    def wait_for(self, predicate, max_ticks: int) -> bool:
        for _ in range(max_ticks):
            if predicate():
                return True
            self.step()
        return predicate()

    def stable_leader(self) -> SimNode | None:
        """A leader that every live node agrees on, at the highest term."""
        ld = self.leader()
        if ld is None:
            return None
        for n in self.nodes.values():
            if n.alive and (n.core.leader_id != ld.id or n.core.term != ld.core.term):
                return None
        return ld
