"""The replicated part of the scenario suite (mesh.scheduling.scenariobook), through the state
machine's commands: what every voter holds about scenarios and their runs."""

from __future__ import annotations

import json
from typing import Any

from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling.scenariobook import MAX_FINISHED, MAX_QUEUED, observe, quantile
from mesh.scheduling.state import SchedulerState

AT = "2026-11-29T10:00:00+00:00"


def apply(state: SchedulerState, command: dict[str, Any], index: int = 1) -> Any:
    return state.apply(Entry(term=1, index=index, kind=COMMAND, data=command))


def start(run_id: str, name: str = "storm", **extra: Any) -> dict[str, Any]:
    run = {
        "run_id": run_id,
        "name": name,
        "version": "v1",
        "definition": {"name": name, "steps": []},
        "parameters": {"n": 1},
        "depends_on": [],
    }
    return {"op": "scenario_start", "runs": [run], "source": "api", "at": AT, **extra}


def progress(run_id: str, term: int, **extra: Any) -> dict[str, Any]:
    return {
        "op": "scenario_progress",
        "run_id": run_id,
        "term": term,
        "leader": "n1",
        "at": AT,
    } | extra


def finish(run_id: str, term: int, status: str = "passed") -> dict[str, Any]:
    return {"op": "scenario_finish", "run_id": run_id, "term": term, "status": status, "at": AT}


def record(schedule_id: str, outcome: str = "success", late_ms: float = 5.0) -> dict[str, Any]:
    return {
        "schedule_id": schedule_id,
        "outcome": outcome,
        "scheduled_fire_time": "2026-11-29T10:00:00+00:00",
        "started_at": f"2026-11-29T10:00:00.{int(late_ms * 1000):06d}+00:00",
    }


def test_a_repeated_start_of_the_same_run_queues_nothing_new() -> None:
    state = SchedulerState()
    assert apply(state, start("a" * 16)) == {"run_id": "a" * 16}
    assert apply(state, start("a" * 16)) == {"run_id": "a" * 16, "existing": True}
    assert state.scenarios.queue == ["a" * 16]


def test_the_queue_is_bounded_and_says_so() -> None:
    state = SchedulerState()
    for i in range(MAX_QUEUED):
        assert "run_id" in apply(state, start(f"{i:016x}"))
    refused = apply(state, start("f" * 16))
    assert "refused" in refused and str(MAX_QUEUED) in refused["refused"]
    assert "f" * 16 not in state.scenarios.runs


def test_progress_of_an_older_term_is_ignored_once_a_newer_term_took_the_run() -> None:
    state = SchedulerState()
    rid = "b" * 16
    apply(state, start(rid))
    assert apply(state, progress(rid, 3, progress={"done": 10}))
    assert apply(state, progress(rid, 4, progress={"done": 5}))  # the new leader resumes
    assert not apply(state, progress(rid, 3, progress={"done": 99}))  # the deposed leader's
    run = state.scenarios.runs[rid]
    assert run["progress"] == {"done": 5} and run["term"] == 4 and run["resumed"] == 1
    assert not apply(state, finish(rid, 3, "error"))
    assert run["status"] == "running"


def test_a_run_ends_once() -> None:
    state = SchedulerState()
    rid = "c" * 16
    apply(state, start(rid))
    apply(state, progress(rid, 2))
    assert apply(state, finish(rid, 2, "passed"))
    assert not apply(state, finish(rid, 2, "error"))
    assert not apply(state, progress(rid, 2, progress={"done": 1}))
    run = state.scenarios.runs[rid]
    assert run["status"] == "passed" and run["definition"] is None
    assert state.scenarios.queue == []


def test_cancelling_a_queued_run_ends_it_and_a_running_one_is_flagged_for_the_runner() -> None:
    state = SchedulerState()
    apply(state, start("1" * 16))
    apply(state, start("2" * 16))
    apply(state, progress("1" * 16, 1))
    assert apply(state, {"op": "scenario_cancel", "run_id": "2" * 16, "at": AT}) == "cancelled"
    assert apply(state, {"op": "scenario_cancel", "run_id": "1" * 16, "at": AT}) == "running"
    assert state.scenarios.runs["1" * 16]["cancel"] is True
    assert state.scenarios.queue == ["1" * 16]


