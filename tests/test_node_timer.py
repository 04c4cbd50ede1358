"""The node's Raft timer wakes at the core's due tick only, and hands the core the ticks it
slept through before anything else (docs/consensus.md, "Timings"). Driven by a manual clock on
a node that is built but not started (no timer of its own, no sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.app import build_node
from mesh.config import load_config
from mesh.node import TICK_SECONDS, MeshNode
from tests.netutil import free_mesh_address, free_port_pair


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def follower(tmp_path: Path) -> Iterator[tuple[MeshNode, ManualClock]]:
    """Voter "a" of a, b, c, a follower that has heard from no leader."""
    config = load_config(
        {
            "node_id": "a",
            "data_dir": str(tmp_path),
            "mesh": free_mesh_address(),
            "http": f"127.0.0.1:{free_port_pair()}",
        },
        None,
        {},
    )
    clock = ManualClock()
    node = build_node(config, clock=clock)
    node.core.bootstrap(["a", "b", "c"])
    yield node, clock
    node.store.close()


def test_the_ticks_slept_through_are_handed_over_up_to_the_due_one(follower) -> None:
    node, clock = follower
    due = node.core.ticks_until_due()
    clock.now += (due - 1) * TICK_SECONDS
    node._catch_up()
    assert node.core.role == "follower" and node.core.ticks_until_due() == 1
    clock.now += TICK_SECONDS
    node._catch_up()
    assert node.core.role == "precandidate"  # the election timeout ran out: it campaigns


def test_a_timer_firing_a_little_early_still_counts_its_tick(follower) -> None:
    node, clock = follower
    due = node.core.ticks_until_due()
    clock.now += due * TICK_SECONDS - 0.001  # the loop's clock is coarser than ours
    node._catch_up()
    assert node.core.role == "precandidate"


def test_a_stall_past_the_due_tick_counts_as_one_tick(follower) -> None:
    # A SIGSTOP'd follower must not campaign on waking before it reads its leader's
    # heartbeats, queued meanwhile.
    node, clock = follower
    due = node.core.ticks_until_due()
    clock.now += (due + 20) * TICK_SECONDS
    node._catch_up()
    assert node.core.role == "follower" and node.core.ticks_until_due() == due - 1


def test_a_timer_that_ran_late_is_counted_and_logged_once_per_interval(
    follower, caplog: pytest.LogCaptureFixture
) -> None:
    """An overloaded loop delays heartbeats and election timeouts alike: the node says so."""
    node, clock = follower
    for late in (0.05, 0.5, 0.3):  # only the two past STALL_WARN_SECONDS count; one line
        node._timer_at = clock.now
        clock.now += late
        node._on_timer()
        node._disarm_timer()
    assert node.transport.counters["loop_stalls"] == 2
    stalls = [r for r in caplog.records if "ran 500 ms late" in r.getMessage()]
    assert len(stalls) == 1 and "ran 300 ms late" not in caplog.text
