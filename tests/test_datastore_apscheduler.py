"""ReplicatedDataStore: APScheduler's data-store contract, on a real single-node mesh.

Every store runs on a real ``MeshNode`` (ZeroMQ on 127.0.0.1, SQLite log) that elected itself
leader, so every mutation goes propose → commit → apply. The store's clock is a ``FakeClock``.

The first group is ported from APScheduler's own tests/test_datastores.py at tag 4.0.0a6
(github.com/agronholm/apscheduler). Where our design differs, the case is adapted and says how:

- A lease never expires by wall-clock time. It ends when its holder releases it, or when a new
  leader commits ``reset_leases`` (every lease belongs to a term; see mesh/scheduling/state.py).
  The upstream "lock timeout" and "extend lease" cases therefore check that time alone frees
  nothing and that ``reset_leases`` does.
- A job result stays readable until it expires (every node answers job-status queries from its
  replica, and a read must not write), instead of being removed by the first ``get_job_result``.
  ``cleanup`` drops it once expired.
- A job's exception crosses the log as its type name and message: it comes back as
  ``RemoteJobError``.

The second group covers what the replication adds: replayed fires are no-ops, ``reset_leases``
re-runs jobs as a second attempt, stale releases change nothing, APScheduler only ever gets
copies, and a snapshot restores the whole state.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from logging import Logger
from pathlib import Path

import anyio
import attrs
import pytest
from anyio import CancelScope
from apscheduler import (
    CoalescePolicy,
    ConflictingIdError,
    ConflictPolicy,
    Event,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    Schedule,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleUpdated,
    Task,
    TaskAdded,
    TaskLookupError,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler._structures import ScheduleResult
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.node import MeshNode
from mesh.scheduling.state import (
    RemoteJobError,
    SchedulerState,
    dump_job,
    dump_result,
    dump_schedule,
    dump_task,
    to_wire,
)
from mesh.scheduling.store import ACQUIRE_BATCH, ReplicatedDataStore
from tests.scheduling_fixtures import FakeClock, solo_leader, started_store

DELIVERY_TIMEOUT = 3.0

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def logger() -> Logger:
    return logging.getLogger("apscheduler")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state() -> SchedulerState:
    return SchedulerState()


@pytest.fixture
async def node(tmp_path: Path, state: SchedulerState) -> AsyncIterator[MeshNode]:
    async with solo_leader(tmp_path, state) as node:
        yield node


@pytest.fixture(params=["sequential", "pipelined"])
async def datastore(
    request: pytest.FixtureRequest,
    node: MeshNode,
    state: SchedulerState,
    logger: Logger,
    clock: FakeClock,
) -> AsyncIterator[ReplicatedDataStore]:
    # "pipelined" is how the leader runs it: add_job does not wait, per-job commands batch.
    pipelined = request.param == "pipelined"
    async with started_store(node, state, logger, clock, pipelined=pipelined) as store:
        yield store


@pytest.fixture
def schedules() -> list[Schedule]:
    trigger = DateTrigger(datetime(2020, 9, 13, tzinfo=UTC))
    schedule1 = Schedule(id="s1", task_id="task1", job_executor="async", trigger=trigger)
    schedule1.next_fire_time = trigger.next()

    trigger = DateTrigger(datetime(2020, 9, 14, tzinfo=UTC))
    schedule2 = Schedule(id="s2", task_id="task2", job_executor="async", trigger=trigger)
    schedule2.next_fire_time = trigger.next()

    trigger = DateTrigger(datetime(2020, 9, 15, tzinfo=UTC))
    schedule3 = Schedule(id="s3", task_id="task1", job_executor="async", trigger=trigger)
    schedule3.next_fire_time = trigger.next()

    return [schedule1, schedule2, schedule3]


@asynccontextmanager
async def captured_events(
    datastore: ReplicatedDataStore, event_types: set[type[Event]]
) -> AsyncGenerator[list[Event], None]:
    """Every event of ``event_types`` published in the block, and nothing more.

    On exit a fence event is published and awaited; the broker delivers in publishing order, so
    everything the block published has been delivered by then.
    """
    events: list[Event] = []
    fence = TaskAdded(task_id=f"fence-{uuid.uuid4()}")
    fenced = anyio.Event()

    def listener(event: Event) -> None:
        if event == fence:
            fenced.set()
        elif type(event) in event_types:
            events.append(event)

    subscription = datastore._event_broker.subscribe(listener)
    try:
        yield events
        await datastore._event_broker.publish(fence)
        with anyio.fail_after(DELIVERY_TIMEOUT):
            await fenced.wait()
    finally:
        subscription.unsubscribe()


async def reset_leases(node: MeshNode) -> None:
    """What a new leader commits before it schedules anything."""
    await node.propose({"op": "reset_leases", "term": node.core.term})


async def add_task1(datastore: ReplicatedDataStore, **kwargs: object) -> None:
    await datastore.add_task(
        Task(id="task1", func="contextlib:asynccontextmanager", job_executor="async", **kwargs)
    )


# ---------------------------------------------------------------------------- ported: tasks


async def test_add_replace_task(datastore: ReplicatedDataStore) -> None:
    async with captured_events(datastore, {TaskAdded, TaskUpdated}) as events:
        await datastore.add_task(Task(id="test_task", func="builtins:print", job_executor="async"))
        await datastore.add_task(Task(id="test_task2", func="math:ceil", job_executor="async"))
        await datastore.add_task(Task(id="test_task", func="builtins:repr", job_executor="async"))

        tasks = await datastore.get_tasks()
        assert len(tasks) == 2
        assert tasks[0].id == "test_task"
        assert tasks[0].func == "builtins:repr"
        assert tasks[1].id == "test_task2"
        assert tasks[1].func == "math:ceil"

    assert [(type(e), e.task_id) for e in events] == [
        (TaskAdded, "test_task"),
        (TaskAdded, "test_task2"),
        (TaskUpdated, "test_task"),
    ]


async def test_add_get_task(datastore: ReplicatedDataStore) -> None:
    with pytest.raises(TaskLookupError):
        await datastore.get_task("dummyid")

    await datastore.add_task(
        Task(id="dummyid", func="contextlib:asynccontextmanager", job_executor="async")
    )
    task = await datastore.get_task("dummyid")
    assert task.id == "dummyid"
    assert task.func == "contextlib:asynccontextmanager"


# ---------------------------------------------------------------------------- ported: schedules


async def test_add_schedules(datastore: ReplicatedDataStore, schedules: list[Schedule]) -> None:
    async with captured_events(datastore, {ScheduleAdded}) as events:
        for schedule in schedules:
            await datastore.add_schedule(schedule, ConflictPolicy.exception)

        assert await datastore.get_schedules() == schedules
        assert await datastore.get_schedules({"s1", "s2", "s3"}) == schedules
        assert await datastore.get_schedules({"s1"}) == [schedules[0]]
        assert await datastore.get_schedules({"s2"}) == [schedules[1]]
        assert await datastore.get_schedules({"s3"}) == [schedules[2]]

    assert len(events) == 3
    for event, schedule in zip(events, schedules, strict=True):
        assert isinstance(event, ScheduleAdded)
        assert event.schedule_id == schedule.id
        assert event.task_id == schedule.task_id
        assert event.next_fire_time == schedule.next_fire_time


async def test_replace_schedules(datastore: ReplicatedDataStore, schedules: list[Schedule]) -> None:
    async with captured_events(datastore, {ScheduleUpdated}) as events:
        for schedule in schedules:
            await datastore.add_schedule(schedule, ConflictPolicy.exception)

        trigger = DateTrigger(datetime(2020, 9, 16, tzinfo=UTC))
        next_fire_time = trigger.next()
        schedule = Schedule(
            id="s3",
            task_id="foo",
            trigger=trigger,
            args=(),
            kwargs={},
            job_executor="async",
            coalesce=CoalescePolicy.earliest,
            misfire_grace_time=None,
        )
        schedule.next_fire_time = next_fire_time
        await datastore.add_schedule(schedule, ConflictPolicy.replace)

        schedules = await datastore.get_schedules({schedule.id})
        assert schedules[0].task_id == "foo"
        assert schedules[0].next_fire_time == next_fire_time
        assert schedules[0].args == ()
        assert schedules[0].kwargs == {}
        assert schedules[0].coalesce is CoalescePolicy.earliest
        assert schedules[0].misfire_grace_time is None

    assert len(events) == 1
    received_event = events[0]
    assert isinstance(received_event, ScheduleUpdated)
    assert received_event.schedule_id == "s3"
    assert received_event.task_id == "foo"
    assert received_event.next_fire_time == datetime(2020, 9, 16, tzinfo=UTC)


async def test_remove_schedules(datastore: ReplicatedDataStore, schedules: list[Schedule]) -> None:
    async with captured_events(datastore, {ScheduleRemoved}) as events:
        for schedule in schedules:
            await datastore.add_schedule(schedule, ConflictPolicy.exception)

        await datastore.remove_schedules(["s1", "s2"])
        assert await datastore.get_schedules() == [schedules[2]]

    assert [(type(e), e.schedule_id) for e in events] == [
        (ScheduleRemoved, "s1"),
        (ScheduleRemoved, "s2"),
    ]


async def test_acquire_release_schedules(
    datastore: ReplicatedDataStore, schedules: list[Schedule], clock: FakeClock
) -> None:
    clock.move_to(datetime(2020, 9, 14, tzinfo=UTC))

    async with captured_events(datastore, {ScheduleRemoved, ScheduleUpdated}) as events:
        for schedule in schedules:
            await datastore.add_schedule(schedule, ConflictPolicy.exception)

        # The first scheduler gets the first due schedule
        schedules1 = await datastore.acquire_schedules("dummy-id1", timedelta(seconds=30), 1)
        assert len(schedules1) == 1
        assert schedules1[0].id == "s1"

        # The second scheduler gets the second due schedule
        schedules2 = await datastore.acquire_schedules("dummy-id2", timedelta(seconds=30), 1)
        assert len(schedules2) == 1
        assert schedules2[0].id == "s2"

        # The third scheduler gets nothing
        schedules3 = await datastore.acquire_schedules("dummy-id3", timedelta(seconds=30), 1)
        assert not schedules3

        results1 = [
            ScheduleResult(
                schedule_id=schedules1[0].id,
                task_id=schedules1[0].task_id,
                trigger=schedules1[0].trigger,
                last_fire_time=datetime(2020, 9, 14, tzinfo=UTC),
                next_fire_time=None,
            )
        ]
        results2 = [
            ScheduleResult(
                schedule_id=schedules2[0].id,
                task_id=schedules2[0].task_id,
                trigger=schedules1[0].trigger,
                last_fire_time=datetime(2020, 9, 14, tzinfo=UTC),
                next_fire_time=datetime(2020, 9, 15, tzinfo=UTC),
            )
        ]

        # Release all the schedules
        await datastore.release_schedules("dummy-id1", results1)
        await datastore.release_schedules("dummy-id2", results2)

        # Check that the first schedule has its next fire time nullified
        schedules = await datastore.get_schedules()
        assert len(schedules) == 3
        schedules.sort(key=lambda s: s.id)
        assert schedules[0].id == "s1"
        assert schedules[0].last_fire_time == datetime(2020, 9, 14, tzinfo=UTC)
        assert schedules[0].next_fire_time is None
        assert schedules[1].id == "s2"
        assert schedules[1].last_fire_time == datetime(2020, 9, 14, tzinfo=UTC)
        assert schedules[1].next_fire_time == datetime(2020, 9, 15, tzinfo=UTC)
        assert schedules[2].id == "s3"
        assert schedules[2].last_fire_time is None
        assert schedules[2].next_fire_time == datetime(2020, 9, 15, tzinfo=UTC)

    assert [(type(e), e.schedule_id, e.next_fire_time) for e in events] == [
        (ScheduleUpdated, "s1", None),
        (ScheduleUpdated, "s2", datetime(2020, 9, 15, tzinfo=UTC)),
    ]


async def test_release_schedule_two_identical_fire_times(datastore: ReplicatedDataStore) -> None:
    """Regression test for APScheduler #616."""
    for i in range(1, 3):
        trigger = DateTrigger(datetime(2020, 9, 13, tzinfo=UTC))
        schedule = Schedule(id=f"s{i}", task_id="task1", job_executor="async", trigger=trigger)
        schedule.next_fire_time = trigger.next()
        await datastore.add_schedule(schedule, ConflictPolicy.exception)

    schedules = await datastore.acquire_schedules("foo", timedelta(seconds=30), 3)
    results = [
        ScheduleResult(
            schedule_id=schedules[0].id,
            task_id=schedules[0].task_id,
            trigger=schedules[0].trigger,
            last_fire_time=datetime(2020, 9, 10, tzinfo=UTC),
            next_fire_time=None,
        ),
    ]
    await datastore.release_schedules("foo", results)

    remaining = await datastore.get_schedules({s.id for s in schedules})
    assert len(remaining) == 2
    remaining.sort(key=lambda s: s.id)
    assert remaining[0].id == schedules[0].id
    assert remaining[0].next_fire_time is None
    assert remaining[1].id == schedules[1].id
    assert remaining[1].next_fire_time


