"""The retry policy in the replicated state machine (docs/scheduling.md, "retry").

Commands are applied to ``SchedulerState`` directly, as every node applies them: a failed
release queues the next try (or pauses the schedule once the tries are exhausted) in the same
apply, from replicated data only, so every node and every snapshot agrees.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from apscheduler import Job, JobOutcome, JobResult, Schedule
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling.controls import Controls, Retry, controls_of, with_controls
from mesh.scheduling.state import (
    SchedulerState,
    dump_job,
    dump_result,
    dump_schedule,
    idempotency_key,
    retry_job_id,
)

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
GRACE = 30 * S
RETRY = Retry(max_attempts=3, initial_delay=2, multiplier=3, max_delay=60)


class Log:
    def __init__(self, state: SchedulerState | None = None) -> None:
        self.state = state or SchedulerState()
        self.index = 0

    def apply(self, command: dict[str, Any]) -> Any:
        self.index += 1
        return self.state.apply(Entry(1, self.index, COMMAND, command))


def schedule(controls: Controls, sid: str = "s") -> Schedule:
    trigger = IntervalTrigger(seconds=60, start_time=T0)
    return Schedule(
        id=sid,
        task_id="t",
        trigger=trigger,
        next_fire_time=trigger.next(),
        misfire_grace_time=GRACE,
        job_executor="x",
        metadata=with_controls({"owner": "ops"}, controls),
    )


def fire(log: Log, s: Schedule, at: datetime = T0, jitter: timedelta = 0 * S) -> Job:
    """The job of ``s``'s fire at ``at``, added as a fire round's job is."""
    job = Job(
        task_id=s.task_id,
        schedule_id=s.id,
        scheduled_fire_time=at + jitter,
        jitter=jitter,
        start_deadline=at + jitter + GRACE,
        executor="x",
        metadata=s.metadata,
        result_expiration_time=0 * S,
    )
    assert log.apply({"op": "add_job", "job": dump_job(job)})
    return job


def setup(controls: Controls) -> tuple[Log, Schedule, Job]:
    log = Log()
    s = schedule(controls)
    log.apply({"op": "add_schedule", "schedule": dump_schedule(s), "conflict_policy": "replace"})
    return log, s, fire(log, s)


def run(log: Log, job_id: UUID, outcome: str, finished_at: datetime) -> dict[str, Any]:
    """Lease the job and release it with ``outcome``; the execution record it wrote."""
    assert log.apply(
        {
            "op": "acquire_jobs",
            "scheduler_id": "n1",
            "ids": [str(job_id)],
            "until": (finished_at + 60 * S).isoformat(),
            "term": 1,
        }
    ) == [str(job_id)]
    job = log.state.jobs[job_id].job
    mesh_outcome = outcome if outcome in ("timeout", "no_handler") else None
    ap_outcome = JobOutcome.error if mesh_outcome else JobOutcome[outcome]
    result = JobResult.from_job(
        job,
        ap_outcome,
        finished_at=finished_at,
        exception=RuntimeError("disk full") if ap_outcome is JobOutcome.error else None,
    )
    command = {
        "op": "release_job",
        "scheduler_id": "n1",
        "job_id": str(job_id),
        "result": dump_result(result),
        "handler_id": "h1",
        **({"outcome": mesh_outcome} if mesh_outcome else {}),
    }
    assert log.apply(command)
    return log.state.executions[-1]


def only_job(log: Log) -> Any:
    (js,) = log.state.jobs.values()
    return js


def test_a_failed_fire_queues_its_next_try_after_the_backoff() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    finished = T0 + 5 * S
    record = run(log, job.id, "error", finished)
    retry = only_job(log)
    assert record["retry_at"] == (finished + 2 * S).isoformat()
    assert (retry.origin, retry.tries, retry.not_before) == ("retry", 2, finished + 2 * S)
    assert retry.job.id == retry_job_id(job.id, 2)
    assert idempotency_key(retry.job) == idempotency_key(job)
    assert retry.job.schedule_id == "s"
    assert retry.job.scheduled_fire_time == job.scheduled_fire_time
    # The misfire grace time still applies, from the end of the backoff.
    assert retry.job.start_deadline == finished + 2 * S + GRACE
    assert retry.job.acquired_by is None
    assert log.state.open_jobs("s") == [retry]


def test_the_backoff_grows_per_try_and_the_last_failure_queues_nothing() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    run(log, job.id, "error", T0 + S)
    second = only_job(log)
    record = run(log, second.job.id, "timeout", T0 + 10 * S)
    third = only_job(log)
    assert record["outcome"] == "timeout"
    assert third.not_before == T0 + 16 * S  # 2 s, then 2 * 3 s
    assert third.tries == 3
    last = run(log, third.job.id, "no_handler", T0 + 20 * S)
    assert last["retry_at"] is None
    assert last["try"] == 3
    assert not log.state.jobs
    assert not log.state.schedules["s"].paused  # on_exhausted: continue


def test_attempt_numbers_keep_rising_across_tries() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    first = run(log, job.id, "error", T0 + S)
    second = run(log, only_job(log).job.id, "error", T0 + 10 * S)
    assert (first["attempt"], first["try"]) == (1, 1)
    assert (second["attempt"], second["try"]) == (2, 2)


def test_success_and_no_policy_queue_no_retry() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    assert run(log, job.id, "success", T0 + S)["retry_at"] is None
    assert not log.state.jobs
    log, _, job = setup(Controls())
    assert run(log, job.id, "error", T0 + S)["retry_at"] is None
    assert not log.state.jobs


def test_a_missed_start_deadline_is_not_a_failure_to_retry() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    assert run(log, job.id, "missed_start_deadline", T0 + S)["retry_at"] is None
    assert not log.state.jobs


def test_a_run_now_job_is_not_retried() -> None:
    log = Log()
    job = Job(task_id="t", executor="x", metadata=with_controls({}, Controls(retry=RETRY)))
    log.apply({"op": "add_job", "job": dump_job(job)})
    assert run(log, job.id, "error", T0 + S)["retry_at"] is None
    assert not log.state.jobs


def test_a_deleted_schedule_is_not_retried() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    log.apply({"op": "remove_schedules", "ids": ["s"]})
    assert run(log, job.id, "error", T0 + S)["retry_at"] is None
    assert not log.state.jobs


def test_exhausted_with_pause_pauses_the_schedule_with_a_note_saying_why() -> None:
    retry = Retry(max_attempts=2, initial_delay=1, on_exhausted="pause")
    log, _, job = setup(Controls(retry=retry, timeout=5))
    run(log, job.id, "error", T0 + S)
    assert not log.state.schedules["s"].paused  # a try is left
    record = run(log, only_job(log).job.id, "error", T0 + 5 * S)
    s = log.state.schedules["s"]
    assert record["retry_at"] is None
    assert s.paused
    note = controls_of(s).note
    assert T0.isoformat() in note
    assert "2 of 2 tries" in note
    assert "RuntimeError: disk full" in note
    # The other controls and the user's metadata are kept.
    assert controls_of(s).retry == retry
    assert controls_of(s).timeout == 5
    assert s.metadata["owner"] == "ops"


def test_the_pause_note_is_bounded() -> None:
    retry = Retry(max_attempts=1, on_exhausted="pause")
    log, _, job = setup(Controls(retry=retry))
    log.apply(
        {
            "op": "acquire_jobs",
            "scheduler_id": "n1",
            "ids": [str(job.id)],
            "until": (T0 + 60 * S).isoformat(),
            "term": 1,
        }
    )
    result = JobResult.from_job(
        job, JobOutcome.error, finished_at=T0 + S, exception=RuntimeError("x" * 5000)
    )
    log.apply(
        {
            "op": "release_job",
            "scheduler_id": "n1",
            "job_id": str(job.id),
            "result": dump_result(result),
        }
    )
    note = controls_of(log.state.schedules["s"]).note
    assert len(note) == 1000
    assert log.state.schedules["s"].paused


def test_a_retry_keeps_the_jitter_so_its_idempotency_key_is_the_fire_s() -> None:
    log = Log()
    s = schedule(Controls(retry=RETRY))
    log.apply({"op": "add_schedule", "schedule": dump_schedule(s), "conflict_policy": "replace"})
    job = fire(log, s, jitter=3 * S)
    run(log, job.id, "error", T0 + 5 * S)
    retry = only_job(log).job
    assert retry.jitter == 3 * S
    assert idempotency_key(retry) == f"s@{T0.isoformat()}"


def test_two_nodes_applying_the_same_commands_create_the_same_retry() -> None:
    a, _, job = setup(Controls(retry=RETRY))
    b = Log(SchedulerState())
    b.state.restore(a.state.snapshot())
    run(a, job.id, "error", T0 + S)
    run(b, job.id, "error", T0 + S)
    assert json.loads(a.state.snapshot()) == json.loads(b.state.snapshot())
    assert set(a.state.jobs) == set(b.state.jobs) == {retry_job_id(job.id, 2)}


def test_a_snapshot_taken_mid_backoff_restores_the_waiting_retry() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    run(log, job.id, "error", T0 + S)
    before = only_job(log)
    restored = SchedulerState()
    restored.restore(log.state.snapshot())
    (after,) = restored.jobs.values()
    assert (after.origin, after.tries, after.not_before, after.attempts) == (
        before.origin,
        before.tries,
        before.not_before,
        before.attempts,
    )
    assert restored.backing_off(T0 + 2 * S) == 1
    assert restored.backing_off(T0 + 3 * S) == 0
    # The restored state goes on exactly as the original: the third try, same id.
    follower = Log(restored)
    run(follower, after.job.id, "error", T0 + 4 * S)
    assert only_job(follower).job.id == retry_job_id(after.job.id, 3)


def test_a_retry_is_due_at_the_end_of_its_backoff_not_at_its_fire_time() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    run(log, job.id, "error", T0 + S)
    due, upcoming = log.state.unleased_fire_times(T0 + 2 * S)
    assert (due, upcoming) == (None, T0 + 3 * S)
    due, upcoming = log.state.unleased_fire_times(T0 + 3 * S)
    assert due is not None and due.id == retry_job_id(job.id, 2)


def test_a_new_leader_s_reset_keeps_the_retry_and_its_backoff() -> None:
    log, _, job = setup(Controls(retry=RETRY))
    run(log, job.id, "error", T0 + S)
    retry = only_job(log)
    log.apply(
        {
            "op": "acquire_jobs",
            "scheduler_id": "n1",
            "ids": [str(retry.job.id)],
            "until": (T0 + 60 * S).isoformat(),
            "term": 1,
        }
    )
    log.apply({"op": "reset_leases"})
    after = only_job(log)
    assert after.job.acquired_by is None
    assert (after.tries, after.not_before) == (2, T0 + 3 * S)
