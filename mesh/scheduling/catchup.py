"""Bounded catch-up: a schedule far behind the clock costs the leader a few steps, not millions.

APScheduler's schedule loop finds a due schedule's next fire time by calling ``trigger.next()``
until it passes the clock, once per missed fire time: an interval of 1 s that started a year ago
is 31 million calls inside the leader's event loop. Before it gets a schedule, the leader's data
store calls :func:`catch_up`, which leaves at most ``MAX_CATCH_UP_FIRES`` fire times for that loop
by moving the (copied) trigger forward without visiting every missed time:

- interval: arithmetic (``start + k * interval``);
- cron: a galloping binary search over "the first fire time after t", about 2 log2(gap) calls;
- calendarinterval: arithmetic for days and weeks, at most one step per month otherwise.

The result is what APScheduler itself would compute, with one rule added for ``coalesce:
"all"``: at most ``MAX_CATCH_UP_FIRES`` missed fire times run per catch-up, the *latest* ones (as
Temporal's catch-up window keeps the recent ones); the older ones are skipped and counted.
``"latest"`` and ``"earliest"`` run one job, as in APScheduler. Other trigger classes (added from
Python code, never through the API) are left to APScheduler's loop.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from apscheduler import CoalescePolicy, Schedule
from apscheduler.abc import Trigger
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

log = logging.getLogger("mesh.scheduling.catchup")

MAX_CATCH_UP_FIRES = 100  # coalesce "all": the most missed fire times one catch-up runs
MAX_COUNT_STEPS = 1_000  # cron: skipped fire times are counted one by one, up to this many
_SECOND = timedelta(seconds=1)

# A fire time and the trigger state right after it produced that time (``__getstate__``).
Fire = tuple[datetime, dict[str, Any]]


def catch_up(schedule: Schedule, now: datetime) -> int:
    """Advance ``schedule`` (a copy handed to APScheduler) so that at most
    ``MAX_CATCH_UP_FIRES`` of its fire times are at or before ``now``; returns how many missed
    fire times will not run because of the ``coalesce: "all"`` cap (0 otherwise)."""
    first = schedule.next_fire_time
    trigger = schedule.trigger
    if first is None or first > now or type(trigger) not in _SEEKERS:
        return 0
    keep = MAX_CATCH_UP_FIRES if schedule.coalesce is CoalescePolicy.all else 1
    if _fires_within(trigger, now, MAX_CATCH_UP_FIRES):
        return 0  # few enough: APScheduler's own loop, unchanged
    count, tail = _SEEKERS[type(trigger)](trigger, first, now, keep)
    if schedule.coalesce is CoalescePolicy.all:
        fire, state = tail[0]
        schedule.next_fire_time = fire
        trigger.__setstate__(state)
        skipped = count - len(tail)
        log.warning(
            "schedule %r: %s%d missed fire times; coalesce 'all' runs the latest %d (from %s)",
            schedule.id,
            "at least " if count >= MAX_COUNT_STEPS else "",
            count,
            len(tail),
            fire.isoformat(),
        )
        return skipped
    fire, state = tail[-1]
    if schedule.coalesce is CoalescePolicy.latest:
        schedule.next_fire_time = fire
    trigger.__setstate__(state)  # "earliest" keeps its first missed time, skips the others
    return 0


def _fires_within(trigger: Trigger, now: datetime, steps: int) -> bool:
    """Whether ``trigger`` passes ``now`` (or ends) within ``steps`` calls of ``next()``."""
    probe = _copy(trigger)
    for _ in range(steps):
        fire = probe.next()
        if fire is None or fire > now:
            return True
    return False


def _copy(trigger: Any) -> Any:
    probe = type(trigger).__new__(type(trigger))
    probe.__setstate__(trigger.__getstate__())
    return probe


def _interval(trigger: IntervalTrigger, first: datetime, now: datetime, keep: int) -> Any:
    step = trigger._interval
    k = (now - first) // step
    if trigger.end_time is not None:
        k = min(k, (trigger.end_time - first) // step)
    # Wall-clock arithmetic in a zone with daylight saving can be off by one step either way.
    while k > 0 and first + k * step > now:
        k -= 1
    while first + (k + 1) * step <= now and (
        trigger.end_time is None or first + (k + 1) * step <= trigger.end_time
    ):
        k += 1
    state = trigger.__getstate__()
    tail = [
        (first + j * step, {**state, "last_fire_time": first + j * step})
        for j in range(max(0, k - keep + 1), k + 1)
    ]
    return k + 1, tail


def _cron(trigger: CronTrigger, first: datetime, now: datetime, keep: int) -> Any:
    probe = _copy(trigger)

    def after(t: datetime) -> datetime | None:
        probe._last_fire_time = t  # next() only reads and writes this
        return probe.next()

    def state_at(fire: datetime) -> dict[str, Any]:
        return {**trigger.__getstate__(), "last_fire_time": fire}

    fires: deque[datetime] = deque()
    before = now + timedelta(microseconds=1)
    while len(fires) < keep:
        fire = _previous(after, first, before)
        fires.appendleft(fire)
        if fire == first:
            break
        before = fire
    count = len(fires)
    if keep > 1 and fires[0] != first:  # count what the cap skips, one by one up to a bound
        probe._last_fire_time = first
        count += 1
        while count < MAX_COUNT_STEPS and (f := probe.next()) is not None and f < fires[0]:
            count += 1
    return count, [(f, state_at(f)) for f in fires]


def _previous(
    after: Callable[[datetime], datetime | None], floor: datetime, before: datetime
) -> datetime:
    """The latest fire time in [floor, before), ``floor`` being a fire time: a galloping
    binary search over whole seconds s for the largest with ``after(floor + s) < before``."""

    # Whole seconds: a cron fire time has no microseconds once a field was adjusted (only one
    # that started at a start_time with microseconds and fires every second keeps them; for
    # that one the result may differ from APScheduler's by those microseconds).
    base = floor.replace(microsecond=0)

    def ok(s: int) -> bool:
        fire = after(base + s * _SECOND)
        return fire is not None and fire < before

    if not ok(0):
        return floor
    hi = max(1, -(-(before - base) // _SECOND))  # base + hi >= before: after() is later
    lo, width = 0, 1
    while hi - width > lo:  # gallop down from ``before``: recent fires cost few calls
        if ok(hi - width):
            lo = hi - width
            break
        hi, width = hi - width, width * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    fire = after(base + lo * _SECOND)
    assert fire is not None
    return fire


def _calendar(trigger: CalendarIntervalTrigger, first: datetime, now: datetime, keep: int) -> Any:
    probe = _copy(trigger)
    count = 1
    tail: deque[Fire] = deque([(first, probe.__getstate__())], maxlen=keep)
    days = trigger.days + 7 * trigger.weeks
    if not trigger.years and not trigger.months:
        # Fire dates are a grid of ``days``; jump to a few steps before the last one due.
        behind = (now.astimezone(trigger.timezone).date() - probe._last_fire_date).days
        jump = behind // days - keep - 2
        if jump > 0:
            probe._last_fire_date += timedelta(days=jump * days)
            count += jump
            tail.clear()
    # Months and years: at most one step per month since 1900 (schema.MIN_YEAR).
    while (fire := probe.next()) is not None and fire <= now:
        count += 1
        tail.append((fire, probe.__getstate__()))
    return count, list(tail)


_SEEKERS: dict[type, Callable[..., Any]] = {
    IntervalTrigger: _interval,
    CronTrigger: _cron,
    CalendarIntervalTrigger: _calendar,
}