async def test_release_two_schedules_at_once(datastore: ReplicatedDataStore) -> None:
    """Regression test for APScheduler #621."""
    for i in range(2):
        trigger = DateTrigger(datetime(2020, 9, 13, tzinfo=UTC))
        schedule = Schedule(id=f"s{i}", task_id="task1", job_executor="async", trigger=trigger)
        schedule.next_fire_time = trigger.next()
        await datastore.add_schedule(schedule, ConflictPolicy.exception)

    schedules = await datastore.acquire_schedules("foo", timedelta(seconds=30), 3)
    results = [
        ScheduleResult(
            schedule_id=schedules[0].id,
            task_id=schedules[0].task_id,
            trigger=schedules[0].trigger,
            last_fire_time=datetime(2020, 9, 10, tzinfo=UTC),
            next_fire_time=None,
        ),
    ]
    await datastore.release_schedules("foo", results)

    remaining = await datastore.get_schedules({s.id for s in schedules})
    assert len(remaining) == 2


async def test_acquire_schedules_lease_ends_at_reset_leases_not_by_time(
    datastore: ReplicatedDataStore, node: MeshNode, schedules: list[Schedule], clock: FakeClock
) -> None:
    """Adapted from upstream ``test_acquire_schedules_lock_timeout``.

    Upstream, another scheduler may take a schedule once its lease has expired by the clock.
    Here the lease outlives any amount of time and ends when a new leader resets leases.
    """
    await datastore.add_schedule(schedules[0], ConflictPolicy.exception)

    acquired1 = await datastore.acquire_schedules("dummy-id1", timedelta(seconds=30), 1)
    assert [s.id for s in acquired1] == ["s1"]

    clock.shift(30)
    assert not await datastore.acquire_schedules("dummy-id2", timedelta(seconds=30), 1)
    clock.shift(3600)
    assert not await datastore.acquire_schedules("dummy-id2", timedelta(seconds=30), 1)

    await reset_leases(node)
    acquired3 = await datastore.acquire_schedules("dummy-id2", timedelta(seconds=30), 1)
    assert [s.id for s in acquired3] == ["s1"]
    assert acquired3[0].acquired_by == "dummy-id2"


