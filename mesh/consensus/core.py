"""Raft as a pure state machine.

``RaftCore`` never touches a socket, a disk or a clock. A driver feeds it messages (``step``) and
ticks (``tick``), asks it to ``propose`` commands, and collects effects with ``ready()``:

1. persist ``ready.snapshot``, ``ready.entries`` and ``ready.hard_state`` durably (fsync),
2. then send ``ready.messages``,
3. then apply ``ready.committed`` to the state machine (after restoring ``ready.snapshot``),
4. then call ``advance(ready)``.

The order matters: a node must never tell anyone about state it has not made durable. The same
core is driven by the ZeroMQ node (``mesh.node``) and by the seeded simulator
(``mesh.consensus.sim``).

Features: PreVote (a returning node cannot depose a healthy leader), CheckQuorum (a leader that
cannot hear a majority steps down within one election timeout, and followers that heard from a
leader recently ignore vote requests), leadership transfer (TimeoutNow), snapshots with log
compaction, single-server membership changes (a change takes effect when appended).

Why this file is long: Raft is one algorithm over one state. As in etcd's raft.go it stays in
one file, so every transition reads against the paper (docs/consensus.md) without jumping.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from msgspec.structs import replace

from mesh.consensus.messages import (
    COMMAND,
    CONFIG,
    NOOP,
    AppendEntries,
    AppendResponse,
    Entry,
    HardState,
    InstallSnapshot,
    Message,
    Snapshot,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)


class _Phase(enum.Enum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


class NotLeader(Exception):
    """A proposal reached a node that is not the leader (or is handing leadership over)."""

    def __init__(self, leader_id: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader_id or 'unknown'})")
        self.leader_id = leader_id


class ConfigChangeInProgress(Exception):
    """Only one membership change may be uncommitted at a time."""


class EntryTooLarge(ValueError):
    """A proposed entry is larger than ``RaftSettings.max_entry_bytes``; nothing was appended."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the command is {size} bytes as a log entry; the limit is {limit} bytes")
        self.size, self.limit = size, limit


def entry_bytes(e: Entry) -> int:
    """The size of ``e`` as it travels in an AppendEntries (compact UTF-8 JSON, ``to_json``):
    what the byte budgets count, so a batch never outgrows the frame limit."""
    return len(e.to_json())


@attrs.define
class RaftSettings:
    """Timings are in ticks; the driver chooses the tick length."""

    heartbeat_ticks: int = 3
    election_ticks_min: int = 12
    election_ticks_max: int = 24
    pre_vote: bool = True
    check_quorum: bool = True
    max_append_entries: int = 512
    # Bytes of entries in one AppendEntries (at least one entry is always sent), and the largest
    # entry a proposal may make: together they keep every message below the transport's frame
    # limit (16 MiB), which a receiver enforces by dropping the whole message.
    max_append_bytes: int = 4 * 1024 * 1024
    max_entry_bytes: int = 8 * 1024 * 1024
    # In replicate state the leader keeps at most this many unacknowledged entries, and bytes of
    # entries, in flight to a follower (etcd raft's MaxInflightMsgs and MaxInflightBytes). The
    # bytes bound matters with large entries (a bulk write of 1,000 schedules is ~0.6 MB): a
    # follower slower than the leader would otherwise be sent far more than it can decode, and
    # the backlog would sit in its receive queue.
    max_inflight_entries: int = 8192
    max_inflight_bytes: int = 8 * 1024 * 1024


@attrs.frozen
class SoftState:
    """What is not persisted but every driver reacts to (etcd raft's SoftState)."""

    role: str  # follower | precandidate | candidate | leader
    term: int
    leader_id: str | None


@attrs.define
class Ready:
    """One batch of effects, handled by the driver in order: persist (``entries``, ``snapshot``,
    ``hard_state``; fsync'd when ``must_sync``), send ``messages``, apply ``committed``, then
    ``advance``. ``soft_state`` is set when role, term or leader changed since the last batch."""

    hard_state: HardState | None = None
    entries: list[Entry] = attrs.Factory(list)
    snapshot: Snapshot | None = None
    messages: list[Message] = attrs.Factory(list)
    committed: list[Entry] = attrs.Factory(list)
    soft_state: SoftState | None = None
    # Raft must have term, vote and entries on disk before answering anyone; a lone change of
    # the commit index need not be (a restarted node learns it again from the leader).
    must_sync: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.hard_state
            or self.entries
            or self.snapshot
            or self.messages
            or self.committed
            or self.soft_state
        )


