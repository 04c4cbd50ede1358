"""The daylight saving time rule of cron fire times (Temporal's rule, docs/scheduling.md).

A cron schedule names wall-clock times in its timezone. Twice a year the wall clock skips an
hour (spring forward) or repeats one (fall back). The mesh follows Temporal Schedules:

- a fire time in the skipped hour does not exist, so it is skipped;
- a fire time in the repeated hour fires once, at its first occurrence.

APScheduler 4.0.0a6's ``CronTrigger`` differs on both: it yields a skipped time shifted by the
offset before the change (``02:30+01:00`` in Berlin is 03:30 CEST) when the hour field names it
explicitly, and it yields both occurrences of a repeated time. :func:`skipped_by_dst` says which
of its fire times the rule drops; ``plan_round`` applies it (pure: no clock, the trigger's own
timezone database).
"""

from __future__ import annotations

from datetime import UTC, datetime

from apscheduler.triggers.cron import CronTrigger

__all__ = ["skipped_by_dst"]


def skipped_by_dst(trigger: object, fire_time: datetime) -> bool:
    """True if the cron ``trigger``'s ``fire_time`` must not fire: its wall-clock time does not
    exist in the trigger's timezone, or it is the second occurrence of a repeated one."""
    if not isinstance(trigger, CronTrigger):
        return False  # interval triggers count absolute time: no wall clock to skip or repeat
    tz = trigger.timezone
    # The wall-clock time the trigger meant, in the offset it chose for it.
    wall = fire_time.replace(tzinfo=None)
    first = wall.replace(tzinfo=tz, fold=0)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != wall:
        return True  # in the gap of a spring-forward change
    second = wall.replace(tzinfo=tz, fold=1)
    # Aware datetimes of one tzinfo compare by wall clock (fold ignored): compare instants.
    return first.utcoffset() != second.utcoffset() and fire_time.astimezone(
        UTC
    ) != first.astimezone(UTC)