async def test_next_schedule_run_time(
    datastore: ReplicatedDataStore, schedules: list[Schedule]
) -> None:
    assert await datastore.get_next_schedule_run_time() is None

    for schedule in schedules:
        await datastore.add_schedule(schedule, ConflictPolicy.exception)

    assert await datastore.get_next_schedule_run_time() == datetime(2020, 9, 13, tzinfo=UTC)


async def test_extend_acquired_schedule_leases(
    datastore: ReplicatedDataStore,
    state: SchedulerState,
    clock: FakeClock,
    schedules: list[Schedule],
) -> None:
    """Adapted from upstream: the extension moves ``acquired_until``; time frees nothing.

    Upstream, the schedule becomes available 30 s after the extension; here a lease is not
    ended by time at all (see ``test_acquire_schedules_lease_ends_at_reset_leases_not_by_time``).
    """
    clock.move_to(datetime(2020, 9, 14, tzinfo=UTC))
    await datastore.add_schedule(schedules[0], ConflictPolicy.exception)

    acquired = await datastore.acquire_schedules("scheduler_id", timedelta(seconds=30), 1)
    assert len(acquired) == 1
    assert state.schedules["s1"].acquired_until == datetime(2020, 9, 14, 0, 0, 30, tzinfo=UTC)

    clock.shift(20)
    await datastore.extend_acquired_schedule_leases(
        "scheduler_id", {acquired[0].id}, timedelta(seconds=30)
    )
    assert state.schedules["s1"].acquired_until == datetime(2020, 9, 14, 0, 0, 50, tzinfo=UTC)

    # Another scheduler's extension does not touch a lease it does not hold.
    await datastore.extend_acquired_schedule_leases(
        "scheduler2_id", {acquired[0].id}, timedelta(hours=1)
    )
    assert state.schedules["s1"].acquired_until == datetime(2020, 9, 14, 0, 0, 50, tzinfo=UTC)

    assert not await datastore.acquire_schedules("scheduler2_id", timedelta(seconds=30), 1)
    clock.shift(40)  # beyond the extended lease
    assert not await datastore.acquire_schedules("scheduler2_id", timedelta(seconds=30), 1)
    assert state.schedules["s1"].acquired_by == "scheduler_id"


# ---------------------------------------------------------------------------- ported: jobs


async def test_acquire_multiple_workers(datastore: ReplicatedDataStore) -> None:
    await add_task1(datastore)
    jobs = [Job(task_id="task1", executor="async") for _ in range(2)]
    for job in jobs:
        await datastore.add_job(job)

    # The first worker gets the first job in the queue
    jobs1 = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 1)
    assert len(jobs1) == 1
    assert jobs1[0].id == jobs[0].id

    # The second worker gets the second job
    jobs2 = await datastore.acquire_jobs("worker2", timedelta(seconds=30), 1)
    assert len(jobs2) == 1
    assert jobs2[0].id == jobs[1].id

    # The third worker gets nothing
    assert not await datastore.acquire_jobs("worker3", timedelta(seconds=30), 1)


async def assert_result_kept_until_expiry(
    datastore: ReplicatedDataStore, clock: FakeClock, job_id: uuid.UUID
) -> None:
    """Adapted tail of upstream's release cases ("check that the job and its result are gone").

    The job is gone at once; the result stays readable (reading twice is fine) until it expires,
    then ``cleanup`` drops it.
    """
    assert not await datastore.get_jobs({job_id})
    assert await datastore.get_job_result(job_id)
    assert await datastore.get_job_result(job_id)
    clock.shift(120)  # the results below expire a minute after they were recorded
    await datastore.cleanup()
    assert not await datastore.get_job_result(job_id)


