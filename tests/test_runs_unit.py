"""Runs outside a schedule's times and its run bookkeeping (mesh.scheduling.backfill and the
state machine's ``trigger_schedule``, ``backfill_schedule``, ``remaining_runs``, ``history``).

The fire times of a backfill are checked against stepping the trigger itself; the commands on a
real SchedulerState, applied twice (two nodes) to check that they are deterministic.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from apscheduler import Job, JobOutcome, JobResult, Schedule
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling import backfill
from mesh.scheduling.backfill import NotIterable, TooManyFireTimes, fire_times
from mesh.scheduling.controls import Controls, History, with_controls
from mesh.scheduling.rounds import plan_round, round_command
from mesh.scheduling.state import (
    JobState,
    SchedulerState,
    dump_job,
    dump_result,
    dump_schedule,
    idempotency_key,
    job_key,
    load_schedule,
    to_wire,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)


def stepped(trigger: Any, start: datetime, end: datetime) -> list[datetime]:
    """The fire times in [start, end) the slow way: every next() of the trigger."""
    out = []
    while (t := trigger.next()) is not None and t < end:
        if t >= start:
            out.append(t)
    return out


# --------------------------------------------------------------------------- fire times


DST_WEEKEND = (datetime(2026, 3, 28, tzinfo=UTC), datetime(2026, 3, 30, tzinfo=UTC))
A_YEAR = (datetime(2025, 6, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("make", "span"),
    [
        (lambda: IntervalTrigger(minutes=7, start_time=T0), DST_WEEKEND),
        (lambda: CronTrigger.from_crontab("*/10 * * * *", timezone="Europe/Berlin"), DST_WEEKEND),
        (lambda: CronTrigger(hour="2", minute="30", timezone="Europe/Berlin"), A_YEAR),
        (lambda: CalendarIntervalTrigger(days=3, hour=5, start_date="2020-01-01"), A_YEAR),
        (lambda: CalendarIntervalTrigger(months=1, hour=5, start_date="2020-01-31"), A_YEAR),
    ],
)
def test_backfill_times_are_the_triggers_own_fire_times(
    make: Any, span: tuple[datetime, datetime]
) -> None:
    start, end = span
    probe = make()
    if isinstance(probe, CronTrigger):
        probe.start_time = datetime(2020, 1, 1, tzinfo=UTC).astimezone(probe.timezone)
    expected = stepped(probe, start, end)
    assert expected
    got = fire_times(make(), start, end)
    assert got == expected
    assert [t.isoformat() for t in got] == [t.isoformat() for t in expected]  # same keys


def test_an_interval_extends_back_before_its_start_time_on_the_same_grid() -> None:
    trigger = IntervalTrigger(minutes=10, start_time=T0 + 5 * S)
    got = fire_times(trigger, T0 - timedelta(minutes=30), T0)
    assert got == [T0 - timedelta(minutes=m) + 5 * S for m in (30, 20, 10)]


def test_a_huge_interval_range_is_refused_with_its_exact_count_without_iterating_it() -> None:
    trigger = IntervalTrigger(seconds=1, start_time=T0 - timedelta(days=3650))
    with pytest.raises(TooManyFireTimes) as e:
        fire_times(trigger, T0 - timedelta(days=3650), T0)
    assert e.value.count == 3650 * 86400
    assert "315360000" in str(e.value) and "1000" in str(e.value)


def test_a_cron_range_above_the_bound_is_refused_after_the_bound() -> None:
    with pytest.raises(TooManyFireTimes, match="more than 1000"):
        fire_times(CronTrigger(second="*"), T0 - timedelta(days=3650), T0)


def test_exactly_the_bound_is_accepted() -> None:
    trigger = IntervalTrigger(seconds=1, start_time=T0)
    assert len(fire_times(trigger, T0, T0 + 1000 * S)) == 1000


def test_end_time_still_bounds_and_a_date_trigger_has_its_one_time() -> None:
    trigger = IntervalTrigger(seconds=10, start_time=T0, end_time=T0 + 20 * S)
    assert fire_times(trigger, T0, T0 + timedelta(hours=1)) == [T0, T0 + 10 * S, T0 + 20 * S]
    assert fire_times(DateTrigger(T0), T0 - S, T0 + S) == [T0]
    assert fire_times(DateTrigger(T0), T0 + S, T0 + 2 * S) == []


def test_a_combining_trigger_cannot_be_backfilled() -> None:
    trigger = OrTrigger([DateTrigger(T0), DateTrigger(T0 + S)])
    with pytest.raises(NotIterable):
        fire_times(trigger, T0 - S, T0 + S)


# --------------------------------------------------------------------------- state machine


class Nodes:
    """Two SchedulerStates applying the same log (two nodes), compared after each command."""

    def __init__(self) -> None:
        self.states = [SchedulerState(), SchedulerState()]
        self.index = 0

    @property
    def state(self) -> SchedulerState:
        return self.states[0]

    def apply(self, command: dict[str, Any]) -> Any:
        self.index += 1
        results = [
            s.apply(Entry(term=1, index=self.index, kind=COMMAND, data=command))
            for s in self.states
        ]
        assert results[0] == results[1]
        assert json.loads(self.states[0].snapshot()) == json.loads(self.states[1].snapshot())
        return results[0]


def make_schedule(sid: str = "s", controls: Controls | None = None, **kw: Any) -> Schedule:
    trigger = IntervalTrigger(seconds=10, start_time=T0)
    return Schedule(
        id=sid,
        task_id="t",
        trigger=trigger,
        next_fire_time=trigger.next(),
        job_executor="x",
        metadata=with_controls({}, controls or Controls()),
        **kw,
    )


@pytest.fixture
def nodes() -> Nodes:
    n = Nodes()
    n.apply({"op": "add_schedule", "schedule": dump_schedule(make_schedule())})
    return n


def release(nodes: Nodes, job_id: str, outcome: str = "success", at: datetime = T0) -> None:
    js = nodes.state.jobs[UUID(job_id)]
    result = JobResult.from_job(js.job, JobOutcome[outcome], finished_at=at)
    assert nodes.apply({"op": "release_job", "job_id": job_id, "result": dump_result(result)})


def fire(nodes: Nodes, sid: str, now: datetime) -> list[str]:
    [fired] = plan_round([load_schedule(dump_schedule(nodes.state.schedules[sid]))], now)
    return nodes.apply(round_command("leader", [fired], to_wire, dump_job))["jobs"]


def backfill_cmd(sid: str, times: list[datetime], now: datetime = T0) -> dict[str, Any]:
    return {
        "op": "backfill_schedule",
        "schedule_id": sid,
        "times": [t.isoformat() for t in times],
        "now": now.isoformat(),
    }


def test_a_trigger_queues_one_job_with_its_own_key_and_leaves_the_watermark(nodes: Nodes) -> None:
    for state in nodes.states:  # fires far ahead already recorded
        state.fired["s"] = (T0 + 100 * S).isoformat()
    now = T0 + 5 * S
    answer = nodes.apply({"op": "trigger_schedule", "schedule_id": "s", "now": now.isoformat()})
    assert answer["idempotency_key"] == f"s@{now.isoformat()}#trigger"
    js = nodes.state.jobs[UUID(answer["job_id"])]
    assert (js.origin, js.job.scheduled_fire_time, js.job.start_deadline) == ("trigger", now, None)
    assert job_key(js) == answer["idempotency_key"]
    assert nodes.state.fired["s"] == (T0 + 100 * S).isoformat()


def test_a_trigger_works_on_a_paused_schedule_and_not_on_an_unknown_one(nodes: Nodes) -> None:
    paused = make_schedule("p", paused=True)
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(paused)})
    got = nodes.apply({"op": "trigger_schedule", "schedule_id": "p", "now": T0.isoformat()})
    assert UUID(got["job_id"]) in nodes.state.jobs
    unknown = {"op": "trigger_schedule", "schedule_id": "x", "now": T0.isoformat()}
    assert nodes.apply(unknown) is None


def test_two_triggers_at_one_instant_are_two_jobs(nodes: Nodes) -> None:
    cmd = {"op": "trigger_schedule", "schedule_id": "s", "now": T0.isoformat()}
    assert nodes.apply(cmd)["job_id"] != nodes.apply(cmd)["job_id"]
    assert len(nodes.state.jobs) == 2


def test_backfill_runs_one_time_at_a_time_in_fire_time_order(nodes: Nodes) -> None:
    times = [T0 - 30 * S, T0 - 20 * S, T0 - 10 * S]
    answer = nodes.apply(backfill_cmd("s", times))
    assert (answer["fire_times"], answer["already_run"], len(answer["job_ids"])) == (3, 0, 3)
    ran = []
    for jid in answer["job_ids"]:
        [js] = nodes.state.jobs.values()  # only the head exists
        assert str(js.job.id) == jid and js.origin == "backfill"
        assert js.job.start_deadline is None
        ran.append(js.job.scheduled_fire_time)
        release(nodes, jid)
    assert ran == times
    assert nodes.state.jobs == {} and nodes.state.backfills == {}
    keys = [ex["idempotency_key"] for ex in nodes.state.executions]
    assert keys == [f"s@{t.isoformat()}" for t in times]


def test_backfill_skips_times_that_ran_or_are_running_or_queued(nodes: Nodes) -> None:
    [ran] = fire(nodes, "s", T0)  # the normal fire of T0 ...
    release(nodes, ran)  # ... ran
    [running] = fire(nodes, "s", T0 + 10 * S)  # the fire of T0+10s is unfinished
    missed = nodes.apply(backfill_cmd("s", [T0 + 20 * S]))["job_ids"][0]
    release(nodes, missed, "missed_start_deadline")  # did not run: may be backfilled
    times = [T0, T0 + 10 * S, T0 + 20 * S, T0 + 30 * S]
    answer = nodes.apply(backfill_cmd("s", times))
    assert (answer["fire_times"], answer["already_run"], len(answer["job_ids"])) == (4, 2, 2)
    again = nodes.apply(backfill_cmd("s", [T0 + 30 * S]))  # queued already
    assert (again["already_run"], again["job_ids"]) == (1, [])
    assert running in {str(j) for j in nodes.state.jobs}


def test_backfill_neither_checks_nor_moves_the_fire_watermark(nodes: Nodes) -> None:
    for state in nodes.states:
        state.fired["s"] = (T0 + 100 * S).isoformat()
    answer = nodes.apply(backfill_cmd("s", [T0]))
    assert UUID(answer["job_ids"][0]) in nodes.state.jobs
    assert nodes.state.fired["s"] == (T0 + 100 * S).isoformat()


def test_a_time_that_ran_while_queued_is_not_run_by_the_backfill(nodes: Nodes) -> None:
    answer = nodes.apply(backfill_cmd("s", [T0 - 10 * S, T0]))
    [ran] = fire(nodes, "s", T0)  # a normal fire of T0 came while the backfill waited
    release(nodes, ran)
    release(nodes, answer["job_ids"][0], at=T0 + S)
    assert nodes.state.jobs == {} and nodes.state.backfills == {}


def test_backfill_queue_survives_a_snapshot_and_deleting_the_schedule_drops_it(
    nodes: Nodes,
) -> None:
    answer = nodes.apply(backfill_cmd("s", [T0 - 20 * S, T0 - 10 * S]))
    restored = SchedulerState()
    restored.restore(nodes.state.snapshot())
    assert restored.backfills == nodes.state.backfills
    assert restored.job_status(UUID(answer["job_ids"][1]))["status"] == "pending"
    nodes.apply({"op": "remove_schedules", "ids": ["s"]})
    assert nodes.state.backfills == {}


def test_a_full_backfill_queue_refuses_more(nodes: Nodes) -> None:
    times = [T0 - k * S for k in range(backfill.MAX_QUEUED + 1, 0, -1)]
    answer = nodes.apply(backfill_cmd("s", times))
    assert answer["refused"] == 0 and "job_ids" not in answer
    assert nodes.state.jobs == {}


def test_remaining_runs_counts_fires_not_triggers_and_stops_the_schedule_at_zero() -> None:
    nodes = Nodes()
    s = make_schedule(controls=Controls(remaining_runs=2))
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(s)})
    nodes.apply({"op": "trigger_schedule", "schedule_id": "s", "now": T0.isoformat()})
    nodes.apply(backfill_cmd("s", [T0 - 10 * S]))
    assert len(fire(nodes, "s", T0 + 5 * S)) == 1
    assert nodes.state.schedules["s"].metadata["schedulezero"]["remaining_runs"] == 1
    assert len(fire(nodes, "s", T0 + 15 * S)) == 1
    stopped = nodes.state.schedules["s"]
    assert stopped.metadata["schedulezero"]["remaining_runs"] == 0
    assert stopped.next_fire_time is None
    assert nodes.state.due_schedule_ids(T0 + timedelta(days=1), 10) == []


def test_a_round_with_more_fires_than_runs_left_queues_only_those_runs() -> None:
    nodes = Nodes()
    s = make_schedule(controls=Controls(remaining_runs=2), coalesce=_all())
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(s)})
    jobs = fire(nodes, "s", T0 + 45 * S)  # five fire times due
    assert len(jobs) == 2
    assert nodes.state.schedules["s"].next_fire_time is None


def test_a_schedule_created_with_no_runs_left_never_fires() -> None:
    nodes = Nodes()
    s = make_schedule(controls=Controls(remaining_runs=0))
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(s)})
    assert nodes.state.schedules["s"].next_fire_time is None


def _all() -> Any:
    from apscheduler import CoalescePolicy

    return CoalescePolicy.all


def test_history_keeps_at_most_the_limits_per_kind_dropping_the_oldest() -> None:
    nodes = Nodes()
    s = make_schedule(controls=Controls(history=History(keep_success=2, keep_failed=1)))
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(s)})
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(make_schedule("free"))})
    outcomes = ["success", "error", "success", "error", "success", "success"]
    done = []
    for i, outcome in enumerate(outcomes):
        for sid in ("s", "free"):
            cmd = {"op": "trigger_schedule", "schedule_id": sid, "now": (T0 + i * S).isoformat()}
            jid = nodes.apply(cmd)["job_id"]
            release(nodes, jid, outcome, at=T0 + i * S)
            done.append((sid, jid))
    mine = [ex for ex in nodes.state.executions if ex["schedule_id"] == "s"]
    assert [(ex["outcome"], ex["finished_at"]) for ex in mine] == [
        ("error", (T0 + 3 * S).isoformat()),
        ("success", (T0 + 4 * S).isoformat()),
        ("success", (T0 + 5 * S).isoformat()),
    ]
    assert sum(ex["schedule_id"] == "free" for ex in nodes.state.executions) == 6


def test_history_limit_zero_keeps_none_and_the_count_survives_a_restore() -> None:
    nodes = Nodes()
    s = make_schedule(controls=Controls(history=History(keep_success=0, keep_failed=1)))
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(s)})
    for i in range(3):
        jid = nodes.apply(
            {"op": "trigger_schedule", "schedule_id": "s", "now": (T0 + i * S).isoformat()}
        )["job_id"]
        release(nodes, jid, "success" if i != 1 else "error")
        if i == 1:  # a node restored from a snapshot counts again from its history
            nodes.states[1].restore(nodes.states[0].snapshot())
    assert [ex["outcome"] for ex in nodes.state.executions] == ["error"]


def test_history_limits_with_a_capped_history_count_evicted_records() -> None:
    nodes = Nodes()
    nodes.states = [SchedulerState(max_executions=3), SchedulerState(max_executions=3)]
    s = make_schedule(controls=Controls(history=History(keep_success=2)))
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(s)})
    nodes.apply({"op": "add_schedule", "schedule": dump_schedule(make_schedule("free"))})
    for i, sid in enumerate(["s", "s", "free", "free", "free", "s", "s"]):
        cmd = {"op": "trigger_schedule", "schedule_id": sid, "now": (T0 + i * S).isoformat()}
        release(nodes, nodes.apply(cmd)["job_id"], at=T0 + i * S)
    assert [ex["schedule_id"] for ex in nodes.state.executions] == ["free", "s", "s"]


def test_a_trigger_has_its_own_key_and_a_backfilled_run_the_fires() -> None:
    job = Job(task_id="t", schedule_id="s", scheduled_fire_time=T0, executor="x")
    assert idempotency_key(job) == f"s@{T0.isoformat()}"
    trigger = JobState(job, origin="trigger", key=f"s@{T0.isoformat()}#trigger")
    assert job_key(trigger) == f"s@{T0.isoformat()}#trigger"
    assert job_key(JobState(job, origin="backfill")) == f"s@{T0.isoformat()}"
