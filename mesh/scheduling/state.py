"""The replicated scheduler state: tasks, schedules, jobs, results and execution history.

Why this file is long: it is the one state machine of the scheduler, with one short ``_op_*``
method per command and the wire codecs of what the commands carry; the commands are easier to
check against each other (the firing guarantee rests on them) in one place.

Every node applies the same committed commands in the same order, so every node holds the same
state. Commands carry *resulting* state (which schedules were acquired, the advanced trigger, the
job's outcome), decided by the leader with its clock; applying them never reads a clock.

Two rules give the firing guarantee:
- ``add_job`` for a schedule (alone or inside a ``fire_round``) is ignored when a job for that
  fire time (or a later one) was already recorded (``fired``): a fire replayed by a new leader
  after a crash is a no-op.
- ``reset_leases`` (committed by every new leader before it schedules anything) clears every lease
  of the previous term, so nothing stays stuck behind a dead scheduler (APScheduler issue #1053)
  and committed-but-unfinished jobs run again, with the same idempotency key.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

import attrs
import msgspec
from apscheduler import Job, JobOutcome, JobResult, Schedule, Task
from sortedcontainers import SortedList

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling import backfill, outcomes, overlap
from mesh.scheduling.alerts import Outbox
from mesh.scheduling.codec import NotPlainJSON, from_wire, plain, to_wire
from mesh.scheduling.controls import KEY as CONTROLS
from mesh.scheduling.controls import MAX_NOTE, Controls, controls_of, with_controls
from mesh.scheduling.firemetrics import DEFAULT_MAX_SCHEDULES, FireMetrics, lateness
from mesh.scheduling.scenariobook import ScenarioBook

log = logging.getLogger("mesh.scheduling.state")

DEFAULT_MAX_EXECUTIONS = 10_000
DEFAULT_MAX_RESULTS = 10_000
# The outcomes an execution record can hold: APScheduler's (``outcome.name``) and the mesh's.
OUTCOMES = outcomes.OUTCOMES


# --------------------------------------------------------------------------- wire codecs


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in attrs.fields(type(obj))}


# Fields that hold a caller's data: stored as plain JSON and never decoded (codec module doc).
USER_FIELDS = frozenset({"args", "kwargs", "metadata"})


def _dump(obj: Any, skip: str | None = None) -> dict[str, Any]:
    return {
        k: plain(v) if k in USER_FIELDS else to_wire(v)
        for k, v in _fields(obj).items()
        if k != skip
    }


def _load(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v if k in USER_FIELDS else from_wire(v) for k, v in d.items()}


def dump_task(t: Task) -> dict[str, Any]:
    return _dump(t, skip="running_jobs")


def load_task(d: dict[str, Any]) -> Task:
    return Task(**_load(d))


def dump_schedule(s: Schedule) -> dict[str, Any]:
    return _dump(s)


def load_schedule(d: dict[str, Any]) -> Schedule:
    return Schedule(**_load(d))


def dump_job(j: Job) -> dict[str, Any]:
    return _dump(j)


def load_job(d: dict[str, Any]) -> Job:
    fields = _load(d)
    fields["id"] = UUID(fields["id"])
    return Job(**fields)


class RemoteJobError(Exception):
    """A job's exception as recorded in the replicated log (type name and message)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message


def dump_result(r: JobResult) -> dict[str, Any]:
    exc = None
    if r.exception is not None:
        name = getattr(r.exception, "error_type", None) or type(r.exception).__name__
        exc = {"type": name, "message": str(r.exception)}
        if isinstance(r.exception, RemoteJobError):
            exc = {"type": r.exception.type_name, "message": r.exception.message}
    return {
        "job_id": str(r.job_id),
        "outcome": r.outcome.name,
        "started_at": _iso(r.started_at),
        "finished_at": _iso(r.finished_at),
        "expires_at": _iso(r.expires_at),
        "exception": exc,
        "return_value": plain(r.return_value),
    }


def load_result(d: dict[str, Any]) -> JobResult:
    exc = d.get("exception")
    return JobResult(
        job_id=UUID(d["job_id"]),
        outcome=JobOutcome[d["outcome"]],
        started_at=d.get("started_at"),
        finished_at=d["finished_at"],
        expires_at=d["expires_at"],
        exception=RemoteJobError(exc["type"], exc["message"]) if exc else None,
        return_value=d.get("return_value"),
    )


def json_result(r: JobResult) -> JobResult:
    """``r``, or when its return value is not plain JSON (NaN, Infinity, a set, nesting too
    deep...) an ``error`` outcome saying so: the log holds only plain JSON, and a value it
    cannot hold must not stop the leader from recording that the job ran."""
    try:
        plain(r.return_value)
    except NotPlainJSON as e:
        return attrs.evolve(
            r,
            outcome=JobOutcome.error,
            return_value=None,
            exception=RemoteJobError("ValueError", f"return value is not plain JSON: {e}"),
        )
    return r


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def idempotency_key(job: Job) -> str:
    """Stable across leaders: the schedule and its nominal (jitter-free) fire time. A job with
    a key of its own (a trigger's, a broadcast run's) keeps it in ``JobState.key``: use
    :func:`job_key` for a job of the state."""
    if job.schedule_id is not None and job.scheduled_fire_time is not None:
        return f"{job.schedule_id}@{job.original_scheduled_time.isoformat()}"
    return f"job:{job.id}"


def job_key(js: JobState) -> str:
    """The idempotency key of a job of the state: its own (a trigger's ``sched@now#trigger``,
    a broadcast run's ``sched@time#2/3``; a retry keeps the key of the run it retries), else
    the fire's (:func:`idempotency_key`)."""
    return js.key or idempotency_key(js.job)


def fire_of(key: str) -> str:
    """The fire a key names, without a broadcast run's ``#i/n``; a trigger's stays apart."""
    base, _, suffix = key.partition("#")
    return key if suffix.startswith("trigger") else base


def shard_id(job_id: UUID, index: int, count: int) -> UUID:
    """The id of run ``index`` of ``count`` of a broadcast job: the same on every node and for
    every leader that splits that job (uuid5, no randomness in the state machine)."""
    return uuid5(job_id, f"shard {index}/{count}")


# --------------------------------------------------------------------------- the state machine


