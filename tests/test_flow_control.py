"""The leader's flow control towards a follower: a bounded window of bytes in replicate state,
one unanswered probe in probe state, and heartbeats that check instead of resending. With bulk
writes (~0.6 MB entries) a follower slower than the leader was otherwise sent the same entries
again at every heartbeat, and fell further behind decoding them (the 1,000,000-schedule run)."""

from __future__ import annotations

import random

from mesh.consensus.core import RaftCore, RaftSettings
from mesh.consensus.messages import CONFIG, AppendEntries, AppendResponse, Entry, HardState

KIB = 1024
SETTINGS = RaftSettings(
    election_ticks_min=50,
    election_ticks_max=60,
    max_append_bytes=64 * KIB,
    max_inflight_bytes=128 * KIB,
)
BLOB = "x" * (30 * KIB)  # 3 entries fill one append (64 KiB): the window holds ~5


def _drain(core: RaftCore) -> list[AppendEntries]:
    """Run the core's Readies; the AppendEntries it sent to ``b``."""
    sent = []
    while core.has_ready():
        rd = core.ready()
        sent += [m for m in rd.messages if isinstance(m, AppendEntries) and m.dst == "b"]
        core.advance(rd)
    return sent


def _leader() -> RaftCore:
    """Leader ``a`` of a, b, c; both followers acknowledged its no-op (replicate state)."""
    core = RaftCore(
        "a",
        settings=SETTINGS,
        rng=random.Random(1),
        hard_state=HardState(term=1),
        entries=[Entry(term=1, index=1, kind=CONFIG, data={"voters": ["a", "b", "c"]})],
    )
    core._become_leader()
    _drain(core)
    for peer in ("b", "c"):
        _ack(core, peer, core.last_index)
    _drain(core)
    return core


def _ack(core: RaftCore, peer: str, index: int) -> None:
    core.step(AppendResponse(src=peer, dst="a", term=core.term, success=True, match_index=index))


def _entry_bytes(sent: list[AppendEntries]) -> int:
    return sum(len(e.to_json()) for m in sent for e in m.entries)


def _heartbeats(core: RaftCore, n: int) -> list[AppendEntries]:
    sent = []
    for _ in range(n * core.settings.heartbeat_ticks):
        core.tick()
        sent += _drain(core)
    return sent


def test_a_follower_that_does_not_answer_is_sent_at_most_the_window_of_entries() -> None:
    core = _leader()
    sent = []
    for _ in range(40):  # 1.2 MB of entries, far more than the window
        core.propose({"value": BLOB})
        sent += _drain(core)
    sent += _heartbeats(core, 20)  # 20 heartbeats without an answer from b
    window = SETTINGS.max_inflight_bytes + SETTINGS.max_append_bytes  # the last may overshoot
    assert 0 < _entry_bytes(sent) <= window


def test_heartbeats_to_a_paused_follower_carry_no_entries_and_check_the_last_index_sent() -> None:
    core = _leader()
    sent = []
    for _ in range(40):
        core.propose({"value": BLOB})
        sent += _drain(core)
    last_sent = max(e.index for m in sent for e in m.entries)
    beats = _heartbeats(core, 3)
    assert beats and all(not m.entries for m in beats)
    assert all(m.prev_log_index == last_sent for m in beats)


def test_acknowledgements_reopen_the_window() -> None:
    core = _leader()
    sent = []
    for _ in range(40):
        core.propose({"value": BLOB})
        sent += _drain(core)
    last_sent = max(e.index for m in sent for e in m.entries)
    _ack(core, "b", last_sent)
    more = _drain(core)
    assert more and min(e.index for m in more for e in m.entries) == last_sent + 1


def test_a_lost_append_is_sent_again_once_the_follower_rejects_a_heartbeat() -> None:
    core = _leader()
    acked = core.last_index
    sent = []
    for _ in range(3):
        core.propose({"value": BLOB})
        sent += _drain(core)
    assert sent  # ...and lost on the way: b still has only ``acked``
    (beat, *_) = _heartbeats(core, 1)
    core.step(
        AppendResponse(
            src="b",
            dst="a",
            term=core.term,
            success=False,
            match_index=beat.prev_log_index,
            reject_hint=acked + 1,
        )
    )
    again = _drain(core)
    assert again and again[0].entries and again[0].entries[0].index == acked + 1


def test_a_probe_is_not_repeated_until_the_follower_answers() -> None:
    core = _leader()
    acked = core.last_index
    for _ in range(3):
        core.propose({"value": BLOB})
    _drain(core)
    core.step(  # b rejects: back to probing from acked + 1
        AppendResponse(
            src="b",
            dst="a",
            term=core.term,
            success=False,
            match_index=core.last_index,
            reject_hint=acked + 1,
        )
    )
    probe = _drain(core)
    assert [m.entries[0].index for m in probe if m.entries] == [acked + 1]
    beats = _heartbeats(core, 5)
    assert beats and all(not m.entries for m in beats)
