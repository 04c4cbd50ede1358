"""Translation between the HTTP API's JSON bodies and APScheduler objects.

Why this file is long: it holds both directions of that translation (body -> trigger and
trigger -> JSON), with every bound a body must respect; they must stay symmetric, which is
easiest to check when they sit side by side.

Pure functions, no I/O: ``parse_*`` turn already-decoded JSON into validated values and raise
:class:`BadRequest` (one sentence, starting with the offending field's path) on anything a user
got wrong; ``*_to_json`` turn APScheduler objects back into JSON-able dicts. ``trigger_to_json``
output is accepted by ``parse_trigger`` and describes a trigger with the same fire times, so a
schedule can be stored or replicated as JSON and rebuilt anywhere. See docs/api.md.

A body is first converted to a ``msgspec.Struct`` below: its field types carry the constraints,
and their ``Meta(description=...)`` is what an error says a field must be. What a type cannot say
(cron fields, time zones, ISO dates, intervals, end after start) is checked while building the
APScheduler trigger.

Two choices differ from APScheduler's own defaults because nodes may run in different local time
zones: a date-time without an offset is read as UTC, and a cron or calendarinterval trigger
without ``timezone`` uses UTC (not the machine's local zone).
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal, TypeVar, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import msgspec
from apscheduler import CoalescePolicy, Schedule
from apscheduler._validators import valid_metadata
from apscheduler.abc import Trigger
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from msgspec import UNSET, Meta, UnsetType

from mesh.scheduling import controls
from mesh.scheduling.codec import MAX_USER_DEPTH, NotPlainJSON, plain
from mesh.scheduling.spec import ScheduleSpec
from mesh.tasks import INTERNAL_PREFIX
from mesh.validation import Problem, dotted, explain

MAX_TASK_NAME = 200
# Upper bound for misfire_grace_time and max_jitter: large enough for "run every missed fire
# time after any outage", small enough that fire time + bound never overflows a datetime.
MAX_DURATION_SECONDS = 100 * 366 * 24 * 3600
# Date-times a trigger may name. Outside this range APScheduler's arithmetic overflows a
# datetime (year 9999) on the leader, or searches centuries for a cron match.
MIN_YEAR, MAX_YEAR = 1900, 9000
# A cron or calendarinterval trigger must fire within this many years of its start (or of now,
# when it starts in the past); otherwise it is refused as never firing. The search is bounded
# by this window: about 10 ms of CPU for a cron date that does not exist (31 April).
FIRE_SEARCH_YEARS = 100
# How deep args, kwargs and metadata may nest (codec.MAX_USER_DEPTH, documented in docs/api.md).
MAX_DEPTH = MAX_USER_DEPTH

INTERVAL_UNITS = ("weeks", "days", "hours", "minutes", "seconds", "microseconds")
CRON_FIELDS = tuple(name for name, _ in CronTrigger.FIELDS_MAP)  # year … second
CRONTAB_FIELDS = ("minute", "hour", "day", "month", "day_of_week")  # order in a crontab line
CALENDAR_UNITS = ("years", "months", "weeks", "days")
CALENDAR_TIME = ("hour", "minute", "second")


class BadRequest(ValueError):
    """Input a user got wrong; the message is one sentence naming the field (becomes HTTP 400)."""


# --- field types: constraints, and in ``description`` what an error says the field must be ---

_NonNegative = Annotated[int, Meta(ge=0)] | Annotated[float, Meta(ge=0, le=sys.float_info.max)]
Number = Annotated[_NonNegative, Meta(description="a number >= 0")]
Seconds = Annotated[_NonNegative | None, Meta(description="a number >= 0 (seconds) or null")]
Id = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9_.:-]{1,128}\Z",
        description="a string of 1 to 128 characters from A-Z a-z 0-9 _ . : -",
    ),
]
TaskName = Annotated[
    str,
    Meta(
        max_length=MAX_TASK_NAME,
        pattern=r"^(?s:\S(?:.*\S)?)\Z",  # no leading or trailing white space (str.strip's)
        description=f"a non-empty name of at most {MAX_TASK_NAME} characters without leading "
        "or trailing spaces",
    ),
]
Flag = Annotated[bool, Meta(description="true or false")]
Array = Annotated[list[Any], Meta(description="an array")]
Object = Annotated[dict[str, Any], Meta(description="an object")]
CoalesceName = Literal["earliest", "latest", "all"]  # CoalescePolicy's member names, in order
Coalesce = Annotated[
    CoalesceName, Meta(description="one of " + ", ".join(map(repr, get_args(CoalesceName))))
]
DateTimeText = Annotated[
    str, Meta(description="an ISO-8601 date-time such as '2026-11-23T10:00:00+00:00'")
]
DateText = Annotated[str, Meta(description="an ISO-8601 date such as '2026-11-23'")]
TimeZoneName = Annotated[str, Meta(description="an IANA time zone name such as 'Europe/Berlin'")]
CronExpr = Annotated[str, Meta(description="a crontab string such as '*/5 * * * *'")]
CronField = Annotated[int | str, Meta(description="a cron expression string or an integer")]


def _count(most: int) -> Any:
    return Annotated[int, Meta(ge=0, le=most, description=f"an integer from 0 to {most}")]


# Calendar intervals up to 100 years, so a fire date never leaves the years a date can hold.
Years, Months, Weeks, Days = _count(100), _count(1200), _count(5218), _count(36524)
Hour = Annotated[int, Meta(ge=0, le=23, description="an integer from 0 to 23")]
MinuteOrSecond = Annotated[int, Meta(ge=0, le=59, description="an integer from 0 to 59")]


# --- bodies ------------------------------------------------------------------------------------


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ScheduleBody(_Body):
    """POST/PUT /api/schedules."""

    task: TaskName
    trigger: Annotated[dict[str, Any], Meta(description="an object with a 'type'")]
    id: Id | UnsetType = UNSET
    args: Array = []
    kwargs: Object = {}
    coalesce: Coalesce = "latest"
    misfire_grace_time: Seconds = None
    max_jitter: Seconds = None
    paused: Flag = False
    metadata: Object = {}
    # The added fields (mesh.scheduling.controls; docs/scheduling.md).
    overlap: controls.OverlapField = "allow_all"
    retry: controls.Retry | None = None
    timeout: controls.TimeoutField | None = None
    target: controls.Target | None = None
    history: controls.History | None = None
    remaining_runs: controls.RunsField | None = None
    notify: controls.Notify | None = None
    note: controls.NoteField = ""


MAX_BULK = 5000  # schedules per POST /api/schedules/bulk


class BulkBody(_Body):
    """POST /api/schedules/bulk: each item is a POST /api/schedules body."""

    schedules: Annotated[
        list[ScheduleBody],
        Meta(max_length=MAX_BULK, description=f"an array of at most {MAX_BULK} schedule bodies"),
    ]
    replace: Flag = True


class JobBody(_Body):
    """POST /api/jobs."""

    task: TaskName
    args: Array = []
    kwargs: Object = {}


class MemberBody(_Body):  # POST /api/cluster/members
    node_id: Id


MAX_PAUSE_NOTE = 1000  # characters


class PauseBody(_Body):
    """POST /api/schedules/{id}/pause (the body is optional)."""

    note: (
        Annotated[
            str,
            Meta(
                max_length=MAX_PAUSE_NOTE,
                description="why it is paused: shown with the schedule until it is resumed",
            ),
        ]
        | None
    ) = None


AwareDateTimeText = Annotated[
    str,
    Meta(
        max_length=64,
        description="an ISO-8601 date-time with an offset such as '2026-11-23T10:00:00+00:00'",
    ),
]


class BackfillBody(_Body):
    """POST /api/schedules/{id}/backfill: the range [start, end) of past fire times to run."""

    start: AwareDateTimeText
    end: AwareDateTimeText


class _TriggerBody(_Body, tag_field="type"):
    def to_trigger(self, now: datetime) -> Trigger:
        """The APScheduler trigger; ``now`` fills in an omitted start."""
        raise NotImplementedError


class IntervalTriggerBody(_TriggerBody, tag="interval"):
    weeks: Number = 0
    days: Number = 0
    hours: Number = 0
    minutes: Number = 0
    seconds: Number = 0
    microseconds: Number = 0
    start_time: DateTimeText | None = None
    end_time: DateTimeText | None = None

    def to_trigger(self, now: datetime) -> IntervalTrigger:
        units = {u: getattr(self, u) for u in INTERVAL_UNITS}
        try:
            interval = timedelta(**units)
        except OverflowError:
            raise BadRequest("trigger: the interval is too long") from None
        if interval <= timedelta(0):
            raise BadRequest(
                "trigger: an interval trigger needs a positive interval "
                f"(set one of {', '.join(INTERVAL_UNITS)} above 0)"
            )
        if interval > timedelta(seconds=MAX_DURATION_SECONDS):
            raise BadRequest(
                f"trigger: the interval must be at most {MAX_DURATION_SECONDS} seconds "
                f"(100 years), got {interval.total_seconds():.0f}"
            )
        start, end = _time_range(self.start_time, self.end_time, now)
        return IntervalTrigger(**units, start_time=start, end_time=end)


class CronTriggerBody(_TriggerBody, tag="cron"):
    expr: CronExpr | UnsetType = UNSET
    # The fields of CronTrigger.FIELDS_MAP; UNSET (not None) so that a null is refused.
    year: CronField | UnsetType = UNSET
    month: CronField | UnsetType = UNSET
    day: CronField | UnsetType = UNSET
    week: CronField | UnsetType = UNSET
    day_of_week: CronField | UnsetType = UNSET
    hour: CronField | UnsetType = UNSET
    minute: CronField | UnsetType = UNSET
    second: CronField | UnsetType = UNSET
    start_time: DateTimeText | None = None
    end_time: DateTimeText | None = None
    timezone: TimeZoneName | None = None

    def to_trigger(self, now: datetime) -> CronTrigger:
        fields = {name: getattr(self, name) for name in CRON_FIELDS}
        fields = {name: value for name, value in fields.items() if value is not UNSET}
        tz = _timezone(self.timezone)
        start, end = _time_range(self.start_time, self.end_time, now)

        if self.expr is not UNSET:
            expr = self.expr
            if fields:
                raise BadRequest(
                    f"trigger.expr: cannot be combined with cron fields ({', '.join(fields)}); "
                    "give either a crontab expression or the fields"
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
                trigger = CronTrigger.from_crontab(
                    expr, start_time=start, end_time=end, timezone=tz
                )
            except (ValueError, TypeError, IndexError) as e:  # fields checked above; belt & braces
                raise BadRequest(f"trigger.expr: invalid cron expression {expr!r} ({e})") from None
            return _must_fire(trigger, start, now)

        if not fields:
            raise BadRequest(
                "trigger: a cron trigger needs 'expr' or at least one of " + ", ".join(CRON_FIELDS)
            )
        for name, value in fields.items():
            problem = _cron_field_problem(name, value)
            if problem:
                raise BadRequest(f"trigger.{name}: invalid cron field value ({problem})")
        try:
            trigger = CronTrigger(**fields, start_time=start, end_time=end, timezone=tz)
        except (ValueError, TypeError, IndexError) as e:
            raise BadRequest(f"trigger: invalid cron trigger ({e})") from None
        return _must_fire(trigger, start, now)


class DateTriggerBody(_TriggerBody, tag="date"):
    run_time: DateTimeText

    def to_trigger(self, now: datetime) -> DateTrigger:
        return DateTrigger(run_time=_datetime(self.run_time, "trigger.run_time"))


class CalendarIntervalTriggerBody(_TriggerBody, tag="calendarinterval"):
    years: Years = 0
    months: Months = 0
    weeks: Weeks = 0
    days: Days = 0
    hour: Hour = 0
    minute: MinuteOrSecond = 0
    second: MinuteOrSecond = 0
    start_date: DateText | None = None
    end_date: DateText | None = None
    timezone: TimeZoneName | None = None

    def to_trigger(self, now: datetime) -> CalendarIntervalTrigger:
        units = {u: getattr(self, u) for u in CALENDAR_UNITS}
        if not any(units.values()):
            raise BadRequest(
                "trigger: a calendarinterval trigger needs at least one of "
                f"{', '.join(CALENDAR_UNITS)} above 0"
            )
        clock = {name: getattr(self, name) for name in CALENDAR_TIME}
        tz = _timezone(self.timezone)
        start = _date(self.start_date, "trigger.start_date") or now.astimezone(tz).date()
        end = _date(self.end_date, "trigger.end_date")
        if end is not None and end < start:
            raise BadRequest("trigger.end_date: must not be earlier than trigger.start_date")
        try:
            trigger = CalendarIntervalTrigger(
                **units, **clock, start_date=start, end_date=end, timezone=tz
            )
        except (ValueError, OverflowError) as e:
            raise BadRequest(f"trigger: invalid calendarinterval trigger ({e})") from None
        return _must_fire(trigger, datetime.combine(start, time(0), tz), now)


_TRIGGER_BODIES: dict[str, type[_TriggerBody]] = {
    body.__struct_config__.tag: body
    for body in (
        CalendarIntervalTriggerBody,
        CronTriggerBody,
        DateTriggerBody,
        IntervalTriggerBody,
    )
}
TRIGGER_TYPES = tuple(sorted(_TRIGGER_BODIES))


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
    b = _convert(body, ScheduleBody, where="the schedule")
    if b.task.startswith(INTERNAL_PREFIX):
        raise BadRequest(
            f"task: names starting with {INTERNAL_PREFIX!r} are the mesh's own tasks; a "
            "scenario is scheduled with POST /api/tests/schedule"
        )
    if schedule_id is not None:
        _convert(schedule_id, Id, prefix="id")
        if b.id is not UNSET and b.id != schedule_id:
            raise BadRequest(
                f"id: the body's id {b.id!r} does not match the id in the URL {schedule_id!r}"
            )
        sid = schedule_id
    else:
        sid = str(uuid.uuid4()) if b.id is UNSET else b.id

    return ScheduleSpec(
        id=sid,
        task=b.task,
        trigger=parse_trigger(b.trigger, now=now),
        args=tuple(_require_json(b.args, "args")),
        kwargs=_require_json(b.kwargs, "kwargs"),
        coalesce=CoalescePolicy[b.coalesce],
        misfire_grace_time=_duration(b.misfire_grace_time, "misfire_grace_time"),
        max_jitter=_duration(b.max_jitter, "max_jitter"),
        paused=b.paused,
        metadata=_metadata(b.metadata),
        controls=_controls(b),
    )


def _controls(b: ScheduleBody) -> controls.Controls:
    if b.retry is not None and b.retry.max_delay < b.retry.initial_delay:
        raise BadRequest(
            f"retry.max_delay: must be at least retry.initial_delay ({b.retry.initial_delay:g}), "
            f"got {b.retry.max_delay:g}"
        )
    if b.notify is not None and not b.notify.on:
        raise BadRequest("notify.on: must name at least one event")
    return controls.Controls(
        overlap=b.overlap,
        retry=b.retry,
        timeout=b.timeout,
        target=b.target,
        history=b.history,
        remaining_runs=b.remaining_runs,
        notify=b.notify,
        note=b.note.strip(),
    )


class BulkRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A validated POST /api/schedules/bulk body."""

    specs: list[ScheduleSpec]
    replace: bool
    # Ids whose trigger leaves its start (``start_time``, ``start_date``) to the default: a
    # re-apply compares them with the stored start (mesh.api.bulk).
    default_start: frozenset[str] = frozenset()


