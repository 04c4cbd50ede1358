"""The daylight saving time rule (docs/scheduling.md, "Daylight saving time"): a cron fire time
in a skipped local hour is skipped, one in a repeated local hour fires once (Temporal's rule).

Each day is fired round by round as a leader fires it (``plan_round`` at each next fire time,
the schedule going through the state's wire codec between rounds), and the local wall-clock
times of the jobs are compared with the rule. The first test pins what APScheduler 4.0.0a6's
``CronTrigger`` does on its own, which is why the mesh applies the rule itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import attrs
import pytest
from apscheduler import CoalescePolicy, Schedule
from apscheduler.triggers.cron import CronTrigger

from mesh.scheduling.dst import skipped_by_dst
from mesh.scheduling.rounds import plan_round
from mesh.scheduling.state import dump_schedule, load_schedule

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def local(at: datetime, tz: ZoneInfo) -> str:
    """``at``'s local ``HH:MM`` (through UTC: ``astimezone`` to its own tzinfo is a no-op)."""
    return at.astimezone(UTC).astimezone(tz).strftime("%H:%M")


def fired_wall_times(cron: str, tz: ZoneInfo, day: tuple[int, int, int]) -> list[str]:
    """Local ``HH:MM`` of every job the mesh makes for ``cron`` on ``day``, in order."""
    start = datetime(*day, tzinfo=tz)
    trigger = CronTrigger.from_crontab(cron, timezone=tz, start_time=start)
    s = Schedule(
        id="dst",
        task_id="t",
        trigger=trigger,
        next_fire_time=trigger.next(),
        coalesce=CoalescePolicy.all,
        job_executor="x",
    )
    end = start + timedelta(days=1)
    out: list[str] = []
    while s.next_fire_time is not None and s.next_fire_time < end:
        [fired] = plan_round([s], s.next_fire_time)
        out += [local(j.scheduled_fire_time, tz) for j in fired.jobs]
        advanced = attrs.evolve(
            s, trigger=fired.schedule.trigger, next_fire_time=fired.next_fire_time
        )
        s = load_schedule(dump_schedule(advanced))
    return out


def test_apscheduler_alone_shifts_a_skipped_time_and_repeats_a_repeated_one() -> None:
    spring = CronTrigger.from_crontab(
        "30 2 * * *", timezone=BERLIN, start_time=datetime(2025, 3, 30, tzinfo=BERLIN)
    )
    assert local(spring.next(), BERLIN) == "03:30"  # 02:30 does not exist
    fall = CronTrigger.from_crontab(
        "30 2 * * *", timezone=BERLIN, start_time=datetime(2025, 10, 26, tzinfo=BERLIN)
    )
    first, second = fall.next(), fall.next()
    assert second.astimezone(UTC) - first.astimezone(UTC) == timedelta(hours=1)  # CEST, CET
    assert skipped_by_dst(spring, datetime(2025, 3, 30, 2, 30, tzinfo=BERLIN))
    assert not skipped_by_dst(fall, first)
    assert skipped_by_dst(fall, second)


@pytest.mark.parametrize(
    ("tz", "day"), [(BERLIN, (2025, 3, 30)), (NEW_YORK, (2025, 3, 9))], ids=["berlin", "new_york"]
)
def test_a_fire_time_in_the_skipped_hour_is_skipped(
    tz: ZoneInfo, day: tuple[int, int, int]
) -> None:
    assert fired_wall_times("30 2 * * *", tz, day) == []
    assert fired_wall_times("*/30 1-3 * * *", tz, day) == ["01:00", "01:30", "03:00", "03:30"]


def test_a_fire_time_in_the_repeated_hour_fires_once_berlin() -> None:
    assert fired_wall_times("30 2 * * *", BERLIN, (2025, 10, 26)) == ["02:30"]
    assert fired_wall_times("*/30 1-3 * * *", BERLIN, (2025, 10, 26)) == [
        "01:00", "01:30", "02:00", "02:30", "03:00", "03:30",
    ]  # fmt: skip


def test_a_fire_time_in_the_repeated_hour_fires_once_at_its_first_occurrence_new_york() -> None:
    start = datetime(2025, 11, 2, tzinfo=NEW_YORK)
    trigger = CronTrigger.from_crontab("30 1 * * *", timezone=NEW_YORK, start_time=start)
    s = Schedule(id="dst", task_id="t", trigger=trigger, next_fire_time=trigger.next(),
                 job_executor="x")  # fmt: skip
    [fired] = plan_round([s], start, horizon=start + timedelta(days=1))
    [job] = fired.jobs
    assert job.scheduled_fire_time.astimezone(UTC) == datetime(2025, 11, 2, 5, 30, tzinfo=UTC)
    assert job.scheduled_fire_time.astimezone(UTC).astimezone(NEW_YORK).utcoffset() == timedelta(
        hours=-4
    )  # EDT


def test_ordinary_days_are_unchanged() -> None:
    assert fired_wall_times("30 2 * * *", BERLIN, (2025, 6, 1)) == ["02:30"]
    assert fired_wall_times("0 */6 * * *", NEW_YORK, (2025, 11, 3)) == [
        "00:00", "06:00", "12:00", "18:00",
    ]  # fmt: skip
