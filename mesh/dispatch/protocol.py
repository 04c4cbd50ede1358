"""The handler protocol: what travels between mesh nodes and handler processes.

A handler process connects a DEALER (routing id = its handler id) to the ROUTER of every node it
knows. Messages (ZMQ kind → payload):

``handler_hello``  handler → every node, a request every ``HEARTBEAT_INTERVAL``; the node answers
    ``{"node_id", "leader_id", "term", "leader_mesh", "nodes"}``. Payload: ``{"handler_id",
    "tasks", "concurrency", "pid", "host", "active_jobs", "succeeded", "failed", "avg_ms",
    "max_fencing_token", "started_at", "draining", "clock", "running", "tags"}``. Every node
    keeps the registry from these, so ``GET /api/handlers`` answers on every node. ``clock`` is the
    handler's deadline clock when it sent the hello (seconds, ``CLOCK_BOOTTIME``: monotonic and
    counting suspend); ``running`` the idempotency keys it is running, or whose result it has
    not yet queued. Both serve the one-message dispatch below. ``tags`` (``--tag K=V``): at
    most 32, keys and values of 1 to 128 characters from ``A-Z a-z 0-9 _ . : / -``, as a
    schedule's ``target.tags`` (a hello breaking that is refused whole); absent means none.
``dispatch``       leader → handler (ROUTER → DEALER, one-way): ``{"dispatch_id", "job_id",
    "task", "args", "kwargs", "idempotency_key", "fencing_token", "attempt", "try_number",
    "schedule_id", "scheduled_fire_time", "timeout", "start_by", "shard_index", "shard_count"}``.
    ``try_number`` (default 1) is the run of the fire under the schedule's retry policy: a
    handler deduplicates by :func:`run_key` (the key and the try), so a retry runs again where a
    redelivery of the same try is answered from the idempotency window. Hellos' ``running``
    lists run keys. ``shard_index`` and ``shard_count`` are a broadcast run's place among its
    fire's runs (0-based index < count; else 0 and 1).
``dispatch_ack``   handler → the node the dispatch came from: ``{"dispatch_id", "handler_id",
    "accepted": bool, "reason", "needs_start": bool}``. A handler refuses a dispatch whose
    fencing token is lower than the highest it has seen (``reason: "stale_fencing_token"``), or
    when it is full (``"at_capacity"``), does not offer the task (``"unknown_task"``), or the
    dispatch arrived after its ``start_by`` (``"expired"``).
``job_result``     handler → the node the dispatch came from: ``{"dispatch_id", "job_id",
    "idempotency_key", "handler_id", "outcome": "success"|"error", "return_value", "error":
    {"type", "message"} | None, "duration_ms", "cached": bool}``. ``cached`` is true when the
    handler answered from its idempotency window instead of running the task again.

**One message per dispatch** (a dispatch with ``start_by``). The leader learns each handler's
clock from its hellos and sets ``start_by`` to ``dispatch.ack_timeout`` ahead in the *handler's*
clock (a lower bound of it, see :mod:`mesh.dispatch.registry`). The handler runs the dispatch
at once if it arrives before ``start_by``, and sends nothing until the result; refusals are
acknowledged at once (``accepted: false``). A dispatch that arrives later is refused
``expired`` and runs nothing. So a dispatch delayed in the network (a partition, a
retransmission after heal) can never run once the leader may have given up on it: the leader
decides that an unanswered dispatch did not start only from a hello the handler sent at or
after ``start_by`` that does not list the key in ``running`` (results and hellos travel on one
connection, in order). It then sends the job again *to the same handler*, which answers from
its idempotency window if it ran it after all (a lost result), or runs it now.

**Two-phase start** (a dispatch without ``start_by``: a leader that does not know the
handler's clock, i.e. a hello without ``clock``). The handler acknowledges with
``needs_start: true`` when the dispatch would start a new execution, holds a slot and runs
nothing until ``dispatch_start``; ``needs_start`` is false when it answers from its idempotency
window or joins the execution already running for the key.
``dispatch_start`` leader → handler: ``{"dispatch_id", "start": bool}``. Sent when the
    acknowledgement arrives while the leader still waits for it; a late acknowledgement (the
    leader already retried elsewhere) gets ``start: false``. A handler that gets no start within
    ``START_WINDOW`` of its acknowledgement drops the dispatch, and answers a late start with a
    ``job_result`` of outcome ``"not_started"``.

``cancel_job``     leader → handler (one-way): ``{"job_id", "idempotency_key",
    "fencing_token"}``. The schedule's overlap policy ``cancel_other`` asks the handler to stop
    its run of the job: it cancels the async task, whose ``job_result`` then has outcome
    ``"cancelled"``. The handler acts only on a ``node`` key, a fencing token not lower than the
    highest it has seen, and a job it is running under that key and id; anything else is
    counted and ignored. A sync task cannot be stopped and runs to its end (counted).

**Batches.** Dispatches with ``start_by`` that the leader sends to one handler in one event-loop
iteration travel as one ``dispatches`` message, and results a handler has ready for one node in
one iteration (answers to such dispatches) as one ``job_results`` message: ``{"items": [...]}``,
each item the payload of one ``dispatch`` or ``job_result``, checked one by one as if it had
come alone (one bad item is refused, the others go on). A lone message is sent as itself. At a
few fires per second nothing waits for a batch; under load, one message carries many jobs.

Each payload has a :class:`msgspec.Struct` below; the receiving end decodes it with
:func:`decode`, and a payload that does not match is dropped (a node refuses and counts it as
``malformed``; a malformed ``dispatch`` that names its ``dispatch_id`` is refused with
``bad_request``). On the wire a payload stays a JSON object with these keys.

Who may send what (an authenticated mesh; identity is the key): ``handler_hello``,
``dispatch_ack`` and ``job_result`` only a ``handler`` key whose name is the ``handler_id``
they carry, and an ack or result only the handler its dispatch went to; ``dispatch``,
``dispatch_start`` and ``cancel_job`` only a ``node`` key. A batch is judged as its items:
``dispatches`` only from a ``node`` key, ``job_results`` only from the handler every item
names. See docs/handlers.md, "Identity is the key".
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from mesh.scheduling.controls import Tags

HELLO = "handler_hello"
DISPATCH = "dispatch"
DISPATCH_ACK = "dispatch_ack"
DISPATCH_START = "dispatch_start"
JOB_RESULT = "job_result"
DISPATCHES = "dispatches"  # several ``dispatch`` payloads in one message
JOB_RESULTS = "job_results"  # several ``job_result`` payloads in one message
CANCEL_JOB = "cancel_job"  # leader → handler: stop this run (overlap cancel_other)
CANCELLED = "cancelled"  # job_result outcome: the run was stopped by a cancel_job
MAX_BATCH = 256  # items per batch message

HEARTBEAT_INTERVAL = 0.5  # seconds between hellos
SUSPECT_AFTER = 1.5  # no hello for this long: no new dispatches
DEAD_AFTER = 3.0  # no hello for this long: shown dead, gets no new dispatches
START_WINDOW = 3.0  # a handler waits this long (its own clock) for dispatch_start
NOT_STARTED = "not_started"  # job_result outcome: the dispatch expired before it started

STALE_FENCING_TOKEN = "stale_fencing_token"
AT_CAPACITY = "at_capacity"
UNKNOWN_TASK = "unknown_task"
EXPIRED = "expired"  # the dispatch arrived after its start_by: it runs nothing
MAX_TRY = 100  # a retry policy's max_attempts is at most this (mesh.scheduling.controls)
MAX_RUNNING_LISTED = 100_000  # bound on a hello's running keys (concurrency bounds it in practice)
MAX_SHARDS = 1024  # runs of one broadcast fire: at most this many handlers

Id = Annotated[str, msgspec.Meta(min_length=1)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Term = Annotated[int, msgspec.Meta(ge=0, lt=1 << 62)]  # a term; the fencing token is one
Clock = Annotated[float, msgspec.Meta(ge=0, le=1e12)]  # seconds on a handler's deadline clock

T = TypeVar("T", bound=msgspec.Struct)
Item = TypeVar("Item")


def deadline_clock() -> float:
    """A handler's clock for ``start_by`` and hellos: ``CLOCK_BOOTTIME`` where there is one
    (Linux), which keeps counting while the machine is suspended, so a suspended handler cannot
    wake up "earlier" than the leader's bound on its clock; ``time.monotonic`` elsewhere."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def decode(payload: Any, kind: type[T]) -> T:
    """Validate a received payload as ``kind``; raises :class:`msgspec.ValidationError`."""
    return msgspec.convert(payload, kind)


