"""``MeshScheduler``: APScheduler's ``AsyncScheduler`` with the mesh's schedule loop.

Everything but the schedule loop is APScheduler's: the API (add, pause, remove schedules), the
job loop (which runs jobs added by ``POST /api/jobs`` and any job no round leased), the
executors, the events. The schedule loop is replaced by fire rounds (mesh.scheduling.rounds):

- Each iteration fires every schedule due now or within ``lookahead``, up to ``ROUND_LIMIT``, in
  one Raft entry (``ReplicatedDataStore.fire_round``). That entry also leases the round's jobs to
  this scheduler and names the handler each goes to.
- Each leased job is started by a local timer at its fire time (``_start_at``), through
  APScheduler's own ``_run_job`` (start deadline, executor, result): no commit lies between a
  fire time and its dispatch, and the dispatcher does not commit the assignment again.
- Then the loop sleeps until ``lookahead`` before the next fire time of the replicated due
  index, until a schedule is added or changed (as APScheduler's loop does), or until a job no
  round leased falls due (it then wakes APScheduler's job loop, which starts it).

A leader that dies inside the window leaves its leased, unstarted jobs to the next leader:
``reset_leases`` frees them, its job loop starts each at its fire time (``acquire_jobs`` skips
jobs not yet due), and the idempotency key and the recorded handler keep a job that did start
from running twice (docs/scheduling.md, "Lookahead").

It overrides a private method of the pinned APScheduler (4.0.0a6, ``_process_schedules``) and
calls its ``_run_job``: the wake-up rules are copied from it, and the data store and event
broker test suites of that version still pass against the mesh's store and broker.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

import anyio
from anyio import create_task_group, move_on_after
from anyio.abc import TaskStatus
from apscheduler import (
    AsyncScheduler,
    Job,
    JobAdded,
    JobOutcome,
    JobResult,
    RunState,
    ScheduleAdded,
    SchedulerStarted,
    ScheduleUpdated,
    TaskLookupError,
)

from mesh.scheduling.rounds import ROUND_LIMIT

log = logging.getLogger("mesh.scheduling.loop")

RETRY_SECONDS = 0.5  # a schedule that was due but could not fire is tried again after this
# Unfinished jobs (queued, or leased and waiting for a handler) above which no new round is
# fired: past this the job side is behind, and more fires would only wait longer.
MAX_BACKLOG = 256
BACKLOG_WAIT = 0.01
DEFAULT_LOOKAHEAD = timedelta(milliseconds=100)


class MeshScheduler(AsyncScheduler):
    """``AsyncScheduler`` whose schedule loop fires rounds (needs a ``ReplicatedDataStore``)."""

    round_rng: random.Random | None = None  # the jitter's RNG (tests seed it)
    lookahead: timedelta = DEFAULT_LOOKAHEAD
    # The handler a leased job goes to (the dispatcher's choice), or None.
    assign_handler: Callable[[Job], str | None] | None = None
    _timed: int = 0  # leased jobs waiting for their fire time

    async def _process_schedules(self, *, task_status: TaskStatus[None]) -> None:
        store: Any = self.data_store
        wakeup = anyio.Event()
        wakeup_deadline: datetime | None = None

        async def schedule_added_or_modified(event: Any) -> None:
            event_ = cast("ScheduleAdded | ScheduleUpdated", event)
            if wakeup_deadline is None or (
                event_.next_fire_time is not None and event_.next_fire_time < wakeup_deadline
            ):
                wakeup.set()

        def retry_queued(_retry: Any) -> None:
            # A failed run queued a retry: its backoff ends at a time the loop must wake for.
            wakeup.set()  # the loop's current event (the name is rebound every iteration)

        store.on_retry = retry_queued
        with self.event_broker.subscribe(
            schedule_added_or_modified, {ScheduleAdded, ScheduleUpdated}
        ):
            task_status.started()
            await self.get_next_event(SchedulerStarted)
            async with create_task_group() as timers:
                while self._state is RunState.started:
                    # Held jobs (overlap buffers) and retries in their backoff wait on
                    # purpose: not a backlog.
                    waiting = (
                        self._timed + store.state.held_jobs + store.state.backing_off(store.clock())
                    )
                    if len(store.state.jobs) - waiting >= MAX_BACKLOG:
                        # The job side is behind: fire later, and let the schedules' coalesce
                        # policy merge what is missed meanwhile, as APScheduler's loop would when
                        # it cannot keep up (a queue growing without bound helps nobody).
                        await anyio.sleep(BACKLOG_WAIT)
                        continue
                    result = await store.fire_round(
                        self.identity,
                        ROUND_LIMIT,
                        rng=self.round_rng,
                        lookahead=self.lookahead,
                        lease=self.lease_duration,
                        capacity=self.max_concurrent_jobs - len(self._running_jobs) - self._timed,
                        assign=self.assign_handler,
                    )
                    for job in result.leased:
                        self._timed += 1
                        timers.start_soon(self._start_at, job)
                    if result.due >= ROUND_LIMIT:
                        continue  # more are due: the next round at once
                    wakeup_deadline = await store.get_next_schedule_run_time()
                    wait = await self._wait_seconds(store, wakeup_deadline, result.planned_at)
                    with move_on_after(wait):
                        await wakeup.wait()
                    wakeup = anyio.Event()
                timers.cancel_scope.cancel()

    async def _wait_seconds(
        self, store: Any, next_fire: datetime | None, planned_at: datetime
    ) -> float | None:
        """How long the loop may sleep: until ``lookahead`` before the next fire time, or until
        a job no round leased falls due (the job loop is woken for those now and then)."""
        now = store.clock()
        waits = []
        if next_fire is not None:
            wait = (next_fire - self.lookahead - now).total_seconds()
            if next_fire <= planned_at + self.lookahead:
                # Due when the round was planned, yet still there: it could not fire (its
                # trigger failed, or a lease holds it). Retry, without spinning.
                wait = max(wait, RETRY_SECONDS)
            waits.append(wait)
        due_job, next_job = store.state.unleased_fire_times(now)
        if due_job is not None:
            await self.event_broker.publish(
                JobAdded(
                    job_id=due_job.id, task_id=due_job.task_id, schedule_id=due_job.schedule_id
                )
            )
        if next_job is not None:
            waits.append((next_job - now).total_seconds())
        return min(waits) if waits else None

    async def _start_at(self, job: Job) -> None:
        """Start a leased job at its fire time, as APScheduler's job loop starts one."""
        try:
            assert job.scheduled_fire_time is not None
            delay = (job.scheduled_fire_time - self.data_store.clock()).total_seconds()  # type: ignore[attr-defined]
            if delay > 0:
                await anyio.sleep(delay)
        finally:
            self._timed -= 1
        task = self.data_store.state.tasks.get(job.task_id)  # type: ignore[attr-defined]
        if task is None:  # removed since the round: the job ends as an error, not leased forever
            log.error("job %s: its task %r is gone; not started", job.id, job.task_id)
            result = JobResult.from_job(
                job,
                JobOutcome.error,
                finished_at=self.data_store.clock(),  # type: ignore[attr-defined]
                exception=TaskLookupError(job.task_id),
            )
            await self.data_store.release_job(self.identity, job, result)
            return
        func = self._get_task_callable(task)
        self._running_jobs.add(job)
        await self._run_job(job, func, job.executor)
