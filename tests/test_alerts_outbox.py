"""The alert outbox (mesh.scheduling.alerts): which events the state machine records, with
which target and key, deterministically on every node, bounded, and forgotten once sent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from apscheduler import Job, JobOutcome, JobResult, Schedule
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling import alerts
from mesh.scheduling.controls import Controls, Notify, with_controls
from mesh.scheduling.state import SchedulerState, dump_job, dump_result, dump_schedule

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOOK = "https://ops.example/hook"
EVERYTHING = ["failure", "missed", "skipped", "timeout", "paused", "no_handler"]


class Log:
    """Applies commands to one or more states as committed entries (same index on each)."""

    def __init__(self, *states: SchedulerState) -> None:
        self.states = states or (SchedulerState(),)
        self.index = 0

    @property
    def state(self) -> SchedulerState:
        return self.states[0]

    def apply(self, command: dict[str, Any]) -> Any:
        self.index += 1
        results = [s.apply(Entry(1, self.index, COMMAND, command)) for s in self.states]
        return results[0]

    def schedule(self, sid: str = "s", *, notify: Notify | None = None, paused: bool = False,
                 note: str = "") -> Schedule:  # fmt: skip
        metadata = with_controls({}, Controls(notify=notify, note=note))
        trigger = IntervalTrigger(seconds=10, start_time=T0)
        s = Schedule(id=sid, task_id="t", trigger=trigger, next_fire_time=T0, paused=paused,
                     metadata=metadata, job_executor="x")  # fmt: skip
        self.apply(
            {"op": "add_schedule", "schedule": dump_schedule(s), "conflict_policy": "replace"}
        )
        return s

    def run(self, sid: str, outcome: str, *, at: datetime = T0, started: bool = True) -> Job:
        """A job of ``sid`` fired at ``at`` and released with ``outcome``."""
        schedule = self.state.schedules.get(sid)
        job = Job(task_id="t", schedule_id=sid, scheduled_fire_time=at, executor="x",
                  metadata=dict(schedule.metadata) if schedule else {})  # fmt: skip
        self.apply({"op": "add_job", "job": dump_job(job)})
        aps = JobOutcome[outcome] if outcome in JobOutcome.__members__ else JobOutcome.error
        result = JobResult.from_job(
            job,
            aps,
            started_at=at + timedelta(seconds=0.2) if started else None,
            finished_at=at + timedelta(seconds=1),
            exception=RuntimeError("boom") if aps is JobOutcome.error else None,
        )
        release = {"op": "release_job", "job_id": str(job.id), "result": dump_result(result)}
        if outcome not in JobOutcome.__members__:
            release["outcome"] = outcome
        assert self.apply(release)
        return job


def events(state: SchedulerState) -> list[dict[str, Any]]:
    return list(state.outbox.events.values())


@pytest.mark.parametrize(
    ("outcome", "event"),
    [
        ("error", "failure"),
        ("abandoned", "failure"),
        ("missed_start_deadline", "missed"),
        ("skipped", "skipped"),
        ("timeout", "timeout"),
        ("no_handler", "no_handler"),
    ],
)
def test_each_outcome_records_its_event(outcome: str, event: str) -> None:
    log = Log()
    log.schedule(notify=Notify(webhook=HOOK, on=EVERYTHING))
    job = log.run("s", outcome)
    [ev] = events(log.state)
    assert ev["event"] == event
    assert (ev["schedule_id"], ev["outcome"], ev["job_id"]) == ("s", outcome, str(job.id))
    assert ev["fire_time"] == T0.isoformat()
    assert ev["webhook"] == HOOK


@pytest.mark.parametrize("outcome", ["success", "cancelled"])
def test_other_outcomes_record_nothing(outcome: str) -> None:
    log = Log()
    log.schedule(notify=Notify(webhook=HOOK, on=EVERYTHING))
    log.run("s", outcome)
    assert events(log.state) == []


def test_the_error_is_part_of_a_failure_event() -> None:
    log = Log()
    log.schedule(notify=Notify(webhook=HOOK, on=["failure"]))
    log.run("s", "error")
    assert events(log.state)[0]["error"] == {"type": "RuntimeError", "message": "boom"}


def test_a_failed_try_followed_by_a_retry_alerts_nothing_the_last_try_does() -> None:
    log = Log()
    log.schedule(notify=Notify(webhook=HOOK, on=EVERYTHING))
    base = {"job_id": "j1", "schedule_id": "s", "scheduled_fire_time": T0.isoformat(),
            "started_at": None, "error": None}  # fmt: skip
    entry = Entry(1, 99, COMMAND, {})
    for outcome in ("error", "timeout", "no_handler", "abandoned"):
        retry_at = (T0 + timedelta(seconds=5)).isoformat()
        log.state._record({**base, "outcome": outcome, "try": 1, "retry_at": retry_at}, entry)
    assert events(log.state) == []
    log.state._record({**base, "outcome": "error", "try": 2}, entry)
    assert [ev["event"] for ev in events(log.state)] == ["failure"]


def test_only_the_events_listed_in_on_are_recorded() -> None:
    log = Log()
    log.schedule(notify=Notify(webhook=HOOK, on=["missed"]))
    log.run("s", "error")
    log.run("s", "missed_start_deadline", at=T0 + timedelta(seconds=10), started=False)
    assert [ev["event"] for ev in events(log.state)] == ["missed"]


def test_without_notify_nor_default_nothing_is_recorded() -> None:
    log = Log()
    log.schedule()
    log.run("s", "error")
    assert events(log.state) == []


def test_the_replicated_default_applies_to_schedules_without_notify() -> None:
    log = Log()
    log.schedule("plain")
    log.schedule("own", notify=Notify(webhook="https://own.example/x", on=["failure"]))
    assert log.apply({"op": "notify_default", "notify": {"webhook": HOOK, "on": ["failure"]}})
    log.run("plain", "error")
    log.run("own", "error")
    assert [ev["webhook"] for ev in events(log.state)] == [HOOK, "https://own.example/x"]
    assert log.apply({"op": "notify_default", "notify": None})
    log.run("plain", "error", at=T0 + timedelta(seconds=10))
    assert len(events(log.state)) == 2


def test_a_default_this_version_cannot_read_is_ignored() -> None:
    log = Log()
    assert log.apply({"op": "notify_default", "notify": {"webhook": "ftp://x", "on": []}}) is False
    assert log.state.outbox.default is None


def test_pausing_a_running_schedule_records_paused_with_its_note() -> None:
    log = Log()
    s = log.schedule(notify=Notify(webhook=HOOK, on=["paused"]))
    paused = attrs.evolve(
        s,
        paused=True,
        metadata=with_controls(
            s.metadata, Controls(notify=Notify(webhook=HOOK, on=["paused"]), note="db migration")
        ),
    )
    log.apply(
        {"op": "add_schedule", "schedule": dump_schedule(paused), "conflict_policy": "replace"}
    )
    [ev] = events(log.state)
    assert (ev["event"], ev["schedule_id"], ev["note"]) == ("paused", "s", "db migration")
    # Paused again while paused, or created paused: no transition, no event.
    log.apply(
        {"op": "add_schedule", "schedule": dump_schedule(paused), "conflict_policy": "replace"}
    )
    log.schedule("new", notify=Notify(webhook=HOOK, on=["paused"]), paused=True)
    assert len(events(log.state)) == 1


def test_every_node_records_the_same_events_with_the_same_keys() -> None:
    log = Log(SchedulerState(), SchedulerState())
    log.schedule(notify=Notify(webhook=HOOK, on=EVERYTHING))
    for i, outcome in enumerate(["error", "timeout", "skipped", "error"]):
        log.run("s", outcome, at=T0 + timedelta(seconds=10 * i))
    a, b = log.states
    assert events(a) == events(b)
    assert len({ev["id"] for ev in events(a)}) == 4


def test_a_snapshot_keeps_the_outbox_and_the_keys_go_on_the_same() -> None:
    log = Log()
    log.schedule(notify=Notify(webhook=HOOK, on=EVERYTHING))
    log.run("s", "error")
    a = log.state
    restored = SchedulerState()
    restored.restore(a.snapshot())
    assert events(restored) == events(a)
    log.states = (a, restored)
    log.run("s", "error", at=T0 + timedelta(seconds=10))
    assert events(restored) == events(a)


def test_the_outbox_is_bounded_dropping_the_oldest() -> None:
    log = Log()
    log.schedule(notify=Notify(webhook=HOOK, on=["failure"]))
    first = None
    for i in range(alerts.MAX_OUTBOX + 3):
        log.run("s", "error", at=T0 + timedelta(seconds=10 * i))
        first = first or next(iter(log.state.outbox.events))
    outbox = log.state.outbox
    assert len(outbox.events) == alerts.MAX_OUTBOX
    assert outbox.dropped == 3
    assert first not in outbox.events


def test_alerts_done_forgets_sent_and_failed_events_and_counts_them() -> None:
    log = Log()
    log.schedule(notify=Notify(webhook=HOOK, on=["failure"]))
    for i in range(3):
        log.run("s", "error", at=T0 + timedelta(seconds=10 * i))
    k1, k2, k3 = log.state.outbox.events
    assert log.apply({"op": "alerts_done", "sent": [k1, "unknown"], "failed": [k2]}) == 2
    assert log.apply({"op": "alerts_done", "sent": [k1]}) == 0  # a second confirmation
    outbox = log.state.outbox
    assert list(outbox.events) == [k3]
    assert (outbox.sent, outbox.failed) == (1, 1)


def test_a_zone_replicas_copy_records_no_alerts() -> None:
    """A replica applies the same records but has no leader to send alerts nor alerts_done to
    clear them: with ``alerts=False`` its outbox stays empty (it would otherwise fill up)."""
    from mesh.scheduling.alerts import Outbox

    outbox = Outbox(enabled=False)
    outbox.set_default({"webhook": "https://ops.example/hook", "on": ["failure"]})
    outbox.on_record(
        {"schedule_id": "s", "outcome": "error", "scheduled_fire_time": None, "job_id": "j",
         "error": {"type": "E", "message": "m"}},
        None,
    )  # fmt: skip
    assert outbox.events == {}
