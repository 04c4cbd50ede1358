"""``MeshJobExecutor``: how the leader's APScheduler runs a job.

APScheduler needs a local callable for every task or its job loop fails. Every mesh task is
therefore registered with the same importable stand-in (``remote_task``), and this executor
decides what really runs: an embedded ``@mesh.task`` function on this node, or (when a dispatcher
is attached) a remote handler process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from uuid import UUID

from apscheduler import Job
from apscheduler.abc import JobExecutor

from mesh.scheduling.state import SchedulerState, idempotency_key
from mesh.tasks import REGISTRY, JobContext

STAND_IN_REF = "mesh.scheduling.executor:remote_task"


def remote_task(*args: Any, **kwargs: Any) -> Any:
    """The local stand-in APScheduler sees for every mesh task; never called."""
    raise RuntimeError("mesh tasks are run by MeshJobExecutor, not called directly")


class TaskUnavailable(Exception):
    """No embedded function and no handler offers this task."""


class Dispatcher(Protocol):
    def offers(self, task: str) -> bool: ...

    async def dispatch(self, job: Job, ctx: JobContext) -> tuple[Any, str]:
        """Run the job on a handler; returns (return value, handler id)."""


class MeshJobExecutor(JobExecutor):
    def __init__(
        self,
        *,
        node_id: str,
        term: int,
        state: SchedulerState,
        job_handlers: dict[UUID, str],
        dispatcher: Dispatcher | None = None,
        on_start: Callable[[Job, JobContext], Awaitable[None] | None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.term = term
        self.state = state
        self.job_handlers = job_handlers
        self.dispatcher = dispatcher
        self.on_start = on_start

    def context_for(self, job: Job) -> JobContext:
        js = self.state.jobs.get(job.id)
        return JobContext(
            job_id=str(job.id),
            task=job.task_id,
            schedule_id=job.schedule_id,
            scheduled_fire_time=job.scheduled_fire_time,
            idempotency_key=idempotency_key(job),
            attempt=js.attempts if js is not None else 1,
            fencing_token=self.term,
        )

    async def run_job(self, func: Callable[..., Any], job: Job) -> Any:
        ctx = self.context_for(job)
        task = REGISTRY.get(job.task_id)
        # Handlers exist to take work off the scheduler nodes: when one offers the task, it runs
        # there; the embedded function is the fallback (and the default with no handlers).
        offered = self.dispatcher is not None and self.dispatcher.offers(job.task_id)
        if task is not None and not offered:
            self.job_handlers[job.id] = f"embedded:{self.node_id}"
            return await task.run(ctx, job.args, job.kwargs)
        if self.dispatcher is not None:
            value, handler_id = await self.dispatcher.dispatch(job, ctx)
            self.job_handlers[job.id] = handler_id
            return value
        raise TaskUnavailable(
            f"no embedded function or handler offers task {job.task_id!r} on leader {self.node_id}"
        )
