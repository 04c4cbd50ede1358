"""``MeshJobExecutor``: how the leader's APScheduler runs a job.

APScheduler needs a local callable for every task or its job loop fails. Every mesh task is
therefore registered with the same importable stand-in (``remote_task``), and this executor
decides what really runs: an embedded ``@mesh.task`` function on this node, or (when a dispatcher
is attached) a remote handler process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from apscheduler import Job
from apscheduler.abc import JobExecutor

from mesh.scheduling.state import idempotency_key
from mesh.tasks import REGISTRY, JobContext

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


class MeshJobExecutor(JobExecutor):
    def __init__(
        self,
        session: LeaderSession,
        *,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.session = session
        self.dispatcher = dispatcher

    def context_for(self, job: Job) -> JobContext:
        js = self.session.state.jobs.get(job.id)
        return JobContext(
            job_id=str(job.id),
            task=job.task_id,
            schedule_id=job.schedule_id,
            scheduled_fire_time=job.scheduled_fire_time,
            idempotency_key=idempotency_key(job, js.origin if js is not None else "fire"),
            attempt=js.attempts if js is not None else 1,
            fencing_token=self.session.fencing_token,
        )

    async def run_job(self, func: Callable[..., Any], job: Job) -> Any:
        ctx = self.context_for(job)
        task = REGISTRY.get(job.task_id)
        # Handlers exist to take work off the scheduler nodes: when one offers the task, it runs
        # there; the embedded function is the fallback (and the default with no handlers).
        offered = self.dispatcher is not None and self.dispatcher.offers(job.task_id)
        if task is not None and not offered:
            self.session.ran_on(job.id, f"embedded:{self.session.node_id}")
            return await task.run(ctx, job.args, job.kwargs)
        if self.dispatcher is not None:
            value, handler_id = await self.dispatcher.dispatch(job, ctx, self.session)
            self.session.ran_on(job.id, handler_id)
            return value
        raise TaskUnavailable(
            f"no embedded function or handler offers task {job.task_id!r} on leader "
            f"{self.session.node_id}"
        )
