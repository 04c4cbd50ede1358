"""Fire rounds (mesh/scheduling/rounds.py): APScheduler's fire rules, one entry per round, and
the state machine's refusal of a round planned on a schedule that changed since.

``plan_round`` keeps the rules of APScheduler 4.0.0a6's schedule loop (coalesce, misfire grace
time → start deadline, jitter below the next fire time): each is checked against fire times
worked out by hand. The apply rules are checked on a real SchedulerState; the whole path on a
leader's SchedulingService (FakeReplica log).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler import CoalescePolicy, Schedule
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling.rounds import Lease, plan_round, round_command
from mesh.scheduling.service import SchedulingService
from mesh.scheduling.spec import ScheduleSpec
from mesh.scheduling.state import (
    SchedulerState,
    dump_job,
    dump_schedule,
    load_schedule,
    to_wire,
)
from tests.fakes import FakeReplica, embedded_tasks

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
WAIT = 5.0


def schedule(
    sid: str = "s",
    *,
    every: float = 10,
    start: datetime = T0,
    coalesce: CoalescePolicy = CoalescePolicy.latest,
    misfire: timedelta | None = None,
    jitter: timedelta | None = None,
) -> Schedule:
    trigger = IntervalTrigger(seconds=every, start_time=start)
    return Schedule(
        id=sid,
        task_id="t",
        trigger=trigger,
        next_fire_time=trigger.next(),
        coalesce=coalesce,
        misfire_grace_time=misfire,
        max_jitter=jitter,
        job_executor="x",
    )


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("coalesce", "expected"),
    [
        (CoalescePolicy.latest, [T0 + 30 * S]),
        (CoalescePolicy.earliest, [T0]),
        (CoalescePolicy.all, [T0, T0 + 10 * S, T0 + 20 * S, T0 + 30 * S]),
    ],
)
def test_missed_fire_times_follow_the_coalesce_policy(
    coalesce: CoalescePolicy, expected: list[datetime]
) -> None:
    [fired] = plan_round([schedule(coalesce=coalesce)], T0 + 35 * S)
    assert [j.scheduled_fire_time for j in fired.jobs] == expected
    assert fired.fired_from == T0
    assert fired.last_fire_time == expected[-1]
    assert fired.next_fire_time == T0 + 40 * S


def test_a_schedule_not_yet_due_would_still_fire_its_next_time_only() -> None:
    [fired] = plan_round([schedule(start=T0)], T0)
    assert [j.scheduled_fire_time for j in fired.jobs] == [T0]
    assert fired.next_fire_time == T0 + 10 * S


def test_the_misfire_grace_time_becomes_the_jobs_start_deadline() -> None:
    [fired] = plan_round([schedule(misfire=timedelta(seconds=3))], T0 + S)
    [job] = fired.jobs
    assert job.start_deadline == T0 + 3 * S
    [plain] = plan_round([schedule()], T0 + S)[0].jobs
    assert plain.start_deadline is None


def test_jitter_is_seeded_and_never_reaches_the_next_fire_time() -> None:
    runs = [
        plan_round(
            [schedule(every=2, jitter=timedelta(seconds=60), coalesce=CoalescePolicy.all)],
            T0 + 7 * S,
            rng=random.Random(7),
        )[0]
        for _ in range(2)
    ]
    assert [j.jitter for j in runs[0].jobs] == [j.jitter for j in runs[1].jobs]  # seeded
    jobs = runs[0].jobs
    assert len(jobs) == 4
    for job in jobs:
        assert timedelta(0) <= job.jitter < 2 * S
        assert job.original_scheduled_time + job.jitter == job.scheduled_fire_time


def test_a_schedule_far_behind_is_caught_up_in_bounded_steps() -> None:
    [fired] = plan_round([schedule(every=1)], T0 + timedelta(days=365))
    assert len(fired.jobs) == 1
    assert fired.next_fire_time == T0 + timedelta(days=365, seconds=1)
    assert fired.fired_from == T0  # what the replica holds, for the apply's check


def test_a_cron_schedule_with_coalesce_all_runs_each_missed_time_once() -> None:
    trigger = CronTrigger.from_crontab("*/5 * * * *", timezone="UTC")
    first = trigger.next()
    s = Schedule(
        id="c",
        task_id="t",
        trigger=trigger,
        next_fire_time=first,
        coalesce=CoalescePolicy.all,
        job_executor="x",
    )
    now = first + timedelta(minutes=12)
    [fired] = plan_round([s], now)
    assert [j.scheduled_fire_time for j in fired.jobs] == [
        first,
        first + timedelta(minutes=5),
        first + timedelta(minutes=10),
    ]
    assert fired.next_fire_time == first + timedelta(minutes=15)


# --------------------------------------------------------------------------- the apply


class Log:
    def __init__(self) -> None:
        self.state = SchedulerState()
        self.index = 0

    def apply(self, command: dict[str, Any]) -> Any:
        self.index += 1
        return self.state.apply(Entry(1, self.index, COMMAND, command))

    def add(self, s: Schedule) -> None:
        self.apply(
            {"op": "add_schedule", "schedule": dump_schedule(s), "conflict_policy": "replace"}
        )


def planned(log: Log, now: datetime, *ids: str) -> dict[str, Any]:
    # Copies, as the leader's store plans on: the plan advances their triggers.
    copies = [load_schedule(dump_schedule(log.state.schedules[i])) for i in ids]
    fired = plan_round(copies, now)
    return round_command("n1@1", fired, to_wire, dump_job)


def test_a_round_advances_every_schedule_and_adds_their_jobs_in_one_entry() -> None:
    log = Log()
    log.add(schedule("a"))
    log.add(schedule("b", every=5))
    result = log.apply(planned(log, T0 + 6 * S, "a", "b"))
    assert result["schedules"] == ["a", "b"]
    assert len(result["jobs"]) == 2
    assert len(log.state.jobs) == 2
    assert log.state.schedules["a"].next_fire_time == T0 + 10 * S
    assert log.state.schedules["b"].next_fire_time == T0 + 10 * S
    assert log.state.fires_recorded == 2


def test_replaying_a_round_adds_no_job_twice() -> None:
    log = Log()
    log.add(schedule("a"))
    command = planned(log, T0 + S, "a")
    assert len(log.apply(command)["jobs"]) == 1
    again = log.apply(command)  # a new leader's round planned on the same state, or a replay
    assert again == {"schedules": [], "jobs": []}
    assert len(log.state.jobs) == 1


def test_a_schedule_replaced_paused_or_deleted_since_the_plan_is_left_alone() -> None:
    log = Log()
    for sid in ("kept", "replaced", "paused", "deleted"):
        log.add(schedule(sid))
    command = planned(log, T0 + S, "kept", "replaced", "paused", "deleted")
    log.add(schedule("replaced", start=T0 + 100 * S))
    paused = log.state.schedules["paused"]
    log.apply(
        {
            "op": "add_schedule",
            "schedule": {**dump_schedule(paused), "paused": True},
            "conflict_policy": "replace",
        }
    )
    log.apply({"op": "remove_schedules", "ids": ["deleted"]})
    result = log.apply(command)
    assert result["schedules"] == ["kept"]
    assert [js.job.schedule_id for js in log.state.jobs.values()] == ["kept"]
    assert log.state.schedules["replaced"].next_fire_time == T0 + 100 * S
    assert log.state.schedules["paused"].next_fire_time == T0  # not advanced


# --------------------------------------------------------------------------- on a leader


@pytest.fixture
def tasks() -> Iterator[asyncio.Event]:
    with embedded_tasks("round_echo", "round_blocking") as gate:
        yield gate


async def test_the_leader_fires_due_schedules_in_fire_round_entries(tasks: Any) -> None:
    replica = FakeReplica("n1")
    service = SchedulingService(replica, replica.state_machine)
    try:
        replica.become_leader(1)
        await service.wait_ready(WAIT)
        for i in range(20):
            await service.put_schedule(
                ScheduleSpec(
                    id=f"r{i:02d}",
                    task="round_echo",
                    trigger=IntervalTrigger(hours=1),
                    args=("x",),
                ),
                replace=False,
            )
        await replica.wait_for(lambda: len(replica.state_machine.executions) >= 20)
        assert replica.commands("acquire_schedules") == []
        assert replica.commands("release_schedules") == []
        assert replica.commands("add_job") == []
        rounds = replica.commands("fire_round")
        fired = [r["schedule_id"] for c in rounds for r in c["schedules"]]
        assert sorted(fired) == [f"r{i:02d}" for i in range(20)]
        assert all(len(r["jobs"]) == 1 for c in rounds for r in c["schedules"])
        # Leased to the leader in the round itself and started by it: no acquire_jobs entry.
        leased = {jid for c in rounds for jid in c.get("lease", {}).get("jobs", {})}
        assert leased == {j["id"] for c in rounds for r in c["schedules"] for j in r["jobs"]}
        assert replica.commands("acquire_jobs") == []
        outcomes = {ex["outcome"] for ex in replica.state_machine.executions}
        assert outcomes == {"success"}
    finally:
        async with asyncio.timeout(WAIT):
            await service.close()


# --------------------------------------------------------------------------- lookahead


def test_fires_within_the_horizon_each_get_a_job_and_are_not_coalesced() -> None:
    [fired] = plan_round(
        [schedule(every=1, coalesce=CoalescePolicy.latest)],
        T0 + 2.5 * S,
        horizon=T0 + 4.5 * S,
    )
    # T0, T0+1, T0+2 were missed: coalesced to the latest; T0+3 and T0+4 are ahead: one each.
    assert [j.scheduled_fire_time for j in fired.jobs] == [T0 + 2 * S, T0 + 3 * S, T0 + 4 * S]
    assert fired.next_fire_time == T0 + 5 * S


def test_a_schedule_due_only_within_the_horizon_fires_ahead() -> None:
    [fired] = plan_round([schedule(start=T0 + S)], T0, horizon=T0 + 2 * S)
    assert [j.scheduled_fire_time for j in fired.jobs] == [T0 + S]
    assert fired.fired_from == T0 + S


def test_a_leased_round_leases_its_jobs_to_the_leader_with_their_handler() -> None:
    log = Log()
    log.add(schedule("a"))
    log.apply({"op": "add_task", "task": {"id": "t", "func": None, "job_executor": "x"}})
    copies = [load_schedule(dump_schedule(log.state.schedules["a"]))]
    fired = plan_round(copies, T0, horizon=T0 + 15 * S)
    ids = [str(j.id) for j in fired[0].jobs]
    assert len(ids) == 2  # T0 and T0+10
    lease = Lease(T0 + 30 * S, 7, {ids[0]: "h1", ids[1]: None})
    result = log.apply(round_command("n1@7", fired, to_wire, dump_job, lease))
    assert result["jobs"] == ids
    first, second = (log.state.jobs[j.id] for j in fired[0].jobs)
    assert (first.job.acquired_by, first.term, first.attempts, first.handler) == (
        "n1@7",
        7,
        1,
        "h1",
    )
    assert (second.job.acquired_by, second.handler) == ("n1@7", None)
    assert log.state.pending_jobs() == 0


def test_a_job_fired_ahead_and_freed_by_a_new_leader_waits_for_its_time() -> None:
    log = Log()
    log.add(schedule("a", start=T0 + 5 * S))
    copies = [load_schedule(dump_schedule(log.state.schedules["a"]))]
    fired = plan_round(copies, T0, horizon=T0 + 6 * S)
    log.apply(round_command("n1@1", fired, to_wire, dump_job))
    due, upcoming = log.state.unleased_fire_times(T0)
    assert (due, upcoming) == (None, T0 + 5 * S)
    due, upcoming = log.state.unleased_fire_times(T0 + 5 * S)
    assert due is not None and due.id == fired[0].jobs[0].id and upcoming is None


async def test_a_job_fired_ahead_whose_task_is_removed_meanwhile_ends_as_an_error(
    tasks: Any,
) -> None:
    replica = FakeReplica("n1")
    service = SchedulingService(replica, replica.state_machine, lookahead=timedelta(seconds=2))
    try:
        replica.become_leader(1)
        await service.wait_ready(WAIT)
        start = datetime.now(UTC) + timedelta(seconds=1)
        await service.put_schedule(
            ScheduleSpec(
                id="gone",
                task="round_echo",
                trigger=IntervalTrigger(hours=1, start_time=start),
            ),
            replace=False,
        )
        state = replica.state_machine
        await replica.wait_for(lambda: any(js.job.acquired_by for js in state.jobs.values()))
        await replica.propose({"op": "remove_task", "task_id": "round_echo"})
        await replica.wait_for(lambda: len(state.executions) == 1)
        [ex] = state.executions
        assert ex["outcome"] == "error" and "round_echo" in str(ex["error"])
    finally:
        async with asyncio.timeout(WAIT):
            await service.close()