@attrs.define
class _Progress:
    next: int
    match: int = 0
    probing: bool = True  # probe: one append per heartbeat/response; else optimistic pipelining
    recent_active: bool = False
    snapshot_wait: int = 0  # ticks before a snapshot may be sent again (they are large)
    commit_sent: int = 0  # the commit index last told to this follower
    # Probe: an append with entries was sent and not answered yet (no second one until it is).
    probe_sent: bool = False
    # Replicate: (last index, bytes of entries) of each unacknowledged append, oldest first.
    inflight: deque[tuple[int, int]] = attrs.Factory(deque)
    inflight_bytes: int = 0

    def acknowledge(self, match: int) -> None:
        """Free the window up to ``match`` (acknowledged by the follower)."""
        while self.inflight and self.inflight[0][0] <= match:
            self.inflight_bytes -= self.inflight.popleft()[1]

    def probe(self) -> None:
        """Back to probe: the follower's log must be found again; nothing counts as in flight."""
        self.probing = True
        self.probe_sent = False
        self.inflight.clear()
        self.inflight_bytes = 0


class RaftCore:
    def __init__(
        self,
        node_id: str,
        *,
        settings: RaftSettings | None = None,
        rng: random.Random | None = None,
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
    ) -> None:
        self.id = node_id
        self.settings = settings or RaftSettings()
        self.rng = rng or random.Random()
        hs = hard_state or HardState()
        self.term = hs.term
        self.voted_for = hs.voted_for
        self.snap: Snapshot | None = snapshot
        self.snap_index = snapshot.index if snapshot else 0
        self.snap_term = snapshot.term if snapshot else 0
        self.log: list[Entry] = [e for e in entries if e.index > self.snap_index]
        self._check_contiguous()
        self.commit = max(hs.commit, self.snap_index)
        self.commit = min(self.commit, self.last_index)
        # The state machine restores from the snapshot; entries after it are re-applied.
        self.applied = self.snap_index
        self.voters: frozenset[str] = frozenset()
        # Removed through the admin API: auto_join must not add them back (docs/consensus.md).
        self.removed: frozenset[str] = frozenset()
        self._set_config(self.last_index)
        self.phase = _Phase.FOLLOWER
        self.leader_id: str | None = None
        self.votes: dict[str, bool] = {}
        self.progress: dict[str, _Progress] = {}
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = 0
        self.transferee: str | None = None
        self.transfer_elapsed = 0
        self.pending_conf_index = 0
        self._reset_election_timer()
        # Effects not yet handed out.
        self._msgs: list[Message] = []
        self._unstable_from = self.last_index + 1  # entries >= this are not yet persisted
        self._pending_snapshot: Snapshot | None = None
        self._append_pending = False
        self._last_hard_state = HardState(self.term, self.voted_for, self.commit)
        self._last_soft_state = self.soft_state()
        # index -> (term, entry_bytes): sized once, not at every (re)send to a lagging follower.
        self._sizes: dict[int, tuple[int, int]] = {}

    # ------------------------------------------------------------------ log helpers

    def _check_contiguous(self) -> None:
        for offset, e in enumerate(self.log):
            if e.index != self.snap_index + 1 + offset:
                raise ValueError(f"log is not contiguous at index {e.index}")

    @property
    def last_index(self) -> int:
        return self.log[-1].index if self.log else self.snap_index

    @property
    def last_term(self) -> int:
        return self.log[-1].term if self.log else self.snap_term

    def term_at(self, index: int) -> int | None:
        """Term of the entry at index; None if compacted away (below the snapshot) or absent."""
        if index == self.snap_index:
            return self.snap_term
        if index < self.snap_index or index > self.last_index:
            return None if index != 0 else 0
        return self.log[index - self.snap_index - 1].term

    def entry(self, index: int) -> Entry:
        return self.log[index - self.snap_index - 1]

    def entries_from(self, start: int, limit: int) -> list[Entry]:
        lo = start - self.snap_index - 1
        return self.log[lo : lo + limit]

    def _config_at(self, index: int) -> tuple[frozenset[str], frozenset[str]]:
        """``(voters, removed)`` of the configuration in force at ``index``."""
        for e in reversed(self.log):
            if e.index <= index and e.kind == CONFIG:
                return frozenset(e.data["voters"]), frozenset(e.data.get("removed", ()))
        if self.snap is None:
            return frozenset(), frozenset()
        return frozenset(self.snap.voters), frozenset(self.snap.removed)

    def _voters_at(self, index: int) -> frozenset[str]:
        return self._config_at(index)[0]

    def _set_config(self, index: int) -> None:
        self.voters, self.removed = self._config_at(index)

    def _truncate_from(self, index: int) -> None:
        del self.log[index - self.snap_index - 1 :]
        self._unstable_from = min(self._unstable_from, index)
        self._set_config(self.last_index)

    def _append(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            self.log.append(e)
            if e.kind == CONFIG:
                self.voters = frozenset(e.data["voters"])
                self.removed = frozenset(e.data.get("removed", ()))
                self._on_voters_changed()

    @property
    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    # ------------------------------------------------------------------ public state

    @property
    def role(self) -> str:
        return {
            _Phase.FOLLOWER: "follower",
            _Phase.PRE_CANDIDATE: "precandidate",
            _Phase.CANDIDATE: "candidate",
            _Phase.LEADER: "leader",
        }[self.phase]

    @property
    def is_leader(self) -> bool:
        return self.phase is _Phase.LEADER

    def hard_state(self) -> HardState:
        return HardState(self.term, self.voted_for, self.commit)

    def soft_state(self) -> SoftState:
        return SoftState(self.role, self.term, self.leader_id)

    # ------------------------------------------------------------------ driver API

    def bootstrap(self, voters: Iterable[str]) -> None:
        """Write the initial configuration of a brand-new cluster.

        Every node of the first configuration must bootstrap with the *same* voter set, which then
        becomes the identical entry (index 1, term 1) on all of them.
        """
        if self.last_index != 0 or self.term != 0:
            raise RuntimeError("bootstrap on a node that already has state")
        vs = sorted(set(voters))
        if self.id not in vs:
            raise ValueError("a bootstrapping node must be one of the voters")
        self.term = 1
        self._append([Entry(term=1, index=1, kind=CONFIG, data={"voters": vs})])
        self._reset_election_timer()

    def tick(self) -> None:
        if self.phase is _Phase.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def ticks_until_due(self) -> int | None:
        """How many ticks from now the next ``tick()`` with an effect falls (1: the next one);
        None if no tick has any (a follower that is not a voter).

        The ticks before it only advance counters that are read when a message is stepped, so
        a driver may sleep until then instead of waking every tick, provided it hands the core
        every elapsed tick before it steps a message or changes anything else (``mesh.node``).
        The simulator checks this promise at every tick of every test.
        """
        s = self.settings
        if self.phase is _Phase.LEADER:
            due = min(
                s.heartbeat_ticks - self.heartbeat_elapsed,
                s.election_ticks_min - self.election_elapsed,
            )
            if self.transferee is not None:
                due = min(due, s.election_ticks_max - self.transfer_elapsed)
            return max(1, due)
        if self.id not in self.voters:
            return None
        return max(1, self.randomized_timeout - self.election_elapsed)

    def propose(self, data: Any, *, kind: str = COMMAND) -> tuple[int, int]:
        """Append a command; returns (index, term). Commit is observed via ready().committed."""
        if kind == CONFIG:
            if self.pending_conf_index > self.commit:
                raise ConfigChangeInProgress("a membership change is still being committed")
            if not data["voters"]:
                raise ValueError("a configuration needs at least one voter")
        if kind != CONFIG:
            (placed,) = self._propose([data], kind)
            return placed
        previous, self.pending_conf_index = self.pending_conf_index, self.last_index + 1
        try:
            (placed,) = self._propose([data], kind)
        except NotLeader:
            self.pending_conf_index = previous
            raise
        return placed

    def propose_many(self, datas: Sequence[Any]) -> list[tuple[int, int]]:
        """Append several commands at once (one replication round)."""
        return self._propose(datas, COMMAND)

    def _propose(self, datas: Sequence[Any], kind: str) -> list[tuple[int, int]]:
        if self.phase is not _Phase.LEADER or self.transferee is not None:
            raise NotLeader(None if self.phase is _Phase.LEADER else self.leader_id)
        start = self.last_index + 1
        entries = [
            Entry(term=self.term, index=start + i, kind=kind, data=d) for i, d in enumerate(datas)
        ]
        limit = self.settings.max_entry_bytes
        for e in entries:  # all or nothing: a batch with one oversized entry appends none
            size = entry_bytes(e)
            if size > limit:
                raise EntryTooLarge(size, limit)
            self._sizes[e.index] = (e.term, size)
        self._append(entries)
        self.progress[self.id].match = self.last_index
        self.progress[self.id].next = self.last_index + 1
        self._maybe_commit()
        self._append_pending = True  # sent at the next ready(): one message per batch
        return [(start + i, self.term) for i in range(len(datas))]

    def change_voters(
        self, voters: Iterable[str], *, removed: Iterable[str] | None = None
    ) -> tuple[int, int]:
        """Single-server membership change (add or remove exactly one voter); ``removed``
        replaces the removed set (default: unchanged).

        The leader may remove itself (Raft thesis §4.2.2): it keeps replicating, not counting
        itself in majorities, and steps down once the change is committed, handing over to the
        most up-to-date voter.
        """
        new = frozenset(voters)
        if len(new ^ self.voters) != 1:
            raise ValueError("a membership change must add or remove exactly one voter")
        gone = self.removed if removed is None else frozenset(removed)
        data: dict[str, Any] = {"voters": sorted(new)}
        if gone:
            data["removed"] = sorted(gone)
        return self.propose(data, kind=CONFIG)

    def transfer_leadership(self, target: str | None = None) -> str | None:
        """Hand leadership to ``target`` (default: the most up-to-date voter); returns it."""
        if self.phase is not _Phase.LEADER:
            return None
        candidates = [p for p in self._peers() if p in self.voters]
        if target is None:
            if not candidates:
                return None
            target = max(candidates, key=lambda p: (self.progress[p].match, p))
        if target == self.id or target not in candidates:
            return None
        self.transferee = target
        self.transfer_elapsed = 0
        if self.progress[target].match == self.last_index:
            self._send(TimeoutNow(src=self.id, dst=target, term=self.term))
        else:
            self._send_append(target)
        return target

    def create_snapshot(self, index: int, data: bytes) -> Snapshot:
        """Compact the log up to ``index`` (which the state machine has applied) into ``data``."""
        if index <= self.snap_index:
            raise ValueError(f"snapshot index {index} is not newer than {self.snap_index}")
        if index > self.applied:
            raise ValueError(f"cannot snapshot unapplied index {index} (applied {self.applied})")
        term = self.term_at(index)
        assert term is not None
        voters, removed = self._config_at(index)
        snap = Snapshot(
            index=index,
            term=term,
            voters=tuple(sorted(voters)),
            data=data,
            removed=tuple(sorted(removed)),
        )
        del self.log[: index - self.snap_index]
        self.snap, self.snap_index, self.snap_term = snap, index, term
        self._forget_sizes(index)
        return snap

    def snapshot_point(self, index: int) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        """``(term, voters, removed)`` a snapshot at applied ``index`` will carry: the driver
        names and records the snapshot it writes elsewhere before calling ``create_snapshot``."""
        term = self.term_at(index)
        if term is None or index > self.applied:
            raise ValueError(f"no applied entry at {index} to snapshot")
        voters, removed = self._config_at(index)
        return term, tuple(sorted(voters)), tuple(sorted(removed))

    def drop_snapshot_data(self) -> None:
        """Forget the current snapshot's bytes once the driver has stored them (they can be tens
        of megabytes); the driver then sends InstallSnapshot data from its own copy."""
        if self.snap is not None and self.snap.data:
            self.snap = replace(self.snap, data=b"")

    def _flush_appends(self) -> None:
        """Replicate what was proposed since the last batch: one AppendEntries per follower
        however many proposals arrived in between (the driver's loop is the batch)."""
        if not self._append_pending:
            return
        self._append_pending = False
        if self.phase is _Phase.LEADER:
            for peer in self._peers():
                if not self.progress[peer].probing:
                    self._send_append(peer)

    def has_ready(self) -> bool:
        """Whether ``ready()`` has anything to hand out; changes nothing."""
        return bool(
            self._msgs
            or (self._append_pending and self.phase is _Phase.LEADER)
            or self._pending_snapshot
            or self._unstable_from <= self.last_index
            or self.commit > self.applied
            or self.hard_state() != self._last_hard_state
            or self.soft_state() != self._last_soft_state
        )

    def ready(self) -> Ready:
        self._flush_appends()
        rd = Ready()
        hs = self.hard_state()
        last = self._last_hard_state
        if self._pending_snapshot is not None:
            rd.snapshot = self._pending_snapshot
        if self._unstable_from <= self.last_index:
            rd.entries = self.entries_from(max(self._unstable_from, self.snap_index + 1), 1 << 62)
        rd.must_sync = bool(
            rd.entries
            or rd.snapshot is not None
            or hs.term != last.term
            or hs.voted_for != last.voted_for
        )
        if hs != last or rd.must_sync:
            rd.hard_state = hs
        soft = self.soft_state()
        if soft != self._last_soft_state:
            rd.soft_state = soft
        rd.messages, self._msgs = self._msgs, []
        start = max(self.applied, self.snap_index) + 1
        if self.commit >= start:
            rd.committed = self.entries_from(start, self.commit - start + 1)
        return rd

    def advance(self, rd: Ready) -> None:
        if rd.hard_state is not None:
            self._last_hard_state = rd.hard_state
        if rd.soft_state is not None:
            self._last_soft_state = rd.soft_state
        if rd.snapshot is not None:
            self._pending_snapshot = None
            self.applied = max(self.applied, rd.snapshot.index)
        if rd.entries:
            self._unstable_from = max(self._unstable_from, rd.entries[-1].index + 1)
        elif self._unstable_from <= self.snap_index:
            self._unstable_from = self.snap_index + 1
        if rd.committed:
            self.applied = max(self.applied, rd.committed[-1].index)

    # ------------------------------------------------------------------ role changes

    def _reset_election_timer(self) -> None:
        self.election_elapsed = 0
        s = self.settings
        self.randomized_timeout = self.rng.randint(s.election_ticks_min, s.election_ticks_max - 1)

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.voted_for = None
        self.leader_id = None
        self.votes = {}
        self.heartbeat_elapsed = 0
        self.transferee = None
        self._reset_election_timer()

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.phase = _Phase.FOLLOWER
        self.leader_id = leader
        self.progress = {}

    def _become_pre_candidate(self) -> None:
        # PreVote does not change term or vote: a node cut off from the cluster cannot inflate its
        # term and disrupt the leader when it returns.
        self.phase = _Phase.PRE_CANDIDATE
        self.votes = {}
        self.leader_id = None
        self.progress = {}

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.phase = _Phase.CANDIDATE
        self.voted_for = self.id
        self.progress = {}

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.phase = _Phase.LEADER
        self.leader_id = self.id
        self.progress = {p: _Progress(next=self.last_index + 1) for p in self.voters | {self.id}}
        self.progress[self.id].recent_active = True
        # Commit a no-op of our own term: only then are entries of earlier terms known committed,
        # and only then may a membership change be proposed (Ongaro's single-server fix).
        self.pending_conf_index = self.last_index + 1
        index = self.last_index + 1
        self._append([Entry(term=self.term, index=index, kind=NOOP)])
        self.progress[self.id].match = index
        self.progress[self.id].next = index + 1
        self._maybe_commit()
        self._broadcast_append()

    def _on_voters_changed(self) -> None:
        if self.phase is not _Phase.LEADER:
            return
        for p in self.voters:
            if p not in self.progress:
                self.progress[p] = _Progress(next=self.last_index + 1, recent_active=True)
        for p in list(self.progress):
            if p not in self.voters and p != self.id:
                del self.progress[p]

    def _peers(self) -> list[str]:
        return [p for p in self.progress if p != self.id]

    # ------------------------------------------------------------------ ticks

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.election_elapsed >= self.randomized_timeout and self.id in self.voters:
            self._campaign(transfer=False)

    def _tick_leader(self) -> None:
        s = self.settings
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= s.election_ticks_min:
            self.election_elapsed = 0
            if s.check_quorum:
                active = sum(
                    1 for p in self.voters if p in self.progress and self.progress[p].recent_active
                )
                if active < self.quorum:
                    self._become_follower(self.term, None)
                    return
                for p, pr in self.progress.items():
                    pr.recent_active = p == self.id
        if self.phase is not _Phase.LEADER:
            return
        if self.transferee is not None:
            self.transfer_elapsed += 1
            if self.transfer_elapsed >= s.election_ticks_max:
                self.transferee = None  # the target did not take over in time: keep leading
        for pr in self.progress.values():
            if pr.snapshot_wait:
                pr.snapshot_wait -= 1
        if self.heartbeat_elapsed >= s.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._broadcast_append()

    def _campaign(self, *, transfer: bool) -> None:
        if self.settings.pre_vote and not transfer:
            self._become_pre_candidate()
            self._reset_election_timer()
            term = self.term + 1
            pre = True
        else:
            self._become_candidate()
            term = self.term
            pre = False
        self.votes = {self.id: True}
        if self._tally() >= self.quorum:
            self._win(pre)
            return
        for p in sorted(self.voters):
            if p == self.id:
                continue
            self._send(
                VoteRequest(
                    src=self.id,
                    dst=p,
                    term=term,
                    last_log_index=self.last_index,
                    last_log_term=self.last_term,
                    pre_vote=pre,
                    transfer=transfer,
                )
            )

    def _tally(self) -> int:
        return sum(1 for v, g in self.votes.items() if g and v in self.voters)

    def _win(self, pre: bool) -> None:
        if pre:
            self._real_election()
        else:
            self._become_leader()

    def _real_election(self) -> None:
        self._become_candidate()
        self.votes = {self.id: True}
        if self._tally() >= self.quorum:
            self._become_leader()
            return
        for p in sorted(self.voters):
            if p != self.id:
                self._send(
                    VoteRequest(
                        src=self.id,
                        dst=p,
                        term=self.term,
                        last_log_index=self.last_index,
                        last_log_term=self.last_term,
                    )
                )

    # ------------------------------------------------------------------ messages

    def _send(self, msg: Message) -> None:
        self._msgs.append(msg)

    def step(self, m: Message) -> None:
        if m.dst != self.id or m.src == self.id:
            return
        if m.term > self.term:
            if isinstance(m, VoteRequest):
                in_lease = (
                    self.settings.check_quorum
                    and self.leader_id is not None
                    and self.election_elapsed < self.settings.election_ticks_min
                )
                if in_lease and not m.transfer:
                    # We heard from a live leader recently: this candidate is disruptive.
                    return
                if not m.pre_vote:
                    self._become_follower(m.term, None)
            elif isinstance(m, VoteResponse) and m.pre_vote:
                # A granted pre-vote carries the future term we asked about; a rejection with a
                # higher term means we are behind.
                if not m.granted:
                    self._become_follower(m.term, None)
            elif isinstance(m, (AppendEntries, InstallSnapshot, TimeoutNow)):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if isinstance(m, (AppendEntries, InstallSnapshot)):
                # A stale leader: tell it our term so it steps down.
                self._send(AppendResponse(src=self.id, dst=m.src, term=self.term, success=False))
            elif isinstance(m, VoteRequest):
                self._send(
                    VoteResponse(
                        src=self.id, dst=m.src, term=self.term, granted=False, pre_vote=m.pre_vote
                    )
                )
            return

        if isinstance(m, VoteRequest):
            self._on_vote_request(m)
        elif isinstance(m, VoteResponse):
            self._on_vote_response(m)
        elif isinstance(m, AppendEntries):
            self._on_append(m)
        elif isinstance(m, InstallSnapshot):
            self._on_snapshot(m)
        elif isinstance(m, AppendResponse):
            self._on_append_response(m)
        elif isinstance(m, TimeoutNow):
            if self.id in self.voters and self.phase is not _Phase.LEADER:
                self._campaign(transfer=True)

    def _log_ok(self, m: VoteRequest) -> bool:
        return (m.last_log_term, m.last_log_index) >= (self.last_term, self.last_index)

    def _on_vote_request(self, m: VoteRequest) -> None:
        if m.pre_vote:
            grant = m.term > self.term and self._log_ok(m)
            term = m.term if grant else self.term
            self._send(
                VoteResponse(src=self.id, dst=m.src, term=term, granted=grant, pre_vote=True)
            )
            return
        can_vote = self.voted_for == m.src or (self.voted_for is None and self.leader_id is None)
        grant = m.term == self.term and can_vote and self._log_ok(m)
        if grant:
            self.voted_for = m.src
            self._reset_election_timer()
        self._send(VoteResponse(src=self.id, dst=m.src, term=self.term, granted=grant))

    def _on_vote_response(self, m: VoteResponse) -> None:
        if self.phase is _Phase.PRE_CANDIDATE and m.pre_vote:
            if m.granted and m.term != self.term + 1:
                return  # a stale answer to an older pre-vote round
        elif self.phase is _Phase.CANDIDATE and not m.pre_vote:
            if m.term != self.term:
                return
        else:
            return
        self.votes.setdefault(m.src, m.granted)
        granted = self._tally()
        rejected = sum(1 for v, g in self.votes.items() if not g and v in self.voters)
        if granted >= self.quorum:
            self._win(self.phase is _Phase.PRE_CANDIDATE)
        elif rejected >= self.quorum:
            self._become_follower(self.term, None)

    def _on_append(self, m: AppendEntries) -> None:
        self._accept_leader(m.src)
        reply = AppendResponse(src=self.id, dst=m.src, term=self.term, success=False)
        if m.prev_log_index < self.commit:
            # Already committed up to here: everything <= commit matches the leader.
            skip = self.commit - m.prev_log_index
            entries = m.entries[skip:]
            prev_index = self.commit
            prev_term = self.term_at(self.commit)
        else:
            entries = m.entries
            prev_index, prev_term = m.prev_log_index, m.prev_log_term
        local_term = self.term_at(prev_index)
        if local_term is None or local_term != prev_term:
            hint = min(prev_index, self.last_index + 1)
            if local_term is not None:
                # Skip back over the whole conflicting term in one round trip.
                conflict_term = local_term
                i = prev_index
                while i > self.commit + 1 and self.term_at(i - 1) == conflict_term:
                    i -= 1
                hint = i
            self._send(replace(reply, match_index=m.prev_log_index, reject_hint=max(1, hint)))
            return
        # Log matching: find the first entry that is new or conflicts.
        new_from = None
        for i, e in enumerate(entries):
            t = self.term_at(e.index)
            if t is None or t != e.term:
                if t is not None:
                    self._truncate_from(e.index)
                new_from = i
                break
        if new_from is not None:
            self._append(entries[new_from:])
        last_new = prev_index + len(entries)
        if m.leader_commit > self.commit:
            self.commit = min(m.leader_commit, last_new)
        if m.quiet and not m.entries and last_new == m.prev_log_index:
            return  # the leader knows all this answer would say, and asked for silence
        self._send(replace(reply, success=True, match_index=last_new))

    def _accept_leader(self, leader: str) -> None:
        if self.phase is not _Phase.FOLLOWER:
            self._become_follower(self.term, leader)
        self.leader_id = leader
        self.election_elapsed = 0

    def _on_snapshot(self, m: InstallSnapshot) -> None:
        self._accept_leader(m.src)
        snap = m.snapshot
        if snap.index <= self.commit:
            self._send(
                AppendResponse(
                    src=self.id, dst=m.src, term=self.term, success=True, match_index=self.commit
                )
            )
            return
        if self.term_at(snap.index) == snap.term:
            # We already have the entry: keep the suffix, drop what the snapshot covers.
            del self.log[: snap.index - self.snap_index]
        else:
            self.log = []
        self.snap, self.snap_index, self.snap_term = snap, snap.index, snap.term
        self._forget_sizes(snap.index)
        self._set_config(self.last_index)
        self.commit = snap.index
        self.applied = min(self.applied, snap.index)
        self._pending_snapshot = snap
        self._unstable_from = self.snap_index + 1
        self._send(
            AppendResponse(
                src=self.id, dst=m.src, term=self.term, success=True, match_index=snap.index
            )
        )

    def _on_append_response(self, m: AppendResponse) -> None:
        if self.phase is not _Phase.LEADER:
            return
        pr = self.progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        pr.snapshot_wait = 0
        pr.probe_sent = False
        if not m.success:
            rejected = m.match_index
            if pr.probing:
                if rejected != pr.next - 1:
                    return  # stale
            elif rejected <= pr.match:
                return  # stale
            pr.next = max(pr.match + 1, min(rejected, m.reject_hint or rejected))
            pr.probe()
            self._send_append(m.src)
            return
        pr.acknowledge(m.match_index)
        if m.match_index > pr.match:
            pr.match = m.match_index
            pr.probing = False
            committed = self.commit
            self._maybe_commit()
            if self.phase is not _Phase.LEADER:
                return
            if self.commit > committed:
                self._announce_commit()
        pr.next = max(pr.next, pr.match + 1)
        if pr.probing:
            pr.probing = False
        if self.transferee == m.src and pr.match == self.last_index:
            self._send(TimeoutNow(src=self.id, dst=m.src, term=self.term))
        if pr.next <= self.last_index:
            self._send_append(m.src)

    def _maybe_commit(self) -> None:
        matches = sorted(
            (self.progress[p].match for p in self.voters if p in self.progress), reverse=True
        )
        if len(matches) < self.quorum:
            return
        n = matches[self.quorum - 1]
        if n > self.commit and self.term_at(n) == self.term:
            self.commit = n
            if self.id not in self.voters and self.commit >= self.pending_conf_index:
                self._step_down_removed()

    def _step_down_removed(self) -> None:
        """The committed configuration no longer holds this leader: tell the followers the
        commit index, hand over to the most up-to-date voter, and follow."""
        self._announce_commit()
        best = max(self._peers(), key=lambda p: (self.progress[p].match, p), default=None)
        if best is not None and self.progress[best].match == self.last_index:
            self._send(TimeoutNow(src=self.id, dst=best, term=self.term))
        self._become_follower(self.term, None)

    def _announce_commit(self) -> None:
        """Tell caught-up followers about a new commit index now, not at the next heartbeat:
        a write forwarded by a follower is readable there one round trip after it commits."""
        for peer in self._peers():
            pr = self.progress[peer]
            if pr.next > self.last_index and pr.commit_sent < self.commit:
                self._send_append(peer)

    def _broadcast_append(self) -> None:
        for p in self._peers():
            self._send_append(p, heartbeat=True)

    def _send_append(self, peer: str, *, heartbeat: bool = False) -> None:
        """Send ``peer`` the entries from its next index, within the flow control: one
        unanswered probe, or a bounded window in replicate state. A heartbeat is always sent,
        without entries when the flow is paused: it checks that the follower has everything
        up to its next index, so a lost append is found (the follower rejects it) without
        sending the same entries again on a timer, which a follower slower than the leader
        would only fall further behind decoding."""
        pr = self.progress[peer]
        s = self.settings
        if pr.next <= self.snap_index or self.term_at(pr.next - 1) is None:
            self._send_snapshot(peer, pr)
            return
        if pr.probing:
            paused = pr.probe_sent
        else:
            paused = (
                pr.next - 1 - pr.match >= s.max_inflight_entries
                or pr.inflight_bytes >= s.max_inflight_bytes
            )
        if paused and not heartbeat:
            return  # wait for the follower's answer
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        entries: tuple[Entry, ...] = ()
        size = 0
        if not paused:
            entries, size = self._budgeted(self.entries_from(pr.next, s.max_append_entries))
        self._send(
            AppendEntries(
                src=self.id,
                dst=peer,
                term=self.term,
                prev_log_index=prev,
                prev_log_term=prev_term,
                entries=entries,
                leader_commit=self.commit,
                quiet=heartbeat and not entries and self._knows_peer(pr, prev),
            )
        )
        pr.commit_sent = self.commit
        if not entries:
            return
        if pr.probing:
            pr.probe_sent = True
        else:
            pr.next = entries[-1].index + 1
            pr.inflight.append((entries[-1].index, size))
            pr.inflight_bytes += size

    @staticmethod
    def _knows_peer(pr: _Progress, prev: int) -> bool:
        """Whether a successful answer to an empty heartbeat after ``prev`` would tell us
        nothing: the peer is known to match up to ``prev`` and has answered since the last
        CheckQuorum round. Until it has, every heartbeat asks again, so each round still gets
        an answer from every live follower, with as many chances as before."""
        return pr.recent_active and not pr.probing and pr.match == prev

    def _budgeted(self, entries: list[Entry]) -> tuple[tuple[Entry, ...], int]:
        """The longest prefix of ``entries`` within ``max_append_bytes`` (at least one entry),
        and its size in bytes."""
        budget = self.settings.max_append_bytes
        total = 0
        for n, e in enumerate(entries):
            cached = self._sizes.get(e.index)
            if cached is not None and cached[0] == e.term:
                size = cached[1]
            else:
                size = entry_bytes(e)
                self._sizes[e.index] = (e.term, size)
            if total + size > budget and n > 0:
                return tuple(entries[:n]), total
            total += size
        return tuple(entries), total

    def _forget_sizes(self, upto: int) -> None:
        """Drop the cached sizes of entries compacted into a snapshot."""
        if self._sizes and min(self._sizes) <= upto:
            self._sizes = {i: v for i, v in self._sizes.items() if i > upto}

    def _send_snapshot(self, peer: str, pr: _Progress) -> None:
        if self.snap is None or pr.snapshot_wait > 0:
            return
        self._send(InstallSnapshot(src=self.id, dst=peer, term=self.term, snapshot=self.snap))
        pr.probe()
        pr.snapshot_wait = self.settings.election_ticks_max