class _BulkEnvelope(_Body):
    schedules: Annotated[list[Any], Meta(description="an array of schedule bodies")]
    replace: Flag = True


def parse_bulk_envelope(body: Any) -> tuple[list[Any], bool]:
    """The outer POST /api/schedules/bulk body → (the raw items, replace); the items are
    checked one by one with :func:`parse_bulk_item`."""
    _require_object(body, "request body")
    b = _convert(body, _BulkEnvelope, where="the bulk request")
    if len(b.schedules) > MAX_BULK:
        raise BadRequest(
            f"schedules: at most {MAX_BULK} schedules per request, got {len(b.schedules)} "
            "(send them in several requests)"
        )
    return b.schedules, b.replace


def parse_bulk_item(index: int, item: Any, *, now: datetime) -> tuple[ScheduleSpec, bool]:
    """``schedules[index]`` → (its spec, whether its trigger's start is left to the default);
    a BadRequest names the item: ``schedules[3].trigger.seconds: ...``."""
    where = f"schedules[{index}]"
    try:
        spec = parse_schedule_body(item, now=now)
    except BadRequest as e:
        raise BadRequest(_within(where, str(e))) from None
    trigger = item["trigger"]
    start = "start_date" if trigger.get("type") == "calendarinterval" else "start_time"
    return spec, trigger.get("type") != "date" and trigger.get(start) is None


