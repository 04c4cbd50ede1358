"""Quiet heartbeats: an idle leader asks each follower for one answer per CheckQuorum round
instead of one per heartbeat, without giving up anything an answer would have told it.

The rule (docs/consensus.md, "Heartbeats and answers"): a heartbeat is ``quiet`` when the
follower is known to match up to its ``prev_log_index`` and has answered since the last
CheckQuorum round; a follower stays silent only on a quiet heartbeat that matches its log and
tells nothing new. Silence can only slow the leader's progress, never make it unsafe; these tests
pin down that it slows nothing either.
"""

from __future__ import annotations

import random
from collections import Counter

import msgspec
import pytest

from mesh.consensus.core import RaftCore, RaftSettings
from mesh.consensus.messages import (
    CONFIG,
    AppendEntries,
    AppendResponse,
    Entry,
    HardState,
    Message,
)
from mesh.consensus.sim import NetworkFaults, SimCluster

VOTERS = ["a", "b", "c"]


def _follower(entries: int = 3, commit: int = 0) -> RaftCore:
    """Follower "b" of leader "a" in term 2, holding ``entries`` entries of term 2."""
    log = [Entry(term=1, index=1, kind=CONFIG, data={"voters": VOTERS})]
    log += [Entry(term=2, index=i, data={"n": i}) for i in range(2, entries + 1)]
    core = RaftCore(
        "b",
        rng=random.Random(1),
        hard_state=HardState(term=2, commit=commit),
        entries=log,
    )
    _drain(core)
    return core


def _drain(core: RaftCore) -> list[Message]:
    sent: list[Message] = []
    while core.has_ready():
        rd = core.ready()
        sent += rd.messages
        core.advance(rd)
    return sent


def _heartbeat(prev: int, *, quiet: bool, prev_term: int = 2, commit: int = 3) -> AppendEntries:
    return AppendEntries(
        src="a",
        dst="b",
        term=2,
        prev_log_index=prev,
        prev_log_term=prev_term,
        leader_commit=commit,
        quiet=quiet,
    )


def _appends_and_answers(c: SimCluster, ticks: int) -> tuple[Counter[str], list[tuple[int, str]]]:
    """Run ``ticks`` ticks; AppendEntries sent per destination, and (tick, sender) of every
    AppendResponse sent."""
    appends: Counter[str] = Counter()
    answers: list[tuple[int, str]] = []
    enqueue = c._enqueue

    def spy(msg: Message) -> None:
        if isinstance(msg, AppendEntries):
            appends[msg.dst] += 1
        elif isinstance(msg, AppendResponse):
            answers.append((c.now, msg.src))
        enqueue(msg)

    c._enqueue = spy  # type: ignore[method-assign]
    c.run(ticks)
    return appends, answers


def _elect(c: SimCluster):
    assert c.wait_for(lambda: c.stable_leader() is not None, 600)
    return c.stable_leader()


def test_a_follower_stays_silent_on_a_quiet_heartbeat_that_matches_its_log() -> None:
    core = _follower()
    core.step(_heartbeat(3, quiet=True))
    assert _drain(core) == []
    assert core.commit == 3 and core.leader_id == "a"  # it still learns the commit index


def test_a_follower_answers_a_heartbeat_that_is_not_quiet() -> None:
    core = _follower()
    core.step(_heartbeat(3, quiet=False))
    (answer,) = _drain(core)
    assert isinstance(answer, AppendResponse) and answer.success and answer.match_index == 3


def test_a_quiet_heartbeat_that_does_not_match_the_log_is_still_rejected() -> None:
    # A leader that believes the follower holds more than it does: silence would stall it.
    core = _follower(entries=3)
    core.step(_heartbeat(5, quiet=True))
    (answer,) = _drain(core)
    assert isinstance(answer, AppendResponse) and not answer.success


def test_a_quiet_heartbeat_with_a_conflicting_term_is_still_rejected() -> None:
    core = _follower(entries=3)
    core.step(_heartbeat(3, quiet=True, prev_term=1))
    (answer,) = _drain(core)
    assert isinstance(answer, AppendResponse) and not answer.success


def test_a_quiet_heartbeat_is_answered_when_the_follower_matches_further_than_it_says() -> None:
    # The follower's commit index is past the heartbeat's prev: its answer is news.
    core = _follower(entries=4, commit=4)
    core.step(_heartbeat(2, quiet=True, commit=4))
    (answer,) = _drain(core)
    assert isinstance(answer, AppendResponse) and answer.success and answer.match_index == 4


