"""``ReplicatedDataStore``: an APScheduler 4 data store whose every mutation goes through Raft.

Why this file is long: it is one class implementing the whole of APScheduler's ``DataStore``
contract (tasks, schedules, jobs, results, leases) plus the mesh's extensions of it (fire
rounds, bulk writes, job assignment), each a short method over the replicated state; splitting
the class would scatter one contract over several files.

It runs on the leader only, inside the leader's ``AsyncScheduler``. Reads come from the local
replica (``SchedulerState``), which every node holds. Mutations are proposed as commands carrying
their resulting state and return only after a majority committed them and this node applied them.
Anything that depends on the clock (what is due, lease expiry, missed start deadlines) is decided
here, by the leader, and recorded in the command.

Objects handed to APScheduler are copies: its loops mutate triggers while computing fire times,
and the replica must change only by applying committed commands.

Per-job commands (``add_job``, ``release_job``) arriving in one event-loop iteration are
proposed as one ``batch`` entry: at hundreds of fires per second each entry's fixed cost (its
encoding, its row, its apply on every node) mattered more than its content. Every direct
proposal first flushes the pending batch, so the log keeps the order the scheduler asked for.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import attrs
from apscheduler import (
    ConflictingIdError,
    Job,
    JobOutcome,
    JobResult,
    Schedule,
    ScheduleResult,
    Task,
    TaskLookupError,
)
from apscheduler._enums import ConflictPolicy
from apscheduler._events import (
    JobAcquired,
    JobAdded,
    JobReleased,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleUpdated,
    TaskAdded,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler.datastores.base import BaseDataStore

from mesh.contracts import ProposalTooLarge
from mesh.scheduling.catchup import catch_up
from mesh.scheduling.controls import controls_of
from mesh.scheduling.outcomes import outcome_of
from mesh.scheduling.rounds import Fired, Lease, RoundResult, plan_round, round_command
from mesh.scheduling.state import (
    JobState,
    SchedulerState,
    dump_job,
    dump_result,
    dump_schedule,
    dump_task,
    json_result,
    load_job,
    load_schedule,
    load_task,
    retry_job_id,
    to_wire,
)

Proposer = Callable[[dict[str, Any]], Awaitable[Any]]
# Jobs one acquire_jobs call hands APScheduler's job loop, which starts them all in one step of
# the event loop: a new leader inheriting hundreds of jobs stalled its heartbeats for ~1 s and
# lost the leadership, which left the next leader the same backlog. The loop is woken for more.
ACQUIRE_BATCH = 64
BATCH_WAIT_TIMEOUT = 5.0  # seconds a batched release waits for its commit (as MeshNode.propose)
YIELD_EVERY = 0.005  # add_schedules lets the event loop run this often while encoding

log = logging.getLogger("mesh.scheduling")


class BatchedCommandFailed(Exception):
    """A command inside a batch entry failed to apply (a bug: commands are validated first)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@attrs.define(eq=False, kw_only=True)
