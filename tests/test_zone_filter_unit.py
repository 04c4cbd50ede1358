"""The zone filter (mesh.zones.filter): what of the scheduler state reaches a replica of a zone.

Commands are built as the leader's store builds them (``mesh.scheduling.state`` dumps of real
APScheduler objects) and applied to real ``SchedulerState``s: a replica that restores the
filtered snapshot and applies the filtered commands must hold exactly the filtered state.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from apscheduler import Job, JobOutcome, JobResult, Schedule, Task
from apscheduler.triggers.interval import IntervalTrigger

from mesh.config import ZoneConfig
from mesh.consensus.messages import COMMAND, Entry
from mesh.scheduling.rounds import Lease, plan_round, round_command
from mesh.scheduling.state import (
    RemoteJobError,
    SchedulerState,
    dump_job,
    dump_result,
    dump_schedule,
    dump_task,
    load_schedule,
    to_wire,
)
from mesh.zones.filter import (
    DROP_KINDS,
    STRICTEST,
    ZoneFilter,
    filter_command,
    filter_for,
    filter_snapshot,
    zone_filters,
)

SECRET = "PLANTED-S3CRET-0xfeed"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def commands() -> list[dict[str, Any]]:
    """A fresh copy of the same commands every time (see :func:`_commands`)."""
    return copy.deepcopy(_COMMANDS)


def _commands() -> list[dict[str, Any]]:
    """A schedule's life: task, schedule, a fired job, its run, a failed run-now job."""
    task = Task(
        id="t", func="mesh.sample_tasks:echo", job_executor="async", metadata={"owner": SECRET}
    )
    schedule = Schedule(
        id="s",
        task_id="t",
        trigger=IntervalTrigger(seconds=1, start_time=NOW),
        args=(SECRET, {"nested": SECRET}),
        kwargs={"message": SECRET, "keep": "visible-kwarg"},
        metadata={"team": SECRET, "label": "visible-meta"},
        next_fire_time=NOW,
        job_executor="async",
    )
    job = Job(
        task_id="t",
        args=(SECRET,),
        kwargs={"message": SECRET},
        schedule_id="s",
        scheduled_fire_time=NOW,
        metadata={"team": SECRET},
        result_expiration_time=timedelta(hours=1),
        executor="async",
    )
    failed = Job(
        task_id="t",
        args=(),
        kwargs={"x": SECRET},
        executor="async",
        result_expiration_time=timedelta(hours=1),
    )
    ok = JobResult(
        job_id=job.id,
        outcome=JobOutcome.success,
        started_at=NOW,
        finished_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        return_value={"answer": SECRET},
    )
    bad = JobResult(
        job_id=failed.id,
        outcome=JobOutcome.error,
        started_at=NOW,
        finished_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        exception=RemoteJobError("ValueError", f"bad value {SECRET}"),
    )
    until = (NOW + timedelta(seconds=30)).isoformat()
    # A second schedule fired by a round (mesh.scheduling.rounds), its jobs leased ahead.
    ahead = attrs.evolve(schedule, id="r", trigger=IntervalTrigger(seconds=1, start_time=NOW))
    fired = plan_round(
        [load_schedule(dump_schedule(ahead))], NOW, horizon=NOW + timedelta(seconds=1)
    )
    lease = Lease(NOW + timedelta(seconds=30), 1, {str(j.id): "h1" for j in fired[0].jobs})
    return [
        {"op": "add_task", "task": dump_task(task)},
        {"op": "add_schedule", "schedule": dump_schedule(schedule), "conflict_policy": "exception"},
        {"op": "acquire_schedules", "ids": ["s"], "scheduler_id": "n0@1", "until": until},
        {"op": "add_job", "job": dump_job(job)},
        {
            "op": "batch",
            "commands": [
                {"op": "add_job", "job": dump_job(failed)},
                {
                    "op": "acquire_jobs",
                    "ids": [str(job.id), str(failed.id)],
                    "scheduler_id": "n0@1",
                    "until": until,
                    "term": 1,
                },
            ],
        },
        {
            "op": "release_job",
            "scheduler_id": "n0@1",
            "job_id": str(job.id),
            "result": dump_result(ok),
            "handler_id": "h1",
        },
        {
            "op": "release_job",
            "scheduler_id": "n0@1",
            "job_id": str(failed.id),
            "result": dump_result(bad),
            "handler_id": "h1",
        },
        {"op": "add_schedule", "schedule": dump_schedule(ahead), "conflict_policy": "exception"},
        round_command("n0@1", fired, to_wire, dump_job, lease),
    ]


_COMMANDS = _commands()


def apply_all(state: SchedulerState, cmds: list[dict[str, Any] | None], start: int = 1) -> None:
    for i, c in enumerate(cmds, start):
        state.apply(Entry(term=1, index=i, kind=COMMAND, data=c))


def primary_state() -> SchedulerState:
    state = SchedulerState()
    apply_all(state, commands())
    return state


