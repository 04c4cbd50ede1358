"""Dispatch from the leader to handler processes.

Why this file is long: routing, the dispatch protocol's leader side (one message or two-phase),
the watchdog and the checks on what handlers send are one retry loop's parts, read together.

Routing: among the alive handlers that offer the task, whose circuit is closed and who have a
free slot, pick the least loaded; ties go round-robin (a per-task cursor), so equal handlers get
equal shares. A schedule whose metadata says ``{"affinity": "sticky"}`` prefers the handler that
ran its previous job while that handler is healthy.

Targets: a job whose schedule's ``target.tags`` are set goes only to handlers having all those
tags (``--tag``); when no live handler offering its task has them, the job ends at once with
outcome ``no_handler`` (``NoHandler``), while matching handlers that are only busy are waited
for as usual. A broadcast fire is split by the leader into one run per matching handler
(``targets``, then the state machine's ``broadcast`` command); each run then comes here as a
job assigned to its handler.

Messages: one ``dispatch`` per job, answered by its ``job_result`` (or a refusal). Its
``start_by``, a time on the handler's clock (learnt from its hellos), fences it: a dispatch that
arrives later runs nothing, so once that time has passed on the handler and a hello sent after
it does not list the job, the job did not start there (mesh.dispatch.protocol). A handler whose
hellos carry no clock gets the two-phase start (dispatch, ack, start, result).

Faults: a refused dispatch, a dispatch that did not start, a handler that stops heartbeating, or
one silent past the job's timeout (and a slack) is retried with the same idempotency key (the
handler deduplicates): a dispatch that did not start goes back to the same handler (it answers
from its idempotency window if only the result was lost), the others go to another handler. A
task that raises, or that its handler reports past its timeout (outcome ``timeout``), is not
retried here: the schedule's retry policy decides (docs/scheduling.md). A job whose task no
handler offers waits for one until its start deadline (the schedule's misfire grace time), or
``no_handler_wait`` for jobs without one, then ends with a clear error.

Trust: on an authenticated mesh a handler is its key. Hellos, acknowledgements and results are
accepted only from a ``handler`` key whose name is the ``handler_id`` they claim, and an answer
to a dispatch only from the handler it was sent to; anything else, malformed messages included,
is refused through ``MessageBus.reject`` (counted, logged at most once a minute per peer).

Why this file is long: it is the leader's whole side of the handler protocol (routing, the
dispatch attempt loop, the watchdog, incoming answers, cancels), which share the table of
dispatches in flight and are checked against the handler's side together.
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
from mesh.dispatch.registry import HandlerInfo, HandlerRegistry, has_tags
from mesh.scheduling.controls import controls_of
from mesh.scheduling.executor import TaskUnavailable
from mesh.scheduling.outcomes import JobTimedOut, NoHandler, RunCancelled
from mesh.scheduling.state import (
    RemoteJobError,
    SchedulerState,
    idempotency_key,
    job_key,
    to_wire,
)
from mesh.tasks import JobContext

if TYPE_CHECKING:
    from mesh.scheduling.session import LeaderSession

log = logging.getLogger("mesh.dispatch")

MAX_BUSY_REFUSALS = 100  # "at capacity" answers a job may get before they count as failures
WATCH_INTERVAL = 0.25  # seconds between the watchdog's looks at the dispatches in flight

_FromHandler = TypeVar("_FromHandler", p.Hello, p.DispatchAck, p.JobResult)


class HandlerLost(Exception):
    """The handler stopped answering (died, partitioned, or refused): retry elsewhere."""


class HandlerBusy(HandlerLost):
    """The handler refused because it is full: choose again; neither a failure nor an attempt."""


class NotStarted(HandlerLost):
    """The dispatch cannot start any more and did not (a hello sent after its ``start_by`` does
    not list it, and no result came): send it again to the same handler."""


class Fenced(Exception):
    """This leader's lease on the job is gone (a newer leader took over): do not dispatch."""


