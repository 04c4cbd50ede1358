"""The test doubles of tests/fakes.py keep to the contracts they stand in for."""

from __future__ import annotations

import asyncio

import pytest

from mesh.contracts import Directory, MessageBus, NodeView, NoLeader, ProposalFailed, Replica
from tests.fakes import FakeBus, FakeReplica


def test_the_fake_replica_implements_replica_node_view_and_directory() -> None:
    replica = FakeReplica()
    assert isinstance(replica, Replica)
    assert isinstance(replica, NodeView)
    assert isinstance(replica, Directory)


def test_the_fake_bus_implements_message_bus() -> None:
    assert isinstance(FakeBus(), MessageBus)


async def test_pipelined_proposals_apply_in_order_in_a_later_loop_iteration() -> None:
    replica = FakeReplica()
    replica.become_leader(1)
    first = replica.propose_nowait({"op": "reset_leases", "term": 1})
    second = replica.propose_nowait({"op": "expire_results", "now": "2024-01-01T00:00:00+00:00"})
    assert not first.done()  # not applied in the iteration that proposed it
    assert await second == 0
    assert first.done()
    assert [c["op"] for c in replica.commands()] == ["reset_leases", "expire_results"]
    assert replica.commit_index == 3  # the term's no-op, then the two commands


async def test_a_follower_refuses_proposals_and_a_step_down_fails_pending_ones() -> None:
    replica = FakeReplica()
    with pytest.raises(NoLeader):
        replica.propose_nowait({"op": "reset_leases", "term": 0})
    replica.become_leader(1)
    replica.hold_commits()
    pending = replica.propose_nowait({"op": "reset_leases", "term": 1})
    replica.step_down("n2")
    with pytest.raises(ProposalFailed):
        await asyncio.wait_for(pending, 1.0)
    assert replica.commands("reset_leases") == []
