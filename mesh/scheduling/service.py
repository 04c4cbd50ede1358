"""Leader-only scheduling: APScheduler runs on the leader, and only there.

On gaining leadership a node commits ``reset_leases`` (which also proves it holds a quorum and
has applied everything before its term), then starts an ``AsyncScheduler`` with the replicated
data store. On losing leadership (step-down, partition, shutdown) the scheduler task is cancelled
at once: nothing more is dispatched, and any write it still attempts fails because only a leader
can commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import attrs
import msgspec
from apscheduler import AsyncScheduler, ConflictPolicy, Schedule, Task, TaskDefaults
from apscheduler._utils import merge_metadata
from apscheduler.abc import EventBroker
from apscheduler.eventbrokers.local import LocalEventBroker

from mesh.contracts import Replica
from mesh.scheduling import backfill
from mesh.scheduling.cancel import cancel_flagged
from mesh.scheduling.controls import controls_of, with_controls
from mesh.scheduling.executor import STAND_IN_REF, Dispatcher, MeshJobExecutor, remote_task
from mesh.scheduling.loop import DEFAULT_LOOKAHEAD, MeshScheduler
from mesh.scheduling.session import LeaderSession
from mesh.scheduling.state import SchedulerState
from mesh.tasks import REGISTRY

if TYPE_CHECKING:
    from mesh.scheduling.spec import ScheduleSpec

log = logging.getLogger("mesh.scheduling")

EXECUTOR = "mesh"
RUN_NOW_RESULT_TTL = timedelta(hours=1)
READY_WAIT = 4.0  # a new leader's scheduler starts within a commit; allow for a loaded machine


class NotReady(Exception):
    """This node is not (yet) the leader with a running scheduler."""


class UnknownSchedule(LookupError):
    pass


class ScheduleExists(Exception):
    pass


class BackfillQueueFull(Exception):
    """The schedule has too many backfilled fire times waiting to take more."""

    def __init__(self, schedule_id: str, queued: int) -> None:
        super().__init__(
            f"schedule {schedule_id!r} has {queued} backfilled fire times still to run; with "
            f"this request it would exceed {backfill.MAX_QUEUED}: wait for them to run"
        )


class SchedulingService:
    def __init__(
        self,
        replica: Replica,
        state: SchedulerState,
        *,
        lease_duration: timedelta = timedelta(seconds=30),
        broker_factory: Callable[[], EventBroker] = LocalEventBroker,
        dispatcher: Dispatcher | None = None,
        lookahead: timedelta = DEFAULT_LOOKAHEAD,
        alerts: Callable[[LeaderSession], Awaitable[None]] | None = None,
    ) -> None:
        self.replica = replica
        self.lookahead = lookahead
        self.state = state
        self.lease_duration = lease_duration
        self.broker_factory = broker_factory
        self.dispatcher = dispatcher
        # Tasks run next to the scheduler for its term, by name: the alert sender
        # (mesh.dispatch.alerts), the scenario runner (mesh.scenarios.runner).
        self.term_tasks: dict[str, Callable[[LeaderSession], Awaitable[None]]] = {}
        if alerts is not None:
            self.term_tasks["alerts"] = alerts
        # Context variables set for the term's scheduler and its jobs: what an embedded
        # internal task finds its node's parts by (mesh.scenarios.runner.current_runner).
        self.term_context: list[tuple[contextvars.ContextVar[Any], Any]] = []
        self.scheduler: AsyncScheduler | None = None
        self.session: LeaderSession | None = None
        self.term: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        replica.on_role_change(self._on_role_change)

    # ------------------------------------------------------------------ lifecycle

    def _on_role_change(self, role: str, term: int, _leader: str | None) -> None:
        if role == "leader":
            if self.term != term:
                self._stop()
                self.term = term
                self._task = asyncio.get_running_loop().create_task(
                    self._lead(term), name=f"scheduler-term-{term}"
                )
        elif self._task is not None:
            self._stop()

    def _stop(self) -> None:
        self._ready.clear()
        self.scheduler = None
        self.session = None
        self.term = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        task = self._task
        self._stop()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _lead(self, term: int) -> None:
        replica = self.replica
        for var, value in self.term_context:
            var.set(value)  # in this task's own context: its scheduler's jobs inherit it
        try:
            cleared = await replica.propose({"op": "reset_leases", "term": term})
            log.info("term %d: leases reset (%s), starting the scheduler", term, cleared)
            session = self.session = LeaderSession(replica, self.state, term)
            executor = MeshJobExecutor(session, dispatcher=self.dispatcher)
            scheduler = MeshScheduler(
                data_store=session.store,
                event_broker=self.broker_factory(),
                identity=session.identity,
                job_executors={EXECUTOR: executor},
                task_defaults=TaskDefaults(job_executor=EXECUTOR, max_running_jobs=None),
                lease_duration=self.lease_duration,
                cleanup_interval=60,
                max_concurrent_jobs=1000,
            )
            scheduler.lookahead = self.lookahead
            if self.dispatcher is not None:
                scheduler.assign_handler = self._handler_for
            async with scheduler:
                for name, task in sorted(REGISTRY.items()):
                    await self._ensure_task(scheduler, name, task.max_running_jobs)
                self.scheduler = scheduler
                self._ready.set()
                canceller = asyncio.get_running_loop().create_task(
                    cancel_flagged(session, executor, self.dispatcher), name=f"cancel-{term}"
                )
                try:
                    async with self._term_tasks_running(session):
                        await scheduler.run_until_stopped()
                finally:
                    canceller.cancel()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Losing leadership mid-write lands here; a node that is still leader retries.
            if replica.is_leader and replica.term == term and not replica.handing_over:
                log.exception("scheduler for term %d failed; restarting it", term)
                await asyncio.sleep(0.5)
                if replica.is_leader and replica.term == term and self.term == term:
                    self._task = asyncio.get_running_loop().create_task(self._lead(term))
            else:
                log.info("scheduler for term %d stopped: leadership lost or handed over", term)
        finally:
            self._ready.clear()

    @contextlib.asynccontextmanager
    async def _term_tasks_running(self, session: LeaderSession) -> AsyncIterator[None]:
        """The term's own tasks (the alert sender, the scenario runner), for as long as its
        scheduler runs."""
        tasks = [
            asyncio.create_task(run(session), name=f"{name}-term-{session.term}")
            for name, run in self.term_tasks.items()
        ]
        for task in tasks:
            task.add_done_callback(_log_failure)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _handler_for(self, job: Any) -> str | None:
        """Where a job fired ahead goes: a handler when one offers its task (the executor
        prefers handlers, MeshJobExecutor.run_job), else None (embedded, or chosen at start)."""
        assert self.dispatcher is not None
        return self.dispatcher.suggest(job) if self.dispatcher.offers(job.task_id) else None

    async def _ensure_task(
        self, scheduler: AsyncScheduler, name: str, max_running_jobs: int | None = None
    ) -> None:
        existing = self.state.tasks.get(name)
        if (
            existing is not None
            and existing.func == STAND_IN_REF
            and existing.job_executor == EXECUTOR
            and existing.max_running_jobs == max_running_jobs
        ):
            return
        await scheduler.configure_task(
            name, func=remote_task, job_executor=EXECUTOR, max_running_jobs=max_running_jobs
        )

    async def wait_ready(self, timeout: float) -> AsyncScheduler:
        if not self.replica.is_leader:
            raise NotReady("not the leader")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise NotReady("the leader's scheduler is not running yet") from None
        scheduler = self.scheduler
        if scheduler is None:  # leadership was lost while we waited
            raise NotReady("leadership changed while the request waited")
        if not getattr(scheduler, "_services_initialized", True):
            # Between a scheduler crash and its restart APScheduler raises RuntimeError on every
            # call: that is "not ready yet" (503), not a server error.
            raise NotReady("the leader's scheduler is restarting")
        return scheduler

    # ------------------------------------------------------------------ operations (leader)

    def handlers(self) -> list[dict[str, Any]]:
        return self.dispatcher.handlers() if self.dispatcher is not None else []

    def task_warnings(self, task: str) -> list[str]:
        if task in REGISTRY:
            return []
        if self.dispatcher is not None and self.dispatcher.offers(task):
            return []
        return [
            f"no handler or embedded function offers task {task!r} yet; its jobs will wait "
            "for one within the schedule's misfire grace time"
        ]

    async def put_schedule(self, spec: ScheduleSpec, *, replace: bool) -> Schedule:
        scheduler = await self.wait_ready(READY_WAIT)
        if replace and spec.id not in self.state.schedules:
            raise UnknownSchedule(spec.id)
        if not replace and spec.id in self.state.schedules:
            raise ScheduleExists(spec.id)
        await self._ensure_task(scheduler, spec.task, _task_cap(spec.task))
        from apscheduler import ConflictingIdError

        try:
            await scheduler.add_schedule(
                spec.task,
                spec.trigger,
                id=spec.id,
                args=spec.args,
                kwargs=spec.kwargs,
                paused=spec.paused,
                coalesce=spec.coalesce,
                misfire_grace_time=spec.misfire_grace_time,
                max_jitter=spec.max_jitter,
                metadata=with_controls(spec.metadata, spec.controls),
                conflict_policy=ConflictPolicy.replace if replace else ConflictPolicy.exception,
            )
        except ConflictingIdError:
            raise ScheduleExists(spec.id) from None
        return self.state.schedules[spec.id]

    async def put_schedules(
        self,
        specs: Sequence[ScheduleSpec],
        *,
        replace: bool,
        unchanged: Callable[[Schedule, Schedule], bool] | None = None,
    ) -> list[BulkOutcome]:
        """Create (``replace=False``: an existing id is a conflict, left as it is) or create and
        replace many schedules in as few log entries as fit (usually one); each spec's
        :class:`BulkOutcome`, in order. ``unchanged(new, old)`` says that an existing schedule
        already has the new definition: it is then not written at all (its next fire time and
        lease stay). Each distinct task is configured first, once."""
        scheduler = await self.wait_ready(READY_WAIT)
        session = self.session
        if session is None:
            raise NotReady("leadership changed while the request waited")
        tasks = {}
        for name in sorted({spec.task for spec in specs}):
            await self._ensure_task(scheduler, name, _task_cap(name))
            tasks[name] = await scheduler.configure_task(name)  # as add_schedule; no write now
        outcomes: list[BulkOutcome] = []
        to_write: list[Schedule] = []
        pause = _Pauses()
        for spec in specs:
            await pause()  # thousands of schedules must not hold up the heartbeats
            schedule = _new_schedule(spec, tasks[spec.task])
            old = self.state.schedules.get(spec.id)
            if old is not None and not replace:
                outcomes.append(BulkOutcome(spec.id, "conflict", old.next_fire_time))
            elif old is not None and unchanged is not None and unchanged(schedule, old):
                outcomes.append(BulkOutcome(spec.id, "unchanged", old.next_fire_time))
            else:
                outcomes.append(BulkOutcome(spec.id, "", schedule.next_fire_time))
                to_write.append(schedule)
        # A schedule changed meanwhile (the loop above lets others run) is still consistent:
        # the conflict is checked again where the commands apply, and an "unchanged" one was
        # unchanged when looked at (as if this request had come first).
        policy = ConflictPolicy.replace if replace else ConflictPolicy.exception
        written = iter(await session.store.add_schedules(to_write, policy))
        for i, outcome in enumerate(outcomes):
            if not outcome.outcome:
                result = next(written)
                outcomes[i] = attrs.evolve(
                    outcome, outcome={"added": "created"}.get(result, result)
                )
        return outcomes

    async def remove_schedule(self, schedule_id: str) -> None:
        scheduler = await self.wait_ready(READY_WAIT)
        if schedule_id not in self.state.schedules:
            raise UnknownSchedule(schedule_id)
        await scheduler.remove_schedule(schedule_id)

    async def set_paused(
        self, schedule_id: str, paused: bool, *, note: str | None = None
    ) -> Schedule:
        """Pause (with an optional ``note``: the schedule's ``note`` field, saying why, in the
        same commit) or resume a schedule. Resuming clears the note."""
        scheduler = await self.wait_ready(READY_WAIT)
        if schedule_id not in self.state.schedules:
            raise UnknownSchedule(schedule_id)
        schedule = await scheduler.get_schedule(schedule_id)
        current = controls_of(schedule)
        wanted = msgspec.structs.replace(current, note=(note or "") if paused else "")
        if wanted != current or schedule.paused != paused:
            # What AsyncScheduler.pause_schedule / unpause_schedule do, with the note in the
            # same commit.
            metadata = with_controls(schedule.metadata, wanted)
            if paused:
                await scheduler.data_store.add_schedule(
                    attrs.evolve(schedule, paused=True, metadata=metadata),
                    ConflictPolicy.replace,
                )
            else:
                if metadata != schedule.metadata:
                    await scheduler.data_store.add_schedule(
                        attrs.evolve(schedule, metadata=metadata), ConflictPolicy.replace
                    )
                await scheduler.unpause_schedule(schedule_id)
        return self.state.schedules[schedule_id]

    async def trigger(self, schedule_id: str, now: datetime) -> dict[str, Any]:
        """One run of the schedule at ``now``, outside its times (paused or not):
        ``{"job_id", "idempotency_key"}`` once committed (docs/scheduling.md, "trigger")."""
        await self.wait_ready(READY_WAIT)
        if self.dispatcher is not None:
            self.dispatcher.check_queue(len(self.state.jobs))
        result = await self._run_outside_times(
            {"op": "trigger_schedule", "schedule_id": schedule_id, "now": now.isoformat()}
        )
        return {
            "job_id": result["job_id"],
            "idempotency_key": result["idempotency_key"],
            "queued": result["queued"],
        }

    async def backfill(self, schedule_id: str, start: datetime, end: datetime) -> dict[str, Any]:
        """Run the schedule's fire times in [start, end) that have not run, one after another:
        ``{"fire_times", "already_run", "job_ids"}`` once committed (docs/scheduling.md,
        "backfill"). ``backfill.TooManyFireTimes``, ``backfill.NotIterable`` and
        ``BackfillQueueFull`` say why not."""
        await self.wait_ready(READY_WAIT)
        schedule = self.state.schedules.get(schedule_id)
        if schedule is None:
            raise UnknownSchedule(schedule_id)
        times = backfill.fire_times(schedule.trigger, start, end)
        result = await self._run_outside_times(
            {
                "op": "backfill_schedule",
                "schedule_id": schedule_id,
                "times": [t.isoformat() for t in times],
                "now": datetime.now(UTC).isoformat(),
            }
        )
        if "refused" in result:
            raise BackfillQueueFull(schedule_id, result["refused"])
        return result

    async def _run_outside_times(self, command: dict[str, Any]) -> dict[str, Any]:
        session = self.session
        if session is None:
            raise NotReady("leadership changed while the request waited")
        result = await session.store.run_outside_times(command)
        if result is None:  # deleted meanwhile
            raise UnknownSchedule(command["schedule_id"])
        return result

    async def run_now(self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> UUID:
        scheduler = await self.wait_ready(READY_WAIT)
        if self.dispatcher is not None:
            self.dispatcher.check_queue(len(self.state.jobs))
        await self._ensure_task(scheduler, task, _task_cap(task))
        job_id = await scheduler.add_job(
            task, args=args, kwargs=kwargs, result_expiration_time=RUN_NOW_RESULT_TTL
        )
        # add_job is pipelined for the schedule loop; an API answer waits for the commit.
        session = self.session
        if session is None:
            raise NotReady("leadership changed while the request waited")
        await session.store.flush()
        return job_id


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


class _Pauses:
    """Awaited in a long loop: lets the event loop run (heartbeats, other requests) every
    ``every`` seconds of work."""

    def __init__(self, every: float = 0.005) -> None:
        self.every = every
        self.since = time.monotonic()

    async def __call__(self) -> None:
        if time.monotonic() - self.since > self.every:
            await asyncio.sleep(0)
            self.since = time.monotonic()


@attrs.frozen
class BulkOutcome:
    """What ``put_schedules`` did with one schedule: ``outcome`` is ``created``, ``updated``,
    ``unchanged`` or ``conflict``; ``next_fire_time`` the schedule's (the existing one's for
    ``unchanged`` and ``conflict``)."""

    id: str
    outcome: str
    next_fire_time: datetime | None


def _new_schedule(spec: ScheduleSpec, task: Task) -> Schedule:
    """The Schedule ``AsyncScheduler.add_schedule`` builds for ``spec`` (APScheduler 4.0.0a6:
    the task's executor and metadata, its first fire time from the trigger)."""
    schedule = Schedule(
        id=spec.id,
        task_id=task.id,
        trigger=spec.trigger,
        args=tuple(spec.args),
        kwargs=dict(spec.kwargs),
        paused=spec.paused,
        coalesce=spec.coalesce,
        misfire_grace_time=spec.misfire_grace_time,
        metadata=with_controls(merge_metadata(task.metadata, spec.metadata), spec.controls),
        max_jitter=spec.max_jitter,
        job_executor=task.job_executor,
        job_result_expiration_time=0,
    )
    schedule.next_fire_time = spec.trigger.next()
    return schedule


def _task_cap(task: str) -> int | None:
    t = REGISTRY.get(task)
    return t.max_running_jobs if t is not None else None
