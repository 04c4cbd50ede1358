"""The schedule controls together, in the replicated state machine: a retry continues its fire
past the overlap policy, a broadcast run's retry stays that run, and a job that leaves the state
leaves every index (retries in their backoff ended by ``cancel_other`` included)."""

from __future__ import annotations

from datetime import timedelta

from mesh.scheduling.controls import Controls, Retry, Target, controls_of
from mesh.scheduling.state import idempotency_key
from tests.test_retry_unit import GRACE, T0, Log, fire, run, schedule

S = timedelta(seconds=1)
RETRY = Retry(max_attempts=3, initial_delay=2, multiplier=2, max_delay=60)


def setup(controls: Controls) -> tuple[Log, object]:
    from mesh.scheduling.state import dump_schedule

    log = Log()
    s = schedule(controls)
    log.apply({"op": "add_schedule", "schedule": dump_schedule(s), "conflict_policy": "replace"})
    return log, s


def test_a_retry_is_not_judged_by_the_overlap_policy_and_keeps_a_held_fire_waiting() -> None:
    log, s = setup(Controls(overlap="buffer_one", retry=RETRY))
    first = fire(log, s)
    second = fire(log, s, T0 + 60 * S)  # while the first is unfinished: held
    assert log.state.jobs[second.id].held
    run(log, first.id, "error", T0 + 5 * S)
    retry = next(js for js in log.state.jobs.values() if js.origin == "retry")
    assert not retry.held  # the fire's next try runs, whatever the policy
    # ... and the held fire still waits: the fire before it is not over yet.
    assert log.state.jobs[second.id].held
    run(log, retry.job.id, "success", T0 + 10 * S)
    assert not log.state.jobs[second.id].held
    assert log.state.held_jobs == 0


def test_cancel_other_ending_a_retry_in_its_backoff_leaves_no_index_behind() -> None:
    log, s = setup(Controls(overlap="cancel_other", retry=RETRY))
    first = fire(log, s)
    run(log, first.id, "error", T0 + 5 * S)
    retry = next(js for js in log.state.jobs.values() if js.origin == "retry")
    assert log.state.backing_off(T0 + 6 * S) == 1
    fire(log, s, T0 + 60 * S)  # cancels the queued retry (never started): ended at once
    assert retry.job.id not in log.state.jobs
    assert log.state.backing_off(T0 + 6 * S) == 0  # no KeyError, nothing counted twice
    assert log.state.executions[-1]["outcome"] == "cancelled"


def test_a_broadcast_runs_retry_keeps_its_shard_and_handler() -> None:
    log, s = setup(Controls(target=Target(broadcast=True), retry=RETRY))
    job = fire(log, s)
    log.apply(
        {"op": "acquire_jobs", "scheduler_id": "n1", "ids": [str(job.id)],
         "until": (T0 + 60 * S).isoformat(), "term": 1}
    )  # fmt: skip
    runs = log.apply(
        {"op": "broadcast", "scheduler_id": "n1", "job_id": str(job.id), "handlers": ["a", "b"]}
    )
    assert len(runs) == 2
    second = next(js for js in log.state.jobs.values() if js.shard == (1, 2))
    run(log, second.job.id, "error", T0 + 5 * S)
    retry = next(js for js in log.state.jobs.values() if js.origin == "retry")
    assert retry.shard == (1, 2) and retry.handler == "b"
    assert idempotency_key(retry.job) == idempotency_key(second.job)
    assert controls_of(retry.job).target == Target(broadcast=True)
    assert retry.job.start_deadline == retry.not_before + GRACE
