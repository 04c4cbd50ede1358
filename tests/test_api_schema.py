"""mesh.api.schema: HTTP JSON ⇄ APScheduler objects, and every way a body can be wrong."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import apscheduler._converters
import pytest
from apscheduler import CoalescePolicy, Schedule
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from mesh.api.schema import (
    BadRequest,
    iso,
    parse_job_body,
    parse_schedule_body,
    parse_trigger,
    schedule_to_json,
    spec_to_json,
    trigger_to_json,
)

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # a Monday
BERLIN = ZoneInfo("Europe/Berlin")


def body(**overrides: Any) -> dict[str, Any]:
    """A valid schedule body; ``field=DROP`` removes a field."""
    b: dict[str, Any] = {
        "id": "nightly",
        "task": "send_notification",
        "trigger": {"type": "interval", "seconds": 30},
    }
    b.update(overrides)
    return {k: v for k, v in b.items() if v is not DROP}


DROP = object()


def fires(trigger: Any, n: int = 3) -> list[datetime | None]:
    return [trigger.next() for _ in range(n)]


def rejected(value: Any, **kw: Any) -> str:
    """The message of the BadRequest that parse_schedule_body raises for ``value``."""
    with pytest.raises(BadRequest) as info:
        parse_schedule_body(value, now=NOW, **kw)
    return str(info.value)


def trigger_rejected(spec: Any) -> str:
    with pytest.raises(BadRequest) as info:
        parse_trigger(spec, now=NOW)
    return str(info.value)


# --- triggers: parsing ---------------------------------------------------------------------------


def test_interval_trigger_sums_its_units() -> None:
    trigger = parse_trigger({"type": "interval", "hours": 1, "minutes": 30}, now=NOW)
    assert isinstance(trigger, IntervalTrigger)
    assert fires(trigger, 2) == [NOW, NOW + timedelta(minutes=90)]


def test_interval_trigger_accepts_sub_second_intervals() -> None:
    trigger = parse_trigger({"type": "interval", "seconds": 0.25}, now=NOW)
    assert fires(trigger) == [NOW, NOW + timedelta(seconds=0.25), NOW + timedelta(seconds=0.5)]


def test_interval_trigger_starts_now_when_start_time_is_omitted() -> None:
    trigger = parse_trigger({"type": "interval", "seconds": 5}, now=NOW)
    assert trigger.start_time == NOW


def test_interval_trigger_stops_at_end_time() -> None:
    spec = {
        "type": "interval",
        "minutes": 1,
        "start_time": "2026-01-05T12:00:00+00:00",
        "end_time": "2026-01-05T12:01:00+00:00",
    }
    assert fires(parse_trigger(spec, now=NOW)) == [NOW, NOW + timedelta(minutes=1), None]


def test_datetime_without_offset_is_read_as_utc_whatever_the_machines_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # APScheduler itself would read it in the local zone; pretend this machine is in Berlin.
    monkeypatch.setattr(apscheduler._converters, "get_localzone", lambda: BERLIN)
    trigger = parse_trigger({"type": "date", "run_time": "2026-11-23T10:00:00"}, now=NOW)
    assert trigger.run_time == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert trigger.run_time.utcoffset() == timedelta(0)


def test_datetime_offset_is_kept() -> None:
    trigger = parse_trigger({"type": "date", "run_time": "2026-11-23T10:00:00+02:00"}, now=NOW)
    assert trigger.run_time.utcoffset() == timedelta(hours=2)


def test_date_trigger_fires_once_at_run_time() -> None:
    trigger = parse_trigger({"type": "date", "run_time": "2026-11-23T10:00:00Z"}, now=NOW)
    assert isinstance(trigger, DateTrigger)
    assert fires(trigger, 2) == [datetime(2026, 11, 23, 10, 0, tzinfo=UTC), None]


def test_cron_expr_builds_a_crontab_trigger() -> None:
    trigger = parse_trigger({"type": "cron", "expr": "*/5 * * * *"}, now=NOW)
    assert isinstance(trigger, CronTrigger)
    assert fires(trigger) == [NOW + timedelta(minutes=m) for m in (0, 5, 10)]


def test_cron_expr_with_timezone_fires_at_that_zones_wall_clock_time() -> None:
    # 09:00 in Berlin across the 2026-03-29 DST switch: 08:00 UTC, then 07:00 UTC.
    spec = {
        "type": "cron",
        "expr": "0 9 * * *",
        "timezone": "Europe/Berlin",
        "start_time": "2026-03-27T00:00:00+00:00",
    }
    times = fires(parse_trigger(spec, now=NOW))
    assert [t.astimezone(BERLIN).hour for t in times] == [9, 9, 9]
    assert [t.astimezone(UTC).hour for t in times] == [8, 8, 7]
    assert all(t.tzinfo == BERLIN for t in times)


def test_cron_without_timezone_uses_utc_not_the_machines_zone() -> None:
    trigger = parse_trigger({"type": "cron", "expr": "0 9 * * *"}, now=NOW)
    assert trigger.timezone == ZoneInfo("UTC")
    assert trigger.next() == datetime(2026, 1, 6, 9, 0, tzinfo=UTC)


def test_cron_fields_build_a_cron_trigger() -> None:
    spec = {"type": "cron", "day_of_week": "mon-fri", "hour": 3, "minute": "30"}
    assert fires(parse_trigger(spec, now=NOW)) == [
        datetime(2026, 1, d, 3, 30, tzinfo=UTC) for d in (6, 7, 8)
    ]


def test_cron_expr_day_of_week_0_is_sunday_as_in_crontab() -> None:
    trigger = parse_trigger({"type": "cron", "expr": "0 0 * * 0"}, now=NOW)
    assert trigger.next().weekday() == 6  # type: ignore[union-attr]


def test_calendarinterval_trigger_runs_at_the_same_time_of_day() -> None:
    spec = {
        "type": "calendarinterval",
        "months": 1,
        "hour": 3,
        "minute": 15,
        "start_date": "2026-01-31",
        "timezone": "Europe/Berlin",
    }
    trigger = parse_trigger(spec, now=NOW)
    assert isinstance(trigger, CalendarIntervalTrigger)
    # 31 February does not exist, so that month is skipped.
    assert fires(trigger) == [
        datetime(2026, 1, 31, 3, 15, tzinfo=BERLIN),
        datetime(2026, 3, 31, 3, 15, tzinfo=BERLIN),
        datetime(2026, 5, 31, 3, 15, tzinfo=BERLIN),
    ]


def test_calendarinterval_start_date_defaults_to_today_in_its_timezone() -> None:
    late_evening_utc = datetime(2026, 1, 5, 23, 30, tzinfo=UTC)  # already 6 Jan in Berlin
    spec = {"type": "calendarinterval", "days": 1, "timezone": "Europe/Berlin"}
    assert parse_trigger(spec, now=late_evening_utc).start_date == date(2026, 1, 6)


def test_calendarinterval_without_timezone_uses_utc() -> None:
    trigger = parse_trigger({"type": "calendarinterval", "days": 1}, now=NOW)
    assert trigger.timezone == ZoneInfo("UTC")


# --- triggers: round trip ------------------------------------------------------------------------

ROUND_TRIP_SPECS = {
    "interval": {"type": "interval", "seconds": 0.5},
    "interval-with-end": {
        "type": "interval",
        "weeks": 1,
        "days": 2,
        "start_time": "2026-01-01T00:00:00+01:00",
        "end_time": "2026-03-01T00:00:00+01:00",
    },
    "cron-expr": {"type": "cron", "expr": "*/5 9-17 * * mon-fri", "timezone": "Europe/Berlin"},
    "cron-fields": {
        "type": "cron",
        "year": "2026-2030",
        "month": "jan,jul",
        "day": "last fri",
        "second": 30,
        "end_time": "2029-01-01T00:00:00Z",
    },
    "cron-crontab-fields-with-spaces": {
        "type": "cron",
        "minute": 0,
        "hour": 0,
        "day": "last fri",
        "month": "*",
        "day_of_week": "*",
    },
    "cron-week": {"type": "cron", "week": "*/2", "day_of_week": "sun", "hour": 6},
    "date": {"type": "date", "run_time": "2026-11-23T10:00:00+00:00"},
    "calendarinterval": {
        "type": "calendarinterval",
        "years": 1,
        "weeks": 2,
        "hour": 23,
        "minute": 59,
        "second": 59,
        "start_date": "2026-02-28",
        "end_date": "2030-01-01",
        "timezone": "America/New_York",
    },
}


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS.values(), ids=ROUND_TRIP_SPECS.keys())
def test_trigger_to_json_round_trips_with_the_same_next_fire_times(spec: dict) -> None:
    original = parse_trigger(spec, now=NOW)
    rebuilt = parse_trigger(trigger_to_json(original), now=NOW + timedelta(days=3))
    assert type(rebuilt) is type(original)
    assert fires(rebuilt) == fires(original)
    assert fires(parse_trigger(spec, now=NOW))[0] is not None  # the comparison means something


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS.values(), ids=ROUND_TRIP_SPECS.keys())
def test_trigger_to_json_is_stable_after_one_round_trip(spec: dict) -> None:
    once = trigger_to_json(parse_trigger(spec, now=NOW))
    assert trigger_to_json(parse_trigger(once, now=NOW)) == once


def test_trigger_to_json_shows_a_crontab_trigger_as_its_expr() -> None:
    out = trigger_to_json(parse_trigger({"type": "cron", "expr": "*/5 * * * *"}, now=NOW))
    assert out == {
        "type": "cron",
        "expr": "*/5 * * * *",
        "timezone": "UTC",
        "start_time": "2026-01-05T12:00:00+00:00",
        "end_time": None,
    }


def test_trigger_to_json_shows_cron_fields_when_there_is_no_crontab_equivalent() -> None:
    out = trigger_to_json(parse_trigger({"type": "cron", "second": "*/10"}, now=NOW))
    assert out["second"] == "*/10"
    assert "expr" not in out


def test_trigger_to_json_shows_interval_units_and_fixed_start_time() -> None:
    out = trigger_to_json(parse_trigger({"type": "interval", "seconds": 0.5}, now=NOW))
    assert out == {
        "type": "interval",
        "seconds": 0.5,
        "start_time": "2026-01-05T12:00:00+00:00",
        "end_time": None,
    }


def test_trigger_to_json_describes_a_trigger_it_cannot_express_without_failing() -> None:
    trigger = OrTrigger([DateTrigger(NOW), DateTrigger(NOW + timedelta(days=1))])
    out = trigger_to_json(trigger)
    assert out["type"] == "unsupported"
    assert "OrTrigger" in out["class"]
    assert "unknown trigger type 'unsupported'" in trigger_rejected(out)


# --- triggers: errors ----------------------------------------------------------------------------


def test_unknown_trigger_type_lists_the_known_ones() -> None:
    message = trigger_rejected({"type": "foo"})
    assert (
        "unknown trigger type 'foo' (expected one of: calendarinterval, cron, date, interval)"
        in (message)
    )
    assert message.startswith("trigger.type")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ([], "trigger"),
        ("interval", "trigger"),
        ({}, "trigger.type"),
        ({"type": 5}, "trigger.type"),
        ({"type": "interval", "seconds": 1, "color": "red"}, "'color'"),
        ({"type": "date", "run_time": "2026-01-01T00:00:00Z", "seconds": 1}, "'seconds'"),
        ({"type": "cron", "expr": "* * * * *", "run_time": "x"}, "'run_time'"),
        ({"type": "calendarinterval", "days": 1, "start_time": "x"}, "'start_time'"),
    ],
    ids=[
        "array",
        "string",
        "no-type",
        "type-not-string",
        "interval-unknown-key",
        "date-unknown-key",
        "cron-unknown-key",
        "calendarinterval-unknown-key",
    ],
)
def test_malformed_trigger_is_rejected_naming_the_field(spec: Any, field: str) -> None:
    assert field in trigger_rejected(spec)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "interval"}, "trigger"),
        ({"type": "interval", "seconds": 0, "minutes": 0}, "trigger"),
        ({"type": "interval", "seconds": -1}, "trigger.seconds"),
        ({"type": "interval", "minutes": "5"}, "trigger.minutes"),
        ({"type": "interval", "hours": None}, "trigger.hours"),
        ({"type": "interval", "seconds": float("nan")}, "trigger.seconds"),
        ({"type": "interval", "days": float("inf")}, "trigger.days"),
        ({"type": "interval", "weeks": 10**12}, "trigger"),
        ({"type": "interval", "seconds": 1, "start_time": "yesterday"}, "trigger.start_time"),
        ({"type": "interval", "seconds": 1, "start_time": 1700000000}, "trigger.start_time"),
        (
            {
                "type": "interval",
                "seconds": 1,
                "start_time": "2026-01-02T00:00:00Z",
                "end_time": "2026-01-01T00:00:00Z",
            },
            "trigger.end_time",
        ),
        (
            {
                "type": "interval",
                "seconds": 1,
                "start_time": "2026-01-01T00:00:00Z",
                "end_time": "2026-01-01T00:00:00Z",
            },
            "trigger.end_time",
        ),
    ],
    ids=[
        "no-units",
        "all-zero",
        "negative",
        "string",
        "null",
        "nan",
        "infinite",
        "overflow",
        "start-time-not-iso",
        "start-time-not-string",
        "end-before-start",
        "end-equals-start",
    ],
)
def test_bad_interval_trigger_is_rejected_naming_the_field(spec: dict, field: str) -> None:
    assert trigger_rejected(spec).startswith(field)


@pytest.mark.parametrize("unit", ["weeks", "days", "hours", "minutes", "seconds", "microseconds"])
@pytest.mark.parametrize("flag", [True, False])
def test_interval_unit_rejects_booleans_as_numbers(unit: str, flag: bool) -> None:
    message = trigger_rejected({"type": "interval", "seconds": 1} | {unit: flag})
    assert message.startswith(f"trigger.{unit}")
    assert "got " + str(flag).lower() in message


@pytest.mark.parametrize(
    ("spec", "field", "detail"),
    [
        (
            {"type": "cron", "expr": "*/5 * * * *", "minute": "1"},
            "trigger.expr",
            "cannot be combined with cron fields (minute)",
        ),
        ({"type": "cron", "expr": "* * *"}, "trigger.expr", "got 3, expected 5"),
        ({"type": "cron", "expr": "* * * * * *"}, "trigger.expr", "got 6, expected 5"),
        ({"type": "cron", "expr": 5}, "trigger.expr", "must be a crontab string"),
        (
            {"type": "cron", "expr": "*/61 * * * *"},
            "trigger.expr",
            "minute field: Error validating expression '*/61'",
        ),
        (
            {"type": "cron", "expr": "0 0 * * funday"},
            "trigger.expr",
            "day_of_week field: Invalid weekday name 'funday'",
        ),
        (
            {"type": "cron", "hour": "25"},
            "trigger.hour",
            "the last value (25) is higher than the maximum value (23)",
        ),
        ({"type": "cron", "month": "foo"}, "trigger.month", "Invalid month name 'foo'"),
        ({"type": "cron", "day_of_week": "0-8"}, "trigger.day_of_week", "out of range"),
        ({"type": "cron", "minute": "*/0"}, "trigger.minute", "invalid cron field value"),
        ({"type": "cron", "minute": -1}, "trigger.minute", "invalid cron field value"),
        ({"type": "cron", "hour": True}, "trigger.hour", "got true"),
        ({"type": "cron", "hour": 1.5}, "trigger.hour", "got 1.5"),
        ({"type": "cron", "hour": None}, "trigger.hour", "got null"),
        ({"type": "cron"}, "trigger", "needs 'expr' or at least one of"),
        (
            {"type": "cron", "expr": "* * * * *", "timezone": "Mars/Base"},
            "trigger.timezone",
            "unknown timezone 'Mars/Base'",
        ),
        (
            {"type": "cron", "expr": "* * * * *", "timezone": "../../etc/passwd"},
            "trigger.timezone",
            "unknown timezone",
        ),
        (
            {"type": "cron", "expr": "* * * * *", "timezone": 1},
            "trigger.timezone",
            "IANA time zone name",
        ),
        (
            {
                "type": "cron",
                "expr": "* * * * *",
                "start_time": "2026-01-02T00:00:00Z",
                "end_time": "2026-01-01T00:00:00Z",
            },
            "trigger.end_time",
            "later than trigger.start_time",
        ),
    ],
    ids=[
        "expr-and-fields",
        "expr-too-few-fields",
        "expr-too-many-fields",
        "expr-not-string",
        "expr-step-out-of-range",
        "expr-bad-weekday",
        "field-out-of-range",
        "field-bad-month",
        "field-weekday-number-out-of-range",
        "field-zero-step",
        "field-negative-int",
        "field-bool",
        "field-float",
        "field-null",
        "no-expr-no-fields",
        "unknown-timezone",
        "timezone-path",
        "timezone-not-string",
        "end-before-start",
    ],
)
def test_bad_cron_trigger_is_rejected_naming_the_field(spec: dict, field: str, detail: str) -> None:
    message = trigger_rejected(spec)
    assert message.startswith(field + ":")
    assert detail in message


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "date"}, "trigger.run_time"),
        ({"type": "date", "run_time": None}, "trigger.run_time"),
        ({"type": "date", "run_time": "23/11/2026"}, "trigger.run_time"),
        ({"type": "date", "run_time": 1700000000}, "trigger.run_time"),
    ],
    ids=["missing", "null", "not-iso", "number"],
)
def test_bad_date_trigger_is_rejected_naming_the_field(spec: dict, field: str) -> None:
    assert trigger_rejected(spec).startswith(field + ":")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "calendarinterval"}, "trigger"),
        ({"type": "calendarinterval", "days": 0}, "trigger"),
        ({"type": "calendarinterval", "months": 1.5}, "trigger.months"),
        ({"type": "calendarinterval", "years": -1}, "trigger.years"),
        ({"type": "calendarinterval", "weeks": True}, "trigger.weeks"),
        ({"type": "calendarinterval", "days": 1, "hour": 24}, "trigger.hour"),
        ({"type": "calendarinterval", "days": 1, "minute": 60}, "trigger.minute"),
        ({"type": "calendarinterval", "days": 1, "second": "0"}, "trigger.second"),
        ({"type": "calendarinterval", "days": 1, "start_date": "Jan 1"}, "trigger.start_date"),
        ({"type": "calendarinterval", "days": 1, "end_date": 20260101}, "trigger.end_date"),
        (
            {
                "type": "calendarinterval",
                "days": 1,
                "start_date": "2026-02-01",
                "end_date": "2026-01-01",
            },
            "trigger.end_date",
        ),
        ({"type": "calendarinterval", "days": 1, "timezone": "Mars/Base"}, "trigger.timezone"),
    ],
    ids=[
        "no-units",
        "all-zero",
        "float-months",
        "negative-years",
        "bool-weeks",
        "hour-24",
        "minute-60",
        "second-string",
        "start-date-not-iso",
        "end-date-number",
        "end-before-start",
        "unknown-timezone",
    ],
)
def test_bad_calendarinterval_trigger_is_rejected_naming_the_field(spec: dict, field: str) -> None:
    assert trigger_rejected(spec).startswith(field + ":")


def test_trigger_errors_inside_a_schedule_body_are_bad_requests() -> None:
    message = rejected(body(trigger={"type": "interval", "seconds": -1}))
    assert message.startswith("trigger.seconds:")


# --- schedule body -------------------------------------------------------------------------------


def test_schedule_body_defaults_are_applied() -> None:
    spec = parse_schedule_body(body(), now=NOW)
    assert spec.id == "nightly"
    assert spec.task == "send_notification"
    assert spec.args == ()
    assert spec.kwargs == {}
    assert spec.coalesce is CoalescePolicy.latest
    assert spec.misfire_grace_time is None
    assert spec.max_jitter is None
    assert spec.paused is False
    assert spec.metadata == {}


def test_schedule_body_from_the_interface_example_parses_fully() -> None:
    spec = parse_schedule_body(
        {
            "id": "nightly",
            "task": "send_notification",
            "trigger": {"type": "interval", "seconds": 0.5},
            "args": [1, "two"],
            "kwargs": {"message": "hi"},
            "coalesce": "all",
            "misfire_grace_time": 30,
            "max_jitter": 0.5,
            "paused": True,
            "metadata": {"owner": "ops", "tags": ["a", "b"]},
        },
        now=NOW,
    )
    assert spec.args == (1, "two")
    assert spec.kwargs == {"message": "hi"}
    assert spec.coalesce is CoalescePolicy.all
    assert spec.misfire_grace_time == timedelta(seconds=30)
    assert spec.max_jitter == timedelta(milliseconds=500)
    assert spec.paused is True
    assert spec.metadata == {"owner": "ops", "tags": ["a", "b"]}
    assert fires(spec.trigger, 2) == [NOW, NOW + timedelta(seconds=0.5)]


@pytest.mark.parametrize("policy", ["latest", "earliest", "all"])
def test_coalesce_names_map_to_apschedulers_policies(policy: str) -> None:
    assert parse_schedule_body(body(coalesce=policy), now=NOW).coalesce is CoalescePolicy[policy]


def test_misfire_grace_time_zero_is_allowed() -> None:
    spec = parse_schedule_body(body(misfire_grace_time=0), now=NOW)
    assert spec.misfire_grace_time == timedelta(0)


def test_misfire_grace_time_null_means_no_limit() -> None:
    assert parse_schedule_body(body(misfire_grace_time=None), now=NOW).misfire_grace_time is None


def test_post_without_id_gets_a_uuid4() -> None:
    spec = parse_schedule_body(body(id=DROP), now=NOW)
    assert uuid.UUID(spec.id).version == 4


def test_put_without_body_id_uses_the_url_id() -> None:
    spec = parse_schedule_body(body(id=DROP), schedule_id="from-url", now=NOW)
    assert spec.id == "from-url"


def test_put_with_the_same_body_id_is_accepted() -> None:
    assert parse_schedule_body(body(id="same"), schedule_id="same", now=NOW).id == "same"


def test_put_with_a_different_body_id_is_rejected() -> None:
    message = rejected(body(id="other"), schedule_id="from-url")
    assert message.startswith("id:")
    assert "other" in message
    assert "from-url" in message


def test_put_with_an_invalid_url_id_is_rejected() -> None:
    assert rejected(body(id=DROP), schedule_id="has space").startswith("id:")


def test_schedule_body_must_be_an_object() -> None:
    for value in ([], "nightly", None, 5):
        assert "must be a JSON object" in rejected(value)


def test_unknown_top_level_key_is_rejected_by_name() -> None:
    message = rejected(body(cron="* * * * *"))
    assert "unknown field 'cron'" in message
    assert "allowed:" in message


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"id": ""}, "id"),
        ({"id": "a b"}, "id"),
        ({"id": "a/b"}, "id"),
        ({"id": "x\n"}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"id": 7}, "id"),
        ({"id": None}, "id"),
        ({"task": DROP}, "task"),
        ({"task": ""}, "task"),
        ({"task": "   "}, "task"),
        ({"task": " padded"}, "task"),
        ({"task": "t" * 201}, "task"),
        ({"task": 3}, "task"),
        ({"trigger": DROP}, "trigger"),
        ({"trigger": None}, "trigger"),
        ({"args": {"a": 1}}, "args"),
        ({"args": "a"}, "args"),
        ({"args": None}, "args"),
        ({"args": [float("nan")]}, "args"),
        ({"kwargs": []}, "kwargs"),
        ({"kwargs": None}, "kwargs"),
        ({"kwargs": {1: "x"}}, "kwargs"),
        ({"kwargs": {"when": datetime(2026, 1, 1)}}, "kwargs"),
        ({"coalesce": "newest"}, "coalesce"),
        ({"coalesce": "Latest"}, "coalesce"),
        ({"coalesce": None}, "coalesce"),
        ({"misfire_grace_time": -1}, "misfire_grace_time"),
        ({"misfire_grace_time": "30"}, "misfire_grace_time"),
        ({"misfire_grace_time": float("inf")}, "misfire_grace_time"),
        ({"misfire_grace_time": 10**12}, "misfire_grace_time"),
        ({"max_jitter": -0.1}, "max_jitter"),
        ({"max_jitter": "1s"}, "max_jitter"),
        ({"paused": 0}, "paused"),
        ({"paused": "false"}, "paused"),
        ({"paused": None}, "paused"),
        ({"metadata": []}, "metadata"),
        ({"metadata": None}, "metadata"),
        ({"metadata": {1: "x"}}, "metadata"),
        ({"metadata": {"a": [None]}}, "metadata"),
        ({"metadata": {"a": float("nan")}}, "metadata"),
    ],
    ids=[
        "id-empty",
        "id-space",
        "id-slash",
        "id-trailing-newline",
        "id-too-long",
        "id-number",
        "id-null",
        "task-missing",
        "task-empty",
        "task-blank",
        "task-padded",
        "task-too-long",
        "task-number",
        "trigger-missing",
        "trigger-null",
        "args-object",
        "args-string",
        "args-null",
        "args-nan",
        "kwargs-array",
        "kwargs-null",
        "kwargs-non-string-key",
        "kwargs-not-json",
        "coalesce-unknown",
        "coalesce-wrong-case",
        "coalesce-null",
        "misfire-negative",
        "misfire-string",
        "misfire-infinite",
        "misfire-too-large",
        "jitter-negative",
        "jitter-string",
        "paused-number",
        "paused-string",
        "paused-null",
        "metadata-array",
        "metadata-null",
        "metadata-non-string-key",
        "metadata-nested-null",
        "metadata-nan",
    ],
)
def test_bad_schedule_field_is_rejected_naming_the_field(overrides: dict, field: str) -> None:
    assert rejected(body(**overrides)).startswith(field + ":")


@pytest.mark.parametrize("field", ["misfire_grace_time", "max_jitter"])
@pytest.mark.parametrize("flag", [True, False])
def test_duration_rejects_booleans_as_numbers(field: str, flag: bool) -> None:
    message = rejected(body(**{field: flag}))
    assert message.startswith(field + ":")
    assert "got " + str(flag).lower() in message


def test_id_of_128_allowed_characters_is_accepted() -> None:
    sid = ("Az09_.:-" * 16)[:128]
    assert parse_schedule_body(body(id=sid), now=NOW).id == sid


def test_bad_request_is_a_value_error() -> None:
    assert issubclass(BadRequest, ValueError)


def test_spec_to_json_round_trips_through_parse_schedule_body() -> None:
    original = parse_schedule_body(
        body(
            trigger={"type": "cron", "expr": "0 9 * * mon", "timezone": "Europe/Berlin"},
            args=[1],
            kwargs={"k": [True, None]},
            coalesce="earliest",
            misfire_grace_time=2.5,
            max_jitter=1,
            paused=True,
            metadata={"owner": "ops"},
        ),
        now=NOW,
    )
    rebuilt = parse_schedule_body(spec_to_json(original), now=NOW + timedelta(days=30))
    assert spec_to_json(rebuilt) == spec_to_json(original)
    assert fires(rebuilt.trigger) == fires(original.trigger)


# --- job body ------------------------------------------------------------------------------------


def test_job_body_parses_task_args_and_kwargs() -> None:
    assert parse_job_body({"task": "backup", "args": ["/db"], "kwargs": {"full": True}}) == (
        "backup",
        ("/db",),
        {"full": True},
    )


def test_job_body_args_and_kwargs_default_to_empty() -> None:
    assert parse_job_body({"task": "backup"}) == ("backup", (), {})


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ([], "request body"),
        ({}, "task"),
        ({"task": ""}, "task"),
        ({"task": "backup", "args": {}}, "args"),
        ({"task": "backup", "kwargs": []}, "kwargs"),
        ({"task": "backup", "trigger": {}}, "unknown field 'trigger'"),
    ],
    ids=["not-object", "task-missing", "task-empty", "args-object", "kwargs-array", "unknown"],
)
def test_bad_job_body_is_rejected_naming_the_field(value: Any, field: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_job_body(value)
    assert str(info.value).startswith(field)


# --- schedule_to_json / iso ----------------------------------------------------------------------


def make_schedule(**overrides: Any) -> Schedule:
    fields: dict[str, Any] = {
        "id": "nightly",
        "task_id": "send_notification",
        "trigger": IntervalTrigger(seconds=30, start_time=NOW),
        "job_executor": "async",
    }
    fields.update(overrides)
    return Schedule(**fields)


def test_schedule_to_json_has_exactly_the_documented_keys() -> None:
    assert set(schedule_to_json(make_schedule())) == {
        "id",
        "task",
        "trigger",
        "args",
        "kwargs",
        "coalesce",
        "misfire_grace_time",
        "max_jitter",
        "overlap",
        "retry",
        "timeout",
        "target",
        "history",
        "remaining_runs",
        "notify",
        "note",
        "paused",
        "metadata",
        "next_fire_time",
        "last_fire_time",
    }


def test_schedule_to_json_renders_every_field() -> None:
    schedule = make_schedule(
        args=(1, "x"),
        kwargs={"message": "hi"},
        paused=True,
        coalesce=CoalescePolicy.all,
        misfire_grace_time=timedelta(seconds=30),
        max_jitter=timedelta(milliseconds=250),
        metadata={
            "owner": "ops",
            "schedulezero": {"overlap": "skip", "retry": {"max_attempts": 5}, "note": "why"},
        },
        next_fire_time=datetime(2026, 1, 5, 13, 0, tzinfo=BERLIN),
        last_fire_time=NOW,
    )
    assert schedule_to_json(schedule) == {
        "id": "nightly",
        "task": "send_notification",
        "trigger": {
            "type": "interval",
            "seconds": 30,
            "start_time": "2026-01-05T12:00:00+00:00",
            "end_time": None,
        },
        "args": [1, "x"],
        "kwargs": {"message": "hi"},
        "coalesce": "all",
        "misfire_grace_time": 30.0,
        "max_jitter": 0.25,
        "paused": True,
        "metadata": {"owner": "ops"},  # the controls' key is not shown as metadata
        "overlap": "skip",
        "retry": {
            "max_attempts": 5,
            "initial_delay": 1.0,
            "max_delay": 60.0,
            "multiplier": 2.0,
            "on_exhausted": "continue",
        },
        "timeout": None,
        "target": None,
        "history": None,
        "remaining_runs": None,
        "notify": None,
        "note": "why",
        "next_fire_time": "2026-01-05T13:00:00+01:00",
        "last_fire_time": "2026-01-05T12:00:00+00:00",
    }


def test_schedule_to_json_renders_unset_times_and_durations_as_null() -> None:
    out = schedule_to_json(make_schedule())
    assert out["misfire_grace_time"] is None
    assert out["max_jitter"] is None
    assert out["next_fire_time"] is None
    assert out["last_fire_time"] is None


def test_schedule_to_json_includes_warnings_only_when_given() -> None:
    warning = "no handler has registered task 'send_notification' yet"
    assert "warnings" not in schedule_to_json(make_schedule())
    assert schedule_to_json(make_schedule(), warnings=[warning])["warnings"] == [warning]


def test_schedule_to_json_trigger_parses_back_to_the_same_fire_times() -> None:
    schedule = make_schedule(trigger=CronTrigger.from_crontab("*/5 * * * *", start_time=NOW))
    rebuilt = parse_trigger(schedule_to_json(schedule)["trigger"], now=NOW)
    assert fires(rebuilt) == fires(schedule.trigger)


def test_iso_keeps_the_offset() -> None:
    assert iso(datetime(2026, 11, 23, 10, 0, 0, 500, tzinfo=BERLIN)) == (
        "2026-11-23T10:00:00.000500+01:00"
    )


def test_iso_of_none_is_none() -> None:
    assert iso(None) is None


def test_parsed_spec_builds_an_apscheduler_schedule_that_renders_back_the_same() -> None:
    spec = parse_schedule_body(
        body(
            kwargs={"message": "hi"},
            coalesce="all",
            misfire_grace_time=3600,
            metadata={"owner": "ops", "limits": {"max": 3}},
        ),
        now=NOW,
    )
    schedule = Schedule(
        id=spec.id,
        task_id=spec.task,
        trigger=spec.trigger,
        args=spec.args,
        kwargs=spec.kwargs,
        coalesce=spec.coalesce,
        misfire_grace_time=spec.misfire_grace_time,
        max_jitter=spec.max_jitter,
        paused=spec.paused,
        metadata=spec.metadata,
        job_executor="async",
    )
    out = schedule_to_json(schedule)
    assert {k: v for k, v in out.items() if not k.endswith("_fire_time")} == spec_to_json(spec)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "cron", "expr": "0 3 29 2 *", "timezone": "UTC"},
        {
            "type": "cron",
            "hour": "3",
            "minute": "*/5",
            "day_of_week": "mon-fri",
            "timezone": "Europe/Berlin",
        },
        {"type": "cron", "second": "*/10", "timezone": "UTC"},
        {"type": "interval", "seconds": 0.25},
        {"type": "date", "run_time": "2030-01-01T00:00:00+00:00"},
        {"type": "calendarinterval", "months": 1, "hour": 4, "timezone": "UTC"},
    ],
)
def test_a_trigger_read_back_from_the_replicated_store_renders_and_reparses(spec) -> None:
    """Schedules on every node are rebuilt from their state (``__setstate__``), which for a
    cron trigger keeps only its compiled fields: rendering must not depend on the rest."""
    from mesh.scheduling.state import from_wire, to_wire

    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    original = parse_trigger(spec, now=now)
    restored = from_wire(to_wire(original))
    again = parse_trigger(trigger_to_json(restored), now=now)
    reference = from_wire(to_wire(original))
    assert [again.next() for _ in range(3)] == [reference.next() for _ in range(3)]