def check_bulk_ids(specs: list[ScheduleSpec]) -> None:
    """BadRequest when two items of a bulk request have the same id."""
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        first = seen.setdefault(spec.id, i)
        if first != i:
            raise BadRequest(f"schedules[{i}].id: {spec.id!r} is also the id of schedules[{first}]")


def parse_bulk_body(body: Any, *, now: datetime | None = None) -> BulkRequest:
    """Validate a whole POST /api/schedules/bulk body at once (the handler does the same in
    steps, letting the event loop run between items)."""
    items, replace = parse_bulk_envelope(body)
    now = now or datetime.now(UTC)
    specs, default_start = [], set()
    for i, item in enumerate(items):
        spec, default = parse_bulk_item(i, item, now=now)
        specs.append(spec)
        if default:
            default_start.add(spec.id)
    check_bulk_ids(specs)
    return BulkRequest(specs=specs, replace=replace, default_start=frozenset(default_start))


def _within(where: str, message: str) -> str:
    """A schedule body's error message, as the error of the item ``where``."""
    head, sep, rest = message.partition(": ")
    if sep and head == "request body":
        return f"{where}: {rest}"
    if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head):
        return f"{where}.{message}"
    return f"{where}: {message}"


def parse_job_body(body: Any) -> tuple[str, tuple, dict]:
    """Validate a POST /api/jobs body ``{"task", "args"?, "kwargs"?}`` → (task, args, kwargs)."""
    _require_object(body, "request body")
    b = _convert(body, JobBody, where="the job")
    return b.task, tuple(_require_json(b.args, "args")), _require_json(b.kwargs, "kwargs")


