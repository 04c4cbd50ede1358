"""``@mesh.task`` and ``mesh.job_context()``.

A task is a plain function (async or sync) registered under a name. Nodes started with
``--tasks MODULE`` run them embedded on the leader; handler processes (``schedulezero handler``)
offer them to the mesh.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, overload

import anyio.to_thread
import attrs


@attrs.frozen
class JobContext:
    job_id: str
    task: str
    schedule_id: str | None
    scheduled_fire_time: datetime | None
    idempotency_key: str
    # 1-based count of this fire's deliveries (leases and redeliveries after a failover or
    # a lost handler), never lower than ``try_number``: several attempts may serve one try.
    attempt: int
    fencing_token: int  # the leader's term when it dispatched this attempt
    # 1-based run of this fire under the schedule's retry policy (the record's ``try``).
    try_number: int = 1
    # A broadcast fire's run: its place among the fire's runs (one per matching handler).
    shard_index: int = 0
    shard_count: int = 1


_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("mesh_job_context")


def job_context() -> JobContext:
    """The context of the job this task function is running for."""
    try:
        return _current.get()
    except LookupError:
        raise LookupError("mesh.job_context() called outside a running task") from None


@attrs.frozen
class TaskDef:
    name: str
    func: Callable[..., Any]
    max_running_jobs: int | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    async def run(self, ctx: JobContext, args: Iterable[Any], kwargs: dict[str, Any]) -> Any:
        if self.is_async:
            token = _current.set(ctx)
            try:
                return await self.func(*args, **kwargs)
            finally:
                _current.reset(token)

        def call() -> Any:
            _current.set(ctx)
            return self.func(*args, **kwargs)

        # Sync tasks run in a worker thread with their own copy of the context.
        return await anyio.to_thread.run_sync(contextvars.copy_context().run, call)

    async def run_within(
        self,
        ctx: JobContext,
        args: Iterable[Any],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        """``run``, ended at ``timeout`` seconds with :class:`RunTimedOut`.

        At the timeout an async task is cancelled; a sync task's thread cannot be stopped. In
        both cases the caller hears of the timeout at once, not when the run has ended (a task
        that catches the cancellation and goes on would otherwise hold the answer back), and
        gets the run still ending (``RunTimedOut.run``) to keep its slot busy until it has."""
        if timeout is None:
            return await self.run(ctx, args, kwargs)
        run = asyncio.ensure_future(self.run(ctx, args, kwargs))
        try:
            done, _ = await asyncio.wait({run}, timeout=timeout)
        except asyncio.CancelledError:
            run.cancel()  # our caller stopped: so does the run (as far as it can)
            raise
        if done:
            return run.result()
        if self.is_async:
            run.cancel()
        # A sync task is left alone: cancelling would only stop waiting for its thread (and
        # give its worker slot back) while the thread runs on.
        run.add_done_callback(_late_outcome)
        raise RunTimedOut(timeout, run)


class RunTimedOut(Exception):
    """A task run passed its timeout; ``run`` is still ending (a cancelled async task, or a
    sync task's thread, which runs on until its function returns)."""

    def __init__(self, timeout: float, run: asyncio.Future[Any]) -> None:
        super().__init__(f"task exceeded its {timeout:g}s timeout")
        self.timeout = timeout
        self.run = run


def _late_outcome(run: asyncio.Future[Any]) -> None:
    """Nobody waits for a timed-out run's outcome: fetch it so asyncio does not log it as
    never retrieved."""
    if not run.cancelled():
        run.exception()


REGISTRY: dict[str, TaskDef] = {}
# Task names the mesh itself owns (the scenario suite's ``schedulezero.scenario``): they run
# embedded on the leader only; a handler cannot offer them and the API cannot schedule them.
INTERNAL_PREFIX = "schedulezero."


class TaskModuleError(Exception):
    """A --tasks module could not be imported."""


@overload
def task(func: Callable[..., Any]) -> Callable[..., Any]: ...
@overload
def task(
    *, name: str | None = None, max_running_jobs: int | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


def task(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    max_running_jobs: int | None = None,
) -> Any:
    """Register a function as a mesh task (the name defaults to the function's name)."""

    def register(f: Callable[..., Any]) -> Callable[..., Any]:
        task_name = name or f.__name__
        existing = REGISTRY.get(task_name)
        if existing is not None and existing.func is not f:
            same = getattr(existing.func, "__qualname__", None) == f.__qualname__ and (
                existing.func.__module__ == f.__module__
            )
            if not same:
                raise ValueError(
                    f"task name {task_name!r} is already registered by "
                    f"{existing.func.__module__}.{existing.func.__qualname__}"
                )
        REGISTRY[task_name] = TaskDef(task_name, f, max_running_jobs)
        functools.update_wrapper(register, f)
        return f

    if func is not None:
        return register(func)
    return register


def load_task_modules(modules: Iterable[str]) -> list[str]:
    """Import ``--tasks`` modules; returns the names of the tasks now registered."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:
            raise TaskModuleError(
                f"cannot import tasks module {module!r}: {type(e).__name__}: {e}"
            ) from e
    return sorted(REGISTRY)
