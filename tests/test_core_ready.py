"""What the Raft core's Ready says, so that a driver never has to diff the core itself
(etcd raft's SoftState and MustSync), and that asking whether there is one changes nothing."""

from __future__ import annotations

import random

from mesh.consensus.core import RaftCore, RaftSettings, SoftState
from mesh.consensus.messages import CONFIG, AppendResponse, Entry, HardState

VOTERS = ["a", "b", "c"]


def _core(node_id: str = "a", *, pre_vote: bool = True) -> RaftCore:
    core = RaftCore(
        node_id,
        settings=RaftSettings(election_ticks_min=5, election_ticks_max=6, pre_vote=pre_vote),
        rng=random.Random(1),
        hard_state=HardState(term=1),
        entries=[Entry(term=1, index=1, kind=CONFIG, data={"voters": VOTERS})],
    )
    _drain(core)
    return core


def _drain(core: RaftCore) -> list:
    readies = []
    while core.has_ready():
        rd = core.ready()
        readies.append(rd)
        core.advance(rd)
    return readies


def _time_out(core: RaftCore) -> None:
    for _ in range(core.settings.election_ticks_max):
        core.tick()


def _leader() -> RaftCore:
    """A leader whose followers have acknowledged everything (so it pipelines appends)."""
    core = _core(pre_vote=False)
    _time_out(core)
    _drain(core)
    core._become_leader()
    _drain(core)
    for peer in ("b", "c"):
        core.step(
            AppendResponse(
                src=peer, dst="a", term=core.term, success=True, match_index=core.last_index
            )
        )
    _drain(core)
    assert not any(pr.probing for p, pr in core.progress.items() if p != "a")
    return core


def test_a_fresh_core_has_nothing_to_report() -> None:
    assert not _core().has_ready()


def test_a_pre_vote_is_reported_as_precandidate_with_the_term_unchanged() -> None:
    core = _core()
    _time_out(core)
    (rd, *_) = _drain(core)
    assert rd.soft_state == SoftState("precandidate", 1, None)
    assert core.term == 1  # PreVote does not spend a term
    assert not rd.must_sync  # nothing durable changed


def test_a_real_candidacy_is_reported_as_candidate_and_must_be_synced() -> None:
    core = _core(pre_vote=False)
    _time_out(core)
    (rd, *_) = _drain(core)
    assert rd.soft_state == SoftState("candidate", 2, None)
    assert rd.must_sync  # a new term and our own vote must be on disk before asking for votes
    assert rd.hard_state == HardState(2, "a", 0)


def test_soft_state_is_reported_once_per_change() -> None:
    core = _core(pre_vote=False)
    _time_out(core)
    readies = _drain(core)
    assert [rd.soft_state for rd in readies if rd.soft_state is not None] == [
        SoftState("candidate", 2, None)
    ]
    core.tick()
    assert all(rd.soft_state is None for rd in _drain(core))


def test_has_ready_does_not_flush_pending_appends() -> None:
    core = _leader()
    core.propose({"x": 1})
    before = list(core._msgs)
    assert core.has_ready()
    assert core.has_ready()
    assert core._msgs == before  # asking twice sent nothing: only ready() hands effects out
    rd = core.ready()
    assert rd.entries and rd.entries[-1].data == {"x": 1}
    assert rd.must_sync


def test_a_lone_commit_index_change_need_not_be_synced() -> None:
    core = _leader()
    index, _ = core.propose({"x": 1})
    _drain(core)
    core.step(AppendResponse(src="b", dst="a", term=core.term, success=True, match_index=index))
    assert core.commit == index
    rd = core.ready()
    assert rd.hard_state is not None and rd.hard_state.commit == index
    assert rd.committed and rd.committed[-1].index == index
    assert not rd.must_sync


def test_propose_and_propose_many_append_the_same_way() -> None:
    one, many = _leader(), _leader()
    placed = [one.propose({"n": 1}), one.propose({"n": 2})]
    assert many.propose_many([{"n": 1}, {"n": 2}]) == placed
    assert one.entries_from(placed[0][0], 2) == many.entries_from(placed[0][0], 2)
