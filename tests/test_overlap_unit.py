"""The overlap policies (mesh/scheduling/overlap.py) as the state machine applies them.

Each test drives a real ``SchedulerState`` with the commands a leader commits (``add_job`` for
a fire, ``acquire_jobs`` when it starts, ``release_job`` when it ends) and checks what every
node then holds: which jobs run, wait (held) or were skipped, and the execution records.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler import Job, JobOutcome, JobResult, Schedule
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling import overlap
from mesh.scheduling.controls import Controls, with_controls
from mesh.scheduling.state import SchedulerState, dump_job, dump_result, dump_schedule, to_wire

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
LEADER = "n1@1"


class Machine:
    """A state machine and the commands a leader would commit to it."""

    def __init__(self, state: SchedulerState | None = None) -> None:
        self.state = state or SchedulerState()
        self.index = 0

    def apply(self, command: dict[str, Any]) -> Any:
        self.index += 1
        return self.state.apply(Entry(1, self.index, COMMAND, command))

    def fire(self, n: int, policy: str, *, grace: float | None = None) -> Job:
        """The job of fire time ``T0 + n s`` of schedule "s", committed as a leader does."""
        at = T0 + n * S
        job = Job(
            task_id="t",
            schedule_id="s",
            scheduled_fire_time=at,
            start_deadline=at + grace * S if grace is not None else None,
            executor="x",
            metadata=with_controls({}, Controls(overlap=policy)),
        )
        self.apply({"op": "add_job", "job": dump_job(job)})
        return job

    def start(self, job: Job) -> list[str]:
        return self.apply(
            {
                "op": "acquire_jobs",
                "scheduler_id": LEADER,
                "ids": [str(job.id)],
                "until": (T0 + 60 * S).isoformat(),
                "term": 1,
            }
        )

    def finish(self, job: Job, at: datetime, outcome: str | None = None) -> None:
        result = JobResult.from_job(job, JobOutcome.success, started_at=at, finished_at=at)
        command = {
            "op": "release_job",
            "scheduler_id": LEADER,
            "job_id": str(job.id),
            "result": dump_result(result),
        }
        if outcome is not None:
            command["outcome"] = outcome
        self.apply(command)

    def job(self, job: Job) -> Any:
        return self.state.jobs.get(job.id)

    def records(self) -> list[dict[str, Any]]:
        return list(self.state.executions)


def test_allow_all_queues_every_fire_while_one_runs() -> None:
    m = Machine()
    first = m.fire(0, "allow_all")
    m.start(first)
    second = m.fire(1, "allow_all")
    assert m.job(second) is not None and not m.job(second).held
    assert m.start(second) == [str(second.id)]


def test_skip_records_the_fire_as_skipped_and_keeps_it_fired() -> None:
    m = Machine()
    first = m.fire(0, "skip")
    m.start(first)
    second = m.fire(1, "skip")
    assert m.job(second) is None
    [record] = m.records()
    assert record["outcome"] == "skipped" and record["reason"] == overlap.REASON
    assert record["job_id"] == str(second.id)
    assert record["scheduled_fire_time"] == (T0 + S).isoformat()
    # The fire time stays fired: a new leader replaying it adds nothing.
    m.apply({"op": "add_job", "job": dump_job(second)})
    assert m.job(second) is None and len(m.records()) == 1
    assert m.state.fires_deduplicated == 1


def test_skip_runs_a_fire_once_the_previous_run_finished() -> None:
    m = Machine()
    first = m.fire(0, "skip")
    m.start(first)
    m.finish(first, T0 + S / 2)
    second = m.fire(1, "skip")
    assert m.job(second) is not None and not m.job(second).held


def test_buffer_one_holds_one_fire_skips_the_next_and_releases_the_held_one() -> None:
    m = Machine()
    first = m.fire(0, "buffer_one", grace=2)
    m.start(first)
    second = m.fire(1, "buffer_one", grace=2)
    third = m.fire(2, "buffer_one", grace=2)
    assert m.job(second).held
    assert m.job(third) is None
    assert [r["outcome"] for r in m.records()] == ["skipped"]
    # Held: never acquired, never due, not counted as queued work.
    assert m.start(second) == []
    assert m.state.unleased_fire_times(T0 + 10 * S) == (None, None)
    assert m.state.held_jobs == 1
    m.finish(first, T0 + 5 * S)
    released = m.job(second)
    assert not released.held and m.state.held_jobs == 0
    # It waited on purpose: its 2 s of grace count from its release, not its fire time.
    assert released.job.start_deadline == T0 + 7 * S
    assert m.start(second) == [str(second.id)]


def test_buffer_all_holds_every_fire_and_releases_them_one_at_a_time_in_order() -> None:
    m = Machine()
    first = m.fire(0, "buffer_all")
    m.start(first)
    held = [m.fire(n, "buffer_all") for n in (1, 2, 3)]
    assert all(m.job(j).held for j in held)
    m.finish(first, T0 + 5 * S)
    assert [m.job(j).held for j in held] == [False, True, True]
    m.start(held[0])
    m.finish(held[0], T0 + 6 * S)
    assert [m.job(j) is None for j in held[:1]] == [True]
    assert [m.job(j).held for j in held[1:]] == [False, True]
    assert m.records()[-1]["outcome"] == "success"


def test_buffer_all_skips_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlap, "MAX_BUFFERED", 2)
    m = Machine()
    m.start(m.fire(0, "buffer_all"))
    held = [m.fire(n, "buffer_all") for n in (1, 2, 3)]
    assert [m.job(j) is not None for j in held] == [True, True, False]
    assert m.records()[-1]["outcome"] == "skipped"


def test_cancel_other_flags_the_running_job_and_holds_the_new_one_until_it_ends() -> None:
    m = Machine()
    first = m.fire(0, "cancel_other")
    m.start(first)
    second = m.fire(1, "cancel_other")
    assert m.job(first).cancel and list(m.state.cancelling) == [first.id]
    assert m.job(second).held
    m.finish(first, T0 + 2 * S, outcome="cancelled")
    assert m.records()[-1]["outcome"] == "cancelled"
    assert m.records()[-1]["reason"] == overlap.REASON
    assert not m.job(second).held and not m.state.cancelling


def test_cancel_other_ends_a_run_that_never_started_at_once() -> None:
    m = Machine()
    first = m.fire(0, "cancel_other")  # queued, not started by anyone
    second = m.fire(1, "cancel_other")
    assert m.job(first) is None
    assert not m.job(second).held and not m.job(second).cancel
    [record] = m.records()
    assert (record["job_id"], record["outcome"]) == (str(first.id), "cancelled")


def test_cancel_other_replaces_an_older_held_fire() -> None:
    m = Machine()
    first = m.fire(0, "cancel_other")
    m.start(first)
    second = m.fire(1, "cancel_other")
    third = m.fire(2, "cancel_other")
    assert m.job(second) is None and m.job(third).held
    assert m.state.held_jobs == 1
    assert [r["outcome"] for r in m.records()] == ["cancelled"]


def test_a_release_of_another_schedules_job_releases_nothing() -> None:
    m = Machine()
    first = m.fire(0, "buffer_one")
    m.start(first)
    second = m.fire(1, "buffer_one")
    other = Job(task_id="t", executor="x")  # a run-now job: no schedule, no policy
    m.apply({"op": "add_job", "job": dump_job(other)})
    m.start(other)
    m.finish(other, T0 + 2 * S)
    assert m.job(second).held


def test_held_and_flagged_jobs_survive_a_snapshot_and_restore() -> None:
    m = Machine()
    first = m.fire(0, "cancel_other")
    m.start(first)
    second = m.fire(1, "cancel_other")
    restored = SchedulerState()
    restored.restore(m.state.snapshot())
    assert restored.jobs[second.id].held and restored.held_jobs == 1
    assert restored.jobs[first.id].cancel and list(restored.cancelling) == [first.id]
    # The restored node goes on as the original would: the release un-holds.
    again = Machine(restored)
    again.finish(first, T0 + 2 * S, outcome="cancelled")
    assert not restored.jobs[second.id].held and not restored.cancelling


def test_reset_leases_keeps_held_jobs_held() -> None:
    m = Machine()
    first = m.fire(0, "buffer_one")
    m.start(first)
    second = m.fire(1, "buffer_one")
    m.apply({"op": "reset_leases", "term": 2})
    assert m.job(second).held
    assert m.state.unleased_fire_times(T0 + 10 * S)[0].id == first.id


def test_a_fire_round_does_not_lease_a_held_job() -> None:
    m = Machine()
    first = m.fire(0, "buffer_one")
    m.start(first)
    trigger = IntervalTrigger(seconds=1, start_time=T0 + S)
    s = Schedule(
        id="s", task_id="t", trigger=trigger, next_fire_time=trigger.next(), job_executor="x"
    )
    m.apply({"op": "add_schedule", "schedule": dump_schedule(s)})
    job = Job(
        task_id="t",
        schedule_id="s",
        scheduled_fire_time=T0 + S,
        executor="x",
        metadata=with_controls({}, Controls(overlap="buffer_one")),
    )
    trigger.next()
    lease = {"until": (T0 + 60 * S).isoformat(), "term": 1, "jobs": {str(job.id): "h1"}}
    applied = m.apply(
        {
            "op": "fire_round",
            "scheduler_id": LEADER,
            "lease": lease,
            "schedules": [
                {
                    "schedule_id": "s",
                    "fired_from": (T0 + S).isoformat(),
                    "trigger": to_wire(trigger),
                    "last_fire_time": (T0 + S).isoformat(),
                    "next_fire_time": (T0 + 2 * S).isoformat(),
                    "jobs": [dump_job(job)],
                }
            ],
        }
    )
    assert applied["jobs"] == [str(job.id)]
    js = m.job(job)
    assert js.held and js.job.acquired_by is None and js.handler is None
    assert m.state.running_jobs("t") == 1  # only the first


def test_flagging_a_run_to_cancel_wakes_the_leaders_watchers() -> None:
    """The leader's cancel loop sleeps until the state machine flags a run (no polling)."""
    m = Machine()
    woken: list[int] = []
    unwatch = m.state.watch(lambda: woken.append(1))
    first = m.fire(0, "cancel_other")
    m.start(first)
    assert woken == []
    m.fire(1, "cancel_other")
    assert woken == [1] and first.id in m.state.cancelling
    unwatch()
    m.fire(2, "cancel_other")
    assert woken == [1]