@attrs.define
class _Pending:
    """One dispatch in flight. ``result`` gets the handler's answer (the one-message dispatch's
    refusal too) or the watchdog's verdict; ``ack`` is the two-phase start's acknowledgement."""

    handler: HandlerInfo
    ack: asyncio.Future[dict[str, Any]]
    result: asyncio.Future[dict[str, Any]]
    key: str
    incarnation: str | None
    start_by: float | None = None  # the handler's clock; None: the two-phase start
    timeout: float | None = None  # the task's run time limit (seconds)
    deadline: float | None = None  # registry clock: the timeout and its slack have passed
    started: bool = False  # two-phase: the start was sent; the watchdog now watches it


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
        self._watchdog: asyncio.Task[None] | None = None
        # One-message dispatches queued this loop iteration, per handler identity.
        self._outbox: dict[bytes, list[tuple[str, dict[str, Any]]]] = {}
        self._cursor: dict[str, itertools.count[int]] = {}
        self._sticky: dict[str, str] = {}  # schedule id → handler id
        bus.handle(p.HELLO, self._on_hello)
        bus.handle(p.DISPATCH_ACK, self._on_ack)
        bus.handle(p.JOB_RESULT, self._on_result)
        bus.handle(p.JOB_RESULTS, self._on_results)

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
            except NotStarted as e:
                # Back to the same handler: it runs the job now, or answers from its
                # idempotency window if it did run it and only the result was lost.
                last_error = e
                assigned = handler.handler_id
                log.info("job %s: %s; sending it again", job.id, e)
                continue
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
        offer its task, have its target's tags and have room now), or None: chosen when it
        starts (always for a broadcast, split at its start)."""
        target = controls_of(job).target
        if target is not None and target.broadcast:
            return None
        routable = self.registry.routable(job.task_id, _tags(job))
        candidates = sorted(
            (h for h in routable if h.in_flight < h.concurrency),
            key=lambda h: h.handler_id,
        )
        if not candidates:
            return None
        turn = next(self._cursor.setdefault(job.task_id, itertools.count()))
        return candidates[turn % len(candidates)].handler_id

    def cancel(self, handler_id: str, job: Job, fencing_token: int) -> bool:
        """Send ``cancel_job`` for ``job`` to ``handler_id`` (overlap ``cancel_other``); False
        when that handler is unknown or not connected to this node."""
        handler = self.registry.handlers.get(handler_id)
        if handler is None:
            return False
        payload = {
            "job_id": str(job.id),
            "idempotency_key": self._key_of(job),
            "fencing_token": fencing_token,
        }
        return bool(self.bus.send_to_identity(handler.identity, p.CANCEL_JOB, payload))

    def _key_of(self, job: Job) -> str:
        js = self.state.jobs.get(job.id)
        return job_key(js) if js is not None else idempotency_key(job)

    async def targets(self, job: Job) -> list[str]:
        """The handlers a broadcast fire runs on, by id: every live one offering its task with
        all its target's tags, at most ``MAX_SHARDS``; empty when there is none."""
        await self._settled()
        matching = self.registry.matching(job.task_id, _tags(job))
        if len(matching) > p.MAX_SHARDS:
            log.warning(
                "job %s: %d handlers match its broadcast; it runs on the first %d by id",
                job.id, len(matching), p.MAX_SHARDS,
            )  # fmt: skip
        return [h.handler_id for h in matching[: p.MAX_SHARDS]]

    async def _settled(self) -> None:
        """Until the registry has heard every live handler (registry module docstring)."""
        while not self.registry.settled():
            await self.registry.changed(0.1)

    async def _wait_for(self, handler_id: str, job: Job) -> HandlerInfo | None:
        """The assigned handler once it is alive (and offers the task), or None after the wait;
        None at once when it is alive without the job's target tags (restarted with others)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.redispatch_wait
        tags = _tags(job)
        while True:
            h = self.registry.handlers.get(handler_id)
            if h is not None and job.task_id in h.tasks and self.registry.state(h) == "alive":
                return h if has_tags(h, tags) else None
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
        tags = _tags(job)
        target = controls_of(job).target
        targeted = target is not None and (bool(target.tags) or target.broadcast)
        while True:
            handler = self._pick(job, excluded, tags)
            if handler is not None:
                return handler
            if targeted and not self.registry.offers(job.task_id, tags):
                if self.registry.settled():
                    raise NoHandler(
                        f"no live handler offering task {job.task_id!r} has the tags "
                        f"{_show(tags) or '(any)'} its schedule targets"
                    )
                await self.registry.changed(0.1)  # a node just started: hear the handlers
                continue
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

    def _pick(
        self, job: Job, excluded: set[str], tags: dict[str, str] | None = None
    ) -> HandlerInfo | None:
        candidates = [
            h
            for h in self.registry.routable(job.task_id, tags)
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
        timeout = self._timeout(job)
        pending = _Pending(
            handler, loop.create_future(), loop.create_future(),
            p.run_key(ctx.idempotency_key, ctx.try_number), handler.incarnation,
        )  # fmt: skip
        if timeout is not None:
            slack = self.settings.ack_timeout + p.START_WINDOW
            pending.timeout = timeout
            pending.deadline = self.registry.clock() + timeout + slack
        handler_now = self.registry.handler_clock(handler)
        if handler_now is not None:
            pending.start_by = handler_now + self.settings.ack_timeout
        payload = {
            "dispatch_id": dispatch_id,
            "job_id": str(job.id),
            "task": job.task_id,
            "args": to_wire(list(job.args)),
            "kwargs": to_wire(job.kwargs),
            "idempotency_key": ctx.idempotency_key,
            "fencing_token": ctx.fencing_token,
            "attempt": ctx.attempt,
            "try_number": ctx.try_number,
            "schedule_id": job.schedule_id,
            "scheduled_fire_time": ctx.scheduled_fire_time.isoformat()
            if ctx.scheduled_fire_time
            else None,
            "timeout": timeout,
            "start_by": pending.start_by,
            "shard_index": ctx.shard_index,
            "shard_count": ctx.shard_count,
        }
        self._pending[dispatch_id] = pending
        try:
            if pending.start_by is None:
                if not self.bus.send_to_identity(handler.identity, p.DISPATCH, payload):
                    raise _not_connected(handler)
                await self._start(pending, dispatch_id)
            else:
                self._queue(handler.identity, dispatch_id, payload)
            self._watch()
            result = await pending.result
        finally:
            self._pending.pop(dispatch_id, None)
        if result.get("outcome") == p.NOT_STARTED:
            raise HandlerLost(f"handler {handler.handler_id} did not start the job in time")
        if result.get("outcome") == "success":
            return result.get("return_value")
        if result.get("outcome") == p.CANCELLED:
            raise RunCancelled(f"handler {handler.handler_id} stopped job {job.id} (cancel_other)")
        err = result.get("error") or {}
        if err.get("timed_out"):
            raise JobTimedOut(f"handler {handler.handler_id}: {err.get('message')}")
        raise RemoteJobError(str(err.get("type", "Error")), str(err.get("message", "")))

    def _timeout(self, job: Job) -> float | None:
        """A run's time limit: the schedule's ``timeout``, else the config's for the task."""
        own = controls_of(job).timeout
        s = self.settings
        return own if own is not None else s.task_timeouts.get(job.task_id, s.default_timeout)

    def _queue(self, identity: bytes, dispatch_id: str, payload: dict[str, Any]) -> None:
        """Queue a one-message dispatch; what is queued for each handler goes out as one
        message when this loop iteration's callbacks have run (``_flush``)."""
        queue = self._outbox.get(identity)
        if queue is None:
            if not self._outbox:
                asyncio.get_running_loop().call_soon(self._flush)
            queue = self._outbox[identity] = []
        queue.append((dispatch_id, payload))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for identity, queued in outbox.items():
            # A dispatch given up on meanwhile (leadership lost) is not sent.
            live = [(d, payload) for d, payload in queued if d in self._pending]
            for chunk in p.batches(live):
                if len(chunk) == 1:
                    sent = self.bus.send_to_identity(identity, p.DISPATCH, chunk[0][1])
                else:
                    items = [payload for _, payload in chunk]
                    sent = self.bus.send_to_identity(identity, p.DISPATCHES, {"items": items})
                if sent:
                    continue
                for dispatch_id, _ in chunk:
                    pending = self._pending[dispatch_id]
                    if not pending.result.done():
                        pending.result.set_exception(_not_connected(pending.handler))

    async def _start(self, pending: _Pending, dispatch_id: str) -> None:
        """The two-phase start: wait for the acknowledgement, then send ``dispatch_start``."""
        handler = pending.handler
        try:
            ack = await asyncio.wait_for(pending.ack, self.settings.ack_timeout)
        except TimeoutError:
            # Nothing runs without our start, and a late acknowledgement is answered with
            # start=false (see _on_ack): retrying elsewhere cannot run the job twice.
            raise HandlerLost(f"handler {handler.handler_id} did not acknowledge") from None
        if not ack.get("accepted"):
            raise _refused(handler, ack)
        if ack.get("needs_start"):
            self.bus.send_to_identity(
                handler.identity, p.DISPATCH_START, {"dispatch_id": dispatch_id, "start": True}
            )
        pending.started = True

    # ------------------------------------------------------------------ the watchdog

    def _watch(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch_loop(), name="mesh.dispatch.watchdog"
            )

    async def _watch_loop(self) -> None:
        """Every ``WATCH_INTERVAL``, ends the dispatches in flight that will not be answered;
        exits when none is left. One task for all of them, instead of a timer per job."""
        while self._pending:
            await asyncio.sleep(WATCH_INTERVAL)
            for pending in list(self._pending.values()):
                if pending.result.done() or (pending.start_by is None and not pending.started):
                    continue
                verdict = self._verdict(pending)
                if verdict is not None:
                    pending.result.set_exception(verdict)

    def _verdict(self, pending: _Pending) -> HandlerLost | None:
        """Why a dispatch in flight will get no answer, or None while it still may.

        A started job is given up on only when its handler restarted (the job died with it), has
        been unreachable for ``redispatch_wait`` (it may still be running it: retrying elsewhere
        is then at-least-once, with the same idempotency key), or ran past the task's timeout.
        """
        handler = pending.handler
        now = self.registry.clock()
        if pending.deadline is not None and now >= pending.deadline:
            return HandlerLost(
                f"handler {handler.handler_id} exceeded the task timeout ({pending.timeout}s)"
            )
        silent = now - handler.last_seen
        if silent > max(self.settings.redispatch_wait, p.DEAD_AFTER):
            return HandlerLost(
                f"handler {handler.handler_id} unreachable for {silent:.1f}s mid-job"
            )
        if handler.incarnation != pending.incarnation:
            return HandlerLost(f"handler {handler.handler_id} restarted mid-job")
        if (
            pending.start_by is not None
            and handler.hello_clock is not None
            and handler.hello_clock >= pending.start_by
            and pending.key not in handler.running
        ):
            return NotStarted(
                f"handler {handler.handler_id} did not start the job by its start deadline"
            )
        return None

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
        if pending is not None and pending.start_by is not None:
            # One message per dispatch: only refusals are acknowledged.
            if not ack.accepted and not pending.result.done():
                pending.result.set_exception(_refused(pending.handler, msg.payload))
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

    def _on_results(self, msg: Incoming) -> None:
        """A batch of results: each item is judged as a ``job_result`` of its own."""
        try:
            batch = p.decode(msg.payload, p.Batch)
        except msgspec.ValidationError as e:
            self.bus.reject(msg, "malformed", f"{msg.kind}: {e}")
            return
        for item in batch.items:
            self._on_result(attrs.evolve(msg, kind=p.JOB_RESULT, payload=item))

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


def _tags(job: Job) -> dict[str, str]:
    """The tags the job's schedule targets (none: any handler)."""
    target = controls_of(job).target
    return target.tags if target is not None else {}


def _show(tags: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))


def _not_connected(handler: HandlerInfo) -> HandlerLost:
    return HandlerLost(f"handler {handler.handler_id} is not connected to this node")


def _refused(handler: HandlerInfo, ack: dict[str, Any]) -> HandlerLost:
    """The error for a refused dispatch: "at capacity" and "expired" (our bound on its clock
    was early) say nothing bad about the handler: choose again (HandlerBusy)."""
    reason = ack.get("reason")
    error = HandlerBusy if reason in (p.AT_CAPACITY, p.EXPIRED) else HandlerLost
    return error(f"handler {handler.handler_id} refused the dispatch: {reason}")


@attrs.frozen
class _RetryState:
    """The bit of tenacity's RetryCallState that its wait strategies read."""

    attempt_number: int
