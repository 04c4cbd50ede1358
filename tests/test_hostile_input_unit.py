"""Hostile input, in-process: opaque user data in the replicated state, bounded catch-up
equal to APScheduler's own loop, and NaN results."""

from __future__ import annotations

import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest
from apscheduler import CoalescePolicy, Job, JobOutcome, JobResult, Schedule
from apscheduler.abc import Trigger
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling import codec
from mesh.scheduling.catchup import MAX_CATCH_UP_FIRES, catch_up
from mesh.scheduling.state import SchedulerState, dump_job, json_result, load_job

NOW = datetime(2026, 11, 29, 7, 30, 12, 345678, tzinfo=UTC)


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module whose import writes a file; returns (its class ref, that file)."""
    (tmp_path / "unit_canary.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(tmp_path / 'imported')!r}).write_text('yes')\n"
        "class C:\n    def __setstate__(self, s): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("unit_canary", None)
    return "unit_canary:C", tmp_path / "imported"


def test_user_data_with_the_marshalling_key_survives_the_log_and_a_snapshot_unchanged(
    canary: tuple[str, Path],
) -> None:
    ref, imported = canary
    hostile = {"p": {codec.MAGIC_KEY: [ref, {}]}}
    job = Job(task_id="t", args=(hostile,), kwargs=hostile, metadata=hostile, executor="x")
    state = SchedulerState()
    state.apply(Entry(1, 1, COMMAND, {"op": "add_job", "job": dump_job(job)}))
    restored = SchedulerState()
    restored.restore(state.snapshot())
    for s in (state, restored):
        got = s.jobs[job.id].job
        assert (got.args, got.kwargs, got.metadata) == ((hostile,), hostile, hostile)
    assert load_job(dump_job(job)).kwargs == hostile
    assert not imported.exists()


def test_only_apscheduler_classes_are_rebuilt_from_the_log(canary: tuple[str, Path]) -> None:
    ref, imported = canary
    with pytest.raises(ValueError, match="not an APScheduler class"):
        codec.from_wire({codec.MAGIC_KEY: [ref, {}]})
    assert not imported.exists()
    trigger = IntervalTrigger(seconds=5, start_time=NOW)
    assert codec.from_wire(codec.to_wire(trigger)) == trigger


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), {1, 2}])
def test_a_return_value_that_is_not_plain_json_becomes_an_error_outcome(value: Any) -> None:
    job = Job(task_id="t", executor="x")
    result = JobResult.from_job(job, JobOutcome.success, return_value=value)
    checked = json_result(result)
    assert (checked.outcome, checked.return_value) == (JobOutcome.error, None)
    assert "not plain JSON" in str(checked.exception)
    assert json_result(JobResult.from_job(job, JobOutcome.success, return_value=[1.5])).outcome == (
        JobOutcome.success
    )


def test_plain_json_walks_deep_data_without_recursion() -> None:
    value: Any = 1
    for _ in range(100_000):
        value = [value]
    with pytest.raises(codec.NotPlainJSON, match="deeper than 32"):
        codec.plain(value)


# --- catch-up ----------------------------------------------------------------------------------


def apscheduler_loop(trigger: Trigger, first: datetime, coalesce: CoalescePolicy) -> Any:
    """What AsyncScheduler._process_schedules computes: the jobs' fire times and the next."""
    fire_times = [first]
    while True:
        fire = trigger.next()
        if fire is None or fire > NOW:
            return fire_times, fire
        if coalesce is CoalescePolicy.all:
            fire_times.append(fire)
        elif coalesce is CoalescePolicy.latest:
            fire_times[0] = fire


def schedule(trigger: Trigger, coalesce: CoalescePolicy) -> Schedule:
    first = trigger.next()
    return Schedule(
        id=str(uuid4()),
        task_id="t",
        trigger=trigger,
        coalesce=coalesce,
        next_fire_time=first,
        job_executor="x",
    )


def triggers() -> list[Any]:
    rnd = random.Random(12)
    berlin = ZoneInfo("Europe/Berlin")
    made: list[Any] = []
    for _ in range(12):
        secs = rnd.choice([0.5, 1, 7, 60, 3600, 129600])
        start = NOW - timedelta(seconds=secs * rnd.randint(1, 3000))
        made.append(lambda s=secs, st=start: IntervalTrigger(seconds=s, start_time=st))
    for expr, days in [
        ("* * * * *", (0.04, 3)),
        ("*/7 * * * *", (3, 60)),
        ("0 0 29 2 *", (400, 40000)),
        ("15 3 * * mon-fri", (3, 4000)),
    ]:
        for d in days:
            made.append(
                lambda e=expr, d=d: CronTrigger.from_crontab(
                    e, start_time=NOW - timedelta(days=d), timezone=berlin
                )
            )
    made.append(lambda: CronTrigger(second="*/3", start_time=NOW - timedelta(hours=5)))
    for units in [{"days": 1}, {"weeks": 2}, {"months": 1}, {"months": 1, "days": 3}]:
        for back in (30, 4000):
            made.append(
                lambda u=units, b=back: CalendarIntervalTrigger(
                    **u,
                    hour=2,
                    minute=30,
                    start_date=(NOW - timedelta(days=b)).date(),
                    timezone=berlin,
                )
            )
    return made


@pytest.mark.parametrize("coalesce", list(CoalescePolicy))
def test_catch_up_gives_apscheduler_s_own_fire_times_with_all_capped(
    coalesce: CoalescePolicy,
) -> None:
    for make in triggers():
        expected, expected_next = apscheduler_loop(*_first(make(), coalesce))
        s = schedule(make(), coalesce)
        skipped = catch_up(s, NOW)
        got, got_next = apscheduler_loop(s.trigger, s.next_fire_time, coalesce)
        if coalesce is CoalescePolicy.all and len(expected) > MAX_CATCH_UP_FIRES:
            assert skipped == len(expected) - MAX_CATCH_UP_FIRES or skipped >= 900
            expected = expected[-MAX_CATCH_UP_FIRES:]
        else:
            assert skipped == 0
        # Only a cron that fires every second from a start with microseconds may differ, by them.
        assert [f.replace(microsecond=0) for f in got] == [
            f.replace(microsecond=0) for f in expected
        ], make()
        assert got_next == expected_next, make()


def _first(trigger: Trigger, coalesce: CoalescePolicy) -> tuple[Trigger, datetime, Any]:
    return trigger, trigger.next(), coalesce


@pytest.mark.parametrize("coalesce", list(CoalescePolicy))
@pytest.mark.parametrize(
    "make",
    [
        lambda: IntervalTrigger(seconds=1, start_time=NOW - timedelta(days=365)),
        lambda: CronTrigger(second="*", start_time=NOW - timedelta(days=365)),
        lambda: CalendarIntervalTrigger(days=1, start_date="1900-01-01", timezone="UTC"),
    ],
    ids=["interval", "cron", "calendarinterval"],
)
def test_a_start_a_year_or_more_ago_is_caught_up_at_once(make: Any, coalesce: Any) -> None:
    s = schedule(make(), coalesce)
    started = time.perf_counter()
    catch_up(s, NOW)
    fires, following = apscheduler_loop(s.trigger, s.next_fire_time, coalesce)
    assert time.perf_counter() - started < 0.5
    assert len(fires) <= MAX_CATCH_UP_FIRES and following > NOW
