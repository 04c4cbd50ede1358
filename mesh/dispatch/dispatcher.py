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

Trust: on an authenticated mesh a handler is its key. Hellos, acknowledgements and results are
accepted only from a ``handler`` key whose name is the ``handler_id`` they claim, and an answer
to a dispatch only from the handler it was sent to; anything else, malformed messages included,
is refused through ``MessageBus.reject`` (counted, logged at most once a minute per peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import msgspec
from apscheduler import Job
from tenacity import wait_exponential

from mesh.config import DispatchConfig
from mesh.contracts import Directory, Incoming, MessageBus, Replica, refusal
from mesh.dispatch import protocol as p
from mesh.dispatch.governors import Governors
from mesh.dispatch.registry import HandlerInfo, HandlerRegistry
from mesh.scheduling.executor import TaskUnavailable
from mesh.scheduling.state import RemoteJobError, SchedulerState, to_wire
from mesh.tasks import JobContext

if TYPE_CHECKING:
    from mesh.scheduling.session import LeaderSession

log = logging.getLogger("mesh.dispatch")

MAX_BUSY_REFUSALS = 100  # "at capacity" answers a job may get before they count as failures

_FromHandler = TypeVar("_FromHandler", p.Hello, p.DispatchAck, p.JobResult)


class HandlerLost(Exception):
    """The handler stopped answering (died, partitioned, or refused): retry elsewhere."""


class HandlerBusy(HandlerLost):
    """The handler refused because it is full: choose again; neither a failure nor an attempt."""


class Fenced(Exception):
    """This leader's lease on the job is gone (a newer leader took over): do not dispatch."""


@attrs.define
class _Pending:
    handler: HandlerInfo
    ack: asyncio.Future[dict[str, Any]]
    result: asyncio.Future[dict[str, Any]]


class HandlerDispatcher:
    def __init__(
        self,
        replica: Replica,
        bus: MessageBus,
        directory: Directory,
        state: SchedulerState,
        *,
        registry: HandlerRegistry | None = None,
        governors: Governors | None = None,
        settings: DispatchConfig | None = None,
    ) -> None:
        self.replica = replica
        self.bus = bus
        self.directory = directory
        self.state = state  # the replica: which handler each job was assigned to
        self.registry = registry or HandlerRegistry()
        self.governors = governors or Governors()
        self.settings = settings or DispatchConfig()  # the config's dispatch section
        self._pending: dict[str, _Pending] = {}
        self._cursor: dict[str, itertools.count[int]] = {}
        self._sticky: dict[str, str] = {}  # schedule id → handler id
        bus.handle(p.HELLO, self._on_hello)
        bus.handle(p.DISPATCH_ACK, self._on_ack)
        bus.handle(p.JOB_RESULT, self._on_result)

    # ------------------------------------------------------------------ Dispatcher protocol

    def offers(self, task: str) -> bool:
        return self.registry.offers(task)

    def check_queue(self, queued_jobs: int) -> None:
        self.governors.check_queue(queued_jobs)

    def handlers(self) -> list[dict[str, Any]]:
        return self.registry.to_json()

    async def dispatch(self, job: Job, ctx: JobContext, session: LeaderSession) -> tuple[Any, str]:
        s = self.settings
        backoff = wait_exponential(multiplier=s.backoff_initial, max=s.backoff_max)
        excluded: set[str] = set()
        last_error: Exception | None = None
        assigned = self._assigned_handler(job)
        attempt, busy = 0, 0
        while attempt < s.max_attempts:
            attempt += 1
            try:
                async with self.governors.task_slot(job.task_id):
                    # Chosen only once the governors let the job go: a handler picked before
                    # a long wait for a slot or token is full by then and refuses it.
                    if assigned is not None and assigned not in excluded:
                        handler = await self._wait_for(assigned, job)
                        if handler is None:
                            excluded.add(assigned)  # unreachable too long: treat it as dead
                            handler = await self._choose(job, excluded)
                    else:
                        handler = await self._choose(job, excluded)
                    with self._reserved(handler):
                        if not await self._assign(job, handler, session):
                            raise Fenced(
                                f"job {job.id} no longer belongs to this leader "
                                f"(term {ctx.fencing_token})"
                            )
                        assigned = handler.handler_id
                        await self.governors.handler_rate(handler.handler_id)
                        try_ctx = attrs.evolve(ctx, attempt=ctx.attempt + attempt - 1)
                        value = await self._run_on(handler, job, try_ctx)
            except HandlerBusy as e:
                # Our view of its load was stale: not its fault, and not a failed attempt.
                last_error = e
                busy += 1
                if busy <= MAX_BUSY_REFUSALS:
                    attempt -= 1
                    if assigned == handler.handler_id:
                        assigned = None
                    await asyncio.sleep(backoff(_RetryState(min(busy, 8))))
                    continue
                excluded.add(handler.handler_id)
                continue
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

    # ------------------------------------------------------------------ assignment

    def _assigned_handler(self, job: Job) -> str | None:
        js = self.state.jobs.get(job.id)
        return js.handler if js is not None else None

    async def _assign(self, job: Job, handler: HandlerInfo, session: LeaderSession) -> bool:
        """Commit "job → handler" before dispatching; a leader without a quorum cannot.
        Assignments made in one loop iteration share a log entry (the data store batches).
        A job its fire round already leased to this term with this handler needs no second
        commit: the round's entry recorded both (mesh.scheduling.loop)."""
        js = self.state.jobs.get(job.id)
        if js is None:
            return True
        if (
            js.handler == handler.handler_id
            and js.term == session.term
            and js.job.acquired_by == session.identity
        ):
            return True
        return await session.assign(job.id, handler.handler_id)

    def suggest(self, job: Job) -> str | None:
        """The handler a job fired ahead of time will go to (round robin over the handlers that
        offer its task and have room now), or None: chosen when it starts."""
        candidates = sorted(
            (h for h in self.registry.routable(job.task_id) if h.in_flight < h.concurrency),
            key=lambda h: h.handler_id,
        )
        if not candidates:
            return None
        turn = next(self._cursor.setdefault(job.task_id, itertools.count()))
        return candidates[turn % len(candidates)].handler_id

    async def _wait_for(self, handler_id: str, job: Job) -> HandlerInfo | None:
        """The assigned handler once it is alive (and offers the task), or None after the wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.redispatch_wait
        while True:
            h = self.registry.handlers.get(handler_id)
            if h is not None and job.task_id in h.tasks and self.registry.state(h) == "alive":
                return h
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning(
                    "job %s: assigned handler %s unreachable for %.1fs; retrying elsewhere",
                    job.id, handler_id, self.settings.redispatch_wait,
                )  # fmt: skip
                return None
            await self.registry.changed(min(remaining, 0.25))

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
                wait = (
                    "the schedule's misfire grace time"
                    if job.start_deadline is not None
                    else f"dispatch.no_handler_wait, {self.settings.no_handler_wait:g}s"
                )
                if not self.registry.offers(job.task_id):
                    raise TaskUnavailable(
                        f"no handler offered task {job.task_id!r} within the job's wait ({wait})"
                    )
                raise TaskUnavailable(
                    f"every handler offering task {job.task_id!r} stayed busy or unhealthy "
                    f"within the job's wait ({wait})"
                )
            # Woken by a handler arriving, recovering or finishing a job; polled as a fallback
            # for circuits whose cool-down ends.
            await self.registry.changed(min(remaining, 0.25), job.task_id)

    def _wait_deadline(self, job: Job) -> float:
        loop = asyncio.get_running_loop()
        if job.start_deadline is not None:
            left = (job.start_deadline - datetime.now(UTC)).total_seconds()
            return loop.time() + max(0.0, left)
        return loop.time() + self.settings.no_handler_wait

    def _pick(self, job: Job, excluded: set[str]) -> HandlerInfo | None:
        candidates = [
            h
            for h in self.registry.routable(job.task_id)
            if h.handler_id not in excluded and h.in_flight < h.concurrency
        ]
        if not candidates:
            return None
        chosen = None
        if job.schedule_id is not None and (job.metadata or {}).get("affinity") == "sticky":
            sticky = self._sticky.get(job.schedule_id)
            chosen = next((h for h in candidates if h.handler_id == sticky), None)
        if chosen is None:
            candidates.sort(key=lambda h: h.handler_id)
            start = next(self._cursor.setdefault(job.task_id, itertools.count())) % len(candidates)
            rotated = candidates[start:] + candidates[:start]
            chosen = min(rotated, key=lambda h: h.in_flight / h.concurrency)
        if chosen.circuit_open_until > 0:
            # Its circuit's cool-down has passed (else it is not routable): this job is the one
            # probe, and other jobs skip the handler until the probe's outcome is known.
            chosen.probing = True
        return chosen

    # ------------------------------------------------------------------ one attempt

    @contextlib.contextmanager
    def _reserved(self, handler: HandlerInfo) -> Iterator[None]:
        """Count the job against the handler from the moment it is chosen: the assignment
        commit comes first, and jobs choosing meanwhile must see the slot as taken, or they
        pile onto the same handler and it refuses them (``at_capacity``)."""
        probe = handler.probing  # this job is its circuit's probe (see _pick)
        handler.in_flight += 1
        try:
            yield
        finally:
            handler.in_flight -= 1
            if probe:
                # Ended without a verdict on the handler (refused as full, fenced, cancelled, or
                # the task raised): the next job probes it. record_* give the verdicts.
                handler.probing = False
            self.registry.notify(handler)

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
        incarnation = handler.incarnation
        try:
            if not self.bus.send_to_identity(handler.identity, p.DISPATCH, payload):
                raise HandlerLost(f"handler {handler.handler_id} is not connected to this node")
            try:
                ack = await asyncio.wait_for(pending.ack, self.settings.ack_timeout)
            except TimeoutError:
                # Nothing runs without our start, and a late acknowledgement is answered with
                # start=false (see _on_ack): retrying elsewhere cannot run the job twice.
                raise HandlerLost(f"handler {handler.handler_id} did not acknowledge") from None
            if not ack.get("accepted"):
                error = HandlerBusy if ack.get("reason") == p.AT_CAPACITY else HandlerLost
                raise error(
                    f"handler {handler.handler_id} refused the dispatch: {ack.get('reason')}"
                )
            if ack.get("needs_start"):
                self.bus.send_to_identity(
                    handler.identity, p.DISPATCH_START, {"dispatch_id": dispatch_id, "start": True}
                )
            result = await self._await_result(handler, incarnation, pending, timeout)
        finally:
            self._pending.pop(dispatch_id, None)
        if result.get("outcome") == p.NOT_STARTED:
            raise HandlerLost(f"handler {handler.handler_id} did not start the job in time")
        if result.get("outcome") == "success":
            return result.get("return_value")
        err = result.get("error") or {}
        if err.get("timed_out"):
            raise HandlerLost(f"handler {handler.handler_id}: {err.get('message')}")
        raise RemoteJobError(str(err.get("type", "Error")), str(err.get("message", "")))

    async def _await_result(
        self,
        handler: HandlerInfo,
        incarnation: str | None,
        pending: _Pending,
        timeout: float | None,
    ) -> dict[str, Any]:
        """Wait for the result while watching the handler's heartbeat.

        A started job is given up on only when its handler restarted (the job died with it) or
        has been unreachable for ``redispatch_wait`` (it may still be running it: retrying
        elsewhere is then at-least-once, with the same idempotency key).
        """
        loop = asyncio.get_running_loop()
        slack = self.settings.ack_timeout + p.START_WINDOW
        deadline = None if timeout is None else loop.time() + timeout + slack
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
            silent = self.registry.clock() - handler.last_seen
            if silent > max(self.settings.redispatch_wait, p.DEAD_AFTER):
                raise HandlerLost(
                    f"handler {handler.handler_id} unreachable for {silent:.1f}s mid-job"
                )
            if handler.incarnation != incarnation:
                raise HandlerLost(f"handler {handler.handler_id} restarted mid-job")

    # ------------------------------------------------------------------ incoming

    def _on_hello(self, msg: Incoming) -> dict[str, Any] | None:
        """Every node keeps the handler registry, and tells a handler where the leader is."""
        hello = self._accept(msg, p.Hello)
        if hello is None:
            return None  # refused: no registration, and no map of the mesh for a stranger
        self.registry.record(hello, identity=msg.identity if msg.sender is not None else None)
        leader = self.replica.leader_id
        return {
            "node_id": self.replica.node_id,
            "leader_id": leader,
            "term": self.replica.term,
            "leader_mesh": self.directory.address_of(leader) if leader is not None else None,
            "nodes": self.directory.mesh_addresses(),
        }

    def _on_ack(self, msg: Incoming) -> None:
        ack = self._accept(msg, p.DispatchAck)
        if ack is None:
            return
        pending = self._pending.get(ack.dispatch_id)
        if pending is not None and not self._from_assigned(msg, pending):
            return
        if pending is not None and not pending.ack.done():
            pending.ack.set_result(msg.payload)
            return
        if ack.needs_start and msg.identity:
            # We gave up on this dispatch (or never sent it): the handler must not run it.
            self.bus.send_to_identity(
                msg.identity, p.DISPATCH_START, {"dispatch_id": ack.dispatch_id, "start": False}
            )

    def _on_result(self, msg: Incoming) -> None:
        result = self._accept(msg, p.JobResult)
        if result is None:
            return
        pending = self._pending.get(result.dispatch_id)
        if pending is None:
            return  # a late result for an attempt we gave up on, or from a previous leader
        if not self._from_assigned(msg, pending):
            return
        if not pending.ack.done():
            pending.ack.set_result({"accepted": True})
        if not pending.result.done():
            pending.result.set_result(msg.payload)

    def _accept(self, msg: Incoming, kind: type[_FromHandler]) -> _FromHandler | None:
        """The decoded message when it is well-formed and its key may send it (a ``handler``
        key naming itself as ``handler_id``); otherwise it is counted, logged and None."""
        try:
            decoded = p.decode(msg.payload, kind)
        except msgspec.ValidationError as e:
            self.bus.reject(msg, "malformed", f"{msg.kind}: {e}")
            return None
        reason = refusal(msg, decoded.handler_id, "handler")
        if reason is not None:
            self.bus.reject(
                msg,
                reason,
                f"{msg.kind} claiming handler {decoded.handler_id!r} from key {msg.sender!r} "
                f"(role {msg.sender_role!r})",
            )
            return None
        return decoded

    def _from_assigned(self, msg: Incoming, pending: _Pending) -> bool:
        """An answer to a dispatch counts only from the handler it was sent to. Unencrypted
        links authenticate nobody, so there the dispatch id alone identifies the answer."""
        assigned = pending.handler.handler_id
        if msg.sender is None or msg.sender == assigned:
            return True
        self.bus.reject(
            msg, "not_assigned", f"{msg.kind} for a dispatch sent to handler {assigned!r}"
        )
        return False


@attrs.frozen
class _RetryState:
    """The bit of tenacity's RetryCallState that its wait strategies read."""

    attempt_number: int