async def test_job_release_success(datastore: ReplicatedDataStore, clock: FakeClock) -> None:
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(minutes=1))
    await datastore.add_job(job)

    acquired = await datastore.acquire_jobs("worker_id", timedelta(seconds=30), 2)
    assert len(acquired) == 1
    assert acquired[0].id == job.id

    await datastore.release_job(
        "worker_id",
        acquired[0],
        JobResult.from_job(acquired[0], JobOutcome.success, return_value="foo"),
    )
    result = await datastore.get_job_result(acquired[0].id)
    assert result
    assert result.outcome is JobOutcome.success
    assert result.exception is None
    assert result.return_value == "foo"

    await assert_result_kept_until_expiry(datastore, clock, acquired[0].id)


async def test_job_release_failure(datastore: ReplicatedDataStore, clock: FakeClock) -> None:
    """Adapted: the exception comes back as ``RemoteJobError`` with its type name and message."""
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(minutes=1))
    await datastore.add_job(job)

    acquired = await datastore.acquire_jobs("worker_id", timedelta(seconds=30), 2)
    assert len(acquired) == 1
    assert acquired[0].id == job.id

    await datastore.release_job(
        "worker_id",
        acquired[0],
        JobResult.from_job(acquired[0], JobOutcome.error, exception=ValueError("foo")),
    )
    result = await datastore.get_job_result(acquired[0].id)
    assert result
    assert result.outcome is JobOutcome.error
    assert isinstance(result.exception, RemoteJobError)
    assert (result.exception.type_name, result.exception.message) == ("ValueError", "foo")
    assert result.return_value is None

    await assert_result_kept_until_expiry(datastore, clock, acquired[0].id)


async def test_job_release_missed_deadline(
    datastore: ReplicatedDataStore, clock: FakeClock
) -> None:
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(minutes=1))
    await datastore.add_job(job)

    acquired = await datastore.acquire_jobs("worker_id", timedelta(seconds=30), 2)
    assert len(acquired) == 1
    assert acquired[0].id == job.id

    await datastore.release_job(
        "worker_id",
        acquired[0],
        JobResult.from_job(acquired[0], JobOutcome.missed_start_deadline),
    )
    result = await datastore.get_job_result(acquired[0].id)
    assert result
    assert result.outcome is JobOutcome.missed_start_deadline
    assert result.exception is None
    assert result.return_value is None

    await assert_result_kept_until_expiry(datastore, clock, acquired[0].id)


async def test_job_release_cancelled(datastore: ReplicatedDataStore, clock: FakeClock) -> None:
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(minutes=1))
    await datastore.add_job(job)

    acquired = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 2)
    assert len(acquired) == 1
    assert acquired[0].id == job.id

    await datastore.release_job(
        "worker1", acquired[0], JobResult.from_job(acquired[0], JobOutcome.cancelled)
    )
    result = await datastore.get_job_result(acquired[0].id)
    assert result
    assert result.outcome is JobOutcome.cancelled
    assert result.exception is None
    assert result.return_value is None

    await assert_result_kept_until_expiry(datastore, clock, acquired[0].id)


async def test_acquire_jobs_lease_ends_at_reset_leases_not_by_time(
    datastore: ReplicatedDataStore, node: MeshNode, clock: FakeClock
) -> None:
    """Adapted from upstream ``test_acquire_jobs_lock_timeout``.

    Upstream, another worker may take a job once its lease has expired by the clock. Here the
    lease outlives any amount of time and ends when a new leader resets leases.
    """
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(minutes=1))
    await datastore.add_job(job)

    acquired = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 1)
    assert [j.id for j in acquired] == [job.id]

    clock.shift(30)
    assert not await datastore.acquire_jobs("worker2", timedelta(seconds=30), 1)
    clock.shift(3600)
    assert not await datastore.acquire_jobs("worker2", timedelta(seconds=30), 1)

    await reset_leases(node)
    acquired = await datastore.acquire_jobs("worker2", timedelta(seconds=30), 1)
    assert [j.id for j in acquired] == [job.id]
    assert acquired[0].acquired_by == "worker2"


async def test_acquire_jobs_max_number_exceeded(datastore: ReplicatedDataStore) -> None:
    await add_task1(datastore, max_running_jobs=2)
    assert (await datastore.get_task("task1")).running_jobs == 0

    jobs = [Job(task_id="task1", executor="async") for _ in range(3)]
    for job in jobs:
        await datastore.add_job(job)

    # Only 2 jobs are returned from acquire_jobs() even though the limit was 3
    acquired_jobs = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 3)
    assert [job.id for job in acquired_jobs] == [job.id for job in jobs[:2]]
    assert (await datastore.get_task("task1")).running_jobs == 2
    for job in acquired_jobs:
        assert job.acquired_by == "worker1"
        assert job.acquired_until

    # No jobs are acquired now that the task is at capacity
    assert not await datastore.acquire_jobs("worker1", timedelta(seconds=30), 3)

    # Release one job, and the worker should be able to acquire the third job
    await datastore.release_job(
        "worker1",
        acquired_jobs[0],
        JobResult.from_job(acquired_jobs[0], JobOutcome.success, return_value=None),
    )
    assert (await datastore.get_task("task1")).running_jobs == 1
    assert len(await datastore.get_jobs()) == 2

    acquired_jobs = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 3)
    assert [job.id for job in acquired_jobs] == [jobs[2].id]
    assert (await datastore.get_task("task1")).running_jobs == 2


