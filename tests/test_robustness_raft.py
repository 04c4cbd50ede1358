"""Byte budgets of the Raft core: a batch of large entries never outgrows the transport's frame
limit, and one entry larger than the limit is refused before anything is appended.

Messages travel through the real wire codec (``mesh.transport.codec``), so a message over the
16 MiB frame limit is dropped here exactly as a follower's transport drops it."""

from __future__ import annotations

import json
import random

import pytest

from mesh.consensus.core import EntryTooLarge, RaftCore, RaftSettings, entry_bytes
from mesh.consensus.messages import CONFIG, AppendEntries, Entry, HardState, Message
from mesh.transport.codec import DEFAULT_MAX_FRAME_BYTES, FrameError, decode, encode_json

VOTERS = ["a", "b", "c"]
MiB = 1024 * 1024


def _cluster(settings: RaftSettings) -> dict[str, RaftCore]:
    return {
        n: RaftCore(
            n,
            settings=settings,
            rng=random.Random(i),
            hard_state=HardState(term=1),
            entries=[Entry(term=1, index=1, kind=CONFIG, data={"voters": VOTERS})],
        )
        for i, n in enumerate(VOTERS)
    }


class _Wire:
    """Delivers messages between cores through the real frame codec, recording what it sends."""

    def __init__(self, cores: dict[str, RaftCore]) -> None:
        self.cores = cores
        self.append_sizes: list[tuple[int, int]] = []  # (frame bytes, entries)
        self.dropped = 0

    def pump(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            moved = False
            for core in self.cores.values():
                while core.has_ready():
                    rd = core.ready()
                    core.advance(rd)
                    for m in rd.messages:
                        moved = True
                        self._deliver(m)
            if not moved:
                return

    def _deliver(self, m: Message) -> None:
        frames = encode_json("raft", m.to_json())  # as MeshNode._send
        if isinstance(m, AppendEntries):
            self.append_sizes.append((len(frames[3]), len(m.entries)))
        try:
            _kind, _rid, payload = decode(frames, DEFAULT_MAX_FRAME_BYTES)
        except FrameError:
            self.dropped += 1
            return
        self.cores[m.dst].step(Message.from_dict(payload))


def _elect(cores: dict[str, RaftCore], wire: _Wire) -> RaftCore:
    for _ in range(200):
        for core in cores.values():
            core.tick()
        wire.pump()
        leaders = [c for c in cores.values() if c.is_leader]
        if leaders:
            return leaders[0]
    raise AssertionError("no leader elected")


def test_a_batch_of_large_entries_reaches_every_follower_in_messages_under_the_budget() -> None:
    settings = RaftSettings(election_ticks_min=5, election_ticks_max=10)
    cores = _cluster(settings)
    wire = _Wire(cores)
    leader = _elect(cores, wire)
    wire.append_sizes.clear()
    # 20 commands of 1 MiB proposed in one loop iteration: 20 MiB of entries to replicate.
    blob = "x" * MiB
    for i in range(20):
        leader.propose({"op": "put", "key": f"k{i}", "value": blob})
    for _ in range(50):
        wire.pump()
        if all(c.last_index == leader.last_index for c in cores.values()):
            break
        for core in cores.values():
            core.tick()
    assert wire.dropped == 0, "an AppendEntries exceeded the frame limit and was dropped"
    assert all(c.last_index == leader.last_index for c in cores.values())
    budget = settings.max_append_bytes
    largest = max(size for size, _n in wire.append_sizes)
    assert largest <= budget + 4096  # the budget counts entries; the envelope is small


def test_an_entry_larger_than_the_budget_is_sent_alone() -> None:
    settings = RaftSettings(election_ticks_min=5, election_ticks_max=10, max_append_bytes=64 * 1024)
    cores = _cluster(settings)
    wire = _Wire(cores)
    leader = _elect(cores, wire)
    wire.append_sizes.clear()
    leader.propose({"value": "y" * (100 * 1024)})  # over the budget, under max_entry_bytes
    leader.propose({"value": "small"})
    for _ in range(50):
        wire.pump()
        if all(c.last_index == leader.last_index for c in cores.values()):
            break
        for core in cores.values():
            core.tick()
    assert all(c.last_index == leader.last_index for c in cores.values())
    big = [(size, n) for size, n in wire.append_sizes if size > 64 * 1024]
    assert big and all(n == 1 for _size, n in big)


def test_a_proposal_over_the_entry_limit_is_refused_and_nothing_is_appended() -> None:
    settings = RaftSettings(election_ticks_min=5, election_ticks_max=10, max_entry_bytes=MiB)
    cores = _cluster(settings)
    wire = _Wire(cores)
    leader = _elect(cores, wire)
    before = leader.last_index
    with pytest.raises(EntryTooLarge, match=r"limit is 1048576 bytes"):
        leader.propose({"value": "z" * (MiB + 1)})
    with pytest.raises(EntryTooLarge):  # a batch with one oversized command appends none
        leader.propose_many([{"value": "ok"}, {"value": "z" * (MiB + 1)}])
    assert leader.last_index == before


def test_entry_bytes_counts_the_bytes_the_wire_carries_non_ascii_included() -> None:
    ascii_entry = Entry(term=1, index=1, data={"v": "a" * 1000})
    wide = Entry(term=1, index=1, data={"v": "\u00e9" * 1000})
    assert entry_bytes(wide) == entry_bytes(ascii_entry) + 1000  # "é" is 2 bytes of UTF-8
    assert entry_bytes(wide) == len(encode_json("raft", wide.to_json())[3])
    # The same JSON as the dict form: a receiver decodes it as before.
    assert json.loads(wide.to_json()) == wide.to_dict()