def test_a_quiet_heartbeat_from_a_stale_leader_is_answered_with_the_newer_term() -> None:
    core = _follower()
    core.step(_heartbeat(3, quiet=True))
    _drain(core)
    stale = msgspec.structs.replace(_heartbeat(3, quiet=True), term=1)
    core.step(stale)
    (answer,) = _drain(core)
    assert isinstance(answer, AppendResponse) and answer.term == 2 and not answer.success


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_a_quiet_flag_that_is_not_a_boolean_is_refused_off_the_wire(value: object) -> None:
    wire = _heartbeat(3, quiet=True).to_dict() | {"quiet": value}
    with pytest.raises(msgspec.ValidationError):
        Message.from_dict(wire)


def test_a_heartbeat_without_the_quiet_flag_is_answered_as_from_an_older_leader() -> None:
    wire = _heartbeat(3, quiet=True).to_dict()
    del wire["quiet"]
    core = _follower()
    core.step(Message.from_dict(wire))
    (answer,) = _drain(core)
    assert isinstance(answer, AppendResponse) and answer.success


def _prompt_cluster(seed: int) -> SimCluster:
    """A round trip shorter than a heartbeat interval, as on a real network (~1 ms vs 100 ms)."""
    settings = RaftSettings(heartbeat_ticks=3, election_ticks_min=12, election_ticks_max=24)
    return SimCluster(VOTERS, seed, settings=settings, faults=NetworkFaults(max_delay=1))


def test_an_idle_leader_gets_one_answer_per_follower_per_check_quorum_round() -> None:
    c = _prompt_cluster(seed=11)
    ld = _elect(c)
    c.run(3 * c.settings.election_ticks_min)  # settle the first rounds after the election
    term = ld.core.term
    rounds = 20
    appends, answers = _appends_and_answers(c, rounds * c.settings.election_ticks_min)
    per_follower = Counter(src for _, src in answers)
    for follower in (n for n in VOTERS if n != ld.id):
        assert rounds <= per_follower[follower] <= rounds + 1
        assert appends[follower] >= 4 * rounds  # heartbeats still every heartbeat_ticks
    assert ld.core.is_leader and ld.core.term == term


def test_the_leader_asks_again_until_a_follower_answers_in_the_round() -> None:
    # Every answer is lost: after the round in which the last one arrived, each heartbeat must
    # ask for one.
    c = _prompt_cluster(seed=12)
    ld = _elect(c)
    follower = next(n for n in VOTERS if n != ld.id)
    c.run(3 * c.settings.election_ticks_min)
    c.cut(follower, ld.id)
    c.run(c.settings.election_ticks_min)
    quiet: list[bool] = []
    enqueue = c._enqueue

    def spy(msg: Message) -> None:
        if isinstance(msg, AppendEntries) and msg.dst == follower:
            quiet.append(msg.quiet)
        enqueue(msg)

    c._enqueue = spy  # type: ignore[method-assign]
    c.run(3 * c.settings.election_ticks_min)
    assert len(quiet) >= 9 and not any(quiet)
    assert ld.core.is_leader  # the other follower still answers: a quorum


def test_a_leader_whose_followers_all_fall_silent_steps_down_within_two_rounds() -> None:
    c = SimCluster(VOTERS, seed=13)
    ld = _elect(c)
    c.run(3 * c.settings.election_ticks_min)
    for follower in (n for n in VOTERS if n != ld.id):
        c.cut(follower, ld.id)  # heartbeats still arrive: the followers keep following
    c.run(2 * c.settings.election_ticks_min + 1)
    assert not ld.core.is_leader


def test_quiet_heartbeats_keep_a_lossy_cluster_committing_everything() -> None:
    settings = RaftSettings(heartbeat_ticks=2, election_ticks_min=10, election_ticks_max=20)
    c = SimCluster(VOTERS, seed=14, settings=settings, faults=NetworkFaults(drop=0.2, max_delay=3))
    _elect(c)
    for i in range(40):
        c.propose({"w": i})
        c.run(5)
    c.heal()
    c.faults = NetworkFaults()
    c.run(200)
    ld = _elect(c)
    assert all(n.core.commit == ld.core.commit for n in c.nodes.values())
    assert all(n.applied_index == ld.core.commit for n in c.nodes.values())
