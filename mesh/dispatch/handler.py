"""The handler process: runs ``@mesh.task`` functions for the mesh (``schedulezero handler``).

A handler is autonomous. It knows one or more node mesh addresses, keeps a DEALER to each (its
routing id is the handler id) and says ``handler_hello`` to every node every
``HEARTBEAT_INTERVAL``; the replies name the leader, whose address it dials too, so one address
is enough to find the whole mesh. Unreachable nodes are retried with capped exponential backoff
forever, so a handler started before the mesh, or one that outlives every node, never needs a
restart.

The leader sends ``dispatch`` messages; the handler runs each one that arrives before its
``start_by`` (a time on this handler's clock, which its hellos report) and answers with a
``job_result`` when the task has run, or refuses it at once with a ``dispatch_ack``, both to
the node the dispatch came from (see :mod:`mesh.dispatch.protocol`; a dispatch without
``start_by`` gets the older two-phase start). Three handler-side rules make re-dispatches safe:

* fencing: a dispatch whose ``fencing_token`` is below the highest one seen is refused;
* idempotency: a finished ``idempotency_key`` (with its ``try_number``: a retry is a new run,
  see :func:`~mesh.dispatch.protocol.run_key`) is answered from a bounded LRU+TTL window
  (``cached: true``) and a running one is joined, so the task never runs twice for one key
  while this process lives;
* capacity: at most ``concurrency`` tasks run at once; beyond that, dispatches are refused
  (``at_capacity``) so the leader picks another handler.

A dispatch's ``timeout`` ends the run's answer, not always the run: an async task is cancelled,
and the result (``timed_out``) is sent at the timeout even if the task ignores the cancellation;
a sync task's thread cannot be stopped and runs on. Either way the run keeps its slot (capacity,
``active_jobs``) until it has really ended.

Its ``tags`` (``--tag K=V``) travel in every hello; a schedule's ``target.tags`` select on them.

Trust: with keys (``keys``, or ``--keys DIR``) the handler's id is the name of its ``handler``
key and every link is CURVE; it acts only on messages from ``node`` keys (a ``dispatch`` or
``dispatch_start`` from any other key is counted in ``rejections`` and dropped), and a node's
hello reply must name the key it answered with. Without keys it runs unencrypted, which
:func:`mesh.security.policy.check_unencrypted` allows only on loopback unless ``insecure``.

Why this file is long: it is a whole program, the handler process, whose three safety rules
(fencing, the idempotency window, the start deadline) share one job table and must be read
together.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import msgspec
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    stop_never,
    wait_exponential,
)

from mesh import eventloop
from mesh.dispatch import protocol
from mesh.dispatch.protocol import (
    AT_CAPACITY,
    CANCEL_JOB,
    DISPATCH,
    DISPATCH_ACK,
    DISPATCH_START,
    DISPATCHES,
    EXPIRED,
    HEARTBEAT_INTERVAL,
    HELLO,
    JOB_RESULT,
    JOB_RESULTS,
    NOT_STARTED,
    STALE_FENCING_TOKEN,
    START_WINDOW,
    UNKNOWN_TASK,
    Batch,
    CancelJob,
    DispatchStart,
    HelloReply,
    batches,
    deadline_clock,
    decode,
)
from mesh.scheduling.controls import Tags
from mesh.security.audit import Rejections
from mesh.security.keys import KeyFileError, KeyRing
from mesh.security.policy import check_unencrypted, host_of, is_loopback
from mesh.tasks import (
    REGISTRY,
    JobContext,
    RunTimedOut,
    TaskDef,
    TaskModuleError,
    load_task_modules,
)
from mesh.transport.zmq import Incoming, MeshTransport, split_address

__all__ = [
    "BAD_REQUEST",
    "SHUTTING_DOWN",
    "HandlerProcess",
    "IdempotencyWindow",
    "NodeLink",
    "default_handler_id",
    "run_handler",
]

log = logging.getLogger("mesh.handler")

# Refusal reasons besides the protocol's three (the leader treats any refusal as "try another").
BAD_REQUEST = "bad_request"
SHUTTING_DOWN = "shutting_down"

HELLO_TIMEOUT = 1.0  # seconds to wait for one node's hello reply
BACKOFF_FIRST = 0.25  # first wait after a failed hello; doubles up to BACKOFF_MAX
BACKOFF_MAX = 2.0
RESULT_SEND_SECONDS = 5.0  # keep trying to queue an ack/result this long (peer reconnecting)
AVG_ALPHA = 0.2  # weight of the newest duration in the moving average
_HELLO_ERRORS = (TimeoutError, ConnectionError, OSError)


def default_handler_id() -> str:
    """``HOSTNAME-PID``: unique per process on a host, stable for its lifetime."""
    return f"{socket.gethostname()}-{os.getpid()}"


# ---------------------------------------------------------------------------- idempotency


@attrs.frozen
class FinishedResult:
    """What one execution of a task produced, kept to answer re-dispatches of its key."""

    outcome: str  # "success" | "error" | "cancelled"
    return_value: Any
    error: dict[str, str] | None
    duration_ms: float


class IdempotencyWindow:
    """A bounded LRU map ``idempotency_key -> FinishedResult`` whose entries expire after ``ttl``.

    The bound keeps memory flat on a handler that runs for months; the TTL keeps a key from
    answering forever (a leader re-dispatches within seconds, not hours).
    """

    def __init__(
        self, max_entries: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: collections.OrderedDict[str, tuple[float, FinishedResult]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> FinishedResult | None:
        item = self._entries.get(key)
        if item is None:
            return None
        stored_at, result = item
        if self._clock() - stored_at >= self.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return result

    def put(self, key: str, result: FinishedResult) -> None:
        now = self._clock()
        self._entries[key] = (now, result)
        self._entries.move_to_end(key)
        # Drop expired entries at the cold end, then whatever exceeds the bound.
        while self._entries:
            oldest_key, (stored_at, _) = next(iter(self._entries.items()))
            if now - stored_at < self.ttl and len(self._entries) <= self.max_entries:
                break
            del self._entries[oldest_key]


# ---------------------------------------------------------------------------- dispatches


class Dispatch(protocol.Dispatch, kw_only=True):
    """A validated ``dispatch`` payload plus the node address it arrived from."""

    address: str


def parse_dispatch(payload: Mapping[str, Any], address: str) -> Dispatch:
    """Validate a dispatch payload; raises :class:`msgspec.ValidationError` naming the problem."""
    return msgspec.convert({**payload, "address": address}, Dispatch)


@attrs.define
class _Running:
    """One execution in progress, and the re-dispatches of its key waiting for its result.

    Until the leader's ``dispatch_start`` arrives it only holds a slot (``started`` is False).
    """

    dispatch: Dispatch
    joiners: list[Dispatch] = attrs.Factory(list)
    started: bool = False
    expiry: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None  # the run, once started
    cancelled: bool = False  # stopped by the leader's cancel_job (overlap cancel_other)


# ---------------------------------------------------------------------------- nodes


@attrs.define
class NodeLink:
    """What this handler knows about one node: reachability and its last hello reply."""

    address: str
    reachable: bool | None = None  # None: never tried yet
    node_id: str | None = None
    leader_id: str | None = None
    term: int | None = None
    leader_mesh: str | None = None
    last_reply_at: float | None = None  # clock() of the last reply
    learned: bool = False  # added from a hello reply rather than configured


# ---------------------------------------------------------------------------- the process


class HandlerProcess:
    """One handler: heartbeats to every node, runs dispatched tasks, answers results.

    ``tasks`` defaults to a snapshot of :data:`mesh.tasks.REGISTRY`. ``clock`` (monotonic
    seconds) drives the idempotency TTL and durations. ``counters`` counts ``bad_requests``,
    ``refused.<reason>``, ``cached_answers``, ``joined``, ``sends_failed``; ``rejections``
    counts messages refused for security reasons (``role``, ``sender_mismatch``).

    ``clock`` defaults to :func:`~mesh.dispatch.protocol.deadline_clock`: hellos report it and
    dispatches' ``start_by`` are times on it.

    ``keys``: this handler's key ring (its own key must be named ``handler_id`` and have the
    ``handler`` role); every link is then CURVE. Without keys, the node addresses must all be
    loopback unless ``insecure`` (:class:`~mesh.security.policy.InsecureStart` otherwise).
    """

    def __init__(
        self,
        handler_id: str,
        mesh_addresses: Iterable[str],
        *,
        concurrency: int = 8,
        tasks: Mapping[str, TaskDef] | None = None,
        idempotency_window: int = 10_000,
        idempotency_ttl: float = 3600.0,
        clock: Callable[[], float] = deadline_clock,
        keys: KeyRing | None = None,
        insecure: bool = False,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        try:
            # The rule every node applies to a hello's tags (it refuses a hello breaking it).
            self.tags: dict[str, str] = msgspec.convert(dict(tags or {}), Tags)
        except msgspec.ValidationError as e:
            raise ValueError(f"tags: {e}") from None
        addresses = list(dict.fromkeys(mesh_addresses))
        if not addresses:
            raise ValueError("a handler needs at least one mesh address")
        for address in addresses:
            split_address(address)
        if keys is None:
            check_unencrypted(addresses, insecure=insecure, what=f"handler {handler_id}")
        elif keys.name != handler_id:
            # Identity is the key: nodes refuse a hello whose handler_id is not its key's name.
            raise ValueError(
                f"handler id {handler_id!r} must be the name of its key, here {keys.name!r}"
            )
        elif keys.role != "handler":
            raise ValueError(
                f"key {keys.name!r} has role {keys.role!r}; a handler needs a handler key "
                f"(schedulezero keys create {keys.name} --role handler --dir {keys.directory})"
            )
        self.handler_id = handler_id
        self.keys = keys
        self.insecure = insecure
        self.concurrency = concurrency
        self.tasks: dict[str, TaskDef] = dict(REGISTRY if tasks is None else tasks)
        self._clock = clock
        self.transport = MeshTransport(handler_id, None, keys=keys)
        # The transport's audit (it refuses unknown and revoked keys itself), shared so one
        # count and one rate-limited log cover every refusal of this process.
        self.rejections: Rejections = self.transport.rejections
        self.nodes: dict[str, NodeLink] = {a: NodeLink(a) for a in addresses}
        self.idempotency = IdempotencyWindow(idempotency_window, idempotency_ttl, clock)
        self.counters: collections.Counter[str] = collections.Counter()

        self.max_fencing_token = 0
        self.succeeded = 0
        self.failed = 0
        self.avg_ms = 0.0
        self.started_at: str | None = None
        self._running: dict[str, _Running] = {}  # run key -> execution
        # Runs past their timeout, already answered, still ending (a sync task's thread, an
        # async task ignoring its cancellation) -> task name: each keeps its slot until done.
        self._overrun: dict[asyncio.Future[Any], str] = {}
        # Finished keys whose result is not queued yet: hellos still list them as running, so a
        # leader never takes "not listed, no result" for "never started" (protocol docstring).
        self._sending: collections.Counter[str] = collections.Counter()
        # Results for one-message dispatches queued this loop iteration, per node address; each
        # future learns whether its batch was queued on the socket.
        self._results_out: dict[str, list[tuple[dict[str, Any], asyncio.Future[bool]]]] = {}
        self._job_tasks: set[asyncio.Future[Any]] = set()
        self._heartbeats: dict[str, asyncio.Task[None]] = {}
        self._leader: tuple[int, str] | None = None
        self._accepting = False
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def active_jobs(self) -> int:
        return len(self._running) + len(self._overrun)

    @property
    def draining(self) -> bool:
        return self._started and not self._accepting

    async def start(self) -> None:
        """Open the DEALERs and start heartbeating; dispatches are accepted from now on."""
        if self._started:
            return
        self._started = True
        self.started_at = datetime.now(UTC).isoformat()
        self.transport.set_handler(self._on_message)
        for address in self.nodes:
            self.transport.connect(address)
        await self.transport.start()
        self._accepting = True
        for address in list(self.nodes):
            self._start_heartbeat(address)
        log.info(
            "handler %s started: tasks=%s concurrency=%d tags=%s nodes=%s",
            self.handler_id,
            sorted(self.tasks),
            self.concurrency,
            self.tags,
            list(self.nodes),
        )

    def cancel_running(self) -> None:
        """Cancel every running job now (a second Ctrl-C); a pending :meth:`stop` then returns."""
        for task in list(self._job_tasks):
            task.cancel()

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Refuse new dispatches, let running jobs finish (up to ``drain_timeout``), then cancel.

        Hellos continue while draining, so the leader does not declare this handler dead and
        re-dispatch the jobs it is finishing. Cancelled jobs send no result: like a handler
        that died mid-job, the leader retries them elsewhere with the same idempotency key.
        """
        if self._stopped:
            return
        self._stopped = True
        self._accepting = False
        # Dispatches acknowledged but not yet started get their start (or expire) first.
        loop = asyncio.get_running_loop()
        hold_until = loop.time() + min(START_WINDOW, max(drain_timeout, 0.0))
        while any(not r.started for r in self._running.values()) and loop.time() < hold_until:  # noqa: ASYNC110 - bounded, rare
            await asyncio.sleep(0.02)
        jobs = set(self._job_tasks)
        if jobs:
            log.info("handler %s draining %d running job(s)", self.handler_id, len(jobs))
            _, pending = await asyncio.wait(jobs, timeout=max(drain_timeout, 0.0))
            if pending:
                log.warning(
                    "handler %s: %d job(s) still running after %.1fs; cancelling",
                    self.handler_id,
                    len(pending),
                    drain_timeout,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        beats = list(self._heartbeats.values())
        for task in beats:
            task.cancel()
        await asyncio.gather(*beats, return_exceptions=True)
        self._heartbeats.clear()
        await self.transport.close()
        log.info("handler %s stopped", self.handler_id)

    # ------------------------------------------------------------------ heartbeat

    def hello_payload(self) -> dict[str, Any]:
        return {
            "handler_id": self.handler_id,
            "tasks": sorted(self.tasks),
            "concurrency": self.concurrency,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "active_jobs": self.active_jobs,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "avg_ms": round(self.avg_ms, 3),
            "max_fencing_token": self.max_fencing_token,
            "started_at": self.started_at,
            "draining": self.draining,
            "clock": self._clock(),
            "running": [k for k, r in self._running.items() if r.started] + list(self._sending),
            "tags": self.tags,
        }

    def _start_heartbeat(self, address: str) -> None:
        if address in self._heartbeats or self._stopped:
            return
        self._heartbeats[address] = asyncio.get_running_loop().create_task(
            self._heartbeat_loop(address), name=f"mesh.handler[{self.handler_id}].hello"
        )

    async def _heartbeat_loop(self, address: str) -> None:
        link = self.nodes[address]
        while True:
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(_HELLO_ERRORS),
                    wait=wait_exponential(multiplier=BACKOFF_FIRST, max=BACKOFF_MAX),
                    stop=stop_never,
                    before_sleep=lambda state: self._mark_down(link, state),
                ):
                    with attempt:
                        reply = await self.transport.request(
                            address, HELLO, self.hello_payload(), HELLO_TIMEOUT
                        )
                self._on_hello_reply(link, reply)
                if self.nodes.get(address) is not link:
                    return  # dropped as an alias of a known node
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the heartbeat: log and carry on
                log.exception("handler %s: hello to %s failed", self.handler_id, address)
                await asyncio.sleep(BACKOFF_MAX)
                continue
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def _mark_down(self, link: NodeLink, state: RetryCallState) -> None:
        if link.reachable is False:
            return
        exc = state.outcome.exception() if state.outcome is not None else None
        if link.reachable is None:
            log.info(
                "handler %s: node %s not reachable yet (%s)", self.handler_id, link.address, exc
            )
        else:
            log.warning("handler %s: node %s unreachable (%s)", self.handler_id, link.address, exc)
        link.reachable = False

    def _on_hello_reply(self, link: NodeLink, payload: Mapping[str, Any]) -> None:
        try:
            reply = decode(payload, HelloReply)
        except msgspec.ValidationError as e:
            log.debug("handler %s: dropping malformed hello reply: %s", self.handler_id, e)
            return
        if not self._reply_from_its_key(link, reply):
            return
        link.last_reply_at = self._clock()
        link.node_id = reply.node_id
        link.leader_id = reply.leader_id or None
        link.term = reply.term
        link.leader_mesh = reply.leader_mesh or None
        if link.reachable is not True:
            link.reachable = True
            log.info(
                "handler %s: node %s (%s) up; leader %s, term %s",
                self.handler_id,
                link.address,
                link.node_id,
                link.leader_id,
                link.term,
            )
        if link.leader_id is not None and link.term is not None:
            leader = (link.term, link.leader_id)
            if self._leader is None or leader[0] > self._leader[0]:
                if self._leader is None or leader[1] != self._leader[1]:
                    log.info(
                        "handler %s: leader is %s (term %d)", self.handler_id, leader[1], leader[0]
                    )
                self._leader = leader
        if link.node_id is not None:
            self._forget_aliases(link)
        if link.leader_mesh is not None and link.leader_mesh not in self.nodes:
            if any(n.node_id is None and n.reachable is not False for n in self.nodes.values()):
                # A node we dial has not said who it is yet: it may be this very leader under
                # another spelling, and a second DEALER would take our routing id from the
                # first. Learn from a later reply (every HEARTBEAT_INTERVAL).
                return
            if not any(n.node_id == link.leader_id for n in self.nodes.values()):
                self._learn_node(link.leader_mesh, via=link.address)

    def _reply_from_its_key(self, link: NodeLink, reply: HelloReply) -> bool:
        """On CURVE a node is its key: a reply naming another node than the ``node`` key the
        DEALER dialled is refused (it would mislead us about the leader)."""
        if self.keys is None:
            return True
        name = self.transport.name_at(link.address)
        if name is None:
            return True  # the transport dials node keys only; the name is just not settled
        cert = self.keys.get(name)
        reason = None
        if cert is None or cert.role != "node":
            reason = "role"
        elif reply.node_id != name:
            reason = "sender_mismatch"
        if reason is None:
            return True
        self.rejections.reject(
            reason, link.address, f"hello reply naming node {reply.node_id!r} from key {name!r}"
        )
        return False

    def _forget_aliases(self, link: NodeLink) -> None:
        # Two DEALERs with our routing id on one node would take the identity from each other
        # (ROUTER_HANDOVER) forever; a learned address that turns out to be another spelling of
        # a known node is dropped.
        for other in list(self.nodes.values()):
            if other is link or other.node_id != link.node_id:
                continue
            alias = other if other.learned else link if link.learned else None
            if alias is None:
                continue
            log.info(
                "handler %s: %s is node %s, already known as another address; dropping it",
                self.handler_id,
                alias.address,
                alias.node_id,
            )
            del self.nodes[alias.address]
            beat = self._heartbeats.pop(alias.address, None)
            if beat is not None and beat is not asyncio.current_task():
                beat.cancel()
            self.transport.disconnect(alias.address)

    def _learn_node(self, address: str, *, via: str) -> None:
        try:
            split_address(address)
        except ValueError:
            log.warning(
                "handler %s: node %s named a bad leader address %r", self.handler_id, via, address
            )
            return
        if self.keys is None and not self.insecure and not is_loopback(host_of(address)):
            # The loopback-only rule holds for learned addresses too: no unencrypted dialling
            # out because a reply said so.
            self.rejections.reject(
                "insecure_address", via, f"not dialling {address} without keys (no --insecure)"
            )
            return
        log.info("handler %s: learned node %s from %s", self.handler_id, address, via)
        self.nodes[address] = NodeLink(address, learned=True)
        # Secured, the transport finds which node key is there by probing (docs/security.md).
        self.transport.connect(address)
        self._start_heartbeat(address)

    # ------------------------------------------------------------------ dispatches

    def _on_message(self, incoming: Incoming) -> None:
        # Sync on purpose: each dispatch is judged (fencing, idempotency, capacity) atomically
        # in arrival order; only the task itself runs as an asyncio task.
        if incoming.sender is not None and incoming.sender_role != "node":
            # Only nodes dispatch: a handler or replica key that reached us (a trusted key, so
            # the transport let it through) must not make us run anything.
            self.rejections.reject(
                "role",
                incoming.sender,
                f"{incoming.kind} from a {incoming.sender_role!r} key via {incoming.address}",
            )
            return
        if incoming.kind == DISPATCH:
            self._on_dispatch(incoming.payload, incoming.address)
        elif incoming.kind == DISPATCHES:
            self._on_dispatches(incoming.payload, incoming.address)
        elif incoming.kind == DISPATCH_START:
            self._on_start(incoming.payload, incoming.address)
        elif incoming.kind == CANCEL_JOB:
            self._on_cancel(incoming.payload, incoming.address)
        else:
            self.counters["unexpected." + incoming.kind] += 1
            log.debug("handler %s: ignoring %r message", self.handler_id, incoming.kind)

    def _on_dispatches(self, payload: dict[str, Any], address: str) -> None:
        try:
            batch = decode(payload, Batch)
        except msgspec.ValidationError as e:
            self.counters["bad_requests"] += 1
            log.warning("handler %s: bad dispatch batch from %s: %s", self.handler_id, address, e)
            return
        for item in batch.items:  # each judged as if it had come alone, in order
            self._on_dispatch(item, address)

    def _on_dispatch(self, payload: dict[str, Any], address: str) -> None:
        try:
            d = parse_dispatch(payload, address)
        except msgspec.ValidationError as e:
            self.counters["bad_requests"] += 1
            dispatch_id = payload.get("dispatch_id")
            log.warning("handler %s: bad dispatch from %s: %s", self.handler_id, address, e)
            if isinstance(dispatch_id, str) and dispatch_id:
                self._ack(address, dispatch_id, False, BAD_REQUEST)
            return

        if d.start_by is not None and self._clock() >= d.start_by:
            # The leader may have given up on it and sent the job elsewhere: never run it.
            self._refuse(d, EXPIRED)
            return
        if d.fencing_token < self.max_fencing_token:
            log.warning(
                "handler %s: refusing dispatch %s of %s from %s: fencing token %d < %d",
                self.handler_id,
                d.dispatch_id,
                d.task,
                address,
                d.fencing_token,
                self.max_fencing_token,
            )
            self._refuse(d, STALE_FENCING_TOKEN)
            return
        self.max_fencing_token = d.fencing_token

        task = self.tasks.get(d.task)
        if task is None:
            self._refuse(d, UNKNOWN_TASK)
            return

        two_phase = d.start_by is None  # one message per dispatch: no ack when accepted
        finished = self.idempotency.get(d.run_key)
        if finished is not None:
            self.counters["cached_answers"] += 1
            if two_phase:
                self._ack(address, d.dispatch_id, True, None)
            self._spawn(self._send_result(d, finished, cached=True))
            return
        running = self._running.get(d.run_key)
        if running is not None and not running.started:
            # Not started yet: the newer dispatch takes the slot over; the older one's start
            # (from a leader that may have given up on it) will find nothing to start.
            self._drop_pending(running)
            running = None
        if running is not None:
            self.counters["joined"] += 1
            if two_phase:
                self._ack(address, d.dispatch_id, True, None)
            same = (running.dispatch, *running.joiners)
            if not any(o.dispatch_id == d.dispatch_id and o.address == address for o in same):
                running.joiners.append(d)
            return

        if not self._accepting:
            self._refuse(d, SHUTTING_DOWN)
            return
        if self.active_jobs >= self.concurrency or self._task_is_full(task):
            self._refuse(d, AT_CAPACITY)
            return

        if not two_phase:
            running = self._running[d.run_key] = _Running(d, started=True)
            running.task = self._spawn(self._run(task, d))
            return
        pending = _Running(d)
        pending.expiry = asyncio.get_running_loop().call_later(
            START_WINDOW, self._expire_pending, d.run_key, d.dispatch_id
        )
        self._running[d.run_key] = pending
        self._ack(address, d.dispatch_id, True, None, needs_start=True)

    def _on_start(self, payload: dict[str, Any], address: str) -> None:
        try:
            msg = decode(payload, DispatchStart)
        except msgspec.ValidationError as e:
            log.debug(
                "handler %s: dropping malformed start from %s: %s", self.handler_id, address, e
            )
            return
        dispatch_id, start = msg.dispatch_id, msg.start
        pending = next(
            (
                r
                for r in self._running.values()
                if not r.started and r.dispatch.dispatch_id == dispatch_id
            ),
            None,
        )
        if pending is None:
            if start:
                # Too late (the window passed, or a newer dispatch took the slot): say so, so
                # the leader retries elsewhere knowing this handler ran nothing.
                self.counters["late_starts"] += 1
                self._spawn(self._send_not_started(dispatch_id, address))
            return
        if not start:
            self.counters["cancelled_starts"] += 1
            self._drop_pending(pending)
            return
        if pending.expiry is not None:
            pending.expiry.cancel()
        pending.started = True
        task = self.tasks[pending.dispatch.task]
        pending.task = self._spawn(self._run(task, pending.dispatch))

    def _drop_pending(self, pending: _Running) -> None:
        if pending.expiry is not None:
            pending.expiry.cancel()
        key = pending.dispatch.run_key
        if self._running.get(key) is pending:
            del self._running[key]

    def _expire_pending(self, key: str, dispatch_id: str) -> None:
        pending = self._running.get(key)
        if (
            pending is not None
            and not pending.started
            and pending.dispatch.dispatch_id == dispatch_id
        ):
            self.counters["expired_starts"] += 1
            del self._running[key]

    async def _send_not_started(self, dispatch_id: str, address: str) -> None:
        payload = {
            "dispatch_id": dispatch_id,
            "handler_id": self.handler_id,
            "outcome": NOT_STARTED,
            "error": {"type": "NotStarted", "message": "start arrived after the start window"},
        }
        self.transport.send(address, JOB_RESULT, payload)

    def _task_is_full(self, task: TaskDef) -> bool:
        # A task's own max_running_jobs also holds per handler (the leader may enforce it
        # mesh-wide; locally it is a cheap second line).
        if task.max_running_jobs is None:
            return False
        running = sum(1 for r in self._running.values() if r.dispatch.task == task.name)
        running += sum(1 for name in self._overrun.values() if name == task.name)
        return running >= task.max_running_jobs

    def _refuse(self, d: Dispatch, reason: str) -> None:
        self.counters["refused." + reason] += 1
        self._ack(d.address, d.dispatch_id, False, reason)

    def _ack(
        self,
        address: str,
        dispatch_id: str,
        accepted: bool,
        reason: str | None,
        *,
        needs_start: bool = False,
    ) -> None:
        payload = {
            "dispatch_id": dispatch_id,
            "handler_id": self.handler_id,
            "accepted": accepted,
            "reason": reason,
            "needs_start": needs_start,
        }
        # The DEALER the dispatch arrived on is connected, so this queues unless the HWM is hit.
        if not self.transport.send(address, DISPATCH_ACK, payload):
            self.counters["sends_failed"] += 1
            log.warning("handler %s: could not ack %s to %s", self.handler_id, dispatch_id, address)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)
        return task

    def _on_cancel(self, payload: dict[str, Any], address: str) -> None:
        """The leader's ``cancel_job`` (overlap ``cancel_other``): stop our run of the job if
        the message is current (fencing token) and names a run of ours (key and job id)."""
        try:
            msg = decode(payload, CancelJob)
        except msgspec.ValidationError as e:
            self.counters["bad_requests"] += 1
            log.warning("handler %s: bad cancel from %s: %s", self.handler_id, address, e)
            return
        # Runs are keyed by key and try (``run_key``): the job id names the try to stop.
        running = next(
            (
                r
                for r in self._running.values()
                if r.dispatch.job_id == msg.job_id
                and r.dispatch.idempotency_key == msg.idempotency_key
            ),
            None,
        )
        if msg.fencing_token < self.max_fencing_token:
            reason = STALE_FENCING_TOKEN
        elif running is None or running.dispatch.job_id != msg.job_id or running.task is None:
            reason = "unknown_job"  # not ours, finished already, or its dispatch is yet to come
        elif not self.tasks[running.dispatch.task].is_async:
            reason = "sync_task"  # a thread cannot be stopped: it runs to its end
        else:
            if not running.cancelled:
                running.cancelled = True
                # After the run's first step (it may not have begun yet): a task cancelled
                # before it begins never enters _run, which reports the cancel.
                asyncio.get_running_loop().call_soon(running.task.cancel)
                self.counters["cancelled"] += 1
                log.info("handler %s: job %s cancelled by the leader", self.handler_id, msg.job_id)
            return
        self.counters["cancel_refused." + reason] += 1
        log.debug("handler %s: cancel of %s ignored: %s", self.handler_id, msg.job_id, reason)

    async def _run(self, task: TaskDef, d: Dispatch) -> None:
        ctx = JobContext(
            job_id=d.job_id,
            task=d.task,
            schedule_id=d.schedule_id,
            scheduled_fire_time=d.scheduled_fire_time,
            idempotency_key=d.idempotency_key,
            attempt=d.attempt,
            fencing_token=d.fencing_token,
            try_number=d.try_number,
            shard_index=d.shard_index,
            shard_count=d.shard_count,
        )
        started = self._clock()
        error: dict[str, str] | None = None
        value: Any = None
        outcome = "success"
        try:
            try:
                value = await task.run_within(ctx, d.args, d.kwargs, d.timeout)
            except RunTimedOut as e:
                self._hold_slot(e.run, d.task)
                error = {
                    "type": "TimeoutError",
                    "message": str(e),
                    "timed_out": True,  # the dispatch timeout, not the task's own error
                }
            except Exception as e:
                error = {"type": type(e).__name__, "message": str(e)}
            else:
                try:
                    json.dumps(value)
                except (TypeError, ValueError) as e:
                    error = {
                        "type": "TypeError",
                        "message": f"return value is not JSON-serializable: {e}",
                    }
                    value = None
        except asyncio.CancelledError:
            running = self._running.get(d.run_key)
            if running is None or not running.cancelled or running.dispatch is not d:
                # Stopped mid-job: no result and no cache entry, so the leader's retry runs it.
                self._running.pop(d.run_key, None)
                raise
            # The leader's cancel_job: the run ended, and its result says so.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            outcome = protocol.CANCELLED
            error = {"type": "CancelledError", "message": "cancelled by the leader (overlap)"}
        if error is not None and outcome == "success":
            outcome = "error"
        duration_ms = (self._clock() - started) * 1000.0
        result = FinishedResult(
            outcome=outcome,
            return_value=value,
            error=error,
            duration_ms=duration_ms,
        )
        if error is None:
            self.succeeded += 1
        elif outcome == protocol.CANCELLED:
            pass  # neither a success nor the task's failure
        else:
            self.failed += 1
            log.info(
                "handler %s: job %s (%s) failed: %s: %s",
                self.handler_id,
                d.job_id,
                d.task,
                error["type"],
                error["message"],
            )
        done = self.succeeded + self.failed
        self.avg_ms = (
            duration_ms if done == 1 else self.avg_ms + AVG_ALPHA * (duration_ms - self.avg_ms)
        )
        # Cache before leaving the running map: a re-dispatch never sees neither.
        self.idempotency.put(d.run_key, result)
        running = self._running.pop(d.run_key)
        self._sending[d.run_key] += 1
        try:
            await asyncio.gather(
                self._send_result(d, result, cached=False),
                *(self._send_result(j, result, cached=True) for j in running.joiners),
            )
        finally:
            self._sending[d.run_key] -= 1
            if self._sending[d.run_key] <= 0:
                del self._sending[d.run_key]

    def _hold_slot(self, run: asyncio.Future[Any], task: str) -> None:
        """Keep a timed-out run's slot busy until it has really ended; ``stop`` waits for it
        (and a second signal cancels it) like any running job."""
        self._overrun[run] = task
        self._job_tasks.add(run)
        run.add_done_callback(self._job_tasks.discard)
        run.add_done_callback(lambda f: self._overrun.pop(f, None))

    async def _send_result(self, d: Dispatch, result: FinishedResult, *, cached: bool) -> None:
        payload = {
            "dispatch_id": d.dispatch_id,
            "job_id": d.job_id,
            "idempotency_key": d.idempotency_key,
            "handler_id": self.handler_id,
            "outcome": result.outcome,
            "return_value": result.return_value,
            "error": result.error,
            "duration_ms": round(result.duration_ms, 3),
            "cached": cached,
        }
        # Answers to one-message dispatches (a leader that knows batches) go out batched.
        send = self._queue_result if d.start_by is not None else self._send_now
        if await send(d.address, payload):
            return
        # A node that is reconnecting cannot take the message yet: retry briefly. If it stays
        # away, its successor re-dispatches the key and gets the result from the window.
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_result(lambda sent: not sent),
                wait=wait_exponential(multiplier=0.02, max=0.5),
                stop=stop_after_delay(RESULT_SEND_SECONDS),
            ):
                with attempt:
                    sent = await send(d.address, payload)
                if not attempt.retry_state.outcome.failed:
                    attempt.retry_state.set_result(sent)
        except RetryError:
            self.counters["sends_failed"] += 1
            log.warning(
                "handler %s: could not send the result of %s to %s within %.0fs",
                self.handler_id,
                d.dispatch_id,
                d.address,
                RESULT_SEND_SECONDS,
            )

    async def _send_now(self, address: str, payload: dict[str, Any]) -> bool:
        return self.transport.send(address, JOB_RESULT, payload)

    def _queue_result(self, address: str, payload: dict[str, Any]) -> asyncio.Future[bool]:
        """Queue a result; what is queued for each node goes out as one message when this
        loop iteration's callbacks have run. The future says whether it was queued."""
        loop = asyncio.get_running_loop()
        queue = self._results_out.get(address)
        if queue is None:
            if not self._results_out:
                loop.call_soon(self._flush_results)
            queue = self._results_out[address] = []
        sent = loop.create_future()
        queue.append((payload, sent))
        return sent

    def _flush_results(self) -> None:
        out, self._results_out = self._results_out, {}
        for address, queued in out.items():
            for chunk in batches(queued):
                if len(chunk) == 1:
                    sent = self.transport.send(address, JOB_RESULT, chunk[0][0])
                else:
                    items = [payload for payload, _ in chunk]
                    sent = self.transport.send(address, JOB_RESULTS, {"items": items})
                for _, fut in chunk:
                    if not fut.done():
                        fut.set_result(sent)


