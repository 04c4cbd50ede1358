"""Dispatch from the leader to handler processes.

Routing: among the alive handlers that offer the task, whose circuit is closed and who have a
free slot, pick the least loaded; ties go round-robin (a per-task cursor), so equal handlers get
equal shares. A schedule whose metadata says ``{"affinity": "sticky"}`` prefers the handler that
ran its previous job while that handler is healthy.

Faults: a refused dispatch, a missing acknowledgement, a handler that stops heartbeating, or a
job that exceeds its timeout is retried on another handler with the same idempotency key (the
handler deduplicates). A task that raises is not retried: its error is the job's outcome. A job
whose task no handler offers waits for one until its start deadline (the schedule's misfire grace
time), or ``no_handler_wait`` for jobs without one, then ends with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs
from apscheduler import Job
from tenacity import wait_exponential

from mesh.dispatch import protocol as p
from mesh.dispatch.governors import Governors
from mesh.dispatch.registry import HandlerInfo, HandlerRegistry
from mesh.scheduling.executor import TaskUnavailable
from mesh.scheduling.state import RemoteJobError, to_wire
from mesh.tasks import JobContext
from mesh.transport.zmq import Incoming

if TYPE_CHECKING:
    from mesh.node import MeshNode

log = logging.getLogger("mesh.dispatch")


class HandlerLost(Exception):
    """The handler stopped answering (died, partitioned, or refused): retry elsewhere."""


@attrs.define
class DispatchSettings:
    max_attempts: int = 4  # dispatch attempts per job (first try + retries)
    ack_timeout: float = 1.0
    task_timeouts: Mapping[str, float] = attrs.Factory(dict)
    default_timeout: float | None = None
    no_handler_wait: float = 30.0
    backoff_initial: float = 0.05
    backoff_max: float = 1.0


@attrs.define
class _Pending:
    handler: HandlerInfo
    ack: asyncio.Future[dict[str, Any]]
    result: asyncio.Future[dict[str, Any]]


class HandlerDispatcher:
    def __init__(
        self,
        node: MeshNode,
        registry: HandlerRegistry,
        *,
        governors: Governors | None = None,
        settings: DispatchSettings | None = None,
    ) -> None:
        self.node = node
        self.registry = registry
        self.governors = governors or Governors()
        self.settings = settings or DispatchSettings()
        self._pending: dict[str, _Pending] = {}
        self._cursor: dict[str, itertools.count[int]] = {}
        self._sticky: dict[str, str] = {}  # schedule id → handler id
        node.handle(p.DISPATCH_ACK, self._on_ack)
        node.handle(p.JOB_RESULT, self._on_result)

    # ------------------------------------------------------------------ Dispatcher protocol

    def offers(self, task: str) -> bool:
        return self.registry.offers(task)

    async def dispatch(self, job: Job, ctx: JobContext) -> tuple[Any, str]:
        s = self.settings
        backoff = wait_exponential(multiplier=s.backoff_initial, max=s.backoff_max)
        excluded: set[str] = set()
        last_error: Exception | None = None
        for attempt in range(1, s.max_attempts + 1):
            handler = await self._choose(job, excluded)
            try:
                async with self.governors.task_slot(job.task_id):
                    await self.governors.handler_rate(handler.handler_id)
                    try_ctx = attrs.evolve(ctx, attempt=ctx.attempt + attempt - 1)
                    value = await self._run_on(handler, job, try_ctx)
            except HandlerLost as e:
                last_error = e
                self.registry.record_failure(handler)
                excluded.add(handler.handler_id)
                log.warning("job %s: %s; retrying elsewhere", job.id, e)
                await asyncio.sleep(backoff(_RetryState(attempt)))
                if len(excluded) >= len(self.registry.handlers):
                    excluded.clear()  # everyone failed once: give them another chance
                continue
            self.registry.record_success(handler)
            if job.schedule_id is not None:
                self._sticky[job.schedule_id] = handler.handler_id
            return value, handler.handler_id
        raise TaskUnavailable(
            f"job {job.id} for task {job.task_id!r} failed on {s.max_attempts} dispatch "
            f"attempts; last error: {last_error}"
        )

    # ------------------------------------------------------------------ routing

    async def _choose(self, job: Job, excluded: set[str]) -> HandlerInfo:
        deadline = self._wait_deadline(job)
        loop = asyncio.get_running_loop()
        while True:
            handler = self._pick(job, excluded)
            if handler is not None:
                return handler
            remaining = deadline - loop.time()
            if remaining <= 0:
                if not self.registry.offers(job.task_id):
                    raise TaskUnavailable(
                        f"no handler offered task {job.task_id!r} within the job's wait "
                        "(the schedule's misfire grace time)"
                    )
                raise TaskUnavailable(
                    f"every handler offering task {job.task_id!r} stayed busy or unhealthy "
                    "within the job's wait (the schedule's misfire grace time)"
                )
            # Woken by a handler arriving, recovering or finishing a job; polled as a fallback
            # for circuits whose cool-down ends.
            await self.registry.changed(min(remaining, 0.25))

    def _wait_deadline(self, job: Job) -> float:
        loop = asyncio.get_running_loop()
        if job.start_deadline is not None:
            left = (job.start_deadline - datetime.now(UTC)).total_seconds()
            return loop.time() + max(0.0, left)
        return loop.time() + self.settings.no_handler_wait

    def _pick(self, job: Job, excluded: set[str]) -> HandlerInfo | None:
        reg = self.registry
        now = reg.clock()
        candidates = [
            h
            for h in reg.routable(job.task_id)
            if h.handler_id not in excluded and h.in_flight < h.concurrency
        ]
        if not candidates:
            # A handler whose circuit cool-down has passed gets one probe job.
            for h in reg.handlers.values():
                if (
                    job.task_id in h.tasks
                    and h.handler_id not in excluded
                    and reg.state(h) == "alive"
                    and 0 < h.circuit_open_until <= now
                    and not h.probing
                ):
                    h.probing = True
                    return h
            return None
        if job.schedule_id is not None and (job.metadata or {}).get("affinity") == "sticky":
            sticky = self._sticky.get(job.schedule_id)
            for h in candidates:
                if h.handler_id == sticky:
                    return h
        candidates.sort(key=lambda h: h.handler_id)
        start = next(self._cursor.setdefault(job.task_id, itertools.count())) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda h: h.in_flight / h.concurrency)

    # ------------------------------------------------------------------ one attempt

    async def _run_on(self, handler: HandlerInfo, job: Job, ctx: JobContext) -> Any:
        loop = asyncio.get_running_loop()
        dispatch_id = uuid.uuid4().hex
        pending = _Pending(handler, loop.create_future(), loop.create_future())
        self._pending[dispatch_id] = pending
        timeout = self.settings.task_timeouts.get(job.task_id, self.settings.default_timeout)
        payload = {
            "dispatch_id": dispatch_id,
            "job_id": str(job.id),
            "task": job.task_id,
            "args": to_wire(list(job.args)),
            "kwargs": to_wire(job.kwargs),
            "idempotency_key": ctx.idempotency_key,
            "fencing_token": ctx.fencing_token,
            "attempt": ctx.attempt,
            "schedule_id": job.schedule_id,
            "scheduled_fire_time": ctx.scheduled_fire_time.isoformat()
            if ctx.scheduled_fire_time
            else None,
            "timeout": timeout,
        }
        handler.in_flight += 1
        try:
            if not self.node.transport.send_to_identity(handler.identity, p.DISPATCH, payload):
                raise HandlerLost(f"handler {handler.handler_id} is not connected to this node")
            try:
                ack = await asyncio.wait_for(pending.ack, self.settings.ack_timeout)
            except TimeoutError:
                raise HandlerLost(f"handler {handler.handler_id} did not acknowledge") from None
            if not ack.get("accepted"):
                raise HandlerLost(
                    f"handler {handler.handler_id} refused the dispatch: {ack.get('reason')}"
                )
            result = await self._await_result(handler, pending, timeout)
        finally:
            handler.in_flight -= 1
            self._pending.pop(dispatch_id, None)
            self.registry.notify()
        if result.get("outcome") == "success":
            return result.get("return_value")
        err = result.get("error") or {}
        if err.get("timed_out"):
            raise HandlerLost(f"handler {handler.handler_id}: {err.get('message')}")
        raise RemoteJobError(str(err.get("type", "Error")), str(err.get("message", "")))

    async def _await_result(
        self, handler: HandlerInfo, pending: _Pending, timeout: float | None
    ) -> dict[str, Any]:
        """Wait for the result while watching the handler's heartbeat."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout + self.settings.ack_timeout
        while True:
            wait = 0.5
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    raise HandlerLost(
                        f"handler {handler.handler_id} exceeded the task timeout ({timeout}s)"
                    )
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(pending.result), wait)
            if self.registry.state(handler) == "dead":
                raise HandlerLost(f"handler {handler.handler_id} stopped heartbeating mid-job")

    # ------------------------------------------------------------------ incoming

    def _on_ack(self, msg: Incoming) -> None:
        pending = self._pending.get(str(msg.payload.get("dispatch_id")))
        if pending is not None and not pending.ack.done():
            pending.ack.set_result(msg.payload)

    def _on_result(self, msg: Incoming) -> None:
        pending = self._pending.get(str(msg.payload.get("dispatch_id")))
        if pending is None:
            return  # a late result for an attempt we gave up on, or from a previous leader
        if not pending.ack.done():
            pending.ack.set_result({"accepted": True})
        if not pending.result.done():
            pending.result.set_result(msg.payload)


@attrs.frozen
class _RetryState:
    """The bit of tenacity's RetryCallState that its wait strategies read."""

    attempt_number: int