class ReplicatedDataStore(BaseDataStore):
    propose: Proposer
    state: SchedulerState
    term: int
    clock: Callable[[], datetime] = _utcnow
    # Where a job ran (a handler id), asked once when its result is recorded in the history;
    # the leader's session answers it from what the job executor told it.
    runner_of: Callable[[UUID], str | None] = lambda _job_id: None
    # Optional pipelined proposer (MeshNode.propose_nowait): add_job then does not wait.
    propose_nowait: Callable[[dict[str, Any]], asyncio.Future[Any]] | None = None
    # Told of each retry a failed release queued (the schedule loop sets it to wake up for the
    # retry's backoff: a direct call, not an event each of the thousands of releases a second
    # would deliver through a task of its own).
    on_retry: Callable[[JobState], None] | None = attrs.field(default=None, init=False)
    _inflight: set[asyncio.Future[Any]] = attrs.field(init=False, factory=set)
    _tasks: set[asyncio.Task[None]] = attrs.field(init=False, factory=set)
    _batch: list[tuple[dict[str, Any], asyncio.Future[Any]]] = attrs.field(init=False, factory=list)
    # Missed fire times the catch-up cap skipped, per schedule, until its release records them.
    _skipped: dict[str, int] = attrs.field(init=False, factory=dict)

    # ------------------------------------------------------------------ proposing

    async def _propose(self, command: dict[str, Any]) -> Any:
        """Propose directly, after whatever is batched so far (log order = call order)."""
        self._flush_batch()
        return await self.propose(command)

    async def propose_batched(self, command: dict[str, Any]) -> Any:
        """Replicate ``command`` in this loop iteration's batch entry and return its result
        once applied; ``TimeoutError`` after ``BATCH_WAIT_TIMEOUT`` (no quorum?)."""
        if self.propose_nowait is None:
            return await self._propose(command)
        fut = self._submit(command)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), BATCH_WAIT_TIMEOUT)
        except TimeoutError:
            raise TimeoutError(
                f"{command.get('op')} not committed within {BATCH_WAIT_TIMEOUT:.0f}s (no quorum?)"
            ) from None

    def _submit(self, command: dict[str, Any]) -> asyncio.Future[Any]:
        """Queue ``command`` for this loop iteration's batch entry; the future gets its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._flush_batch)
        self._batch.append((command, fut))
        return fut

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self._propose_batch(batch)

    def _propose_batch(self, batch: list[tuple[dict[str, Any], asyncio.Future[Any]]]) -> None:
        try:
            if self.propose_nowait is None:
                raise RuntimeError("batched commands need a pipelined proposer")
            if len(batch) == 1:
                entry = self.propose_nowait(batch[0][0])
            else:
                entry = self.propose_nowait({"op": "batch", "commands": [c for c, _ in batch]})
        except ProposalTooLarge as exc:
            if len(batch) == 1:
                _fail_all(batch, exc)
                return
            # Too many large commands for one log entry (raft.max_entry_bytes): halve the batch,
            # in log order, until each part fits; only a command too large alone fails.
            half = len(batch) // 2
            self._propose_batch(batch[:half])
            self._propose_batch(batch[half:])
            return
        except Exception as exc:  # NoLeader: every queued command fails the same way
            _fail_all(batch, exc)
            return
        entry.add_done_callback(lambda f: _distribute(f, batch))

    # ------------------------------------------------------------------ tasks

    async def add_task(self, task: Task) -> None:
        outcome = await self._propose({"op": "add_task", "task": dump_task(task)})
        event = TaskUpdated if outcome == "updated" else TaskAdded
        await self._event_broker.publish(event(task_id=task.id))

    async def remove_task(self, task_id: str) -> None:
        if not await self._propose({"op": "remove_task", "task_id": task_id}):
            raise TaskLookupError(task_id)
        await self._event_broker.publish(TaskRemoved(task_id=task_id))

    async def get_task(self, task_id: str) -> Task:
        try:
            return self._copy_task(self.state.tasks[task_id])
        except KeyError:
            raise TaskLookupError(task_id) from None

    async def get_tasks(self) -> list[Task]:
        return sorted(self._copy_task(t) for t in self.state.tasks.values())

    def _copy_task(self, task: Task) -> Task:
        # A deep copy (metadata is a dict); the replica counts leased jobs per task, the stored
        # Task does not carry the count.
        copy = load_task(dump_task(task))
        return attrs.evolve(copy, running_jobs=self.state.running_jobs(task.id))

    # ------------------------------------------------------------------ schedules

    async def get_schedules(self, ids: set[str] | None = None) -> list[Schedule]:
        schedules = self.state.schedules
        chosen = (
            schedules.values() if ids is None else (schedules[i] for i in ids if i in schedules)
        )
        return sorted(_copy_schedule(s) for s in chosen)

    async def add_schedule(self, schedule: Schedule, conflict_policy: ConflictPolicy) -> None:
        outcome = await self._propose(
            {
                "op": "add_schedule",
                "schedule": dump_schedule(schedule),
                "conflict_policy": conflict_policy.name,
            }
        )
        if outcome == "conflict":
            raise ConflictingIdError(schedule.id)
        if outcome == "unchanged":
            return
        event = ScheduleUpdated if outcome == "updated" else ScheduleAdded
        await self._event_broker.publish(
            event(
                schedule_id=schedule.id,
                task_id=schedule.task_id,
                next_fire_time=schedule.next_fire_time,
            )
        )

    async def add_schedules(
        self, schedules: Sequence[Schedule], conflict_policy: ConflictPolicy
    ) -> list[str]:
        """``add_schedule`` for many (a mesh extension of the DataStore contract): their
        commands go in as few ``batch`` entries as fit in ``raft.max_entry_bytes`` (usually
        one), and each schedule's outcome (``added``, ``updated``, ``unchanged``, ``conflict``)
        is returned in order. One ScheduleAdded/ScheduleUpdated event is published: the
        written schedule's with the earliest next fire time."""
        commands = []
        since = time.monotonic()
        for s in schedules:
            commands.append(
                {
                    "op": "add_schedule",
                    "schedule": dump_schedule(s),
                    "conflict_policy": conflict_policy.name,
                }
            )
            if time.monotonic() - since > YIELD_EVERY:  # let the heartbeats out
                await asyncio.sleep(0)
                since = time.monotonic()
        self._flush_batch()  # log order = call order
        outcomes = await self._propose_all(commands)
        # One event for the lot, from the written schedule that fires first: that is what wakes
        # the scheduler's loop (it then reads the next fire time from the state). Nothing else
        # consumes these events (docs/event-broker.md), and one per schedule cost about a
        # third of a bulk write.
        written = [
            (s, outcome)
            for s, outcome in zip(schedules, outcomes, strict=True)
            if outcome in ("added", "updated")
        ]
        if written:
            first, outcome = min(written, key=lambda w: _fire_order(w[0]))
            event = ScheduleUpdated if outcome == "updated" else ScheduleAdded
            await self._event_broker.publish(
                event(
                    schedule_id=first.id,
                    task_id=first.task_id,
                    next_fire_time=first.next_fire_time,
                )
            )
        return outcomes

    async def _propose_all(self, commands: list[dict[str, Any]]) -> list[Any]:
        """Each command's result, proposed as one ``batch`` entry (or as few as fit)."""
        if len(commands) == 1:
            return [await self.propose(commands[0])]
        results: list[Any] = []
        for part, applied in await self._propose_split(
            commands, lambda part: {"op": "batch", "commands": part}
        ):
            failed = [value for ok, value in applied if not ok]
            if failed:
                raise BatchedCommandFailed(f"{len(failed)} of {len(part)} failed: {failed[0]}")
            results += [value for _, value in applied]
        return results

    async def _propose_split(
        self,
        items: list[Any],
        command: Callable[[list[Any]], dict[str, Any]],
        on_too_large: Callable[[Any], None] | None = None,
    ) -> list[tuple[list[Any], Any]]:
        """``(part, result)`` of proposing ``command(items)``, or, when that is larger than a
        log entry may be (``raft.max_entry_bytes``; nothing was appended), of its halves, in
        order, until each part fits. One item too large alone raises ProposalTooLarge, or is
        left out through ``on_too_large`` when given."""
        if not items:
            return []
        try:
            return [(items, await self._propose(command(items)))]
        except ProposalTooLarge:
            if len(items) > 1:
                half = len(items) // 2
                first = await self._propose_split(items[:half], command, on_too_large)
                return first + await self._propose_split(items[half:], command, on_too_large)
            if on_too_large is None:
                raise
            on_too_large(items[0])
            return []

    async def remove_schedules(self, ids: Iterable[str], *, finished: bool = False) -> None:
        ids = list(ids)
        tasks = {i: self.state.schedules[i].task_id for i in ids if i in self.state.schedules}
        removed = await self._propose({"op": "remove_schedules", "ids": ids})
        for sid in removed:
            await self._event_broker.publish(
                ScheduleRemoved(schedule_id=sid, task_id=tasks.get(sid, ""), finished=finished)
            )

    async def acquire_schedules(
        self, scheduler_id: str, lease_duration: timedelta, limit: int
    ) -> list[Schedule]:
        now = self.clock()
        due = self.state.due_schedule_ids(now, limit)
        if not due:
            return []
        got = await self._propose(
            {
                "op": "acquire_schedules",
                "scheduler_id": scheduler_id,
                "ids": due,
                "until": (now + lease_duration).isoformat(),
            }
        )
        schedules = [_copy_schedule(self.state.schedules[sid]) for sid in got]
        for s in schedules:
            # Far behind the clock (a start in the past, an outage): fast-forward the copy so
            # APScheduler's loop visits a bounded number of fire times (catchup module doc).
            if skipped := catch_up(s, now):
                self._skipped[s.id] = skipped
        return schedules

    async def release_schedules(self, scheduler_id: str, results: Sequence[ScheduleResult]) -> None:
        await self._drain_inflight(raise_errors=False)
        if not results:
            return
        released = await self._propose(
            {
                "op": "release_schedules",
                "scheduler_id": scheduler_id,
                "results": [
                    {
                        "schedule_id": r.schedule_id,
                        "trigger": to_wire(r.trigger),
                        "last_fire_time": r.last_fire_time.isoformat(),
                        "next_fire_time": r.next_fire_time.isoformat()
                        if r.next_fire_time
                        else None,
                        **_skipped_field(self._skipped.pop(r.schedule_id, 0)),
                    }
                    for r in results
                ],
            }
        )
        by_id = {r.schedule_id: r for r in results}
        for sid in released:
            r = by_id[sid]
            await self._event_broker.publish(
                ScheduleUpdated(schedule_id=sid, task_id=r.task_id, next_fire_time=r.next_fire_time)
            )

    async def fire_round(
        self,
        scheduler_id: str,
        limit: int,
        *,
        rng: random.Random | None = None,
        lookahead: timedelta = timedelta(0),
        lease: timedelta | None = None,
        capacity: int = 0,
        assign: Callable[[Job], str | None] | None = None,
    ) -> RoundResult:
        """Fire the schedules due now or within ``lookahead`` (at most ``limit``) in one
        ``fire_round`` entry (a mesh extension of the DataStore contract,
        mesh.scheduling.rounds). With ``lease``, up to ``capacity`` of its jobs (of tasks with
        no running-jobs cap) are leased to ``scheduler_id`` in that entry, each with the handler
        ``assign`` names: the caller starts them at their fire times (``RoundResult.leased``)."""
        now = self.clock()
        due = self.state.due_schedule_ids(now + lookahead, limit)
        if not due:
            return RoundResult(0, now)
        copies = [_copy_schedule(self.state.schedules[sid]) for sid in due]
        fired = plan_round(copies, now, horizon=now + lookahead, rng=rng)
        if not fired:
            return RoundResult(len(due), now)
        leases = None
        if lease is not None and capacity > 0:
            chosen: dict[str, str | None] = {}
            for job in (j for f in fired for j in f.jobs):
                if len(chosen) >= capacity:
                    break
                task = self.state.tasks.get(job.task_id)
                if task is not None and task.max_running_jobs is None:
                    chosen[str(job.id)] = assign(job) if assign is not None else None
            leases = Lease(now + lease, self.term, chosen)
        added = await self._commit_round(scheduler_id, fired, leases)
        leased = [
            j
            for f in fired
            for j in f.jobs
            if leases is not None
            and str(j.id) in leases.jobs
            and str(j.id) in added
            and self._leased_to(scheduler_id, j.id)
        ]
        return RoundResult(len(due), now, leased)

    async def _commit_round(
        self, scheduler_id: str, fired: list[Fired], lease: Lease | None
    ) -> set[str]:
        """Commit the round (in parts if too large for one entry); the ids of the jobs added."""

        def too_large(f: Fired) -> None:
            log.error(
                "schedule %r: its fire does not fit in a log entry (raft.max_entry_bytes); it "
                "is skipped this round",
                f.schedule.id,
            )

        parts = await self._propose_split(
            fired,
            lambda part: round_command(scheduler_id, part, to_wire, dump_job, lease),
            too_large,
        )
        added: set[str] = set()
        leased = lease.jobs if lease is not None else {}
        for part, applied in parts:
            added.update(applied["jobs"])
            for f in part:
                for job in f.jobs:
                    # A leased job is started by the round's caller: the job loop need not wake.
                    if str(job.id) in added and str(job.id) not in leased:
                        await self._publish_job_added(job)
        return added

    def _leased_to(self, scheduler_id: str, job_id: UUID) -> bool:
        """Whether the round's entry leased the job to ``scheduler_id``: a job its overlap
        policy held was not (mesh.scheduling.overlap)."""
        js = self.state.jobs.get(job_id)
        return js is not None and js.job.acquired_by == scheduler_id

    async def run_outside_times(self, command: dict[str, Any]) -> Any:
        """Commit a ``trigger_schedule`` or ``backfill_schedule`` command (a mesh extension of
        the DataStore contract) and wake the job loop for the job it queued; its result."""
        result = await self._propose(command)
        if isinstance(result, dict) and self.state.schedules.get(command["schedule_id"]):
            for jid in [result.get("job_id"), *result.get("job_ids", ())]:
                js = self.state.jobs.get(UUID(jid)) if jid is not None else None
                if js is not None:
                    await self._publish_job_added(js.job)
        return result

    async def get_next_schedule_run_time(self) -> datetime | None:
        return self.state.next_fire_time()

    async def extend_acquired_schedule_leases(
        self, scheduler_id: str, schedule_ids: set[str], duration: timedelta
    ) -> None:
        if schedule_ids:
            await self._propose(
                {
                    "op": "extend_leases",
                    "scheduler_id": scheduler_id,
                    "schedule_ids": sorted(schedule_ids),
                    "until": (self.clock() + duration).isoformat(),
                }
            )

    # ------------------------------------------------------------------ jobs

    async def add_job(self, job: Job) -> None:
        if self.propose_nowait is None:
            if await self._propose({"op": "add_job", "job": dump_job(job)}):
                await self._publish_job_added(job)
            return
        # Pipelined: APScheduler adds every fire of a batch one by one; waiting for each commit
        # would cost a round trip per fire. The job cannot run before its entry is applied
        # anyway (the job loop reads applied state), and release_schedules — later in the log —
        # waits for all of them, so a failure still surfaces before the schedule moves on.
        fut = self._submit({"op": "add_job", "job": dump_job(job)})
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        fut.add_done_callback(lambda f: self._on_job_added(f, job))

    def _on_job_added(self, fut: asyncio.Future[Any], job: Job) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result():
            task = asyncio.get_running_loop().create_task(self._publish_job_added(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish_job_added(self, job: Job) -> None:
        js = self.state.jobs.get(job.id)
        if js is not None and js.held:
            return  # nothing to run until a release un-holds it (_wake_released)
        await self._event_broker.publish(
            JobAdded(job_id=job.id, task_id=job.task_id, schedule_id=job.schedule_id)
        )

    async def flush(self) -> None:
        """Wait until every pipelined add_job so far is committed and applied."""
        await self._drain_inflight()

    async def _drain_inflight(self, *, raise_errors: bool = True) -> None:
        # Futures leave the set only once done, so every caller waits for all that were
        # pending when it asked (a schedule batch, or one API request's job).
        if not self._inflight:
            return
        if raise_errors:
            await asyncio.gather(*list(self._inflight))
            return
        # The schedule loop must survive one job it could not add (e.g. too large for a log
        # entry): an exception here would stop APScheduler while this node stays leader.
        outcomes = await asyncio.gather(*list(self._inflight), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, ProposalTooLarge):
                log.error("a job was not added: %s", outcome)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        await self._drain_inflight()  # read your own pipelined writes
        jobs = self.state.jobs
        if ids is None:
            return [_copy_job(js.job) for js in jobs.values()]
        return [_copy_job(jobs[i].job) for i in ids if i in jobs]

    async def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        await self._drain_inflight()
        now = self.clock()
        chosen: list[Job] = []
        missed: list[Job] = []
        taken: dict[str, int] = {}
        limit = ACQUIRE_BATCH if limit is None else min(limit, ACQUIRE_BATCH)
        more: Job | None = None  # an eligible job left for the next call
        for js in self.state.jobs.values():
            job = js.job
            if job.acquired_by is not None or js.held:
                continue  # leased, or held by its overlap policy (not missed while held)
            if js.not_before is not None and js.not_before > now:
                continue  # a retry in its backoff: neither due nor missed yet
            if job.start_deadline is not None and job.start_deadline < now:
                missed.append(job)
                continue
            if job.scheduled_fire_time is not None and job.scheduled_fire_time > now:
                continue  # fired ahead (lookahead) by a leader that is gone: not due yet
            task = self.state.tasks.get(job.task_id)
            cap = task.max_running_jobs if task is not None else None
            running = self.state.running_jobs(job.task_id) + taken.get(job.task_id, 0)
            if cap is not None and running >= cap:
                continue
            if len(chosen) >= limit:
                more = job
                break
            chosen.append(job)
            taken[job.task_id] = taken.get(job.task_id, 0) + 1
        if missed:  # released together: one log entry, not one commit after another
            await asyncio.gather(
                *(
                    self.release_job(
                        scheduler_id,
                        job,
                        JobResult.from_job(job, JobOutcome.missed_start_deadline, finished_at=now),
                    )
                    for job in missed
                )
            )
        if more is not None:
            # APScheduler's job loop asks again only when an event wakes it.
            await self._event_broker.publish(
                JobAdded(job_id=more.id, task_id=more.task_id, schedule_id=more.schedule_id)
            )
        if not chosen:
            return []
        got = await self._propose(
            {
                "op": "acquire_jobs",
                "scheduler_id": scheduler_id,
                "ids": [str(j.id) for j in chosen],
                "until": (now + lease_duration).isoformat(),
                "term": self.term,
            }
        )
        jobs = [_copy_job(self.state.jobs[UUID(jid)].job) for jid in got]
        for job in jobs:
            await self._event_broker.publish(JobAcquired.from_job(job, scheduler_id=scheduler_id))
        return jobs

    async def release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        result = json_result(result)  # NaN, Infinity, a set...: recorded as an error outcome
        command = {
            "op": "release_job",
            "scheduler_id": scheduler_id,
            "job_id": str(job.id),
            "result": dump_result(result),
            "handler_id": self.runner_of(job.id),
        }
        mesh_outcome = outcome_of(result.exception)
        if mesh_outcome is not None:
            command["outcome"] = mesh_outcome
        before = self.state.jobs.get(job.id)
        released = await self.propose_batched(command)  # jobs finishing together: one entry
        if released and result.outcome is not JobOutcome.success and before is not None:
            retry = self.state.jobs.get(retry_job_id(job.id, before.tries + 1))
            if retry is not None and self.on_retry is not None:
                self.on_retry(retry)  # the schedule loop wakes for its backoff's end
        if released:
            await self._event_broker.publish(
                JobReleased.from_result(
                    result, scheduler_id, job.task_id, job.schedule_id, job.scheduled_fire_time
                )
            )
            if job.schedule_id is not None and controls_of(job).overlap != "allow_all":
                self._wake_released(job.schedule_id)

    def _wake_released(self, schedule_id: str) -> None:
        """Wake the job loop for a job the release un-held (overlap), at its fire time if
        that is still ahead (``acquire_jobs`` takes no job before it): nothing else would."""
        for js in self.state.open_jobs(schedule_id):
            if js.held or js.job.acquired_by is not None:
                continue
            at = js.job.scheduled_fire_time
            delay = (at - self.clock()).total_seconds() if at is not None else 0.0
            task = asyncio.get_running_loop().create_task(self._publish_later(js.job, delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish_later(self, job: Job, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        await self._publish_job_added(job)

    async def get_job_result(self, job_id: UUID) -> JobResult | None:
        await self._drain_inflight()
        return self.state.results.get(job_id)

    async def extend_acquired_job_leases(
        self, scheduler_id: str, job_ids: set[UUID], duration: timedelta
    ) -> None:
        if job_ids:
            await self._propose(
                {
                    "op": "extend_leases",
                    "scheduler_id": scheduler_id,
                    "job_ids": sorted(str(j) for j in job_ids),
                    "until": (self.clock() + duration).isoformat(),
                }
            )

    async def assign_job(self, scheduler_id: str, job_id: UUID, handler_id: str) -> bool:
        """Commit "job → handler" before the job is dispatched (a mesh extension of the
        DataStore contract); False when the job is no longer ``scheduler_id``'s. Assignments
        made in one loop iteration share a log entry."""
        command = {
            "op": "assign_job",
            "job_id": str(job_id),
            "handler_id": handler_id,
            "scheduler_id": scheduler_id,
        }
        return bool(await self.propose_batched(command))

    async def broadcast_job(
        self, scheduler_id: str, job: Job, handlers: list[str]
    ) -> list[UUID] | None:
        """Commit the split of a broadcast job into one run per handler (a mesh extension of
        the DataStore contract; the state machine's ``broadcast``) and wake the job loop,
        which starts the runs; their ids, or None when the job is no longer
        ``scheduler_id``'s to split."""
        command = {
            "op": "broadcast",
            "scheduler_id": scheduler_id,
            "job_id": str(job.id),
            "handlers": handlers,
        }
        shards = await self._propose(command)
        if shards is None:
            return None
        ids = [UUID(sid) for sid in shards]
        for sid in ids:
            await self._event_broker.publish(
                JobAdded(job_id=sid, task_id=job.task_id, schedule_id=job.schedule_id)
            )
        return ids

    async def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        now = self.clock()
        for js in list(self.state.jobs.values()):
            if js.job.acquired_by == scheduler_id:
                result = JobResult.from_job(js.job, JobOutcome.abandoned, finished_at=now)
                await self.release_job(scheduler_id, js.job, result)

    async def cleanup(self) -> None:
        await self._drain_inflight()
        now = self.clock()
        if any(r.expires_at <= now for r in self.state.results.values()):
            await self._propose({"op": "expire_results", "now": now.isoformat()})
        busy = {js.job.schedule_id for js in self.state.jobs.values()}
        finished = [
            sid
            for sid, s in self.state.schedules.items()
            if s.next_fire_time is None
            and sid not in busy
            and sid not in self.state.backfills
            and controls_of(s).remaining_runs != 0  # stopped by its run limit: it stays
        ]
        if finished:
            await self.remove_schedules(finished, finished=True)


def _fail_all(batch: list[tuple[dict[str, Any], asyncio.Future[Any]]], exc: Exception) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)


def _distribute(
    entry: asyncio.Future[Any], batch: list[tuple[dict[str, Any], asyncio.Future[Any]]]
) -> None:
    if entry.cancelled():
        for _, fut in batch:
            fut.cancel()
        return
    exc = entry.exception()
    if exc is None and len(batch) > 1:
        for (_, fut), (ok, value) in zip(batch, entry.result(), strict=True):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(BatchedCommandFailed(value))
        return
    for _, fut in batch:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(entry.result())


def _fire_order(s: Schedule) -> tuple[bool, float]:
    """Sorts schedules by next fire time, those that never fire last."""
    t = s.next_fire_time
    return (t is None, t.timestamp() if t is not None else 0.0)


def _skipped_field(skipped: int) -> dict[str, int]:
    return {"skipped": skipped} if skipped else {}


def _copy_schedule(s: Schedule) -> Schedule:
    return load_schedule(dump_schedule(s))


def _copy_job(j: Job) -> Job:
    return load_job(dump_job(j))