async def test_extend_acquired_job_leases(
    datastore: ReplicatedDataStore, state: SchedulerState, clock: FakeClock
) -> None:
    """Adapted from upstream: the extension moves ``acquired_until``; ``cleanup`` never
    abandons a leased job because its lease ran out (upstream does, 30 s after the extension).
    Abandoned work is handled by ``reset_leases`` at a leader change instead.
    """
    clock.move_to(datetime(2020, 9, 14, tzinfo=UTC))
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(seconds=30))
    await datastore.add_job(job)

    jobs = await datastore.acquire_jobs("scheduler_id", timedelta(seconds=30), 1)
    assert len(jobs) == 1

    clock.shift(20)
    await datastore.extend_acquired_job_leases("scheduler_id", {job.id}, timedelta(seconds=30))
    assert state.jobs[job.id].job.acquired_until == datetime(2020, 9, 14, 0, 0, 50, tzinfo=UTC)

    # Another scheduler's extension does not touch a lease it does not hold.
    await datastore.extend_acquired_job_leases("scheduler2_id", {job.id}, timedelta(hours=1))
    assert state.jobs[job.id].job.acquired_until == datetime(2020, 9, 14, 0, 0, 50, tzinfo=UTC)

    assert not await datastore.acquire_jobs("scheduler2_id", timedelta(seconds=30), 1)

    clock.shift(20)
    await datastore.cleanup()
    assert len(await datastore.get_jobs({job.id})) == 1

    clock.shift(20)  # beyond the extended lease
    await datastore.cleanup()
    jobs = await datastore.get_jobs({job.id})
    assert [j.acquired_by for j in jobs] == ["scheduler_id"]
    assert await datastore.get_job_result(job.id) is None


async def test_reap_abandoned_jobs(datastore: ReplicatedDataStore) -> None:
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(seconds=30))
    await datastore.add_job(job)
    await datastore.reap_abandoned_jobs("testscheduler")
    jobs = await datastore.acquire_jobs("testscheduler", timedelta(seconds=30), 1)
    assert len(jobs) == 1

    await datastore.reap_abandoned_jobs("testscheduler")
    assert not await datastore.get_jobs()
    abandoned_job_result = await datastore.get_job_result(jobs[0].id)
    assert abandoned_job_result is not None
    assert abandoned_job_result.outcome is JobOutcome.abandoned

    task = await datastore.get_task("task1")
    assert task.running_jobs == 0


@pytest.mark.skip(
    reason="upstream runs this only for external stores (BaseExternalDataStore) that "
    "deserialize on every acquire; the replica decodes each command once, when applying it"
)
async def test_acquire_jobs_deserialization_failure() -> None:
    raise AssertionError("not applicable")


@pytest.mark.skip(
    reason="upstream TestRepr checks the reprs of its memory, SQLAlchemy and MongoDB stores"
)
async def test_repr() -> None:
    raise AssertionError("not applicable")


# ---------------------------------------------------------------------------- ported: lifecycle


async def test_cancel_start(
    node: MeshNode, state: SchedulerState, logger: Logger, clock: FakeClock
) -> None:
    store = ReplicatedDataStore(propose=node.propose, state=state, term=node.core.term, clock=clock)
    with CancelScope() as scope:
        scope.cancel()
        async with AsyncExitStack() as exit_stack:
            await store.start(exit_stack, LocalEventBroker(), logger)


async def test_cancel_stop(
    node: MeshNode, state: SchedulerState, logger: Logger, clock: FakeClock
) -> None:
    store = ReplicatedDataStore(propose=node.propose, state=state, term=node.core.term, clock=clock)
    with CancelScope() as scope:
        async with AsyncExitStack() as exit_stack:
            await store.start(exit_stack, LocalEventBroker(), logger)
            scope.cancel()


# ---------------------------------------------------------------------------- ours: contract gaps


async def test_remove_task_publishes_task_removed(datastore: ReplicatedDataStore) -> None:
    await add_task1(datastore)
    async with captured_events(datastore, {TaskRemoved}) as events:
        await datastore.remove_task("task1")

    assert [(type(e), e.task_id) for e in events] == [(TaskRemoved, "task1")]
    with pytest.raises(TaskLookupError):
        await datastore.get_task("task1")


async def test_remove_unknown_task_raises_task_lookup_error(
    datastore: ReplicatedDataStore,
) -> None:
    with pytest.raises(TaskLookupError):
        await datastore.remove_task("nope")


async def test_conflict_policy_do_nothing_keeps_the_existing_schedule(
    datastore: ReplicatedDataStore, schedules: list[Schedule]
) -> None:
    await datastore.add_schedule(schedules[0], ConflictPolicy.exception)
    other = Schedule(id="s1", task_id="other", job_executor="async", trigger=schedules[1].trigger)

    async with captured_events(datastore, {ScheduleAdded, ScheduleUpdated}) as events:
        await datastore.add_schedule(other, ConflictPolicy.do_nothing)

    assert not events
    assert [s.task_id for s in await datastore.get_schedules({"s1"})] == ["task1"]


async def test_conflict_policy_exception_raises_and_keeps_the_existing_schedule(
    datastore: ReplicatedDataStore, schedules: list[Schedule]
) -> None:
    await datastore.add_schedule(schedules[0], ConflictPolicy.exception)
    other = Schedule(id="s1", task_id="other", job_executor="async", trigger=schedules[1].trigger)

    async with captured_events(datastore, {ScheduleAdded, ScheduleUpdated}) as events:
        with pytest.raises(ConflictingIdError):
            await datastore.add_schedule(other, ConflictPolicy.exception)

    assert not events
    assert [s.task_id for s in await datastore.get_schedules({"s1"})] == ["task1"]


async def test_job_lifecycle_publishes_added_acquired_released(
    datastore: ReplicatedDataStore,
) -> None:
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(minutes=1))

    async with captured_events(datastore, {JobAdded, JobAcquired, JobReleased}) as events:
        await datastore.add_job(job)
        (acquired,) = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 1)
        await datastore.release_job(
            "worker1", acquired, JobResult.from_job(acquired, JobOutcome.success)
        )

    assert [(type(e), e.job_id) for e in events] == [
        (JobAdded, job.id),
        (JobAcquired, job.id),
        (JobReleased, job.id),
    ]
    assert events[1].scheduler_id == "worker1"
    assert events[2].outcome is JobOutcome.success


async def test_acquire_jobs_releases_a_job_past_its_start_deadline_as_missed(
    datastore: ReplicatedDataStore, clock: FakeClock
) -> None:
    await add_task1(datastore)
    job = Job(
        task_id="task1",
        executor="async",
        start_deadline=clock() + timedelta(seconds=10),
        result_expiration_time=timedelta(minutes=1),
    )
    await datastore.add_job(job)
    clock.shift(11)

    async with captured_events(datastore, {JobAcquired, JobReleased}) as events:
        assert await datastore.acquire_jobs("worker1", timedelta(seconds=30), 1) == []

    assert not await datastore.get_jobs()
    result = await datastore.get_job_result(job.id)
    assert result is not None
    assert result.outcome is JobOutcome.missed_start_deadline
    assert result.finished_at == clock()
    assert [(type(e), e.job_id, e.outcome) for e in events] == [
        (JobReleased, job.id, JobOutcome.missed_start_deadline)
    ]


