"""MeshJobExecutor: what runs a job on the leader (an embedded task or a handler), in-process.

The session is a real LeaderSession of term 3 on a FakeReplica; jobs are added and acquired
through the fake log, so a handler dispatch commits its assignment as on a real leader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler import Job

import mesh
from mesh.dispatch import protocol as p
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.dispatch.registry import HandlerRegistry
from mesh.scheduling.controls import Controls, with_controls
from mesh.scheduling.executor import MeshJobExecutor, TaskUnavailable, remote_task
from mesh.scheduling.outcomes import JobTimedOut
from mesh.scheduling.session import LeaderSession
from mesh.scheduling.state import dump_job
from mesh.tasks import REGISTRY, JobContext
from tests.fakes import FakeBus, FakeHandler, FakeReplica, ManualClock

TERM = 3
TASK = "unit_executor_task"
WAIT = 5.0


@pytest.fixture
def contexts() -> Iterator[list[JobContext]]:
    """``TASK`` embedded: it records its job context and returns ``embedded:<value>``."""
    seen: list[JobContext] = []

    async def task(value: str) -> str:
        seen.append(mesh.job_context())
        return f"embedded:{value}"

    mesh.task(name=TASK)(task)
    try:
        yield seen
    finally:
        REGISTRY.pop(TASK, None)


@pytest.fixture
def replica() -> FakeReplica:
    replica = FakeReplica("n1")
    return replica


@pytest.fixture
async def session(replica: FakeReplica) -> LeaderSession:
    replica.become_leader(TERM)
    return LeaderSession(replica, replica.state_machine, TERM)


@pytest.fixture
def bus() -> FakeBus:
    return FakeBus()


@pytest.fixture
def dispatcher(replica: FakeReplica, bus: FakeBus) -> HandlerDispatcher:
    return HandlerDispatcher(
        replica, bus, replica, replica.state_machine, registry=HandlerRegistry(clock=ManualClock())
    )


async def acquired_job(
    replica: FakeReplica, session: LeaderSession, task: str = TASK, **fields: Any
) -> Job:
    job = Job(task_id=task, executor="mesh", args=("v",), **fields)
    await replica.propose({"op": "add_job", "job": dump_job(job)})
    await replica.propose(
        {
            "op": "acquire_jobs",
            "scheduler_id": session.identity,
            "ids": [str(job.id)],
            "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat(),
            "term": TERM,
        }
    )
    return job


async def run(executor: MeshJobExecutor, job: Job) -> Any:
    return await asyncio.wait_for(executor.run_job(remote_task, job), WAIT)


async def test_an_embedded_task_runs_on_the_leader_when_no_handler_offers_it(
    replica: FakeReplica,
    session: LeaderSession,
    dispatcher: HandlerDispatcher,
    bus: FakeBus,
    contexts: list[JobContext],
) -> None:
    job = await acquired_job(replica, session)
    assert await run(MeshJobExecutor(session, dispatcher=dispatcher), job) == "embedded:v"
    assert session.take_runner(job.id) == "embedded:n1"
    assert bus.sent == []


async def test_a_task_a_handler_offers_is_dispatched_under_the_session_even_if_embedded(
    replica: FakeReplica,
    session: LeaderSession,
    dispatcher: HandlerDispatcher,
    bus: FakeBus,
    contexts: list[JobContext],
) -> None:
    FakeHandler(bus, "h1", (TASK,)).hello()
    job = await acquired_job(replica, session)
    assert await run(MeshJobExecutor(session, dispatcher=dispatcher), job) == "v"
    assert session.take_runner(job.id) == "h1"
    assert contexts == []  # the embedded function did not run
    [dispatch] = bus.sent_of(p.DISPATCH)
    assert dispatch.payload["fencing_token"] == TERM
    [assign] = replica.commands("assign_job")
    assert assign["scheduler_id"] == session.identity == f"n1@{TERM}"


async def test_a_task_with_neither_an_embedded_function_nor_a_dispatcher_is_unavailable(
    replica: FakeReplica, session: LeaderSession
) -> None:
    job = await acquired_job(replica, session, task="nobody_offers_this")
    with pytest.raises(TaskUnavailable, match="nobody_offers_this"):
        await run(MeshJobExecutor(session), job)
    assert session.take_runner(job.id) is None


async def test_the_job_context_carries_the_sessions_term_and_the_idempotency_key(
    replica: FakeReplica, session: LeaderSession, contexts: list[JobContext]
) -> None:
    fire = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    job = await acquired_job(replica, session, schedule_id="nightly", scheduled_fire_time=fire)
    await run(MeshJobExecutor(session), job)
    [ctx] = contexts
    assert ctx.fencing_token == TERM
    assert ctx.idempotency_key == f"nightly@{fire.isoformat()}"
    assert (ctx.job_id, ctx.task, ctx.schedule_id, ctx.attempt) == (
        str(job.id),
        TASK,
        "nightly",
        1,
    )


@pytest.fixture
def stubborn() -> Iterator[asyncio.Event]:
    """``TASK`` embedded, catching its cancellation until the yielded event is set."""
    release = asyncio.Event()

    async def task(value: str) -> str:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue
        return value

    mesh.task(name=TASK)(task)
    try:
        yield release
    finally:
        release.set()
        REGISTRY.pop(TASK, None)


async def test_an_embedded_run_past_its_schedules_timeout_ends_as_timeout_at_the_deadline(
    replica: FakeReplica, session: LeaderSession, stubborn: asyncio.Event
) -> None:
    metadata = with_controls({}, Controls(timeout=0.1))
    job = await acquired_job(replica, session, schedule_id="s", metadata=metadata)
    with pytest.raises(JobTimedOut, match=r"0\.1s timeout"):
        await run(MeshJobExecutor(session), job)  # bounded: the task never ends by itself
    assert not stubborn.is_set()


async def test_an_embedded_run_within_its_timeout_returns_its_value(
    replica: FakeReplica, session: LeaderSession, contexts: list[JobContext]
) -> None:
    metadata = with_controls({}, Controls(timeout=30))
    job = await acquired_job(replica, session, schedule_id="s", metadata=metadata)
    assert await run(MeshJobExecutor(session), job) == "embedded:v"