def test_fires_of_a_runs_schedules_are_counted_as_they_apply_and_others_are_not() -> None:
    state = SchedulerState()
    rid = "d" * 16
    apply(state, start(rid))
    apply(state, progress(rid, 1))
    book = state.scenarios
    book.on_record(record(f"scn-{rid}-1-0", "success", 5.0), 0.005)
    book.on_record(record(f"scn-{rid}-1-1", "error"), 0.2)
    book.on_record(record(f"scn-{rid}-1-2", "missed_start_deadline"), None)
    book.on_record(record("scn-eeeeeeeeeeeeeeee-1-0"), 0.001)  # another (unknown) run
    book.on_record(record("nightly"), 0.001)  # not a scenario's
    run = book.runs[rid]
    assert run["fires"] == {"success": 1, "failure": 1, "missed": 1}
    assert run["lateness"]["n"] == 2
    apply(state, finish(rid, 1))
    book.on_record(record(f"scn-{rid}-1-3"), 0.001)  # after the end: not the run's any more
    assert sum(run["fires"].values()) == 3


def test_the_state_machine_counts_a_run_fire_from_its_execution_record() -> None:
    state = SchedulerState()
    rid = "9" * 16
    apply(state, start(rid))
    apply(state, progress(rid, 1))
    state._record(record(f"scn-{rid}-1-0", "success", 12.0), None)  # type: ignore[arg-type]
    run = state.scenarios.runs[rid]
    assert run["fires"] == {"success": 1}
    assert 11.0 <= quantile(run["lateness"], 0.5) <= 12.7  # type: ignore[operator]


def test_finished_runs_beyond_the_history_limit_drop_oldest_first() -> None:
    state = SchedulerState()
    for i in range(MAX_FINISHED + 3):
        rid = f"{i:016x}"
        apply(state, start(rid))
        apply(state, finish(rid, 1, "passed"))
    runs = state.scenarios.runs
    assert len(runs) == MAX_FINISHED
    assert f"{0:016x}" not in runs and f"{MAX_FINISHED + 2:016x}" in runs


def test_the_library_and_runs_survive_a_snapshot_and_restore() -> None:
    state = SchedulerState()
    apply(
        state,
        {
            "op": "scenario_load",
            "name": "storm",
            "version": "v1",
            "description": "d",
            "parameters": {"n": 1},
            "depends_on": [],
            "definition": {"name": "storm"},
            "source": "test: {}",
            "at": AT,
        },
    )
    apply(state, start("a" * 16))
    apply(state, progress("a" * 16, 2, progress={"step": 1, "done": 3}))
    copy = SchedulerState()
    copy.restore(state.snapshot())
    assert copy.scenarios.library == state.scenarios.library
    assert copy.scenarios.runs == state.scenarios.runs
    assert copy.scenarios.queue == ["a" * 16]
    assert json.loads(copy.snapshot()) == json.loads(state.snapshot())


def test_an_empty_book_adds_nothing_to_the_image() -> None:
    assert "scenarios" not in json.loads(SchedulerState().snapshot())


def test_the_library_is_bounded() -> None:
    state = SchedulerState()
    base = {"version": "v", "description": "", "parameters": {}, "depends_on": []}
    for i in range(100):
        load = {"op": "scenario_load", "name": f"s{i}", "definition": {}, "source": "", "at": AT}
        assert apply(state, load | base)["name"] == f"s{i}"
    over = {"op": "scenario_load", "name": "one-more", "definition": {}, "source": "", "at": AT}
    assert "refused" in apply(state, over | base)
    same = {"op": "scenario_load", "name": "s1", "definition": {}, "source": "", "at": AT}
    assert apply(state, same | base)["name"] == "s1"  # replacing one is always possible


def test_quantiles_read_from_the_histogram_are_within_five_percent() -> None:
    h: dict[str, Any] = {}
    for ms in range(1, 1001):
        observe(h, float(ms))
    assert 950 <= quantile(h, 0.95) <= 950 * 1.05  # type: ignore[operator]
    assert 500 <= quantile(h, 0.5) <= 500 * 1.05  # type: ignore[operator]
    assert quantile(h, 1.0) == 1000.0
    assert quantile({}, 0.5) is None