async def test_acquire_jobs_hands_out_a_bounded_batch_and_wakes_the_job_loop_for_the_rest(
    datastore: ReplicatedDataStore,
) -> None:
    """APScheduler's job loop starts every job it gets in one step and asks again only when an
    event wakes it: a leader inheriting hundreds of jobs gets them ``ACQUIRE_BATCH`` at a time,
    with a ``JobAdded`` for the rest."""
    await add_task1(datastore)
    jobs = [Job(task_id="task1", executor="async") for _ in range(ACQUIRE_BATCH + 1)]
    for job in jobs:
        await datastore.add_job(job)

    async with captured_events(datastore, {JobAdded}) as events:
        first = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 1000)
    assert len(first) == ACQUIRE_BATCH
    (rest,) = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 1000)
    # (pipelined, the last job's own JobAdded may arrive here too: it is that job)
    assert {e.job_id for e in events if e.job_id not in {j.id for j in first}} == {rest.id}
    assert {j.id for j in [*first, rest]} == {j.id for j in jobs}

    async with captured_events(datastore, {JobAdded}) as events:
        assert await datastore.acquire_jobs("worker1", timedelta(seconds=30), 1000) == []
    assert not events  # nothing left: no wake-up


async def test_cleanup_removes_finished_schedules_without_pending_jobs(
    datastore: ReplicatedDataStore, schedules: list[Schedule], clock: FakeClock
) -> None:
    clock.move_to(datetime(2020, 9, 16, tzinfo=UTC))
    await add_task1(datastore)
    for schedule in schedules[:2]:
        await datastore.add_schedule(schedule, ConflictPolicy.exception)
    acquired = await datastore.acquire_schedules("scheduler", timedelta(seconds=30), 2)
    await datastore.release_schedules(
        "scheduler",
        [
            ScheduleResult(
                schedule_id=s.id,
                task_id=s.task_id,
                trigger=s.trigger,
                last_fire_time=s.next_fire_time,
                next_fire_time=None,
            )
            for s in acquired
        ],
    )
    # s1 still has a job waiting to run; s2's last job is done.
    await datastore.add_job(Job(task_id="task1", executor="async", schedule_id="s1"))

    async with captured_events(datastore, {ScheduleRemoved}) as events:
        await datastore.cleanup()

    assert [(e.schedule_id, e.finished) for e in events] == [("s2", True)]
    assert [s.id for s in await datastore.get_schedules()] == ["s1"]


# ---------------------------------------------------------------------------- ours: replication


def job_for_fire(fire_time: datetime, jitter: timedelta = timedelta()) -> Job:
    """A job for schedule s1 as a leader creates it when the schedule fires."""
    return Job(
        task_id="task1",
        executor="async",
        schedule_id="s1",
        scheduled_fire_time=fire_time + jitter,
        jitter=jitter,
    )


async def test_replayed_add_job_for_a_recorded_fire_time_is_a_no_op(
    datastore: ReplicatedDataStore, state: SchedulerState
) -> None:
    await add_task1(datastore)
    fire_time = datetime(2020, 9, 13, tzinfo=UTC)
    first = job_for_fire(fire_time)
    await datastore.add_job(first)

    # A new leader that did not see the release replays the fire: a new job, same fire time.
    async with captured_events(datastore, {JobAdded}) as events:
        await datastore.add_job(job_for_fire(fire_time))

    assert not events
    assert [j.id for j in await datastore.get_jobs()] == [first.id]
    assert state.fires_deduplicated == 1


async def test_replayed_fire_with_another_jitter_is_the_same_fire_time(
    datastore: ReplicatedDataStore,
) -> None:
    await add_task1(datastore)
    fire_time = datetime(2020, 9, 13, tzinfo=UTC)
    first = job_for_fire(fire_time, jitter=timedelta(seconds=2))
    await datastore.add_job(first)

    await datastore.add_job(job_for_fire(fire_time, jitter=timedelta(seconds=7)))

    assert [j.id for j in await datastore.get_jobs()] == [first.id]


async def test_add_job_for_a_later_fire_time_of_the_schedule_is_recorded(
    datastore: ReplicatedDataStore, state: SchedulerState
) -> None:
    await add_task1(datastore)
    first = job_for_fire(datetime(2020, 9, 13, tzinfo=UTC))
    second = job_for_fire(datetime(2020, 9, 14, tzinfo=UTC))
    await datastore.add_job(first)
    await datastore.add_job(second)

    assert [j.id for j in await datastore.get_jobs()] == [first.id, second.id]
    assert state.fired["s1"] == "2020-09-14T00:00:00+00:00"
    assert state.fires_deduplicated == 0


async def test_reset_leases_makes_an_acquired_job_acquirable_again_as_attempt_2(
    datastore: ReplicatedDataStore, node: MeshNode, state: SchedulerState
) -> None:
    await add_task1(datastore, max_running_jobs=1)
    job = Job(task_id="task1", executor="async")
    await datastore.add_job(job)
    (first,) = await datastore.acquire_jobs("leader@1", timedelta(seconds=30), 1)
    assert state.jobs[job.id].attempts == 1

    await reset_leases(node)
    assert (await datastore.get_task("task1")).running_jobs == 0

    (second,) = await datastore.acquire_jobs("leader@2", timedelta(seconds=30), 1)
    assert second.id == first.id
    assert second.acquired_by == "leader@2"
    assert state.jobs[job.id].attempts == 2
    assert state.job_status(job.id)["attempt"] == 2
    assert (await datastore.get_task("task1")).running_jobs == 1


async def test_release_job_by_the_previous_holder_after_reset_changes_nothing(
    datastore: ReplicatedDataStore, node: MeshNode
) -> None:
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async", result_expiration_time=timedelta(minutes=1))
    await datastore.add_job(job)
    (stale,) = await datastore.acquire_jobs("leader@1", timedelta(seconds=30), 1)
    await reset_leases(node)
    await datastore.acquire_jobs("leader@2", timedelta(seconds=30), 1)

    async with captured_events(datastore, {JobReleased}) as events:
        await datastore.release_job(
            "leader@1", stale, JobResult.from_job(stale, JobOutcome.success)
        )

    assert not events
    assert [j.acquired_by for j in await datastore.get_jobs()] == ["leader@2"]
    assert await datastore.get_job_result(job.id) is None