# ---------------------------------------------------------------------------- entry point


def run_handler(
    mesh_addresses: list[str],
    tasks: list[str],
    handler_id: str | None = None,
    concurrency: int = 8,
    *,
    drain_timeout: float = 10.0,
    keys_dir: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    tags: Mapping[str, str] | None = None,
) -> int:
    """``schedulezero handler``: import the task modules, run until SIGINT/SIGTERM; exit code.

    A module that cannot be imported → one line on stderr, exit 2. A first signal drains
    running jobs (up to ``drain_timeout`` seconds); a second one cancels them at once.

    ``keys_dir`` (``--keys DIR``): run on CURVE as the key ``DIR/<handler_id>.key_secret``; a
    handler id is then required, since it is the key's name. Without it, ``insecure``
    (``--insecure``) allows non-loopback node addresses. Raises, before anything starts:
    :class:`~mesh.security.keys.KeyFileError` (no such key, bad directory, ``keys_dir`` without
    ``handler_id``), :class:`~mesh.security.policy.InsecureStart` (no keys, a non-loopback
    address, no ``insecure``), ``ValueError`` (the key is not a ``handler`` key); all are
    ``ValueError``s with a one-line message, for the CLI to print and exit 2.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    try:
        load_task_modules(tasks)
    except TaskModuleError as e:
        print(f"schedulezero: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    if not REGISTRY:
        print(
            f"schedulezero: error: no @mesh.task functions in {', '.join(tasks)}",
            file=sys.stderr,
            flush=True,
        )
        return 2
    keys = None
    if keys_dir is not None:
        if handler_id is None:
            raise KeyFileError("--keys needs --handler-id: a handler's id is the name of its key")
        keys = KeyRing(keys_dir, handler_id)
    handler = HandlerProcess(
        handler_id or default_handler_id(),
        mesh_addresses,
        concurrency=concurrency,
        keys=keys,
        insecure=insecure,
        tags=tags,
    )
    return eventloop.run(_serve(handler, drain_timeout))


async def _serve(handler: HandlerProcess, drain_timeout: float) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info(
                "handler %s: %s received, stopping", handler.handler_id, signal.Signals(signum).name
            )
            stop_requested.set()
        else:
            log.warning("handler %s: second signal, cancelling running jobs", handler.handler_id)
            handler.cancel_running()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        await handler.start()
        await stop_requested.wait()
        await handler.stop(drain_timeout)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 0