@attrs.define
class JobState:
    job: Job
    attempts: int = 0
    term: int | None = None  # the leader term that last acquired it (fencing token)
    # The handler it was last dispatched to, committed before the dispatch was sent: a new leader
    # sends it back there, where the handler's idempotency window answers without a second run.
    handler: str | None = None
    # The schedule controls' bookkeeping (mesh.scheduling.controls), replicated with the job:
    origin: str = "fire"  # fire | trigger | backfill | retry
    tries: int = 1  # which run of its fire time under the schedule's retry policy (1-based)
    held: bool = False  # waiting behind a running job of its schedule (overlap buffer_*)
    not_before: datetime | None = None  # a retry's backoff: not started before this
    shard: tuple[int, int] | None = None  # (index, count) of a broadcast fire's run
    cancel: bool = False  # its schedule's overlap policy asked the run to stop (cancel_other)
    key: str | None = None  # its own idempotency key (job_key), None: the fire's


# JobState fields kept in a snapshot's "x" only when they differ from these.
_JOB_EXTRAS = {"origin": "fire", "tries": 1, "held": False, "not_before": None, "shard": None,
               "cancel": False, "key": None}  # fmt: skip


def _dump_extras(js: JobState) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, default in _JOB_EXTRAS.items():
        value = getattr(js, name)
        if value != default:
            out[name] = _iso(value) if name == "not_before" else value
    return out


def _load_extras(js: JobState, extras: dict[str, Any]) -> None:
    for name, value in extras.items():
        if name not in _JOB_EXTRAS:
            continue
        if name == "not_before":
            value = _dt(value)
        elif name == "shard" and value is not None:
            value = (int(value[0]), int(value[1]))
        setattr(js, name, value)