def wire(value: Any) -> str:
    return json.dumps(value)


# --------------------------------------------------------------------------- drop kinds


def test_the_strictest_filter_lets_no_planted_secret_through_commands_or_snapshot() -> None:
    planted = [c for c in commands() if SECRET in wire(c)]
    assert len(planted) == 8  # every command that carries user data
    for c in planted:
        assert SECRET not in wire(filter_command(c, STRICTEST))
    snap = primary_state().snapshot()
    assert SECRET in snap.decode()
    assert SECRET not in filter_snapshot(snap, STRICTEST).decode()


def test_a_fire_rounds_jobs_are_filtered_and_its_leases_kept() -> None:
    f = ZoneFilter(drop=["args", "kwargs"], sensitive_keys=[])
    c = commands()[-1]
    out = filter_command(c, f)
    [row] = out["schedules"]
    assert [(j["args"], j["kwargs"]) for j in row["jobs"]] == [([], {}), ([], {})]
    assert row["trigger"] == c["schedules"][0]["trigger"]
    assert out["lease"] == c["lease"]


def test_dropping_args_empties_them_and_keeps_everything_else() -> None:
    f = ZoneFilter(drop=["args"], sensitive_keys=[])
    out = filter_command(commands()[1], f)
    assert out["schedule"]["args"] == []
    assert out["schedule"]["kwargs"] == {"message": SECRET, "keep": "visible-kwarg"}
    assert out["schedule"]["metadata"]["label"] == "visible-meta"
    assert out["schedule"]["trigger"] == commands()[1]["schedule"]["trigger"]


def test_dropping_kwargs_empties_them_in_schedules_and_jobs() -> None:
    f = ZoneFilter(drop=["kwargs"], sensitive_keys=[])
    cmds = commands()
    assert filter_command(cmds[1], f)["schedule"]["kwargs"] == {}
    assert filter_command(cmds[3], f)["job"]["kwargs"] == {}
    assert filter_command(cmds[3], f)["job"]["args"] == [SECRET]
    assert filter_command(cmds[4], f)["commands"][0]["job"]["kwargs"] == {}


def test_dropping_metadata_empties_it_in_tasks_schedules_and_jobs() -> None:
    f = ZoneFilter(drop=["metadata"], sensitive_keys=[])
    cmds = commands()
    assert filter_command(cmds[0], f)["task"]["metadata"] == {}
    assert filter_command(cmds[1], f)["schedule"]["metadata"] == {}
    assert filter_command(cmds[3], f)["job"]["metadata"] == {}
    assert filter_command(cmds[1], f)["schedule"]["kwargs"]["keep"] == "visible-kwarg"


def test_dropping_results_nulls_return_values_but_keeps_outcomes() -> None:
    f = ZoneFilter(drop=["results"], sensitive_keys=[])
    out = filter_command(commands()[5], f)
    assert out["result"]["return_value"] is None
    assert out["result"]["outcome"] == "success"
    snap = json.loads(filter_snapshot(primary_state().snapshot(), f))
    assert all(r["return_value"] is None for r in snap["results"])


def test_dropping_errors_nulls_exceptions_and_execution_errors() -> None:
    f = ZoneFilter(drop=["errors"], sensitive_keys=[])
    out = filter_command(commands()[6], f)
    assert out["result"]["exception"] is None
    assert out["result"]["outcome"] == "error"
    snap = json.loads(filter_snapshot(primary_state().snapshot(), f))
    assert [e["outcome"] for e in snap["executions"]] == ["success", "error"]
    assert all(e["error"] is None for e in snap["executions"])
    kept = json.loads(filter_snapshot(primary_state().snapshot(), ZoneFilter(drop=[])))
    assert kept["executions"][1]["error"]["type"] == "ValueError"


def test_a_filter_with_nothing_dropped_and_no_sensitive_keys_changes_nothing() -> None:
    f = ZoneFilter(drop=[], sensitive_keys=[])
    for c in commands():
        assert filter_command(c, f) == c
    snap = json.loads(primary_state().snapshot())
    # The alert outbox is the leader's delivery queue (webhook URLs, errors): never a replica's.
    del snap["alerts"]
    assert json.loads(filter_snapshot(json.dumps(snap).encode(), f)) == snap


@pytest.mark.parametrize("kind", DROP_KINDS)
def test_each_drop_kind_leaves_the_filtered_commands_applicable(kind: str) -> None:
    # The replica's view: restore nothing, apply the filtered commands; it must equal the
    # primary's state filtered as a snapshot (one function for both paths).
    f = ZoneFilter(drop=[kind])
    replica = SchedulerState(alerts=False)  # as a zone replica holds it
    apply_all(replica, [filter_command(c, f) for c in commands()])
    expected = json.loads(filter_snapshot(primary_state().snapshot(), f))
    assert json.loads(replica.snapshot()) == expected