class Hello(msgspec.Struct, frozen=True, kw_only=True):
    handler_id: Id
    tasks: tuple[str, ...]
    concurrency: Annotated[int, msgspec.Meta(ge=1)] = 1
    pid: int | None = None
    host: str | None = None
    active_jobs: Count = 0
    succeeded: Count = 0
    failed: Count = 0
    avg_ms: float | None = None
    max_fencing_token: Count = 0
    started_at: str | None = None  # with pid, tells a restarted handler from its predecessor
    draining: bool = False
    clock: Clock | None = None  # the handler's deadline clock when it sent this hello
    running: Annotated[tuple[str, ...], msgspec.Meta(max_length=MAX_RUNNING_LISTED)] = ()
    tags: Tags = {}  # ``--tag K=V``: what a schedule's ``target.tags`` selects on


class HelloReply(msgspec.Struct, frozen=True, kw_only=True):
    node_id: Id
    term: Term
    leader_id: str | None = None  # None (or empty) while the node knows no leader
    leader_mesh: str | None = None  # the leader's mesh address, for a handler to dial
    nodes: tuple[str, ...] = ()


class Dispatch(msgspec.Struct, kw_only=True):
    dispatch_id: Id
    job_id: Id
    task: Id
    idempotency_key: Id
    fencing_token: Term
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    try_number: Annotated[int, msgspec.Meta(ge=1, le=MAX_TRY)] = 1
    args: list[Any] | None = None  # None (or absent) means no arguments
    kwargs: dict[str, Any] | None = None
    schedule_id: str | None = None
    scheduled_fire_time: datetime | None = None  # RFC 3339; a naive one is taken as UTC
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None
    start_by: Clock | None = None  # run only if it arrives before this (handler's clock)
    shard_index: Count = 0  # a broadcast run's place among its fire's runs
    shard_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_SHARDS)] = 1

    @property
    def run_key(self) -> str:
        return run_key(self.idempotency_key, self.try_number)

    def __post_init__(self) -> None:
        if self.shard_index >= self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} >= shard_count {self.shard_count}")
        if self.args is None:
            self.args = []
        if self.kwargs is None:
            self.kwargs = {}
        fire = self.scheduled_fire_time
        if fire is not None and fire.tzinfo is None:  # the task interface promises aware
            self.scheduled_fire_time = fire.replace(tzinfo=UTC)