class SchedulerState:
    """Implements ``mesh.statemachine.StateMachine``. Reads are safe on any node."""

    def __init__(
        self,
        *,
        max_executions: int = DEFAULT_MAX_EXECUTIONS,
        max_results: int = DEFAULT_MAX_RESULTS,
        metric_schedules: int = DEFAULT_MAX_SCHEDULES,
        alerts: bool = True,
    ) -> None:
        self.max_executions = max_executions
        # A voter records notify alerts (its leader sends them); a zone replica has no leader
        # and is never told what was sent: it records none.
        self.alerts = alerts
        # Leader-side loops waiting for work the state machine creates (an alert to send, a run
        # to cancel): told, so that they sleep while there is none (mesh.dispatch.alerts,
        # mesh.scheduling.cancel). Not state: nothing here changes what apply does.
        self._watchers: set[Callable[[], None]] = set()
        self.max_results = max_results
        # Derived from the records as they apply; not in the image (mesh.scheduling.firemetrics).
        self.fire_metrics = FireMetrics(metric_schedules)
        self._reset()

    def _reset(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.schedules: dict[str, Schedule] = {}
        # Due order: (next_fire_time timestamp, schedule id); exhausted schedules are left out.
        # A sorted list, not a list kept sorted with bisect.insort: an insort moves every later
        # item, so creating N schedules cost O(N²) (at 1,000,000 it was most of the apply time).
        self._due: SortedList[tuple[float, str]] = SortedList()
        # Ids of the schedules leased to a scheduler: what ``reset_leases`` (every new leader's
        # first command) clears, without looking at every schedule (1,000,000 per election).
        self._leased: set[str] = set()
        self.jobs: dict[UUID, JobState] = {}
        self.results: dict[UUID, JobResult] = {}
        self.fired: dict[str, str] = {}  # schedule id → ISO nominal fire time of its latest job
        self.executions: deque[dict[str, Any]] = deque(maxlen=self.max_executions)
        self.fires_recorded = 0
        self.fires_deduplicated = 0
        self.fires_skipped = 0  # missed fire times over the coalesce "all" catch-up cap
        self._running: dict[str, int] = {}  # task id → jobs currently leased
        # Schedule id → its unfinished jobs (queued, held, leased), oldest first: what the
        # overlap policies look at ("is a run of this schedule still going?").
        self._open: dict[str, dict[UUID, None]] = {}
        self.held_jobs = 0  # jobs held by an overlap buffer (never leased, acquired or due)
        # Jobs whose schedule's cancel_other policy asked them to stop, until they finish:
        # the leader (every new one too) sends their cancels (mesh.scheduling.cancel).
        self.cancelling: dict[UUID, None] = {}
        # Notify alerts not yet confirmed sent (mesh.scheduling.alerts).
        self.outbox = Outbox(enabled=self.alerts, on_event=self._wake_watchers)
        # Jobs with a retry backoff (``not_before``) not finished yet: what ``backing_off``
        # counts, without looking at every job.
        self._backoff: dict[UUID, None] = {}
        # Schedule id → its backfilled fire times still to run, in fire-time order, each
        # ``[ISO nominal time, job id]``: one job of a schedule's backfill runs at a time.
        self.backfills: dict[str, list[list[str]]] = {}
        # (schedule id, success?) → its records in the history, for the schedules with history
        # limits (counted when first needed, so never part of a snapshot).
        self._kept: dict[tuple[str, bool], int] = {}
        self.last_record: dict[str, Any] | None = None  # the latest record ``_record`` wrote
        # Loaded scenarios and their runs (mesh.scheduling.scenariobook).
        self.scenarios = ScenarioBook()

    # ------------------------------------------------------------------ StateMachine

    def apply(self, entry: Entry) -> Any:
        if entry.kind != COMMAND or not isinstance(entry.data, dict):
            return None
        return self._apply_command(entry.data, entry)

    def _apply_command(self, c: dict[str, Any], entry: Entry) -> Any:
        op = c.get("op")
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            log.warning("ignoring unknown command %r at index %d", op, entry.index)
            return None
        return handler(c, entry)

    def _op_batch(self, c: dict[str, Any], e: Entry) -> list[tuple[bool, Any]]:
        """Several commands in one entry, applied in order: ``(True, result)`` or
        ``(False, error message)`` each. One failing command does not stop the others."""
        out: list[tuple[bool, Any]] = []
        for sub in c["commands"]:
            try:
                if not isinstance(sub, dict) or sub.get("op") == "batch":
                    raise ValueError(f"not a command that can be batched: {sub!r:.80}")
                out.append((True, self._apply_command(sub, e)))
            except Exception as exc:
                log.exception("batched command failed at index %d", e.index)
                out.append((False, f"{type(exc).__name__}: {exc}"))
        return out

    def _op_barrier(self, _c: dict[str, Any], _e: Entry) -> None:
        """Changes nothing: the leader commits one before a linearizable read (a backup,
        ``MeshNode.state_image``), which proves it still leads and that everything committed
        before has been applied. A node of an older version logs it as unknown and ignores it."""

    def snapshot(self) -> bytes:
        return b"".join(self.snapshot_chunks())

    def snapshot_chunks(self, per_chunk: int = 1000) -> Iterator[bytes]:
        """``snapshot()`` in pieces, the schedules ``per_chunk`` at a time: the forked writer
        streams them to the file, so it never holds the whole image nor every schedule's dict
        at once (at 1,000,000 schedules those were ~2.5 GB on top of the copied pages)."""
        rest = self._snapshot_rest()
        yield b'{"tasks":' + _compact([dump_task(t) for t in self.tasks.values()])
        yield b',"schedules":['
        schedules = iter(self.schedules.values())
        first = True
        while chunk := list(itertools.islice(schedules, per_chunk)):
            body = _compact([dump_schedule(s) for s in chunk])[1:-1]
            yield body if first else b"," + body
            first = False
        yield b"]," + _compact(rest)[1:]

    def _snapshot_rest(self) -> dict[str, Any]:
        """Everything of the image but tasks and schedules, in the image's key order."""
        return {
            "jobs": [
                {
                    "job": dump_job(js.job),
                    "attempts": js.attempts,
                    "term": js.term,
                    "handler": js.handler,
                    **({"x": x} if (x := _dump_extras(js)) else {}),
                }
                for js in self.jobs.values()
            ],
            "results": [dump_result(r) for r in self.results.values()],
            "fired": self.fired,
            "executions": list(self.executions),
            "counters": [self.fires_recorded, self.fires_deduplicated, self.fires_skipped],
            **({"alerts": self.outbox.dump()} if self.alerts else {}),
            **({"backfills": self.backfills} if self.backfills else {}),
            **({"scenarios": book} if (book := self.scenarios.dump()) else {}),
        }

    def restore(self, data: bytes) -> None:
        self._reset()
        if not data:
            return
        # Plain JSON first; then only our own fields are decoded (user data stays opaque).
        d = json.loads(data)
        for t in d["tasks"]:
            task = load_task(t)
            self.tasks[task.id] = task
        schedules = [load_schedule(s) for s in d["schedules"]]
        for s in schedules:
            self.schedules[s.id] = s
        self._due = SortedList(
            (s.next_fire_time.timestamp(), s.id) for s in schedules if s.next_fire_time is not None
        )
        self._leased = {s.id for s in schedules if s.acquired_by is not None}
        for j in d["jobs"]:
            job = load_job(j["job"])
            js = self.jobs[job.id] = JobState(job, j["attempts"], j["term"], j.get("handler"))
            _load_extras(js, j.get("x") or {})
            self._open_add(js)
            self._index_controls(js)
            if js.not_before is not None:
                self._backoff[job.id] = None
        for r in d["results"]:
            res = load_result(r)
            self.results[res.job_id] = res
        self.fired = dict(d["fired"])
        self.backfills = {sid: [list(x) for x in q] for sid, q in d.get("backfills", {}).items()}
        self.executions.extend(d["executions"])
        counters = [*d["counters"], 0]  # snapshots before fires_skipped have two
        self.fires_recorded, self.fires_deduplicated, self.fires_skipped = counters[:3]
        self.outbox.load(d.get("alerts"))
        self.scenarios.restore(d.get("scenarios"))
        self._recount_running()

    # ------------------------------------------------------------------ queries

    def due_schedule_ids(self, now: datetime, limit: int) -> list[str]:
        """Schedules whose next fire time has come, not paused and not leased, oldest first."""
        ts = now.timestamp()
        out: list[str] = []
        for fire_ts, sid in self._due:
            if fire_ts > ts or len(out) >= limit:
                break
            s = self.schedules[sid]
            if s.paused or s.acquired_by is not None:
                continue
            out.append(sid)
        return out

    def next_fire_time(self) -> datetime | None:
        for _, sid in self._due:
            s = self.schedules[sid]
            if not s.paused:
                return s.next_fire_time
        return None

    def upcoming(self, limit: int) -> list[Schedule]:
        """The next ``limit`` schedules to fire (not paused), soonest first."""
        out: list[Schedule] = []
        for _, sid in self._due:
            if len(out) >= limit:
                break
            s = self.schedules[sid]
            if not s.paused:
                out.append(s)
        return out

    def schedules_by_task(self, task_id: str) -> list[Schedule]:
        return [s for s in self.schedules.values() if s.task_id == task_id]

    def unleased_fire_times(self, now: datetime) -> tuple[Job | None, datetime | None]:
        """A job not leased to anyone whose fire time has come (if any), and the earliest fire
        time still to come of such jobs: what the job loop must be woken for."""
        due: Job | None = None
        upcoming: datetime | None = None
        for js in self.jobs.values():
            job = js.job
            # A retry is due when its backoff ends, not at its (past) fire time.
            at = js.not_before if js.not_before is not None else job.scheduled_fire_time
            if job.acquired_by is not None or at is None or js.held:
                continue
            if at <= now:
                due = due or job
            elif upcoming is None or at < upcoming:
                upcoming = at
        return due, upcoming

    def backing_off(self, now: datetime) -> int:
        """Retries still waiting for their backoff to end: queued, yet no work for anyone."""
        waiting = (self.jobs[jid].not_before for jid in self._backoff)
        return sum(1 for at in waiting if at is not None and at > now)

    def pending_jobs(self) -> int:
        """Jobs queued and not leased to a runner yet."""
        return len(self.jobs) - sum(self._running.values())

    def running_jobs(self, task_id: str) -> int:
        return self._running.get(task_id, 0)

    def job_status(self, job_id: UUID) -> dict[str, Any] | None:
        js = self.jobs.get(job_id)
        if js is not None:
            return {
                "job_id": str(job_id),
                "task": js.job.task_id,
                "schedule_id": js.job.schedule_id,
                "status": "running" if js.job.acquired_by else "pending",
                "attempt": js.attempts,
                "idempotency_key": job_key(js),
            }
        for ex in reversed(self.executions):
            if ex["job_id"] == str(job_id):
                result = self.results.get(job_id)
                return {
                    **ex,
                    "status": ex["outcome"],
                    "return_value": dump_result(result)["return_value"] if result else None,
                }
        return self._queued_status(str(job_id))

    def _queued_status(self, job_id: str) -> dict[str, Any] | None:
        """A backfilled run still waiting for its turn (its job does not exist yet)."""
        for sid, queue in self.backfills.items():
            for nominal, jid in queue:
                if jid == job_id:
                    s = self.schedules.get(sid)
                    return {
                        "job_id": jid,
                        "task": s.task_id if s is not None else None,
                        "schedule_id": sid,
                        "status": "pending",
                        "attempt": 0,
                        "idempotency_key": f"{sid}@{nominal}",
                        "scheduled_fire_time": nominal,
                    }
        return None

    def execution_history(
        self,
        schedule_id: str | None,
        limit: int,
        *,
        after: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first, at most ``limit`` records matching every filter given: ``schedule_id``,
        ``outcome`` (one of ``OUTCOMES``), ``since`` (an aware datetime: ``record_time`` at or
        after it). With ``after`` (a job id) only the records older than that job's, whether or
        not that one matches (LookupError if it is not in the history)."""
        records: Iterable[dict[str, Any]] = reversed(self.executions)
        if after is not None:
            records = iter(records)
            if not any(ex["job_id"] == after for ex in records):
                raise LookupError(after)
        out = []
        for ex in records:
            if schedule_id is not None and ex["schedule_id"] != schedule_id:
                continue
            if outcome is not None and ex["outcome"] != outcome:
                continue
            if since is not None:
                at = record_time(ex)
                if at is None or at < since:
                    continue
            out.append(ex)
            if len(out) >= limit:
                break
        return out

    def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` whenever an alert is recorded or a run is flagged to cancel; returns
        the function that stops it."""
        self._watchers.add(wake)
        return lambda: self._watchers.discard(wake)

    def _wake_watchers(self) -> None:
        for wake in list(self._watchers):
            wake()

    def open_jobs(self, schedule_id: str) -> list[JobState]:
        """The schedule's unfinished jobs (queued, held or leased), oldest first."""
        return [self.jobs[jid] for jid in self._open.get(schedule_id, ())]

    def _open_add(self, js: JobState) -> None:
        sid = js.job.schedule_id
        if sid is not None:
            self._open.setdefault(sid, {})[js.job.id] = None

    def _open_discard(self, js: JobState) -> None:
        sid = js.job.schedule_id
        if sid is None:
            return
        open_ = self._open.get(sid)
        if open_ is not None:
            open_.pop(js.job.id, None)
            if not open_:
                del self._open[sid]

    # ------------------------------------------------------------------ schedule index

    def _put_schedule(self, s: Schedule) -> None:
        if s.next_fire_time is not None and _remaining_runs(s) == 0:
            s = attrs.evolve(s, next_fire_time=None)  # its run limit is reached: it stops
        old = self.schedules.get(s.id)
        if old is not None:
            self._unindex(old)
            if s.paused and not old.paused:
                self.outbox.on_pause(s)
        self.schedules[s.id] = s
        if s.next_fire_time is not None:
            self._due.add((s.next_fire_time.timestamp(), s.id))
        if s.acquired_by is not None:
            self._leased.add(s.id)
        else:
            self._leased.discard(s.id)

    def _unindex(self, s: Schedule) -> None:
        if s.next_fire_time is None:
            return
        self._due.discard((s.next_fire_time.timestamp(), s.id))

    def _recount_running(self) -> None:
        self._running: dict[str, int] = {}
        for js in self.jobs.values():
            if js.job.acquired_by is not None:
                self._running[js.job.task_id] = self._running.get(js.job.task_id, 0) + 1

    # ------------------------------------------------------------------ commands

    def _op_add_task(self, c: dict[str, Any], _e: Entry) -> str:
        task = load_task(c["task"])
        existed = task.id in self.tasks
        self.tasks[task.id] = task
        return "updated" if existed else "added"

    def _op_remove_task(self, c: dict[str, Any], _e: Entry) -> bool:
        return self.tasks.pop(c["task_id"], None) is not None

    def _op_add_schedule(self, c: dict[str, Any], _e: Entry) -> str:
        s = load_schedule(c["schedule"])
        policy = c.get("conflict_policy", "do_nothing")
        old = self.schedules.get(s.id)
        if old is not None:
            if policy == "do_nothing":
                return "unchanged"
            if policy == "exception":
                return "conflict"
            # Replacing drops the lease: the release still in flight for the old definition is then
            # ignored (it would write the old trigger back), and the fire records prevent the
            # replaced schedule from firing a time twice when it is acquired again.
            s.acquired_by = s.acquired_until = None
        self._put_schedule(s)
        return "updated" if old is not None else "added"

    def _op_remove_schedules(self, c: dict[str, Any], _e: Entry) -> list[str]:
        removed = []
        for sid in c["ids"]:
            s = self.schedules.pop(sid, None)
            if s is not None:
                self._unindex(s)
                self._leased.discard(sid)
                self.fired.pop(sid, None)
                self.backfills.pop(sid, None)
                removed.append(sid)
        return removed

    def _op_acquire_schedules(self, c: dict[str, Any], _e: Entry) -> list[str]:
        got = []
        for sid in c["ids"]:
            s = self.schedules.get(sid)
            if s is None or s.acquired_by is not None:
                continue
            s.acquired_by = c["scheduler_id"]
            s.acquired_until = _dt(c["until"])
            self._leased.add(s.id)
            got.append(sid)
        return got

    def _op_release_schedules(self, c: dict[str, Any], _e: Entry) -> list[str]:
        released = []
        for r in c["results"]:
            s = self.schedules.get(r["schedule_id"])
            if s is None or s.acquired_by != c["scheduler_id"]:
                continue  # removed, or the lease was reset: a stale release changes nothing
            new = attrs.evolve(
                s,
                trigger=from_wire(r["trigger"]),
                last_fire_time=_dt(r["last_fire_time"]),
                next_fire_time=_dt(r["next_fire_time"]),
                acquired_by=None,
                acquired_until=None,
            )
            self._put_schedule(new)
            self.fires_skipped += r.get("skipped", 0)
            self.fire_metrics.missed_by_catch_up(s.id, r.get("skipped", 0))
            released.append(s.id)
        return released

    def _op_fire_round(self, c: dict[str, Any], e: Entry) -> dict[str, list[str]]:
        """A round of fires (mesh.scheduling.rounds): each schedule that is as the round found
        it (same next fire time, not paused, not leased) moves on and gets its jobs; one that
        changed in between (replaced, paused, deleted, fired by another round) is left alone."""
        fired: list[str] = []
        added: list[str] = []
        lease = c.get("lease")
        leased: dict[str, str | None] = lease["jobs"] if lease else {}
        for r in c["schedules"]:
            s = self.schedules.get(r["schedule_id"])
            if (
                s is None
                or s.paused
                or s.acquired_by is not None
                or s.next_fire_time is None
                or s.next_fire_time != _dt(r["fired_from"])
            ):
                continue
            self._put_schedule(
                attrs.evolve(
                    s,
                    trigger=from_wire(r["trigger"]),
                    last_fire_time=_dt(r["last_fire_time"]),
                    next_fire_time=_dt(r["next_fire_time"]),
                )
            )
            self.fires_skipped += r.get("skipped", 0)
            self.fire_metrics.missed_by_catch_up(s.id, r.get("skipped", 0))
            fired.append(s.id)
            for job in r["jobs"]:
                if self._op_add_job({"job": job}, e):
                    added.append(job["id"])
                    if job["id"] in leased:
                        self._lease(job["id"], c["scheduler_id"], lease, leased[job["id"]])
        return {"schedules": fired, "jobs": added}

    def _lease(
        self, job_id: str, scheduler_id: str, lease: dict[str, Any], handler: str | None
    ) -> None:
        """A job of a fire round leased to the leader that fired it (as ``acquire_jobs`` does)
        and, when given, assigned to its handler (as ``assign_job`` does)."""
        js = self.jobs[UUID(job_id)]
        if js.held:
            return  # waits behind a running job of its schedule (overlap); released later
        js.job.acquired_by = scheduler_id
        js.job.acquired_until = _dt(lease["until"])
        js.attempts += 1
        js.term = lease["term"]
        if handler is not None:
            js.handler = handler
        self._running[js.job.task_id] = self._running.get(js.job.task_id, 0) + 1

    def _op_extend_leases(self, c: dict[str, Any], _e: Entry) -> None:
        until = _dt(c["until"])
        for sid in c.get("schedule_ids", ()):
            s = self.schedules.get(sid)
            if s is not None and s.acquired_by == c["scheduler_id"]:
                s.acquired_until = until
        for jid in c.get("job_ids", ()):
            js = self.jobs.get(UUID(jid))
            if js is not None and js.job.acquired_by == c["scheduler_id"]:
                js.job.acquired_until = until

    def _op_add_job(self, c: dict[str, Any], e: Entry) -> bool:
        job = load_job(c["job"])
        if job.schedule_id is not None and job.scheduled_fire_time is not None:
            nominal = job.original_scheduled_time.isoformat()
            last = self.fired.get(job.schedule_id)
            if last is not None and datetime.fromisoformat(last) >= job.original_scheduled_time:
                self.fires_deduplicated += 1
                return False  # this fire time already has its job: replayed fire, no-op
            if self._run_limit_reached(job.schedule_id):
                return False
            self.fired[job.schedule_id] = nominal
            self.fires_recorded += 1
            if not self._admit(JobState(job), e):
                return False
            self._count_run(job.schedule_id)
            return True
        return self._admit(JobState(job), e)

    def _admit(self, js: JobState, e: Entry) -> bool:
        """Queue a new job (a fire, a trigger, a backfill or retry run, a run-now job): the one
        place jobs enter the state, so the schedule's controls decide here. True if queued."""
        if not self._overlap_admits(js, e):
            return False
        self.jobs[js.job.id] = js
        self._open_add(js)
        self._index_controls(js)
        if js.not_before is not None:
            self._backoff[js.job.id] = None
        return True

    def _overlap_admits(self, js: JobState, e: Entry) -> bool:
        """Apply the schedule's overlap policy to a new job (mesh.scheduling.overlap): False
        when it is skipped (recorded as such); it may come out held, and older runs may be
        asked to stop (``cancel``) or, never started, end as ``cancelled`` now."""
        sid = js.job.schedule_id
        if sid is None or sid not in self._open:
            return True
        policy = controls_of(js.job).overlap
        if policy == "allow_all":
            return True
        decision = overlap.decide(policy, self.open_jobs(sid), js.origin)
        for old in decision.drop:
            self._end_unstarted(old, "cancelled", e)
        for old in decision.stop:
            if not old.cancel:
                old.cancel = True
                self.cancelling[old.job.id] = None
                self._wake_watchers()
        if decision.action == "skip":
            self._record(self._unrun_record(js, "skipped"), e)
            return False
        js.held = decision.action == "hold"
        return True

    def _end_unstarted(self, js: JobState, outcome: str, e: Entry) -> None:
        """End a job that never ran (overlap: a held or never-started run cancelled)."""
        self._remove_job(js)
        self._record(self._unrun_record(js, outcome), e)

    def _unrun_record(self, js: JobState, outcome: str) -> dict[str, Any]:
        """The execution record of a job the overlap policy kept from running. Its time is
        its fire time (no clock in apply): that is when it would have run."""
        job = js.job
        return {
            "job_id": str(job.id),
            "schedule_id": job.schedule_id,
            "task": job.task_id,
            "scheduled_fire_time": _iso(job.scheduled_fire_time),
            "idempotency_key": job_key(js),
            "started_at": None,
            "finished_at": _iso(job.scheduled_fire_time),
            "handler_id": None,
            "outcome": outcome,
            "attempt": js.attempts,
            "try": js.tries,
            "term": js.term,
            "error": None,
            "reason": overlap.REASON,
        }

    def _overlap_finished(self, js: JobState, finished_at: datetime) -> None:
        """A job of a schedule finished: the oldest held job runs once no other run is
        unfinished, with its start deadline measured from now (it waited on purpose)."""
        sid = js.job.schedule_id
        if sid is None or sid not in self._open:
            return
        nxt = overlap.next_to_release(self.open_jobs(sid))
        if nxt is None:
            return
        nxt.held = False
        self.held_jobs -= 1
        deadline = overlap.rebased_deadline(nxt, finished_at)
        if deadline != nxt.job.start_deadline:
            nxt.job = attrs.evolve(nxt.job, start_deadline=deadline)

    def _index_controls(self, js: JobState) -> None:
        if js.held:
            self.held_jobs += 1
        if js.cancel:
            self.cancelling[js.job.id] = None

    def _remove_job(self, js: JobState) -> None:
        """Take a job out of the state and out of every index that names it: the one way a
        job leaves (finished, ended unstarted, or replaced by a broadcast's runs)."""
        jid = js.job.id
        del self.jobs[jid]
        self._open_discard(js)
        if js.held:
            self.held_jobs -= 1
        self.cancelling.pop(jid, None)
        self._backoff.pop(jid, None)
        if js.job.acquired_by is not None:
            self._running[js.job.task_id] = max(0, self._running.get(js.job.task_id, 0) - 1)

    def _op_acquire_jobs(self, c: dict[str, Any], _e: Entry) -> list[str]:
        got = []
        until = _dt(c["until"])
        for jid in c["ids"]:
            js = self.jobs.get(UUID(jid))
            if js is None or js.job.acquired_by is not None or js.held:
                continue
            js.job.acquired_by = c["scheduler_id"]
            js.job.acquired_until = until
            js.attempts += 1
            js.term = c["term"]
            self._running[js.job.task_id] = self._running.get(js.job.task_id, 0) + 1
            got.append(jid)
        return got

    def _op_assign_job(self, c: dict[str, Any], _e: Entry) -> bool:
        """Record the handler a job is about to be dispatched to; False = do not dispatch."""
        js = self.jobs.get(UUID(c["job_id"]))
        if js is None or js.job.acquired_by != c["scheduler_id"]:
            return False  # finished, or its lease was reset by a newer leader: fenced off
        js.handler = c["handler_id"]
        return True

    def _op_release_job(self, c: dict[str, Any], e: Entry) -> bool:
        jid = UUID(c["job_id"])
        js = self.jobs.get(jid)
        if js is None:
            return False
        if c.get("scheduler_id") is not None and js.job.acquired_by not in (
            None,
            c["scheduler_id"],
        ):
            return False  # someone else holds it now: a stale release
        self._remove_job(js)
        result = load_result(c["result"])
        # A mesh outcome (timeout, no_handler, skipped) the leader recorded with the release.
        outcome = c.get("outcome")
        if outcome not in outcomes.LEADER_OUTCOMES:
            outcome = result.outcome.name
        if result.expires_at > result.finished_at:
            self.results[jid] = result
            while len(self.results) > self.max_results:
                del self.results[next(iter(self.results))]
        job = js.job
        error = dump_result(result)["exception"]
        # Decided before the record is written, so the record says whether a retry follows.
        retry_at = self._after_failure(js, outcome, result.finished_at, error, e)
        self._record(
            {
                "job_id": str(jid),
                "schedule_id": job.schedule_id,
                "task": job.task_id,
                "scheduled_fire_time": _iso(job.scheduled_fire_time),
                "idempotency_key": job_key(js),
                "started_at": _iso(result.started_at),
                "finished_at": _iso(result.finished_at),
                "handler_id": c.get("handler_id"),
                "outcome": outcome,
                "attempt": js.attempts,
                "try": js.tries,
                "term": js.term,
                "error": error,
                "retry_at": _iso(retry_at),
                # A run its schedule's cancel_other policy stopped says why.
                **({"reason": overlap.REASON} if js.cancel else {}),
                **({"shard": list(js.shard)} if js.shard is not None else {}),
            },
            e,
            _lateness(result.started_at, job.scheduled_fire_time),
        )
        self._overlap_finished(js, result.finished_at)
        if retry_at is None and job.schedule_id in self.backfills:
            self._backfill_continues(job.schedule_id, result.finished_at, e)
        return True

    def _after_failure(
        self,
        js: JobState,
        outcome: str,
        finished_at: datetime,
        error: dict[str, str] | None,
        e: Entry,
    ) -> datetime | None:
        """What the schedule's retry policy makes of a finished run: another try queued (its
        ``not_before`` returned), the schedule paused (``on_exhausted: pause``), or nothing.
        Only scheduled fires of a schedule that still exists are retried; run-now jobs are not."""
        job = js.job
        if outcome not in outcomes.FAILED or job.schedule_id not in self.schedules:
            return None
        retry = controls_of(job).retry
        if retry is None or job.scheduled_fire_time is None:
            return None
        if js.tries < retry.max_attempts:
            not_before = finished_at + timedelta(seconds=retry.delay(js.tries))
            self._admit(retry_job(js, not_before), e)
            return not_before
        if retry.on_exhausted == "pause":
            self._pause_exhausted(job, js.tries, outcome, error)
        return None

    def _pause_exhausted(
        self, job: Job, tries: int, outcome: str, error: dict[str, str] | None
    ) -> None:
        """Pause the job's schedule, its note saying which fire exhausted its tries and why."""
        s = self.schedules[str(job.schedule_id)]
        why = f"{error['type']}: {error['message']}" if error else outcome
        note = (
            f"paused: the fire at {job.original_scheduled_time.isoformat()} failed "
            f"{tries} of {tries} tries ({outcome}); last error: {why}"
        )[:MAX_NOTE]
        controls: Controls = msgspec.structs.replace(controls_of(s), note=note)
        self._put_schedule(
            attrs.evolve(s, paused=True, metadata=with_controls(s.metadata, controls))
        )

    def _op_broadcast(self, c: dict[str, Any], _e: Entry) -> list[str] | None:
        """Split a broadcast fire's job, leased to ``scheduler_id``, into one job per handler
        of ``handlers``: same fire time and controls, ``shard`` (index, count), ``handler``
        recorded, unleased (the leader's job loop starts them; after a failover the next
        leader's does, each to its recorded handler, where its own idempotency key
        ``…#i/n`` keeps a run that did happen from happening again). Their ids, or None when
        the job is not there to split (finished, already split, or no longer this leader's).

        The runs are one admitted fire, so they do not pass ``_admit`` again: the overlap
        policies must not judge a fire's runs against each other."""
        jid = UUID(c["job_id"])
        js = self.jobs.get(jid)
        handlers = c["handlers"]
        if (
            js is None
            or js.shard is not None
            or js.job.acquired_by != c["scheduler_id"]
            or not handlers
        ):
            return None
        self._remove_job(js)
        count = len(handlers)
        out = []
        for index, handler in enumerate(handlers):
            job = attrs.evolve(
                js.job,
                id=shard_id(jid, index, count),
                metadata=dict(js.job.metadata),
                acquired_by=None,
                acquired_until=None,
            )
            run = attrs.evolve(
                js,
                job=job,
                attempts=0,
                term=None,
                handler=handler,
                shard=(index, count),
                key=f"{job_key(js)}#{index}/{count}",
            )
            self.jobs[job.id] = run
            self._open_add(run)
            out.append(str(job.id))
        return out

    def _record(self, ex: dict[str, Any], _e: Entry, late: float | None = None) -> None:
        """Append an execution record: the one place a finished (or skipped) fire is written
        to the history, so what follows from a record (alerts, metrics, history limits)
        follows here."""
        if self._kept and len(self.executions) == self.executions.maxlen:
            self._forget(self.executions[0])  # the cap pushes the oldest record out
        self.executions.append(ex)
        self.last_record = ex
        late = lateness(ex, late)
        self.fire_metrics.record(ex, late)
        if self.scenarios.queue:  # a run is going: it counts the fires of its schedules
            self.scenarios.on_record(ex, late)
        if ex["outcome"] != "success" or self._kept:
            sid = ex.get("schedule_id")
            self.outbox.on_record(ex, self.schedules.get(sid) if sid is not None else None)
        elif not _has_controls(self.schedules.get(ex.get("schedule_id"))):  # type: ignore[arg-type]
            return  # the common case: a success of a schedule without controls
        self._trim_history(ex)

    def _op_notify_default(self, c: dict[str, Any], _e: Entry) -> bool:
        """The cluster's default ``notify`` (a leader's config, committed when it takes office,
        so that every node records the same alerts whatever its own config says)."""
        return self.outbox.set_default(c.get("notify"))

    def _op_alerts_done(self, c: dict[str, Any], _e: Entry) -> int:
        """Alerts the leader delivered (``sent``) or gave up on (``failed``): out of the outbox."""
        return self.outbox.done(list(c.get("sent", ())), list(c.get("failed", ())))

    # ------------------------------------------------------------------ scenarios

    def _op_scenario_load(self, c: dict[str, Any], _e: Entry) -> dict[str, Any]:
        return self.scenarios.load(c)

    def _op_scenario_delete(self, c: dict[str, Any], _e: Entry) -> bool:
        return self.scenarios.delete(c)

    def _op_scenario_start(self, c: dict[str, Any], _e: Entry) -> dict[str, Any]:
        result = self.scenarios.start(c)
        self._wake_watchers()
        return result

    def _op_scenario_progress(self, c: dict[str, Any], _e: Entry) -> bool:
        return self.scenarios.progress(c)

    def _op_scenario_finish(self, c: dict[str, Any], _e: Entry) -> bool:
        done = self.scenarios.finish(c)
        self._wake_watchers()
        return done

    def _op_scenario_cancel(self, c: dict[str, Any], _e: Entry) -> str | None:
        status = self.scenarios.cancel(c)
        self._wake_watchers()
        return status

    # ------------------------------------------------------------------ history limits

    def _trim_history(self, ex: dict[str, Any]) -> None:
        """Keep at most the schedule's ``history.keep_success`` successful records and
        ``keep_failed`` others (its oldest go). A schedule without limits costs a lookup or two;
        one with limits keeps a count, and a record over its limit costs one pass over the
        history (at most ``max_executions`` records) to remove the oldest of its kind."""
        sid = ex.get("schedule_id")
        if sid is None:
            return
        kind = (sid, ex.get("outcome") == "success")
        keep = _history_limit(self.schedules.get(sid), kind[1])
        if keep is None:
            if self._kept:
                self._kept.pop(kind, None)  # counted again if it gets a limit later
            return
        count = self._kept.get(kind)
        count = self._count_kind(kind) if count is None else count + 1
        if count > keep:
            self._drop_oldest(kind, count - keep)
            count = keep
        self._kept[kind] = count

    def _count_kind(self, kind: tuple[str, bool]) -> int:
        return sum(1 for ex in self.executions if _kind(ex) == kind)

    def _forget(self, ex: dict[str, Any]) -> None:
        kind = _kind(ex)
        if kind in self._kept:
            self._kept[kind] -= 1

    def _drop_oldest(self, kind: tuple[str, bool], n: int) -> None:
        if n == 1:
            for i, ex in enumerate(self.executions):
                if _kind(ex) == kind:
                    del self.executions[i]
                    return
        kept = []
        for ex in self.executions:
            if n > 0 and _kind(ex) == kind:
                n -= 1
                continue
            kept.append(ex)
        self.executions.clear()
        self.executions.extend(kept)

    # ------------------------------------------------------------------ run limit

    def _run_limit_reached(self, schedule_id: str) -> bool:
        s = self.schedules.get(schedule_id)
        return s is not None and _remaining_runs(s) == 0

    def _count_run(self, schedule_id: str) -> None:
        """One fire of the schedule's own times was queued: one run less (``remaining_runs``);
        at 0 the schedule stops (``_put_schedule``)."""
        s = self.schedules.get(schedule_id)
        left = _remaining_runs(s) if s is not None else None
        if s is None or left is None:
            return
        raw = s.metadata[CONTROLS]
        metadata = {**s.metadata, CONTROLS: {**raw, "remaining_runs": max(0, left - 1)}}
        self._put_schedule(attrs.evolve(s, metadata=metadata))

    # ------------------------------------------------------------------ trigger and backfill

    def _op_trigger_schedule(self, c: dict[str, Any], e: Entry) -> dict[str, Any] | None:
        """One run of the schedule now (``c["now"]``, the leader's clock), outside its times:
        its own idempotency key, neither checked against nor moving the ``fired`` watermark,
        nor counted in ``remaining_runs``. None if the schedule is gone."""
        s = self.schedules.get(c["schedule_id"])
        if s is None:
            return None
        now = _dt(c["now"])
        assert now is not None
        key = f"{s.id}@{now.isoformat()}#trigger"
        job = backfill.schedule_job(s, now, backfill.run_id(key, e.index), now)
        queued = self._admit(JobState(job, origin="trigger", key=key), e)
        return {"job_id": str(job.id), "idempotency_key": key, "queued": queued}

    def _op_backfill_schedule(self, c: dict[str, Any], e: Entry) -> dict[str, Any] | None:
        """Queue the fire times ``c["times"]`` (ISO, in order, as the trigger gives them) of a
        schedule to run one after another, each with a normal fire's idempotency key; a time
        that already ran (or waits in a backfill) is left out. None if the schedule is gone."""
        sid = c["schedule_id"]
        if sid not in self.schedules:
            return None
        queue = self.backfills.get(sid, [])
        seen = {t for t, _ in queue}
        ran = self._ran_keys(sid)
        new: list[list[str]] = []
        for t in c["times"]:
            if t in seen or f"{sid}@{t}" in ran:
                continue
            seen.add(t)
            new.append([t, str(backfill.run_id(f"{sid}@{t}", e.index))])
        answer = {"fire_times": len(c["times"]), "already_run": len(c["times"]) - len(new)}
        if len(queue) + len(new) > backfill.MAX_QUEUED:
            return {**answer, "refused": len(queue)}
        if new:
            self.backfills[sid] = sorted(queue + new, key=lambda x: datetime.fromisoformat(x[0]))
            if not any(js.origin == "backfill" for js in self.open_jobs(sid)):
                self._backfill_next(sid, _dt(c["now"]), e)
        return {**answer, "job_ids": [jid for _, jid in new]}

    def _backfill_next(self, sid: str, now: datetime | None, e: Entry) -> None:
        """Queue the schedule's next backfilled fire time that has not run meanwhile."""
        queue = self.backfills.get(sid)
        s = self.schedules.get(sid)
        ran = self._ran_keys(sid) if queue else set()
        while queue and s is not None:
            t, jid = queue.pop(0)
            if f"{sid}@{t}" in ran:
                continue
            nominal = datetime.fromisoformat(t)
            job = backfill.schedule_job(s, nominal, UUID(jid), now or nominal)
            if self._admit(JobState(job, origin="backfill"), e):
                break
        if not queue:
            self.backfills.pop(sid, None)

    def _backfill_continues(self, sid: str, finished_at: datetime, e: Entry) -> None:
        """A run of a schedule with a backfill queue ended: its next backfilled time runs once
        no backfilled run of it (nor a retry, which may be one's next try) is unfinished."""
        if not any(js.origin in ("backfill", "retry") for js in self.open_jobs(sid)):
            self._backfill_next(sid, finished_at, e)

    def _ran_keys(self, sid: str) -> set[str]:
        """The keys of the schedule's fire times that ran or are running (a broadcast's runs
        count for their fire): its unfinished jobs and its records of runs (one pass over the
        history)."""
        keys = {fire_of(job_key(js)) for js in self.open_jobs(sid)}
        keys.update(
            fire_of(ex["idempotency_key"])
            for ex in self.executions
            if ex.get("schedule_id") == sid and ex.get("outcome") not in backfill.NOT_RUN
        )
        return keys

    def _op_reset_leases(self, c: dict[str, Any], _e: Entry) -> dict[str, int]:
        schedules = 0
        for sid in self._leased:
            s = self.schedules[sid]
            s.acquired_by = s.acquired_until = None
            schedules += 1
        self._leased.clear()
        jobs = 0
        for js in self.jobs.values():
            if js.job.acquired_by is not None:
                js.job.acquired_by = js.job.acquired_until = None
                jobs += 1
        self._running = {}
        return {"schedules": schedules, "jobs": jobs}

    def _op_expire_results(self, c: dict[str, Any], _e: Entry) -> int:
        now = _dt(c["now"])
        expired = [jid for jid, r in self.results.items() if r.expires_at <= now]
        for jid in expired:
            del self.results[jid]
        return len(expired)


def retry_job_id(job_id: UUID, tries: int) -> UUID:
    """The id of try ``tries`` of the fire whose previous try was ``job_id``: derived from
    replicated data, so every node creates the same retry."""
    return uuid5(job_id, f"try-{tries}")


def retry_job(js: JobState, not_before: datetime) -> JobState:
    """The next try of ``js``'s fire: the same schedule, fire time and jitter (so the same
    idempotency key), not started before ``not_before``, its start deadline moved as far as
    the backoff (the schedule's misfire grace time still applies from there). ``attempts``
    carries on, so a fire's ``attempt`` numbers keep rising across its tries."""
    job = js.job
    deadline = job.start_deadline
    if deadline is not None and job.scheduled_fire_time is not None:
        deadline = not_before + (deadline - job.scheduled_fire_time)
    tries = js.tries + 1
    new = attrs.evolve(
        job,
        id=retry_job_id(job.id, tries),
        start_deadline=deadline,
        created_at=not_before,
        acquired_by=None,
        acquired_until=None,
    )
    # A broadcast run's retry stays that run: same shard, same handler (the shard is its).
    return JobState(
        new,
        js.attempts,
        handler=js.handler if js.shard is not None else None,
        origin="retry",
        tries=tries,
        not_before=not_before,
        shard=js.shard,
        key=js.key,
    )


def _lateness(started_at: datetime | None, fire_time: datetime | None) -> float | None:
    if started_at is None or fire_time is None:
        return None
    return (started_at - fire_time).total_seconds()


def _has_controls(s: Schedule | None) -> bool:
    return s is not None and bool(s.metadata) and CONTROLS in s.metadata


def _controls_raw(s: Schedule) -> dict[str, Any] | None:
    """The stored controls (plain JSON, validated when written), without decoding them: the
    fire path reads one field of them."""
    return s.metadata.get(CONTROLS) if s.metadata else None


def _remaining_runs(s: Schedule) -> int | None:
    raw = _controls_raw(s)
    return raw.get("remaining_runs") if raw else None


def _history_limit(s: Schedule | None, success: bool) -> int | None:
    raw = _controls_raw(s) if s is not None else None
    history = raw.get("history") if raw else None
    if not history:
        return None
    return history.get("keep_success" if success else "keep_failed")


def _kind(ex: dict[str, Any]) -> tuple[str, bool]:
    return (ex.get("schedule_id"), ex.get("outcome") == "success")  # type: ignore[return-value]


def record_time(ex: dict[str, Any]) -> datetime | None:
    """When an execution record happened, for ``since``: its scheduled fire time; a run-now job
    has none, so its start, or its finish when it never started (missed its deadline, or was
    abandoned before a handler took it). Naive texts (none are written) count as UTC."""
    text = ex.get("scheduled_fire_time") or ex.get("started_at") or ex.get("finished_at")
    if not text:
        return None
    at = datetime.fromisoformat(text)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def ids(values: Iterable[UUID]) -> list[str]:
    return [str(v) for v in values]


def lease_until(now: datetime, duration: timedelta) -> str:
    return (now + duration).isoformat()
