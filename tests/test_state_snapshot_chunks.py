"""The scheduler state's image written in pieces (the forked snapshot writer streams them): the
same bytes as the image made at once, so restoring, zone filtering and older files agree."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from apscheduler import Schedule
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling.state import SchedulerState, dump_schedule, dump_task, load_task


def _state(n: int) -> SchedulerState:
    state = SchedulerState()
    start = datetime(2030, 1, 1, tzinfo=UTC)
    task = dump_task(load_task({"id": "t", "func": "mesh.sample_tasks:noop", "job_executor": "x"}))
    commands = [{"op": "add_task", "task": task}]
    for i in range(n):
        s = Schedule(
            id=f"s{i}",
            task_id="t",
            trigger=IntervalTrigger(hours=1, start_time=start + timedelta(minutes=i)),
            next_fire_time=start + timedelta(minutes=i),
            job_executor="x",
        )
        commands.append({"op": "add_schedule", "schedule": dump_schedule(s)})
    state.apply(Entry(term=1, index=1, kind=COMMAND, data={"op": "batch", "commands": commands}))
    return state


def test_the_pieces_make_the_image_json_dumps_makes_of_the_whole_state() -> None:
    state = _state(2500)
    pieces = list(state.snapshot_chunks(per_chunk=1000))
    assert len(pieces) > 3  # the schedules came in several pieces
    image = b"".join(pieces)
    parsed = json.loads(image)
    assert len(parsed["schedules"]) == 2500
    assert list(parsed) == [
        "tasks",
        "schedules",
        "jobs",
        "results",
        "fired",
        "executions",
        "counters",
        "alerts",
    ]
    assert image == json.dumps(parsed, separators=(",", ":")).encode()


def test_an_image_in_pieces_restores_every_schedule_in_due_order() -> None:
    state = _state(1200)
    copy = SchedulerState()
    copy.restore(b"".join(state.snapshot_chunks(per_chunk=500)))
    assert set(copy.schedules) == set(state.schedules)
    assert [s.id for s in copy.upcoming(3)] == ["s0", "s1", "s2"]


def test_an_empty_state_in_pieces_is_a_valid_image() -> None:
    image = b"".join(SchedulerState().snapshot_chunks())
    assert json.loads(image)["schedules"] == []


def _command(state: SchedulerState, index: int, **command: object) -> object:
    return state.apply(Entry(term=1, index=index, kind=COMMAND, data=command))


def test_reset_leases_clears_the_leases_taken_before_a_snapshot_and_after_it() -> None:
    state = _state(50)
    until = "2030-01-01T00:00:00+00:00"
    _command(state, 2, op="acquire_schedules", ids=["s1", "s2"], scheduler_id="a", until=until)
    restored = SchedulerState()
    restored.restore(state.snapshot())
    _command(restored, 3, op="acquire_schedules", ids=["s3"], scheduler_id="a", until=until)
    _command(restored, 4, op="remove_schedules", ids=["s2"])
    assert _command(restored, 5, op="reset_leases") == {"schedules": 2, "jobs": 0}
    assert all(s.acquired_by is None for s in restored.schedules.values())
    # Every lease is gone: a second reset finds none, and every schedule can be acquired again.
    assert _command(restored, 6, op="reset_leases") == {"schedules": 0, "jobs": 0}
    got = _command(
        restored, 7, op="acquire_schedules", ids=["s1", "s3"], scheduler_id="b", until=until
    )
    assert got == ["s1", "s3"]