def parse_member_body(body: Any) -> str:
    """Validate a POST /api/cluster/members body ``{"node_id"}`` → the node id."""
    _require_object(body, "request body")
    return _convert(body, MemberBody, where="the member").node_id


def parse_pause_body(body: Any) -> str | None:
    """Validate a pause body ``{"note"?}`` → the note (None: no note, or only blanks)."""
    _require_object(body, "request body")
    note = _convert(body, PauseBody, where="the pause").note
    return (note.strip() or None) if note is not None else None


def parse_backfill_body(body: Any, *, now: datetime) -> tuple[datetime, datetime]:
    """Validate a backfill body ``{"start", "end"}`` → (start, end): aware date-times (an
    offset is required: a range of past fire times must not depend on the node's zone), with
    start < end <= ``now``."""
    _require_object(body, "request body")
    b = _convert(body, BackfillBody, where="the backfill")
    start, end = _aware(b.start, "start"), _aware(b.end, "end")
    if end <= start:
        raise BadRequest("end: must be later than start")
    if end > now:
        raise BadRequest(f"end: must not be in the future (now is {now.isoformat()})")
    return start, end


def _aware(text: str, path: str) -> datetime:
    dt = _datetime(text, path)
    if datetime.fromisoformat(text).tzinfo is None:
        raise BadRequest(f"{path}: needs an offset such as 'Z' or '+00:00', got {_show(text)}")
    return dt


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
    if not isinstance(kind, str) or kind not in _TRIGGER_BODIES:
        shown = _show(kind, quote="'")
        raise BadRequest(
            f"trigger.type: unknown trigger type {shown} "
            f"(expected one of: {', '.join(TRIGGER_TYPES)})"
        )
    body = _convert(
        spec, _TRIGGER_BODIES[kind], prefix="trigger", where=f"trigger ({kind} trigger)"
    )
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return body.to_trigger(now)