def test_the_strictest_filter_leaves_the_filtered_commands_applicable() -> None:
    replica = SchedulerState(alerts=False)  # as a zone replica holds it
    apply_all(replica, [filter_command(c, STRICTEST) for c in commands()])
    assert json.loads(replica.snapshot()) == json.loads(
        filter_snapshot(primary_state().snapshot(), STRICTEST)
    )
    assert replica.schedules["s"].kwargs == {}
    assert [e["outcome"] for e in replica.executions] == ["success", "error"]


def test_a_filtered_snapshot_restores_into_a_scheduler_state() -> None:
    replica = SchedulerState(alerts=False)  # as a zone replica holds it
    f = ZoneFilter(drop=["kwargs"], sensitive_keys=["nested"])
    replica.restore(filter_snapshot(primary_state().snapshot(), f))
    assert replica.schedules["s"].kwargs == {}
    assert replica.schedules["s"].args == (SECRET, {"nested": "***"})
    assert replica.tasks["t"].metadata == {"owner": SECRET}


# --------------------------------------------------------------------------- sensitive keys


def test_sensitive_keys_are_masked_at_any_depth_in_what_is_kept() -> None:
    f = ZoneFilter(drop=[], sensitive_keys=["password", "api_key"])
    c = commands()[1]
    c["schedule"]["kwargs"] = {
        "db": {"hosts": [{"name": "a", "password": SECRET}]},
        "X-Api-Key": SECRET,
        "plain": "kept",
    }
    c["schedule"]["args"] = [[{"deep": {"password": SECRET}}]]
    c["schedule"]["metadata"] = {"db_password": SECRET}
    out = filter_command(c, f)["schedule"]
    assert out["kwargs"] == {
        "db": {"hosts": [{"name": "a", "password": "***"}]},
        "X-Api-Key": "***",
        "plain": "kept",
    }
    assert out["args"] == [[{"deep": {"password": "***"}}]]
    assert out["metadata"] == {"db_password": "***"}
    assert SECRET in wire(c)  # the original is never mutated


def test_sensitive_keys_are_masked_in_results_and_snapshots() -> None:
    f = ZoneFilter(drop=[], sensitive_keys=["answer", "team", "owner", "message"])
    out = filter_command(commands()[5], f)
    assert out["result"]["return_value"] == {"answer": "***"}
    snap = filter_snapshot(primary_state().snapshot(), f).decode()
    for kept in ('"answer":"***"', '"team":"***"', '"owner":"***"', '"message":"***"'):
        assert kept in snap


# --------------------------------------------------------------------------- zones


def test_an_unconfigured_zone_or_no_zone_gets_the_strictest_filter() -> None:
    filters = zone_filters({"dmz": ZoneConfig(drop=("kwargs",))})
    assert filter_for(filters, "dmz") == ZoneFilter(drop=["kwargs"])
    assert filter_for(filters, "elsewhere") is STRICTEST
    assert filter_for(filters, None) is STRICTEST
    assert STRICTEST.drop == frozenset(DROP_KINDS)


def test_a_configured_zone_without_drop_drops_everything() -> None:
    assert zone_filters({"eu": ZoneConfig()})["eu"].drop == frozenset(DROP_KINDS)


def test_an_unknown_drop_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown drop kinds"):
        ZoneFilter(drop=["passwords"])


# --------------------------------------------------------------------------- what it does not know


@pytest.mark.parametrize(
    "command",
    [
        {"op": "set", "key": "k", "value": SECRET},  # not a scheduler command
        {"op": "future_op", "payload": SECRET},
        {"no_op": SECRET},
        [SECRET],
        SECRET,
        None,
    ],
)
def test_what_the_filter_does_not_know_does_not_pass(command: Any) -> None:
    assert filter_command(command, ZoneFilter(drop=[])) is None


def test_unknown_sub_commands_of_a_batch_are_left_out() -> None:
    c = {"op": "batch", "commands": [{"op": "future_op", "x": SECRET}, {"op": "reset_leases"}]}
    assert filter_command(c, ZoneFilter(drop=[])) == {
        "op": "batch",
        "commands": [{"op": "reset_leases"}],
    }


@pytest.mark.parametrize(
    "command",
    [
        {"op": "add_schedule", "schedule": [SECRET]},
        {"op": "add_job", "job": None},
        {"op": "release_job", "result": SECRET},
        {"op": "batch", "commands": {"x": SECRET}},
    ],
)
def test_malformed_commands_never_raise(command: dict[str, Any]) -> None:
    filter_command(command, STRICTEST)  # the state machine refuses these later; no crash here


def test_unknown_snapshot_sections_are_left_out() -> None:
    snap = json.loads(primary_state().snapshot())
    snap["future_section"] = {"secret": SECRET}
    out = json.loads(filter_snapshot(json.dumps(snap).encode(), ZoneFilter(drop=[])))
    assert "future_section" not in out
    assert filter_snapshot(b"", STRICTEST) == b""