async def test_release_schedules_by_the_previous_holder_after_reset_changes_nothing(
    datastore: ReplicatedDataStore, node: MeshNode, schedules: list[Schedule]
) -> None:
    await datastore.add_schedule(schedules[0], ConflictPolicy.exception)
    (stale,) = await datastore.acquire_schedules("leader@1", timedelta(seconds=30), 1)
    await reset_leases(node)
    await datastore.acquire_schedules("leader@2", timedelta(seconds=30), 1)

    async with captured_events(datastore, {ScheduleUpdated}) as events:
        await datastore.release_schedules(
            "leader@1",
            [
                ScheduleResult(
                    schedule_id="s1",
                    task_id="task1",
                    trigger=stale.trigger,
                    last_fire_time=datetime(2020, 9, 13, tzinfo=UTC),
                    next_fire_time=None,
                )
            ],
        )

    assert not events
    (s1,) = await datastore.get_schedules({"s1"})
    assert (s1.acquired_by, s1.last_fire_time) == ("leader@2", None)
    assert s1.next_fire_time == datetime(2020, 9, 13, tzinfo=UTC)


def interval_schedule(start: datetime) -> Schedule:
    trigger = IntervalTrigger(seconds=10, start_time=start)
    schedule = Schedule(id="s1", task_id="task1", job_executor="async", trigger=trigger)
    schedule.next_fire_time = trigger.next()
    return schedule


async def test_get_schedules_returns_copies(
    datastore: ReplicatedDataStore, state: SchedulerState, clock: FakeClock
) -> None:
    await datastore.add_schedule(interval_schedule(clock()), ConflictPolicy.exception)
    replica_trigger = to_wire(state.schedules["s1"].trigger)

    (copy,) = await datastore.get_schedules()
    copy.trigger.next()
    copy.trigger.next()
    copy.acquired_by = "someone"

    assert copy is not state.schedules["s1"]
    assert to_wire(state.schedules["s1"].trigger) == replica_trigger
    assert state.schedules["s1"].acquired_by is None


async def test_acquire_schedules_returns_copies(
    datastore: ReplicatedDataStore, state: SchedulerState, clock: FakeClock
) -> None:
    await datastore.add_schedule(interval_schedule(clock()), ConflictPolicy.exception)
    replica_trigger = to_wire(state.schedules["s1"].trigger)

    (copy,) = await datastore.acquire_schedules("scheduler", timedelta(seconds=30), 1)
    copy.trigger.next()
    copy.trigger.next()

    assert to_wire(state.schedules["s1"].trigger) == replica_trigger
    assert state.schedules["s1"].acquired_by == "scheduler"


async def test_jobs_and_tasks_handed_out_are_copies(
    datastore: ReplicatedDataStore, state: SchedulerState
) -> None:
    await add_task1(datastore)
    job = Job(task_id="task1", executor="async")
    await datastore.add_job(job)

    (acquired,) = await datastore.acquire_jobs("worker1", timedelta(seconds=30), 1)
    acquired.acquired_by = "someone"
    (listed,) = await datastore.get_jobs()
    listed.acquired_until = None
    task = await datastore.get_task("task1")
    task.metadata["changed"] = True

    assert state.jobs[job.id].job.acquired_by == "worker1"
    assert state.jobs[job.id].job.acquired_until is not None
    assert state.tasks["task1"].metadata == {}


# ---------------------------------------------------------------------------- ours: snapshots


async def test_snapshot_restore_round_trip_preserves_the_state(
    datastore: ReplicatedDataStore, node: MeshNode, state: SchedulerState, clock: FakeClock
) -> None:
    start = datetime(2020, 9, 13, tzinfo=UTC)
    clock.move_to(start)
    await add_task1(datastore, max_running_jobs=2)
    await datastore.add_task(Task(id="task2", func="math:ceil", job_executor="async"))

    # s1 fired once and was released with an advanced trigger; s2 is paused; s3 is exhausted;
    # s4 is leased (below, after the reset).
    await datastore.add_schedule(interval_schedule(start), ConflictPolicy.exception)
    (s1,) = await datastore.acquire_schedules("leader@1", timedelta(seconds=30), 1)
    fire_time = s1.next_fire_time
    assert fire_time is not None
    await datastore.release_schedules(
        "leader@1",
        [
            ScheduleResult(
                schedule_id="s1",
                task_id="task1",
                trigger=s1.trigger,
                last_fire_time=fire_time,
                next_fire_time=s1.trigger.next(),
            )
        ],
    )
    paused = attrs.evolve(interval_schedule(start + timedelta(seconds=5)), id="s2", paused=True)
    exhausted = attrs.evolve(interval_schedule(start), id="s3", next_fire_time=None)
    await datastore.add_schedule(paused, ConflictPolicy.exception)
    await datastore.add_schedule(exhausted, ConflictPolicy.exception)
    await datastore.add_schedule(
        attrs.evolve(interval_schedule(start), id="s4", task_id="task2"),
        ConflictPolicy.exception,
    )

    # One job per kind: finished with a result, leased (twice: attempt 2), pending (a fire of
    # s1, replayed once).
    done = Job(task_id="task2", executor="async", result_expiration_time=timedelta(hours=1))
    leased = Job(task_id="task1", executor="async", args=(1, "two"), kwargs={"k": [3]})
    await datastore.add_job(done)
    await datastore.add_job(leased)
    acquired = await datastore.acquire_jobs("leader@1", timedelta(seconds=30), 2)
    assert [j.id for j in acquired] == [done.id, leased.id]
    await datastore.release_job(
        "leader@1",
        acquired[0],
        JobResult.from_job(done, JobOutcome.success, finished_at=clock(), return_value=[42]),
    )
    await datastore.add_job(job_for_fire(fire_time))
    await datastore.add_job(job_for_fire(fire_time))
    await reset_leases(node)
    (again,) = await datastore.acquire_jobs("leader@2", timedelta(seconds=30), 1)
    assert again.id == leased.id
    assert state.jobs[leased.id].attempts == 2
    (s4,) = await datastore.acquire_schedules("leader@2", timedelta(seconds=30), 1)
    assert s4.id == "s4"

    restored = SchedulerState()
    restored.restore(state.snapshot())

    assert restored.snapshot() == state.snapshot()
    assert {k: dump_task(t) for k, t in restored.tasks.items()} == {
        k: dump_task(t) for k, t in state.tasks.items()
    }
    assert {k: dump_schedule(s) for k, s in restored.schedules.items()} == {
        k: dump_schedule(s) for k, s in state.schedules.items()
    }
    assert {k: (dump_job(js.job), js.attempts, js.term) for k, js in restored.jobs.items()} == {
        k: (dump_job(js.job), js.attempts, js.term) for k, js in state.jobs.items()
    }
    assert {k: dump_result(r) for k, r in restored.results.items()} == {
        k: dump_result(r) for k, r in state.results.items()
    }
    assert restored.results[done.id].return_value == [42]
    assert restored.fired == state.fired == {"s1": fire_time.isoformat()}
    assert list(restored.executions) == list(state.executions)
    assert len(restored.executions) == 1
    assert (restored.fires_recorded, restored.fires_deduplicated) == (1, 1)
    for task_id in ("task1", "task2"):
        assert restored.running_jobs(task_id) == state.running_jobs(task_id)
    assert restored.next_fire_time() == state.next_fire_time()
    for seconds in (0, 5, 10, 15, 3600):
        now = start + timedelta(seconds=seconds)
        for limit in (1, 10):
            assert restored.due_schedule_ids(now, limit) == state.due_schedule_ids(now, limit)
    assert state.due_schedule_ids(start + timedelta(seconds=10), 10) == ["s1"]