_T = TypeVar("_T")
_Fires = TypeVar("_Fires", CronTrigger, CalendarIntervalTrigger)


def _convert(data: Any, tp: type[_T] | Any, *, prefix: str = "", where: str = "") -> _T:
    """``msgspec.convert``; its error becomes a BadRequest naming the field (under ``prefix``)."""
    try:
        return msgspec.convert(data, tp)
    except msgspec.ValidationError as e:
        raise _bad_request(explain(e, data, tp), prefix, where) from None


def _bad_request(p: Problem, prefix: str, where: str) -> BadRequest:
    if p.kind == "unknown":
        shown = _show(p.value, quote="'")
        allowed = ", ".join(sorted(p.allowed))
        return BadRequest(f"unknown field {shown} in {where} (allowed: {allowed})")
    path = dotted((prefix, *p.path) if prefix else p.path)
    if p.kind in ("type", "bound", "choice"):
        return BadRequest(f"{path}: must be {p.expected}, got {_show(p.value)}")
    return BadRequest(f"{path}: {p.reason(_show)}")


def _must_fire(trigger: _Fires, start: datetime, now: datetime) -> _Fires:
    """``trigger``, or BadRequest when a bounded search finds no fire time: from its start to
    FIRE_SEARCH_YEARS after its start or now, whichever is later."""
    probe = type(trigger).__new__(type(trigger))
    probe.__setstate__(trigger.__getstate__())  # next() advances a trigger: search a copy
    horizon = max(start, now) + timedelta(days=FIRE_SEARCH_YEARS * 365)
    if isinstance(probe, CronTrigger):
        probe.end_time = min(probe.end_time or horizon, horizon)
    else:
        probe.end_date = min(probe.end_date or horizon.date(), horizon.date())
    if probe.next() is None:
        raise BadRequest(
            f"trigger: never fires (no fire time from {start.date().isoformat()} to "
            f"{horizon.date().isoformat()}); check the dates, e.g. 30 February does not exist"
        )
    return trigger


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


