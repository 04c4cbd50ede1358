"""Fire rounds: every due schedule fired in one Raft entry.

APScheduler's schedule loop (``AsyncScheduler._process_schedules``) pays three commits per
batch of at most 100 schedules (acquire, the jobs, release) and one ``add_job`` call with its
event per fire. The mesh's leader instead plans a *round*: the due schedules (not paused, from
the replicated due index), their fire times and jobs by APScheduler's own rules (the trigger's
``next()``, ``coalesce``, ``misfire_grace_time`` → the job's start deadline, ``max_jitter``),
and commits it as one ``fire_round`` command that advances every schedule and adds every job.

:func:`plan_round` is the pure part (no clock, no I/O; the RNG of the jitter is injected): it
reproduces APScheduler 4.0.0a6's loop body for each schedule, after the bounded catch-up of
:mod:`mesh.scheduling.catchup`. The state machine applies a round only for schedules that did
not change since it was planned (same next fire time, not paused, not leased): a replace, a
pause or a delete in between wins, and the idempotency record of ``add_job`` keeps a fire time
from getting a second job in any order of events (a new leader replanning the same round).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import attrs
from apscheduler import CoalescePolicy, Job, Schedule

from mesh.scheduling.catchup import catch_up
from mesh.scheduling.dst import skipped_by_dst

log = logging.getLogger("mesh.scheduling.rounds")

# Schedules per round (APScheduler's loop takes 100 per iteration). A round is planned, applied
# and its jobs' timers started in single event-loop steps: 1,000 at once (a leader catching up
# after a stall or an election) held the loop long enough to make its heartbeats late.
ROUND_LIMIT = 256
_MICROSECOND = timedelta(microseconds=1)


@attrs.frozen
class Fired:
    """One schedule of a round: where its trigger goes, and the jobs of its fire times."""

    schedule: Schedule  # the copy whose trigger was advanced
    fired_from: datetime  # its next fire time when the round was planned (the apply checks it)
    last_fire_time: datetime
    next_fire_time: datetime | None
    jobs: tuple[Job, ...]
    skipped: int = 0  # missed fire times the catch-up cap left out (coalesce "all")


def plan_round(
    schedules: Iterable[Schedule],
    now: datetime,
    *,
    horizon: datetime | None = None,
    rng: random.Random | None = None,
) -> list[Fired]:
    """The fires of ``schedules`` (copies: their triggers are advanced in place) due at ``now``,
    and (lookahead) those due up to ``horizon``.

    Fire times at or before ``now`` were missed (or are due): the schedule's coalesce policy
    applies to them, as in APScheduler. Fire times after ``now`` up to ``horizon`` are not
    missed: each gets its own job, which starts at its time.

    A schedule whose trigger raises is left out and logged; APScheduler removes it, the mesh
    leaves it for the next round (and the operator) rather than deleting user data.
    """
    rng = rng or random.Random()
    out: list[Fired] = []
    for schedule in schedules:
        first = schedule.next_fire_time
        if first is None:
            continue
        skipped = catch_up(schedule, now)
        try:
            fired = _fire(schedule, now, horizon or now, rng)
        except Exception:
            log.exception(
                "error computing the next fire time of schedule %r (task %r); it is skipped "
                "this round",
                schedule.id,
                schedule.task_id,
            )
            continue
        out.append(attrs.evolve(fired, fired_from=first, skipped=skipped))
    return out


def _fire(schedule: Schedule, now: datetime, horizon: datetime, rng: random.Random) -> Fired:
    """APScheduler 4.0.0a6's ``_process_schedules`` loop body for one schedule, plus the fire
    times up to ``horizon`` (one job each: they are not missed), without the fire times the
    daylight saving time rule drops (:mod:`mesh.scheduling.dst`): the schedule moves past them,
    no job is made for them."""
    first = schedule.next_fire_time
    assert first is not None
    trigger = schedule.trigger
    fire_times = [] if skipped_by_dst(trigger, first) else [first]
    while True:
        fire_time = trigger.next()
        if fire_time is None or fire_time > horizon:
            next_fire_time = fire_time
            break
        if skipped_by_dst(trigger, fire_time):
            continue
        if fire_time > now or not fire_times or schedule.coalesce is CoalescePolicy.all:
            fire_times.append(fire_time)  # ahead of the clock (its own job), or the first due
        elif schedule.coalesce is CoalescePolicy.latest:
            fire_times[0] = fire_time

    jobs = []
    max_jitter = schedule.max_jitter.total_seconds() if schedule.max_jitter else 0.0
    for i, nominal in enumerate(fire_times):
        jitter = timedelta(0)
        fire_time = nominal
        if max_jitter:
            following = fire_times[i + 1] if i + 1 < len(fire_times) else next_fire_time
            if following is not None:
                # Never so much jitter that a fire reaches the next fire time.
                max_jitter = min(max_jitter, (following - nominal - _MICROSECOND).total_seconds())
            jitter = timedelta(seconds=rng.uniform(0, max_jitter))
            fire_time = nominal + jitter
        deadline = (
            None if schedule.misfire_grace_time is None else fire_time + schedule.misfire_grace_time
        )
        jobs.append(
            Job(
                task_id=schedule.task_id,
                args=schedule.args,
                kwargs=schedule.kwargs,
                schedule_id=schedule.id,
                scheduled_fire_time=fire_time,
                jitter=jitter,
                start_deadline=deadline,
                executor=schedule.job_executor,
                result_expiration_time=schedule.job_result_expiration_time,
                metadata=schedule.metadata.copy(),
            )
        )
    return Fired(
        schedule=schedule,
        fired_from=first,
        last_fire_time=fire_times[-1] if fire_times else first,
        next_fire_time=next_fire_time,
        jobs=tuple(jobs),
    )


@attrs.frozen
class RoundResult:
    """What a round did: how many schedules were due, when it was planned, the jobs leased to
    the leader that fired it (started by it at their fire times)."""

    due: int
    planned_at: datetime
    leased: list[Job] = attrs.Factory(list)


@attrs.frozen
class Lease:
    """Jobs of a round that start on the leader that fired them, at their fire time: leased to
    it in the round's own entry (``until``, ``term``), with the handler each goes to (None: the
    dispatcher chooses at start, or the task runs embedded)."""

    until: datetime
    term: int
    jobs: dict[str, str | None]  # job id -> handler id


def round_command(
    scheduler_id: str, fired: list[Fired], wire: Any, dump_job: Any, lease: Lease | None = None
) -> dict:
    """The ``fire_round`` command of ``fired`` (``wire``: the trigger codec; ``dump_job``: the
    job codec, both from mesh.scheduling.state); ``lease``: which of its jobs are leased."""
    out: dict[str, Any] = {"op": "fire_round", "scheduler_id": scheduler_id}
    if lease is not None and lease.jobs:
        ids = _ids(fired)  # a round split in parts: each part leases its own jobs
        leased = {jid: handler for jid, handler in lease.jobs.items() if jid in ids}
        if leased:
            out["lease"] = {"until": lease.until.isoformat(), "term": lease.term, "jobs": leased}
    return {
        **out,
        "schedules": [
            {
                "schedule_id": f.schedule.id,
                "fired_from": f.fired_from.isoformat(),
                "trigger": wire(f.schedule.trigger),
                "last_fire_time": f.last_fire_time.isoformat(),
                "next_fire_time": f.next_fire_time.isoformat() if f.next_fire_time else None,
                "jobs": [dump_job(j) for j in f.jobs],
                **({"skipped": f.skipped} if f.skipped else {}),
            }
            for f in fired
        ],
    }


def _ids(fired: list[Fired]) -> set[str]:
    return {str(j.id) for f in fired for j in f.jobs}