def run_key(idempotency_key: str, try_number: int) -> str:
    """What a handler deduplicates executions by: the idempotency key for a fire's first try,
    with ``#try=N`` after it for its retries (a retry must run, not get the failed try's
    answer back from the window)."""
    return idempotency_key if try_number == 1 else f"{idempotency_key}#try={try_number}"


class DispatchAck(msgspec.Struct, frozen=True, kw_only=True):
    dispatch_id: Id
    handler_id: Id
    accepted: bool
    reason: str | None = None
    needs_start: bool = False


class DispatchStart(msgspec.Struct, frozen=True, kw_only=True):
    dispatch_id: Id
    start: bool


class CancelJob(msgspec.Struct, frozen=True, kw_only=True):
    job_id: Id
    idempotency_key: Id
    fencing_token: Term


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """A ``dispatches`` or ``job_results`` message; each item is checked as its own message."""

    items: Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


def batches(items: list[Item]) -> list[list[Item]]:
    """``items`` cut into chunks of at most ``MAX_BATCH``."""
    return [items[i : i + MAX_BATCH] for i in range(0, len(items), MAX_BATCH)]


class JobError(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    message: str
    timed_out: bool = False  # the dispatch's timeout expired (not an error the task raised)


class JobResult(msgspec.Struct, frozen=True, kw_only=True):
    dispatch_id: Id
    handler_id: Id
    outcome: Literal["success", "error", "not_started", "cancelled"]
    job_id: str | None = None  # absent from a "not_started" result
    idempotency_key: str | None = None
    return_value: Any = None
    error: JobError | None = None
    duration_ms: float | None = None
    cached: bool = False
