"""``MeshJobExecutor``: how the leader's APScheduler runs a job.

APScheduler needs a local callable for every task or its job loop fails. Every mesh task is
therefore registered with the same importable stand-in (``remote_task``), and this executor
decides what really runs: an embedded ``@mesh.task`` function on this node, or (when a dispatcher
is attached) a remote handler process. An embedded run past its schedule's ``timeout`` ends as
``timeout`` (docs/scheduling.md, "timeout").

A job whose schedule has a ``target`` (tags, or ``broadcast``) runs on handlers only: an
embedded function on the leader has no tags and is not "every handler". With no live handler
offering the task and having the tags, it ends at once as ``no_handler``. A broadcast job is
split at its start into one run per matching handler (``ReplicatedDataStore.broadcast_job``);
the job loop then starts each run, which comes back here as a targeted job with its ``shard``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from apscheduler import Job
from apscheduler.abc import JobExecutor

from mesh.scheduling.controls import Target, controls_of
from mesh.scheduling.outcomes import JobTimedOut, NoHandler, RunCancelled
from mesh.scheduling.state import idempotency_key, job_key
from mesh.tasks import REGISTRY, JobContext, RunTimedOut, TaskDef

if TYPE_CHECKING:
    from mesh.scheduling.session import LeaderSession

STAND_IN_REF = "mesh.scheduling.executor:remote_task"


def remote_task(*args: Any, **kwargs: Any) -> Any:
    """The local stand-in APScheduler sees for every mesh task; never called."""
    raise RuntimeError("mesh tasks are run by MeshJobExecutor, not called directly")


class TaskUnavailable(Exception):
    """No embedded function and no handler offers this task."""


class Dispatcher(Protocol):
    """What the scheduling layer needs from dispatch (``mesh.dispatch.HandlerDispatcher``)."""

    def offers(self, task: str) -> bool:
        """Whether any live handler offers ``task``."""

    async def dispatch(self, job: Job, ctx: JobContext, session: LeaderSession) -> tuple[Any, str]:
        """Run the job on a handler under ``session``'s term; returns (return value, handler id)."""

    def check_queue(self, queued_jobs: int) -> None:
        """Raise ``Backpressure`` when no more jobs should be queued."""

    def handlers(self) -> list[dict[str, Any]]:
        """The handlers this node knows, as JSON."""

    def suggest(self, job: Job) -> str | None:
        """The handler a job fired ahead of time will go to, or None (chosen at its start)."""

    def cancel(self, handler_id: str, job: Job, fencing_token: int) -> bool:
        """Ask ``handler_id`` to stop its run of ``job`` (overlap ``cancel_other``); False
        when the message could not be sent (the handler is unknown or not connected)."""

    async def targets(self, job: Job) -> list[str]:
        """The handlers a broadcast job runs on (one run each), by id; empty if none."""


class MeshJobExecutor(JobExecutor):
    def __init__(
        self,
        session: LeaderSession,
        *,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.session = session
        self.dispatcher = dispatcher
        # Embedded async runs on this leader, by job: what ``stop`` cancels (cancel_other).
        self._stoppable: dict[UUID, asyncio.Future[Any]] = {}

    def context_for(self, job: Job) -> JobContext:
        js = self.session.state.jobs.get(job.id)
        shard = js.shard if js is not None else None
        index, count = shard if shard is not None else (0, 1)
        return JobContext(
            job_id=str(job.id),
            task=job.task_id,
            schedule_id=job.schedule_id,
            scheduled_fire_time=job.scheduled_fire_time,
            idempotency_key=job_key(js) if js is not None else idempotency_key(job),
            attempt=js.attempts if js is not None else 1,
            fencing_token=self.session.fencing_token,
            try_number=js.tries if js is not None else 1,
            shard_index=index,
            shard_count=count,
        )

    async def run_job(self, func: Callable[..., Any], job: Job) -> Any:
        js = self.session.state.jobs.get(job.id)
        if js is not None and js.cancel and js.handler is None:
            # cancel_other flagged it before any leader sent it anywhere: it never ran.
            raise RunCancelled(f"job {job.id}: a newer fire of its schedule replaced it")
        ctx = self.context_for(job)
        target = controls_of(job).target
        if target is not None and (target.tags or target.broadcast):
            return await self._run_targeted(job, ctx, target)
        task = REGISTRY.get(job.task_id)
        # Handlers exist to take work off the scheduler nodes: when one offers the task, it runs
        # there; the embedded function is the fallback (and the default with no handlers).
        offered = self.dispatcher is not None and self.dispatcher.offers(job.task_id)
        if task is not None and not offered:
            self.session.ran_on(job.id, f"embedded:{self.session.node_id}")
            try:
                return await self._run_embedded(task, ctx, job)
            except RunTimedOut as e:
                # A sync task's thread runs on, holding its worker thread (anyio's limiter)
                # until it returns; the run's outcome is decided now.
                raise JobTimedOut(str(e)) from None
        if self.dispatcher is not None:
            value, handler_id = await self.dispatcher.dispatch(job, ctx, self.session)
            self.session.ran_on(job.id, handler_id)
            return value
        raise TaskUnavailable(
            f"no embedded function or handler offers task {job.task_id!r} on leader "
            f"{self.session.node_id}"
        )

    async def _run_embedded(self, task: TaskDef, ctx: JobContext, job: Job) -> Any:
        """Run an embedded task on this leader; an async one can be stopped (``stop``). A sync
        one runs in a thread, which nothing can stop: it runs to its end."""
        timeout = controls_of(job).timeout
        if not task.is_async:
            return await task.run_within(ctx, job.args, job.kwargs, timeout)
        run = asyncio.ensure_future(task.run_within(ctx, job.args, job.kwargs, timeout))
        self._stoppable[job.id] = run
        try:
            await asyncio.wait({run})
        except asyncio.CancelledError:  # the scheduler stops (leadership lost): so does the run
            run.cancel()
            raise
        finally:
            self._stoppable.pop(job.id, None)
        if run.cancelled():
            raise RunCancelled(f"job {job.id}: stopped for a newer fire of its schedule")
        return run.result()

    def stop(self, job_id: UUID) -> bool:
        """Cancel the embedded async run of ``job_id`` on this leader, if there is one."""
        run = self._stoppable.get(job_id)
        if run is None:
            return False
        run.cancel()
        return True

    async def _run_targeted(self, job: Job, ctx: JobContext, target: Target) -> Any:
        """A job of a schedule with a target: on a matching handler, or split (broadcast)."""
        if self.dispatcher is None:
            raise NoHandler(f"task {job.task_id!r} targets handlers and this mesh has none")
        js = self.session.state.jobs.get(job.id)
        if target.broadcast and (js is None or js.shard is None):
            await self._broadcast(job)
            return None
        value, handler_id = await self.dispatcher.dispatch(job, ctx, self.session)
        self.session.ran_on(job.id, handler_id)
        return value

    async def _broadcast(self, job: Job) -> None:
        """Replace the fire's job by one run per matching handler (the job itself then ends
        with no record: its runs have one each)."""
        assert self.dispatcher is not None
        handlers = await self.dispatcher.targets(job)
        if not handlers:
            raise NoHandler(
                f"no live handler offering task {job.task_id!r} matches the broadcast's target"
            )
        await self.session.store.broadcast_job(self.session.identity, job, handlers)