async def test_replacing_a_leased_schedule_is_not_undone_by_the_stale_release(
    datastore: ReplicatedDataStore, state: SchedulerState, clock: FakeClock
) -> None:
    """A PUT that lands while the old definition is being processed wins over its release."""
    start = datetime(2020, 9, 14, tzinfo=UTC)
    clock.move_to(start)
    trigger = IntervalTrigger(seconds=10, start_time=start)
    sched = Schedule(id="s", task_id="task", trigger=trigger, job_executor="async")
    sched.next_fire_time = trigger.next()
    await datastore.add_schedule(sched, ConflictPolicy.exception)
    clock.move_to(start + timedelta(seconds=1))
    acquired = await datastore.acquire_schedules("sch", timedelta(seconds=30), 10)
    assert [s.id for s in acquired] == ["s"]
    new_trigger = IntervalTrigger(seconds=99, start_time=start)
    replacement = Schedule(id="s", task_id="task", trigger=new_trigger, job_executor="async")
    replacement.next_fire_time = new_trigger.next()
    await datastore.add_schedule(replacement, ConflictPolicy.replace)
    old = acquired[0]
    await datastore.release_schedules(
        "sch",
        [
            ScheduleResult(
                schedule_id="s",
                task_id="task",
                trigger=old.trigger,
                last_fire_time=old.next_fire_time,
                next_fire_time=None,
            )
        ],
    )
    assert state.schedules["s"].trigger.seconds == 99
    assert state.schedules["s"].next_fire_time == replacement.next_fire_time


# ---------------------------------------------------------------------------- ours: batching


@pytest.fixture
async def pipelined(
    node: MeshNode, state: SchedulerState, logger: Logger, clock: FakeClock
) -> AsyncIterator[ReplicatedDataStore]:
    async with started_store(node, state, logger, clock, pipelined=True) as store:
        yield store


def test_a_batch_applies_every_command_in_order_and_isolates_a_failure() -> None:
    state = SchedulerState()
    task = Task(id="t", func="math:ceil", job_executor="async")
    ok_job = Job(task_id="t", executor="async")
    commands = [
        {"op": "add_task", "task": dump_task(task)},
        {"op": "add_job", "job": {"garbage": True}},  # fails to load
        {"op": "add_job", "job": dump_job(ok_job)},
        {"op": "batch", "commands": []},  # batches do not nest
    ]
    batch = {"op": "batch", "commands": commands}
    out = state.apply(Entry(term=1, index=1, kind=COMMAND, data=batch))
    assert [ok for ok, _ in out] == [True, False, True, False]
    assert out[0] == (True, "added") and out[2] == (True, True)
    assert "KeyError" in out[1][1] and "batched" in out[3][1]
    assert set(state.jobs) == {ok_job.id} and "t" in state.tasks


async def test_per_job_commands_of_one_loop_iteration_share_one_log_entry(
    pipelined: ReplicatedDataStore, node: MeshNode, state: SchedulerState, clock: FakeClock
) -> None:
    await add_task1(pipelined)
    jobs = [Job(task_id="task1", executor="async") for _ in range(5)]
    before = node.core.last_index
    for job in jobs:
        await pipelined.add_job(job)  # pipelined: returns before the commit
    await pipelined.flush()
    assert node.core.last_index == before + 1
    assert set(state.jobs) == {j.id for j in jobs}

    acquired = await pipelined.acquire_jobs("worker", timedelta(seconds=30), 10)
    before = node.core.last_index
    results = [JobResult.from_job(j, JobOutcome.success, return_value=1) for j in acquired]
    async with anyio.create_task_group() as tg:  # five jobs finishing together
        for job, result in zip(acquired, results, strict=True):
            tg.start_soon(pipelined.release_job, "worker", job, result)
    assert node.core.last_index == before + 1
    assert not state.jobs
    assert {e["job_id"] for e in state.execution_history(None, 10)} == {str(j.id) for j in jobs}


async def test_a_direct_proposal_goes_after_the_commands_batched_before_it(
    pipelined: ReplicatedDataStore, node: MeshNode, state: SchedulerState
) -> None:
    # The schedule loop's order: jobs for the fires first, then the release that advances the
    # schedule. Reversed, a crash in between would lose those fires.
    await add_task1(pipelined)
    job = Job(task_id="task1", executor="async")
    await pipelined.add_job(job)
    first = node.core.last_index + 1
    await pipelined.remove_schedules(["nothing"])
    entries = node.core.entries_from(first, 10)
    assert [e.data["op"] for e in entries] == ["add_job", "remove_schedules"]
