"""Translation between the HTTP API's JSON bodies and APScheduler objects.

Pure functions, no I/O: ``parse_*`` turn already-decoded JSON into validated values and raise
:class:`BadRequest` (one sentence, starting with the offending field's path) on anything a user
got wrong; ``*_to_json`` turn APScheduler objects back into JSON-able dicts. ``trigger_to_json``
output is accepted by ``parse_trigger`` and describes a trigger with the same fire times, so a
schedule can be stored or replicated as JSON and rebuilt anywhere. See docs/api.md.

Two choices differ from APScheduler's own defaults because nodes may run in different local time
zones: a date-time without an offset is read as UTC, and a cron or calendarinterval trigger
without ``timezone`` uses UTC (not the machine's local zone).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
from apscheduler import CoalescePolicy, Schedule
from apscheduler._validators import valid_metadata
from apscheduler.abc import Trigger
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_TASK_NAME = 200
# Upper bound for misfire_grace_time and max_jitter: large enough for "run every missed fire
# time after any outage", small enough that fire time + bound never overflows a datetime.
MAX_DURATION_SECONDS = 100 * 366 * 24 * 3600

SCHEDULE_FIELDS = (
    "id",
    "task",
    "trigger",
    "args",
    "kwargs",
    "coalesce",
    "misfire_grace_time",
    "max_jitter",
    "paused",
    "metadata",
)
JOB_FIELDS = ("task", "args", "kwargs")

INTERVAL_UNITS = ("weeks", "days", "hours", "minutes", "seconds", "microseconds")
CRON_FIELDS = tuple(name for name, _ in CronTrigger.FIELDS_MAP)  # year … second
CRONTAB_FIELDS = ("minute", "hour", "day", "month", "day_of_week")  # order in a crontab line
CALENDAR_UNITS = ("years", "months", "weeks", "days")
CALENDAR_TIME = (("hour", 23), ("minute", 59), ("second", 59))

TRIGGER_FIELDS: dict[str, tuple[str, ...]] = {
    "calendarinterval": (
        "type",
        *CALENDAR_UNITS,
        *(name for name, _ in CALENDAR_TIME),
        "start_date",
        "end_date",
        "timezone",
    ),
    "cron": ("type", "expr", *CRON_FIELDS, "start_time", "end_time", "timezone"),
    "date": ("type", "run_time"),
    "interval": ("type", *INTERVAL_UNITS, "start_time", "end_time"),
}
TRIGGER_TYPES = tuple(sorted(TRIGGER_FIELDS))


class BadRequest(ValueError):
    """Input a user got wrong; the message is one sentence naming the field (becomes HTTP 400)."""


@attrs.frozen
class ScheduleSpec:
    """A validated schedule body, ready for ``AsyncScheduler.add_schedule``.

    ``trigger`` is a fresh APScheduler trigger. Triggers are stateful (``next()`` advances them),
    so give each scheduler its own: rebuild one from ``to_json()`` rather than sharing it.
    """

    id: str
    task: str
    trigger: Trigger
    args: tuple
    kwargs: dict
    coalesce: CoalescePolicy
    misfire_grace_time: timedelta | None
    max_jitter: timedelta | None
    paused: bool
    metadata: dict

    def to_json(self) -> dict[str, Any]:
        """The canonical body: ``parse_schedule_body(spec.to_json())`` gives an equal schedule."""
        return {
            "id": self.id,
            "task": self.task,
            "trigger": trigger_to_json(self.trigger),
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "coalesce": self.coalesce.name,
            "misfire_grace_time": _seconds(self.misfire_grace_time),
            "max_jitter": _seconds(self.max_jitter),
            "paused": self.paused,
            "metadata": self.metadata,
        }


# --- parsing ------------------------------------------------------------------------------------


def parse_schedule_body(
    body: Any, *, schedule_id: str | None = None, now: datetime | None = None
) -> ScheduleSpec:
    """Validate a POST/PUT /api/schedules body.

    For PUT, ``schedule_id`` is the id from the URL: the body's ``id`` may be omitted or must be
    equal to it. For POST (``schedule_id=None``) an omitted ``id`` gets a random UUID4.
    ``now`` (aware; default: the current time) fills in the trigger's omitted start time.
    """
    _require_object(body, "request body")
    _reject_unknown_keys(body, SCHEDULE_FIELDS, where="the schedule")

    if schedule_id is not None:
        _parse_id(schedule_id, "id")
        if "id" in body and body["id"] != schedule_id:
            shown = _show(body["id"], quote="'")
            raise BadRequest(
                f"id: the body's id {shown} does not match the id in the URL {schedule_id!r}"
            )
        sid = schedule_id
    elif "id" in body:
        sid = _parse_id(body["id"], "id")
    else:
        sid = str(uuid.uuid4())

    if "task" not in body:
        raise BadRequest("task: required (the name of the task to run)")
    if "trigger" not in body:
        raise BadRequest("trigger: required (an object with a 'type')")

    return ScheduleSpec(
        id=sid,
        task=_parse_task(body["task"]),
        trigger=parse_trigger(body["trigger"], now=now),
        args=_parse_args(body.get("args", [])),
        kwargs=_parse_kwargs(body.get("kwargs", {})),
        coalesce=_parse_coalesce(body.get("coalesce", "latest")),
        misfire_grace_time=_parse_duration(body.get("misfire_grace_time"), "misfire_grace_time"),
        max_jitter=_parse_duration(body.get("max_jitter"), "max_jitter"),
        paused=_parse_bool(body.get("paused", False), "paused"),
        metadata=_parse_metadata(body.get("metadata", {})),
    )


def parse_job_body(body: Any) -> tuple[str, tuple, dict]:
    """Validate a POST /api/jobs body ``{"task", "args"?, "kwargs"?}`` → (task, args, kwargs)."""
    _require_object(body, "request body")
    _reject_unknown_keys(body, JOB_FIELDS, where="the job")
    if "task" not in body:
        raise BadRequest("task: required (the name of the task to run)")
    return (
        _parse_task(body["task"]),
        _parse_args(body.get("args", [])),
        _parse_kwargs(body.get("kwargs", {})),
    )


def parse_trigger(spec: Any, *, now: datetime | None = None) -> Trigger:
    """Build an APScheduler trigger from ``{"type": ..., ...}`` (see docs/api.md).

    ``now`` (aware; default: the current time) is the default ``start_time`` of interval and cron
    triggers and gives the default ``start_date`` (today in the trigger's time zone) of
    calendarinterval triggers.
    """
    _require_object(spec, "trigger")
    if "type" not in spec:
        raise BadRequest(f"trigger.type: required (one of: {', '.join(TRIGGER_TYPES)})")
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in TRIGGER_FIELDS:
        shown = _show(kind, quote="'")
        raise BadRequest(
            f"trigger.type: unknown trigger type {shown} "
            f"(expected one of: {', '.join(TRIGGER_TYPES)})"
        )
    _reject_unknown_keys(spec, TRIGGER_FIELDS[kind], where=f"trigger ({kind} trigger)")
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return _TRIGGER_PARSERS[kind](spec, now)


def _parse_interval(spec: dict, now: datetime) -> IntervalTrigger:
    units = {u: _parse_number(spec[u], f"trigger.{u}") for u in INTERVAL_UNITS if u in spec}
    try:
        interval = timedelta(**units)
    except OverflowError:
        raise BadRequest("trigger: the interval is too long") from None
    if interval <= timedelta(0):
        raise BadRequest(
            "trigger: an interval trigger needs a positive interval "
            f"(set one of {', '.join(INTERVAL_UNITS)} above 0)"
        )
    start = _parse_optional_datetime(spec, "start_time") or now
    end = _parse_optional_datetime(spec, "end_time")
    if end is not None and end <= start:
        raise BadRequest("trigger.end_time: must be later than trigger.start_time")
    return IntervalTrigger(**units, start_time=start, end_time=end)


def _parse_cron(spec: dict, now: datetime) -> CronTrigger:
    fields = {name: spec[name] for name in CRON_FIELDS if name in spec}
    tz = _parse_timezone(spec)
    start = _parse_optional_datetime(spec, "start_time") or now
    end = _parse_optional_datetime(spec, "end_time")
    if end is not None and end <= start:
        raise BadRequest("trigger.end_time: must be later than trigger.start_time")

    if "expr" in spec:
        expr = spec["expr"]
        if fields:
            raise BadRequest(
                f"trigger.expr: cannot be combined with cron fields ({', '.join(fields)}); "
                "give either a crontab expression or the fields"
            )
        if not isinstance(expr, str):
            raise BadRequest(
                f"trigger.expr: must be a crontab string such as '*/5 * * * *', got {_show(expr)}"
            )
        values = expr.split()
        if len(values) != len(CRONTAB_FIELDS):
            raise BadRequest(
                f"trigger.expr: invalid cron expression {expr!r}: wrong number of fields; "
                f"got {len(values)}, expected 5 (minute hour day month day_of_week)"
            )
        for name, value in zip(CRONTAB_FIELDS, values, strict=True):
            problem = _cron_field_problem(name, value)
            if problem:
                raise BadRequest(
                    f"trigger.expr: invalid cron expression {expr!r} ({name} field: {problem})"
                )
        try:
            return CronTrigger.from_crontab(expr, start_time=start, end_time=end, timezone=tz)
        except (ValueError, TypeError, IndexError) as e:  # all fields checked above; belt & braces
            raise BadRequest(f"trigger.expr: invalid cron expression {expr!r} ({e})") from None

    if not fields:
        raise BadRequest(
            "trigger: a cron trigger needs 'expr' or at least one of " + ", ".join(CRON_FIELDS)
        )
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise BadRequest(
                f"trigger.{name}: must be a cron expression string or an integer, "
                f"got {_show(value)}"
            )
        problem = _cron_field_problem(name, value)
        if problem:
            raise BadRequest(f"trigger.{name}: invalid cron field value ({problem})")
    try:
        return CronTrigger(**fields, start_time=start, end_time=end, timezone=tz)
    except (ValueError, TypeError, IndexError) as e:
        raise BadRequest(f"trigger: invalid cron trigger ({e})") from None


def _cron_field_problem(name: str, value: int | str) -> str | None:
    """APScheduler's complaint about one cron field's value, or None if it accepts it."""
    field_class = dict(CronTrigger.FIELDS_MAP)[name]
    try:
        field_class(name, value)
    except ValueError as e:
        return str(e)
    except IndexError:  # DayOfWeekField indexes a list with the number it was given
        return f"a weekday number in {str(value)!r} is out of range (0-7; 0 and 7 are sunday)"
    return None


def _parse_date(spec: dict, now: datetime) -> DateTrigger:
    if "run_time" not in spec:
        raise BadRequest("trigger.run_time: required for a date trigger (an ISO-8601 date-time)")
    return DateTrigger(run_time=_parse_datetime(spec["run_time"], "trigger.run_time"))


def _parse_calendarinterval(spec: dict, now: datetime) -> CalendarIntervalTrigger:
    units = {u: _parse_int(spec[u], f"trigger.{u}", 0, None) for u in CALENDAR_UNITS if u in spec}
    if not any(units.values()):
        raise BadRequest(
            "trigger: a calendarinterval trigger needs at least one of "
            f"{', '.join(CALENDAR_UNITS)} above 0"
        )
    clock = {
        name: _parse_int(spec[name], f"trigger.{name}", 0, top)
        for name, top in CALENDAR_TIME
        if name in spec
    }
    tz = _parse_timezone(spec)
    start = _parse_optional_date(spec, "start_date") or now.astimezone(tz).date()
    end = _parse_optional_date(spec, "end_date")
    if end is not None and end < start:
        raise BadRequest("trigger.end_date: must not be earlier than trigger.start_date")
    try:
        return CalendarIntervalTrigger(
            **units, **clock, start_date=start, end_date=end, timezone=tz
        )
    except (ValueError, OverflowError) as e:
        raise BadRequest(f"trigger: invalid calendarinterval trigger ({e})") from None


_TRIGGER_PARSERS: dict[str, Callable[[dict, datetime], Trigger]] = {
    "calendarinterval": _parse_calendarinterval,
    "cron": _parse_cron,
    "date": _parse_date,
    "interval": _parse_interval,
}


# --- field parsers -------------------------------------------------------------------------------


def _parse_id(value: Any, path: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BadRequest(
            f"{path}: must be a string of 1 to 128 characters from A-Z a-z 0-9 _ . : -, "
            f"got {_show(value)}"
        )
    return value


def _parse_task(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value.strip()
        or value != value.strip()
        or len(value) > MAX_TASK_NAME
    ):
        raise BadRequest(
            f"task: must be a non-empty name of at most {MAX_TASK_NAME} characters without "
            f"leading or trailing spaces, got {_show(value)}"
        )
    return value


def _parse_args(value: Any) -> tuple:
    if not isinstance(value, list):
        raise BadRequest(f"args: must be an array, got {_show(value)}")
    _require_json(value, "args")
    return tuple(value)


def _parse_kwargs(value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"kwargs: must be an object, got {_show(value)}")
    for key in value:
        if not isinstance(key, str):
            raise BadRequest(f"kwargs: keys must be strings, got {key!r}")
    _require_json(value, "kwargs")
    return dict(value)


def _parse_coalesce(value: Any) -> CoalescePolicy:
    if not isinstance(value, str) or value not in CoalescePolicy.__members__:
        raise BadRequest(
            f"coalesce: must be one of {', '.join(map(repr, CoalescePolicy.__members__))}, "
            f"got {_show(value)}"
        )
    return CoalescePolicy[value]


def _parse_duration(value: Any, path: str) -> timedelta | None:
    if value is None:
        return None
    seconds = _parse_number(value, path, or_null=True)
    if seconds > MAX_DURATION_SECONDS:
        raise BadRequest(
            f"{path}: must be at most {MAX_DURATION_SECONDS} seconds (100 years), got {value}"
        )
    return timedelta(seconds=seconds)


def _parse_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{path}: must be true or false, got {_show(value)}")
    return value


def _parse_metadata(value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"metadata: must be an object, got {_show(value)}")
    for key in value:
        if not isinstance(key, str):
            raise BadRequest(f"metadata: keys must be strings, got {key!r}")
    # The very validator Schedule applies, so anything accepted here is accepted there.
    try:
        valid_metadata(None, attrs.fields(Schedule).metadata, value)
    except ValueError as e:
        raise BadRequest(f"metadata: {e}") from None
    _require_json(value, "metadata")
    return value


def _parse_number(value: Any, path: str, *, or_null: bool = False) -> float:
    """A finite number >= 0. ``True``/``False`` are not numbers."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        expected = "a number >= 0" + (" (seconds) or null" if or_null else "")
        raise BadRequest(f"{path}: must be {expected}, got {_show(value)}")
    return value


def _parse_int(value: Any, path: str, low: int, high: int | None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise BadRequest(f"{path}: must be an integer {bounds}, got {_show(value)}")
    return value


def _parse_datetime(value: Any, path: str) -> datetime:
    """ISO-8601 date-time; without an offset it is read as UTC."""
    example = "'2026-11-23T10:00:00+00:00'"
    if not isinstance(value, str):
        raise BadRequest(f"{path}: must be an ISO-8601 date-time such as {example}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(
            f"{path}: must be an ISO-8601 date-time such as {example}, got {_show(value)}"
        ) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _parse_optional_datetime(spec: dict, name: str) -> datetime | None:
    value = spec.get(name)
    return None if value is None else _parse_datetime(value, f"trigger.{name}")


def _parse_optional_date(spec: dict, name: str) -> date | None:
    value = spec.get(name)
    if value is None:
        return None
    path = f"trigger.{name}"
    if not isinstance(value, str):
        raise BadRequest(f"{path}: must be an ISO-8601 date such as '2026-11-23'")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(
            f"{path}: must be an ISO-8601 date such as '2026-11-23', got {_show(value)}"
        ) from None


def _parse_timezone(spec: dict) -> ZoneInfo:
    name = spec.get("timezone")
    if name is None:
        return ZoneInfo("UTC")
    if not isinstance(name, str):
        raise BadRequest(
            f"trigger.timezone: must be an IANA time zone name such as 'Europe/Berlin', "
            f"got {_show(name)}"
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: not a valid key, e.g. '../x'
        raise BadRequest(f"trigger.timezone: unknown timezone {name!r}") from None


# --- rendering -----------------------------------------------------------------------------------


def schedule_to_json(schedule: Schedule, *, warnings: list[str] | None = None) -> dict[str, Any]:
    """The schedule as the API shows it; ``warnings`` is included only when given."""
    out: dict[str, Any] = {
        "id": schedule.id,
        "task": schedule.task_id,
        "trigger": trigger_to_json(schedule.trigger),
        "args": list(schedule.args),
        "kwargs": dict(schedule.kwargs),
        "coalesce": schedule.coalesce.name,
        "misfire_grace_time": _seconds(schedule.misfire_grace_time),
        "max_jitter": _seconds(schedule.max_jitter),
        "paused": schedule.paused,
        "metadata": schedule.metadata,
        "next_fire_time": iso(schedule.next_fire_time),
        "last_fire_time": iso(schedule.last_fire_time),
    }
    if warnings is not None:
        out["warnings"] = list(warnings)
    return out


def trigger_to_json(trigger: Trigger) -> dict[str, Any]:
    """The trigger's configuration (not its progress); accepted back by :func:`parse_trigger`.

    A trigger of another class (e.g. a combining trigger added from Python) is described as
    ``{"type": "unsupported", "class": ..., "description": ...}``, which parse_trigger refuses.
    """
    if isinstance(trigger, IntervalTrigger):
        out: dict[str, Any] = {"type": "interval"}
        out.update({u: getattr(trigger, u) for u in INTERVAL_UNITS if getattr(trigger, u)})
        out["start_time"] = iso(trigger.start_time)
        out["end_time"] = iso(trigger.end_time)
        return out
    if isinstance(trigger, CronTrigger):
        out = {"type": "cron"}
        expr = _as_crontab(trigger)
        if expr is not None:
            out["expr"] = expr
        else:
            out.update({f: v for f, v in _cron_values(trigger).items() if v is not None})
        out["timezone"] = _zone_name(trigger.timezone)
        out["start_time"] = iso(trigger.start_time)
        out["end_time"] = iso(trigger.end_time)
        return out
    if isinstance(trigger, DateTrigger):
        return {"type": "date", "run_time": iso(trigger.run_time)}
    if isinstance(trigger, CalendarIntervalTrigger):
        out = {"type": "calendarinterval"}
        out.update({u: getattr(trigger, u) for u in CALENDAR_UNITS if getattr(trigger, u)})
        # A trigger rebuilt from its state keeps the time of day only as ``_time``.
        time_of_day = trigger._time
        out.update(
            {name: getattr(trigger, name, getattr(time_of_day, name)) for name, _ in CALENDAR_TIME}
        )
        out["start_date"] = trigger.start_date.isoformat()
        out["end_date"] = trigger.end_date.isoformat() if trigger.end_date else None
        out["timezone"] = _zone_name(trigger.timezone)
        return out
    return {
        "type": "unsupported",
        "class": f"{type(trigger).__module__}.{type(trigger).__qualname__}",
        "description": repr(trigger),
    }


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 with the offset kept (a naive datetime is taken as UTC); None stays None."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat()


def _cron_values(trigger: CronTrigger) -> dict[str, str | None]:
    """The trigger's field expressions.

    A trigger built from arguments has them as attributes (None when not given); one rebuilt
    from its state (every schedule read from the replicated store) has only ``_fields``, with
    every field explicit: the implied ones at their defaults ("*", or "0" for ``second``).
    """
    if all(hasattr(trigger, f) for f in CRON_FIELDS):
        values = {f: getattr(trigger, f) for f in CRON_FIELDS}
        return {f: None if v is None else str(v) for f, v in values.items()}
    by_name = {field.name: str(field) for field in trigger._fields}
    return {f: by_name.get(f) for f in CRON_FIELDS}


_IMPLIED = {"year": "*", "week": "*", "second": "0"}


def _as_crontab(trigger: CronTrigger) -> str | None:
    """The 5-field crontab line equivalent to ``trigger``'s fields, if there is one."""
    values = _cron_values(trigger)
    if any(
        values[f] not in (None, _IMPLIED.get(f)) for f in CRON_FIELDS if f not in CRONTAB_FIELDS
    ):
        return None
    line = [values[f] for f in CRONTAB_FIELDS]
    if any(v is None or not v.strip() or len(v.split()) != 1 for v in line):
        return None
    return " ".join(line)


def _zone_name(tz: Any) -> str:
    return tz.key if isinstance(tz, ZoneInfo) else str(tz)


def _seconds(td: timedelta | None) -> float | None:
    return None if td is None else td.total_seconds()


# --- helpers -------------------------------------------------------------------------------------


def _require_object(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise BadRequest(f"{what}: must be a JSON object, got {_show(value)}")


def _reject_unknown_keys(obj: dict, allowed: tuple[str, ...], *, where: str) -> None:
    for key in obj:
        if key not in allowed:
            shown = _show(key, quote="'")
            place = f" in {where}" if where else ""
            raise BadRequest(
                f"unknown field {shown}{place} (allowed: {', '.join(sorted(allowed))})"
            )


def _require_json(value: Any, path: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{path}: must contain only JSON values ({e})") from None


def _show(value: Any, *, quote: str | None = None, limit: int = 60) -> str:
    """A short rendering of a user's value for an error message (JSON-style when possible)."""
    if quote and isinstance(value, str):
        text = f"{quote}{value}{quote}"
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
