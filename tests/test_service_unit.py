"""SchedulingService on a FakeReplica: a real APScheduler AsyncScheduler, leader-only.

The service's scheduler runs on the ReplicatedDataStore of its LeaderSession, so every write it
makes goes through the fake log into a real SchedulerState. Embedded ``@mesh.task`` functions
are registered for a test and removed after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from apscheduler import RunState

from mesh.api.schema import parse_schedule_body
from mesh.config import GovernorConfig
from mesh.contracts import ProposalFailed
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.dispatch.governors import Backpressure, Governors
from mesh.scheduling.service import NotReady, SchedulingService
from mesh.scheduling.spec import ScheduleSpec
from tests.fakes import FakeBus, FakeReplica, embedded_tasks

WAIT = 5.0
TASK = "unit_service_echo"
BLOCKING = "unit_service_blocking"


@pytest.fixture
def embedded() -> Iterator[asyncio.Event]:
    """Two embedded tasks: ``TASK`` returns its argument, ``BLOCKING`` waits for the gate."""
    with embedded_tasks(TASK, BLOCKING) as gate:
        yield gate


@pytest.fixture
async def replica() -> FakeReplica:
    replica = FakeReplica("n1")
    replica.add_peer("n2", "tcp://127.0.0.1:7200", "127.0.0.1:8200")
    return replica


@pytest.fixture
async def service(replica: FakeReplica, embedded: asyncio.Event) -> Any:
    service = SchedulingService(replica, replica.state_machine)
    try:
        yield service
    finally:
        await close(service)


async def close(service: SchedulingService) -> None:
    # Bounded: a scheduler task that ignored its cancellation must fail the test, not hang it.
    async with asyncio.timeout(WAIT):
        await service.close()


def spec(schedule_id: str = "s1") -> ScheduleSpec:
    return parse_schedule_body(
        {"id": schedule_id, "task": TASK, "trigger": {"type": "interval", "hours": 1}}
    )


def proposed_ops(replica: FakeReplica) -> list[str]:
    return [c["op"] for c in replica.commands(event="proposed")]


# --------------------------------------------------------------------------- lifecycle


async def test_the_scheduler_starts_only_after_reset_leases_commits(
    replica: FakeReplica, service: SchedulingService
) -> None:
    replica.hold_commits()
    replica.become_leader(1)
    await replica.wait_for(lambda: proposed_ops(replica) == ["reset_leases"])
    with pytest.raises(TimeoutError):  # nothing else is proposed while it is uncommitted
        await replica.wait_for(lambda: len(proposed_ops(replica)) > 1, timeout=0.2)
    replica.release_commits()
    await service.wait_ready(WAIT)
    journal = [(what, e.data["op"]) for what, e in replica.journal if e.kind == "command"]
    first_scheduler_write = next(
        i for i, (what, op) in enumerate(journal) if what == "proposed" and op != "reset_leases"
    )
    assert journal.index(("applied", "reset_leases")) < first_scheduler_write
    assert replica.commands("reset_leases") == [{"op": "reset_leases", "term": 1}]
    assert service.scheduler is not None
    assert service.scheduler.identity == "n1@1"


async def test_stepping_down_stops_the_scheduler_and_later_requests_get_not_ready(
    replica: FakeReplica, service: SchedulingService
) -> None:
    replica.become_leader(1)
    scheduler = await service.wait_ready(WAIT)
    replica.step_down("n2", term=2)
    assert service.scheduler is None
    with pytest.raises(NotReady):
        await service.put_schedule(spec(), replace=False)
    async with asyncio.timeout(WAIT):
        await scheduler.wait_until_stopped()
    assert scheduler.state is RunState.stopped


async def test_a_scheduler_that_fails_is_restarted_in_the_same_term(
    replica: FakeReplica, service: SchedulingService
) -> None:
    replica.fail_next_proposals(ProposalFailed("injected"), op="add_task")
    replica.become_leader(1)
    await service.wait_ready(WAIT)
    assert replica.commands("reset_leases") == [{"op": "reset_leases", "term": 1}] * 2
    assert service.term == 1


async def test_a_scheduler_that_fails_while_handing_over_is_not_restarted(
    replica: FakeReplica, service: SchedulingService
) -> None:
    replica.set_handing_over(True)
    replica.fail_next_proposals(ProposalFailed("injected"), op="add_task")
    replica.become_leader(1)
    first = service._task
    assert first is not None
    await asyncio.wait_for(first, WAIT)  # ended by the failure
    assert service._task is first  # and no second one was started
    assert replica.commands("reset_leases") == [{"op": "reset_leases", "term": 1}]
    with pytest.raises(NotReady):
        await service.wait_ready(0.05)


# --------------------------------------------------------------------------- operations


async def test_writes_on_a_follower_raise_not_ready(
    replica: FakeReplica, service: SchedulingService
) -> None:
    replica.step_down("n2", term=1)
    with pytest.raises(NotReady, match="not the leader"):
        await service.put_schedule(spec(), replace=False)
    with pytest.raises(NotReady, match="not the leader"):
        await service.run_now(TASK, ("x",), {})
    assert replica.log == []


async def test_a_schedule_put_on_the_leader_is_committed_to_the_replicated_state(
    replica: FakeReplica, service: SchedulingService
) -> None:
    replica.become_leader(1)
    schedule = await service.put_schedule(spec("s1"), replace=False)
    assert schedule.id == "s1"
    assert replica.state_machine.schedules["s1"].task_id == TASK
    assert [c["schedule"]["id"] for c in replica.commands("add_schedule")] == ["s1"]


async def test_a_job_run_now_runs_the_embedded_task_and_its_execution_names_the_node(
    replica: FakeReplica, service: SchedulingService
) -> None:
    replica.become_leader(1)
    job_id = await service.run_now(TASK, ("hello",), {})
    state = replica.state_machine
    await replica.wait_for(lambda: bool(state.execution_history(None, 1)))
    [execution] = state.execution_history(None, 1)
    assert (execution["job_id"], execution["outcome"]) == (str(job_id), "success")
    assert execution["handler_id"] == "embedded:n1"
    assert state.results[job_id].return_value == "hello"


async def test_run_now_raises_backpressure_when_the_dispatcher_says_the_queue_is_full(
    replica: FakeReplica, embedded: asyncio.Event
) -> None:
    state = replica.state_machine
    dispatcher = HandlerDispatcher(
        replica, FakeBus(), replica, state, governors=Governors(GovernorConfig(max_queued_jobs=1))
    )
    service = SchedulingService(replica, state, dispatcher=dispatcher)
    try:
        replica.become_leader(1)
        await service.run_now(BLOCKING, (), {})  # stays queued: its task waits for the gate
        with pytest.raises(Backpressure):
            await service.run_now(TASK, ("x",), {})
        assert len(state.jobs) == 1
    finally:
        embedded.set()
        await close(service)
