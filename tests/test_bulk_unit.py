"""POST /api/schedules/bulk in-process: a FakeReplica leader with a real SchedulingService
(tests/test_http_unit.py's fixtures), counting the log entries the request wrote."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.api import schema
from mesh.contracts import ProposalTooLarge
from tests import test_http_unit as unit
from tests.apierrors import error_of

# The fixtures of tests/test_http_unit.py: ``nodes`` makes a FakeReplica node served over HTTP.
gate, nodes = unit.gate, unit.nodes
SERVED_BY_HEADER, TASK, WAIT = unit.SERVED_BY_HEADER, unit.TASK, unit.WAIT

BULK = "/api/schedules/bulk"


def body(i: int, **extra: Any) -> dict[str, Any]:
    # Paused: nothing fires, so the test's writes are the only schedule commands in the log.
    return {
        "id": f"b{i:05d}",
        "task": TASK,
        "trigger": {"type": "interval", "minutes": 5},
        "paused": True,
        **extra,
    }


def schedule_entries(replica: Any) -> list[dict[str, Any]]:
    """The applied entries that carry add_schedule commands (alone or in a batch)."""
    return [
        c
        for c in replica.commands()
        if c["op"] == "add_schedule"
        or (c["op"] == "batch" and any(s["op"] == "add_schedule" for s in c["commands"]))
    ]


async def test_many_schedules_are_created_in_one_log_entry(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    replica = leader.replica
    before = len(replica.commands())
    resp = await leader.client.post(BULK, json={"schedules": [body(i) for i in range(500)]})
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert (answer["created"], answer["updated"], answer["unchanged"]) == (500, 0, 0)
    assert answer["conflicts"] == []
    assert [s["id"] for s in answer["schedules"]] == [f"b{i:05d}" for i in range(500)]
    assert {s["outcome"] for s in answer["schedules"]} == {"created"}
    assert all(s["next_fire_time"] for s in answer["schedules"])
    # The task existed already (embedded): one log entry, holding the 500 commands.
    new = replica.commands()[before:]
    assert [c["op"] for c in new] == ["batch"]
    assert len(new[0]["commands"]) == 500
    state = replica.state_machine
    assert len(state.schedules) == 500
    s = state.schedules["b00042"]
    assert s.task_id == TASK and s.paused and s.job_executor == "mesh"
    assert s.next_fire_time == s.trigger.start_time  # the first fire time, as add_schedule
    got = await leader.client.get("/api/schedules/b00042")
    assert (await got.json())["next_fire_time"] == answer["schedules"][42]["next_fire_time"]


async def test_a_new_task_is_configured_once_then_the_schedules_in_one_entry(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    before = len(leader.replica.commands())
    items = [body(i, task="bulk_new_task") for i in range(3)] + [body(3)]
    resp = await leader.client.post(BULK, json={"schedules": items})
    answer = await resp.json()
    assert answer["created"] == 4
    assert [c["op"] for c in leader.replica.commands()[before:]] == ["add_task", "batch"]
    assert "bulk_new_task" in answer["warnings"][0]  # no handler offers it yet


async def test_replace_updates_and_an_identical_reapply_writes_nothing(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    replica = leader.replica
    items = [body(i) for i in range(10)]
    assert (await leader.client.post(BULK, json={"schedules": items})).status == 200
    first_fires = {s: replica.state_machine.schedules[s].next_fire_time for s in ("b00001",)}

    # The same file again (starts left to the default): nothing to write.
    entries = len(schedule_entries(replica))
    again = await (await leader.client.post(BULK, json={"schedules": items})).json()
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, 10)
    assert {s["outcome"] for s in again["schedules"]} == {"unchanged"}
    assert len(schedule_entries(replica)) == entries
    assert replica.state_machine.schedules["b00001"].next_fire_time == first_fires["b00001"]

    # Two changed, one new, the rest as they are: one entry with the three commands.
    items[1] = body(1, kwargs={"x": 1})
    items[2] = body(2, trigger={"type": "cron", "expr": "0 3 * * *"})
    changed = await leader.client.post(BULK, json={"schedules": [*items, body(10)]})
    answer = await changed.json()
    assert (answer["created"], answer["updated"], answer["unchanged"]) == (1, 2, 8)
    outcomes = {s["id"]: s["outcome"] for s in answer["schedules"]}
    assert outcomes["b00001"] == outcomes["b00002"] == "updated"
    assert outcomes["b00010"] == "created"
    new = schedule_entries(replica)[entries:]
    assert len(new) == 1 and len(new[0]["commands"]) == 3
    assert replica.state_machine.schedules["b00001"].kwargs == {"x": 1}


async def test_replace_false_reports_conflicts_and_creates_the_rest(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    await leader.client.post(BULK, json={"schedules": [body(0, kwargs={"v": "old"})]})
    items = [body(0, kwargs={"v": "new"}), body(1)]
    resp = await leader.client.post(BULK, json={"schedules": items, "replace": False})
    answer = await resp.json()
    assert resp.status == 200
    assert (answer["created"], answer["updated"], answer["conflicts"]) == (1, 0, ["b00000"])
    assert [s["outcome"] for s in answer["schedules"]] == ["conflict", "created"]
    assert leader.replica.state_machine.schedules["b00000"].kwargs == {"v": "old"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"trigger": {"type": "interval", "seconds": True}},
            "schedules[3].trigger.seconds: must be a number >= 0, got true",
        ),
        ({"colour": "red"}, "schedules[3]: unknown field 'colour' in the schedule"),
        ({"task": ""}, "schedules[3].task: must be a non-empty name"),
        ({"id": "b00001"}, "schedules[3].id: 'b00001' is also the id of schedules[1]"),
    ],
    ids=["field", "unknown", "task", "duplicate"],
)
async def test_a_bad_item_is_named_and_nothing_is_written(
    nodes: Any, bad: dict[str, Any], message: str
) -> None:
    leader = await nodes("n1", lead=True)
    before = len(leader.replica.commands())
    items = [body(i) for i in range(6)]
    items[3] = {**items[3], **bad}
    resp = await leader.client.post(BULK, json={"schedules": items})
    assert (await error_of(resp, 400)).startswith(message)
    assert leader.replica.commands()[before:] == []
    assert leader.replica.state_machine.schedules == {}


async def test_an_item_that_is_not_an_object_and_a_bad_envelope_are_400(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    resp = await leader.client.post(BULK, json={"schedules": [body(0), 7]})
    assert await error_of(resp, 400) == "schedules[1]: must be a JSON object, got 7"
    resp = await leader.client.post(BULK, json={"schedules": body(0)})
    assert (await error_of(resp, 400)).startswith("schedules: must be an array")
    resp = await leader.client.post(BULK, json={"schedules": [], "replace": "yes"})
    assert (await error_of(resp, 400)).startswith("replace: must be true or false")
    resp = await leader.client.post(BULK, json=[body(0)])
    assert (await error_of(resp, 400)).startswith("request body: must be a JSON object")


async def test_more_than_max_bulk_schedules_is_a_400(
    nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "MAX_BULK", 20)
    leader = await nodes("n1", lead=True)
    resp = await leader.client.post(BULK, json={"schedules": [body(i) for i in range(21)]})
    assert "at most 20 schedules per request, got 21" in await error_of(resp, 400)
    assert leader.replica.state_machine.schedules == {}


async def test_a_body_over_the_byte_limit_is_a_413(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    big = [body(i, metadata={"pad": "x" * 1000}) for i in range(1100)]  # > 1 MiB
    resp = await leader.client.post(BULK, json={"schedules": big})
    assert "request body too large" in await error_of(resp, 413)


async def test_an_entry_too_large_is_split_in_order(nodes: Any) -> None:
    leader = await nodes("n1", lead=True)
    replica = leader.replica
    real = replica.propose_nowait

    def at_most_four(command: Any) -> Any:  # as MeshNode: raises before appending anything
        if command.get("op") == "batch" and len(command["commands"]) > 4:
            raise ProposalTooLarge("too large")
        return real(command)

    replica.propose_nowait = at_most_four  # type: ignore[method-assign]
    before = len(schedule_entries(replica))
    resp = await leader.client.post(BULK, json={"schedules": [body(i) for i in range(10)]})
    assert (await resp.json())["created"] == 10
    parts = schedule_entries(replica)[before:]
    assert [len(p["commands"]) for p in parts] == [2, 3, 2, 3]
    ids = [c["schedule"]["id"] for p in parts for c in p["commands"]]
    assert ids == [f"b{i:05d}" for i in range(10)]


async def test_a_follower_forwards_a_bulk_write(nodes: Any) -> None:
    follower = await nodes("n1")
    leader = await nodes("n2")
    leader.replica.replicate_to(follower.replica)
    leader.replica.become_leader(1)
    await leader.service.wait_ready(WAIT)
    follower.replica.add_peer("n2", leader.replica.mesh_address, leader.replica.http_address)
    follower.replica.step_down("n2", term=1)

    resp = await follower.client.post(BULK, json={"schedules": [body(i) for i in range(5)]})
    assert resp.status == 200, await resp.text()
    assert resp.headers[SERVED_BY_HEADER] == "n2@1"
    assert (await resp.json())["created"] == 5
    assert len(follower.replica.state_machine.schedules) == 5  # applied before the answer


async def test_a_bulk_write_wakes_the_scheduler(nodes: Any) -> None:
    """An active schedule created in bulk fires (the ScheduleAdded event woke the loop)."""
    leader = await nodes("n1", lead=True)
    item = body(0, paused=False, trigger={"type": "interval", "seconds": 0.2})
    resp = await leader.client.post(BULK, json={"schedules": [item]})
    assert resp.status == 200
    await leader.replica.wait_for(lambda: leader.replica.state_machine.fires_recorded >= 2)