def _duration(seconds: float | None, path: str) -> timedelta | None:
    if seconds is None:
        return None
    if seconds > MAX_DURATION_SECONDS:
        raise BadRequest(
            f"{path}: must be at most {MAX_DURATION_SECONDS} seconds (100 years), got {seconds}"
        )
    return timedelta(seconds=seconds)


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    _require_json(value, "metadata")  # first: the depth bound protects the recursive check
    if controls.KEY in value:
        raise BadRequest(
            f"metadata.{controls.KEY}: this key is reserved for the schedule's own fields "
            "(overlap, retry, timeout, target, history, remaining_runs, notify, note)"
        )
    # The very validator Schedule applies, so anything accepted here is accepted there.
    try:
        valid_metadata(None, attrs.fields(Schedule).metadata, value)
    except ValueError as e:
        raise BadRequest(f"metadata: {e}") from None
    return value


def _datetime(text: str, path: str) -> datetime:
    """ISO-8601 date-time; without an offset it is read as UTC."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{path}: must be an ISO-8601 date-time such as '2026-11-23T10:00:00+00:00', "
            f"got {_show(text)}"
        ) from None
    _check_year(dt.year, path, text)
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _check_year(year: int, path: str, text: str) -> None:
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise BadRequest(
            f"{path}: must be in the years {MIN_YEAR} to {MAX_YEAR}, got {_show(text)}"
        )


def _time_range(
    start_text: str | None, end_text: str | None, now: datetime
) -> tuple[datetime, datetime | None]:
    start = now if start_text is None else _datetime(start_text, "trigger.start_time")
    end = None if end_text is None else _datetime(end_text, "trigger.end_time")
    if end is not None and end <= start:
        raise BadRequest("trigger.end_time: must be later than trigger.start_time")
    return start, end


def _date(text: str | None, path: str) -> date | None:
    if text is None:
        return None
    try:
        d = date.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{path}: must be an ISO-8601 date such as '2026-11-23', got {_show(text)}"
        ) from None
    _check_year(d.year, path, text)
    return d


def _timezone(name: str | None) -> ZoneInfo:
    if name is None:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: not a valid key, e.g. '../x'
        raise BadRequest(f"trigger.timezone: unknown timezone {name!r}") from None


# --- rendering -----------------------------------------------------------------------------------


def schedule_to_json(schedule: Schedule, *, warnings: list[str] | None = None) -> dict[str, Any]:
    """The schedule as the API shows it; ``warnings`` is included only when given."""
    out = _schedule_json(schedule, schedule.task_id)
    out["next_fire_time"] = iso(schedule.next_fire_time)
    out["last_fire_time"] = iso(schedule.last_fire_time)
    if warnings is not None:
        out["warnings"] = list(warnings)
    return out


def spec_to_json(spec: ScheduleSpec) -> dict[str, Any]:
    """The canonical body: ``parse_schedule_body(spec_to_json(spec))`` gives an equal schedule."""
    return _schedule_json(spec, spec.task)


def _schedule_json(s: Schedule | ScheduleSpec, task: str) -> dict[str, Any]:
    return {
        "id": s.id,
        "task": task,
        "trigger": trigger_to_json(s.trigger),
        "args": list(s.args),
        "kwargs": dict(s.kwargs),
        "coalesce": s.coalesce.name,
        "misfire_grace_time": _seconds(s.misfire_grace_time),
        "max_jitter": _seconds(s.max_jitter),
        "paused": s.paused,
        "metadata": controls.user_metadata(s.metadata),
        **controls.to_json(s.controls if isinstance(s, ScheduleSpec) else controls.controls_of(s)),
    }


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
            {name: getattr(trigger, name, getattr(time_of_day, name)) for name in CALENDAR_TIME}
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


_J = TypeVar("_J")


def _require_json(value: _J, path: str) -> _J:
    try:
        plain(value, max_depth=MAX_DEPTH)
    except NotPlainJSON as e:
        raise BadRequest(f"{path}: must be plain JSON ({e})") from None
    return value


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
