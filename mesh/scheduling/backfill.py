"""Backfill and trigger: the fire times of a past range, and the jobs of runs outside the times.

``POST /api/schedules/{id}/backfill`` runs every fire time of a schedule's trigger in
[start, end) once; :func:`fire_times` lists them. It costs at most ``MAX_BACKFILL`` + 1 calls of
the trigger's ``next()`` past the first fire time at or after ``start``, and that first time is
found without visiting the earlier ones (as :mod:`mesh.scheduling.catchup` bounds a catch-up):

- interval: arithmetic (``start_time + k * interval``), so the count is exact even for an
  interval of one second over ten years;
- cron: a copy of the trigger starting at ``start`` (its fields decide the first time);
- calendarinterval: arithmetic for days and weeks, at most one step per month otherwise;
- date: its one run time.

The trigger's start (``start_time``, ``start_date``: by default when the schedule was created)
does not bound a backfill, the range does: an interval's times and a calendar interval of days
or weeks extend back before it on the same grid, a cron's fields are what they are. Only a
calendar interval of months or years starts no earlier than its ``start_date`` (its grid of
month days has no backward extension). The end (``end_time``, ``end_date``) still bounds.

Other trigger classes (added from Python, never through the API) cannot be iterated safely:
:class:`NotIterable`. The times are exactly those a normal fire would have (same offset, no
jitter), so a backfilled time has the idempotency key a normal fire of it has
(``state.idempotency_key``: ``<schedule>@<nominal time>``).

:func:`schedule_job` builds the job of such a run inside the state machine: every value comes
from the replicated schedule and the command (its id is a ``uuid5`` of replicated values, its
creation time the command's), so every node builds the same job.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

from apscheduler import Job, Schedule
from apscheduler.abc import Trigger
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

MAX_BACKFILL = 1000  # fire times one backfill request may run
MAX_QUEUED = 10 * MAX_BACKFILL  # fire times of one schedule waiting in backfills at once
# Outcomes of a record whose job did not run its task: such a fire time may be backfilled.
NOT_RUN = frozenset({"missed_start_deadline", "deserialization_failed", "skipped", "no_handler"})
_JOBS = UUID("9b0f6f3e-1c55-4c1e-9a3e-6d1f2a7c0b16")  # uuid5 namespace of trigger/backfill jobs
_SECOND = timedelta(seconds=1)


class NotIterable(ValueError):
    """The trigger's fire times cannot be listed within bounds (a class the API does not make)."""


class TooManyFireTimes(ValueError):
    """More than ``limit`` fire times in the range; ``count`` is exact when known, else None."""

    def __init__(self, count: int | None, limit: int) -> None:
        shown = f"{count}" if count is not None else f"more than {limit}"
        super().__init__(
            f"the range holds {shown} fire times; a backfill runs at most {limit}: split the range"
        )
        self.count = count
        self.limit = limit


def fire_times(
    trigger: Trigger, start: datetime, end: datetime, *, limit: int = MAX_BACKFILL
) -> list[datetime]:
    """The fire times of ``trigger``'s configuration in [start, end) (aware datetimes), in
    order; ``TooManyFireTimes`` above ``limit``, ``NotIterable`` for other trigger classes.
    ``trigger`` is not changed (its progress does not matter: the range does)."""
    if isinstance(trigger, IntervalTrigger):
        return _interval(trigger, start, end, limit)
    if isinstance(trigger, CronTrigger):
        return _take(_cron(trigger, start), end, limit)
    if isinstance(trigger, CalendarIntervalTrigger):
        return _take(_calendar(trigger, start), end, limit)
    if isinstance(trigger, DateTrigger):
        return [trigger.run_time] if start <= trigger.run_time < end else []
    raise NotIterable(f"a {type(trigger).__name__} cannot be backfilled")


def _take(times: Iterator[datetime], end: datetime, limit: int) -> list[datetime]:
    out: list[datetime] = []
    for t in times:
        if t >= end:
            break
        if len(out) >= limit:
            raise TooManyFireTimes(None, limit)
        out.append(t)
    return out


def _interval(trigger: IntervalTrigger, start: datetime, end: datetime, limit: int) -> Any:
    first, step = trigger.start_time, trigger._interval
    stop = end if trigger.end_time is None else min(end, trigger.end_time + _MICRO)
    k0, k1 = _index_at(first, step, start), _index_at(first, step, stop)
    count = max(0, k1 - k0)
    if count > limit:
        raise TooManyFireTimes(count, limit)
    return [first + k * step for k in range(k0, k1)]


_MICRO = timedelta(microseconds=1)


def _index_at(first: datetime, step: timedelta, t: datetime) -> int:
    """The least k (negative before the start time) with ``first + k * step >= t``:
    arithmetic, then corrected (wall-clock arithmetic in a zone with daylight saving can be off
    by one step either way)."""
    k = -(-(t - first) // step)
    while first + (k - 1) * step >= t:
        k -= 1
    while first + k * step < t:
        k += 1
    return k


def _fresh(trigger: Any) -> Any:
    """A copy of ``trigger`` to step without changing it."""
    probe = type(trigger).__new__(type(trigger))
    probe.__setstate__(trigger.__getstate__())
    return probe


def _cron(trigger: CronTrigger, start: datetime) -> Iterator[datetime]:
    probe = _fresh(trigger)
    # Whole seconds, as the trigger's own fire times have (catchup._previous says why).
    at = start if not start.microsecond else start.replace(microsecond=0) + _SECOND
    probe.start_time = at.astimezone(trigger.timezone)
    probe._last_fire_time = None
    while (t := probe.next()) is not None:
        yield t


def _calendar(trigger: CalendarIntervalTrigger, start: datetime) -> Iterator[datetime]:
    probe = _fresh(trigger)
    probe._last_fire_date = None
    days = trigger.days + 7 * trigger.weeks
    if not trigger.years and not trigger.months:
        # Fire dates are a grid of ``days`` through start_date, extended back before it: jump
        # to the grid date just before ``start``.
        behind = (start.astimezone(trigger.timezone).date() - trigger.start_date).days
        probe._last_fire_date = trigger.start_date + timedelta(days=(behind // days - 1) * days)
    # Months and years: from the start date (no earlier), at most one step per month since it
    # (schema.MIN_YEAR).
    while (t := probe.next()) is not None:
        if t >= start:
            yield t


def schedule_job(schedule: Schedule, nominal: datetime, job_id: UUID, now: datetime) -> Job:
    """The job of one run of ``schedule`` at ``nominal`` outside its normal fires (a trigger or
    a backfilled time): no jitter, no start deadline (it runs whenever a runner is free), the
    schedule's metadata (its controls) copied as a fire's job has it; ``now`` (the command's
    time) is its creation time."""
    return Job(
        id=job_id,
        task_id=schedule.task_id,
        args=schedule.args,
        kwargs=schedule.kwargs,
        schedule_id=schedule.id,
        scheduled_fire_time=nominal,
        start_deadline=None,
        executor=schedule.job_executor,
        result_expiration_time=schedule.job_result_expiration_time,
        metadata=dict(schedule.metadata),
        created_at=now,
    )


def run_id(key: str, seq: int) -> UUID:
    """The job id of the run with idempotency key ``key`` asked by the command at log index
    ``seq``: the same on every node, and new for each request (a time backfilled again after
    its record left the history gets a new job)."""
    return uuid5(_JOBS, f"{key}/{seq}")
