"""``/api/tests`` on a FakeReplica leader (aiohttp's test server, a real AsyncScheduler on the
fake log, the real scenario runner as a term task): answers, results, exports, the live stream,
cancel and timeouts, and a clear 4xx for every bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mesh.api.auth import ApiTokens, create_token
from mesh.api.http import create_app
from mesh.scenarios.export import runs_csv
from mesh.scenarios.http import add_scenario_routes
from mesh.scenarios.runner import ScenarioRunner, current_runner
from mesh.scheduling.service import SchedulingService
from tests.fakes import FakeReplica

WAIT = 10.0

SMALL = """
test:
  name: small
  parameters: {count: 5}
  steps:
    - name: create
      type: loop
      iterations: ${count}
      action:
        method: create_schedule
        args: {task_id: noop, trigger: {type: interval, hours: 1}}
    - {name: pause, type: action, action: {method: pause_schedule}}
    - name: delete
      type: loop
      iterations: ${count}
      action: {method: delete_schedule}
  metrics: [creation_rate, deletion_rate, pause_rate]
  assertions: [creation_rate > 0, action_errors == 0]
"""


async def _serve(tokens: ApiTokens | None = None) -> tuple[TestClient, SchedulingService]:
    replica = FakeReplica("n1")
    service = SchedulingService(replica, replica.state_machine)
    runner = ScenarioRunner(service)
    service.term_tasks["scenarios"] = runner.lead
    service.term_context.append((current_runner, runner))
    app = create_app(replica, replica, service, tokens=tokens)
    add_scenario_routes(app, service)
    client = TestClient(TestServer(app))
    await client.start_server()
    replica.become_leader(1)
    await service.wait_ready(WAIT)
    return client, service


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    client, service = await _serve()
    try:
        yield client
    finally:
        async with asyncio.timeout(WAIT):
            await service.close()
        await client.close()


async def load(client: TestClient, text: str) -> dict[str, Any]:
    resp = await client.post("/api/tests/load", data=text)
    body = await resp.json()
    assert resp.status == 201, body
    return body


async def start(client: TestClient, name: str, **parameters: Any) -> str:
    body: dict[str, Any] = {"name": name}
    if parameters:
        body["parameters"] = parameters
    resp = await client.post("/api/tests/run", json=body)
    answer = await resp.json()
    assert resp.status == 202, answer
    return answer["run_id"]


async def finished(client: TestClient, run_id: str) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            result = await (await client.get(f"/api/tests/results/{run_id}")).json()
            if result["status"] not in ("queued", "running"):
                return result
            await asyncio.sleep(0.02)


async def error(resp: Any, status: int) -> str:
    body = await resp.json()
    assert resp.status == status, body
    return body["error"]


async def test_a_loaded_scenario_runs_and_reports_every_metric_and_assertion(
    client: TestClient,
) -> None:
    assert (await load(client, SMALL))["name"] == "small"
    run_id = await start(client, "small", count=7)
    result = await finished(client, run_id)
    assert result["status"] == "passed", result
    assert result["parameters"] == {"count": 7}
    assert set(result["metrics"]) >= {"creation_rate", "deletion_rate", "pause_rate"}
    assert result["metrics"]["creation_rate"]["value"] > 0
    assert result["metrics"]["actions_total"]["value"] == 15  # 7 + 1 + 7
    assert [(a["expr"], a["passed"]) for a in result["assertions"]] == [
        ("creation_rate > 0", True),
        ("action_errors == 0", True),
    ]
    library = await (await client.get("/api/tests")).json()
    [entry] = library["scenarios"]
    assert entry["last_run"]["status"] == "passed" and entry["parameters"] == {"count": 5}
    runs = await (await client.get("/api/tests/runs?name=small")).json()
    assert [r["run_id"] for r in runs["runs"]] == [run_id]
    schedules = await (await client.get("/api/schedules")).json()
    assert schedules["schedules"] == []


async def test_a_failed_assertion_fails_the_run_with_the_measured_value(client: TestClient) -> None:
    await load(client, SMALL.replace("creation_rate > 0", "creation_rate > 1e12"))
    result = await finished(client, await start(client, "small"))
    assert result["status"] == "failed"
    first = result["assertions"][0]
    assert first["passed"] is False and 0 < first["value"] < 1e12


async def test_results_export_as_csv(client: TestClient) -> None:
    await load(client, SMALL)
    run_id = await start(client, "small")
    await finished(client, run_id)
    resp = await client.get(f"/api/tests/results/{run_id}?format=csv")
    assert resp.status == 200 and resp.content_type == "text/csv"
    lines = (await resp.text()).splitlines()
    assert lines[0] == "kind,name,value,unit,op,threshold,passed"
    assert any(line.startswith("assertion,creation_rate > 0,") for line in lines)
    history = await (await client.get("/api/tests/runs?format=csv")).text()
    assert history.splitlines()[0].startswith("run_id,name,status,started_at,finished_at,")
    assert run_id in history


def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_quoted() -> None:
    view = {
        "run_id": "a" * 16,
        "name": "-2+3",
        "status": "error",
        "started_at": "=HYPERLINK(1)",
        "finished_at": None,
        "metrics": {},
    }
    row = runs_csv([view]).splitlines()[1]
    assert row == "aaaaaaaaaaaaaaaa,'-2+3,error,'=HYPERLINK(1),"


async def test_the_live_stream_sends_progress_then_the_final_result(client: TestClient) -> None:
    await load(client, SMALL.replace("count: 5", "count: 50"))
    run_id = await start(client, "small")
    resp = await client.get(f"/api/tests/metrics/{run_id}")
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    async with asyncio.timeout(WAIT):
        text = (await resp.read()).decode()  # the stream ends after ``done``
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    kinds = [lines[0] for lines in events]
    assert kinds[-1] == "event: done"
    done = json.loads(events[-1][1].removeprefix("data: "))
    assert done["status"] == "passed" and done["run_id"] == run_id


async def test_a_cancelled_run_stops_and_leaves_no_schedule(client: TestClient) -> None:
    await load(
        client,
        SMALL.replace(
            "- {name: pause,", "- {name: nap, type: sleep, duration: 30}\n    - {name: pause,"
        ),
    )
    run_id = await start(client, "small")
    async with asyncio.timeout(WAIT):
        while True:  # until it sleeps (step 2)
            result = await (await client.get(f"/api/tests/results/{run_id}")).json()
            if result["step"]["index"] >= 1:
                break
            await asyncio.sleep(0.02)
    resp = await client.post(f"/api/tests/runs/{run_id}/cancel")
    assert resp.status == 202
    result = await finished(client, run_id)
    assert result["status"] == "cancelled"
    assert (await (await client.get("/api/schedules")).json())["schedules"] == []


async def test_a_run_past_its_timeout_ends_with_an_error(client: TestClient) -> None:
    await load(
        client, "test:\n  name: slow\n  timeout: 1\n  steps:\n    - {type: sleep, duration: 20}\n"
    )
    result = await finished(client, await start(client, "slow"))
    assert result["status"] == "error" and result["error"] == "timed out after 1 s"


async def test_a_failing_action_ends_the_run_unless_the_step_continues(client: TestClient) -> None:
    text = """
test:
  name: missing
  steps:
    - type: loop
      iterations: 3
      on_error: {on_error}
      action: {method: delete_schedule, args: {schedule_id: nothing-here}}
"""
    await load(client, text.replace("{on_error}", "fail"))
    result = await finished(client, await start(client, "missing"))
    assert result["status"] == "error"
    assert (
        result["error"] == "step 'step-1' iteration 0: delete_schedule: no schedule 'nothing-here'"
    )
    await load(client, text.replace("{on_error}", "continue"))
    result = await finished(client, await start(client, "missing"))
    assert result["status"] == "passed"
    assert result["metrics"]["action_errors"]["value"] == 3 and len(result["errors"]) == 3


async def test_waiting_for_fires_that_do_not_come_ends_with_an_error(client: TestClient) -> None:
    text = """
test:
  name: quiet
  steps:
    - {type: action, action: {method: wait_for_fires, args: {count: 5, timeout: 0.3}}}
"""
    await load(client, text)
    result = await finished(client, await start(client, "quiet"))
    assert result["status"] == "error" and "0 of 5 fires within 0.3 s" in result["error"]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ("test:\n  name: x\n  steps: [\n", 400, "line"),
        ("test:\n  name: x\n  steps:\n    - {type: sleep, duration: 1, what: 2}\n", 400, "what"),
        ("", 400, "YAML"),
        ("a: &a [1]\nb: *a\n", 400, "alias"),
        ("ND\x1f", 400, "unacceptable character #x001f"),  # found by tests/fuzz_api.py
    ],
)
async def test_a_bad_scenario_is_refused_with_a_clear_message(
    client: TestClient, body: str, status: int, says: str
) -> None:
    message = await error(await client.post("/api/tests/load", data=body), status)
    assert says.lower() in message.lower()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"name": "nothing"}, "no scenario 'nothing' is loaded"),
        ({"name": "small", "parameters": {"counts": 2}}, "counts"),
        ({"name": "small", "parameters": {"count": "many"}}, "count"),
        ({"name": "small", "parameters": [1]}, "parameters"),
        ({"name": "small", "extra": 1}, "extra"),
        ({"name": "../x"}, "name"),
        ([1], "object"),
    ],
)
async def test_a_bad_run_request_is_refused_with_a_clear_message(
    client: TestClient, body: Any, says: str
) -> None:
    await load(client, SMALL)
    assert says in await error(await client.post("/api/tests/run", json=body), 400)


async def test_unknown_runs_and_scenarios_are_404(client: TestClient) -> None:
    for path in ("/api/tests/results/0123456789abcdef", "/api/tests/results/..%2fx",
                 "/api/tests/metrics/nothing", "/api/tests/library/nothing"):  # fmt: skip
        assert (await client.get(path)).status == 404, path
    assert (await client.post("/api/tests/runs/0123456789abcdef/cancel")).status == 404
    resp = await client.get("/api/tests/results/0123456789abcdef")
    assert await error(resp, 404) == "no run '0123456789abcdef'"
    resp = await client.get("/api/tests/library/nothing")
    assert await error(resp, 404) == "no scenario 'nothing' is loaded"


async def test_a_scenario_schedule_is_refused_for_a_scenario_that_cannot_run(
    client: TestClient,
) -> None:
    body = {"name": "small", "trigger": {"type": "interval", "seconds": 5}}
    assert "no scenario" in await error(await client.post("/api/tests/schedule", json=body), 400)
    await load(client, SMALL)
    body["parameters"] = {"nope": 1}
    assert "nope" in await error(await client.post("/api/tests/schedule", json=body), 400)
    body["parameters"] = {"count": 2}
    body["trigger"] = {"type": "interval"}
    assert (await client.post("/api/tests/schedule", json=body)).status == 400


async def test_a_reader_sees_results_but_not_the_source_and_cannot_run(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    admin = create_token(path, "admin", "admin")
    reader = create_token(path, "reader", "read")
    client, service = await _serve(ApiTokens(path))
    try:
        as_admin = {"Authorization": f"Bearer {admin}"}
        as_reader = {"Authorization": f"Bearer {reader}"}
        secret = SMALL.replace(
            "parameters: {count: 5}", "parameters: {count: 5, api_token: s3cret}"
        )
        resp = await client.post("/api/tests/load", data=secret, headers=as_admin)
        assert resp.status == 201
        full = await (await client.get("/api/tests/library/small", headers=as_admin)).json()
        seen = await (await client.get("/api/tests/library/small", headers=as_reader)).json()
        assert "source" in full and "source" not in seen
        # Parameters are user data: a reader sees sensitive ones masked, in every view.
        assert full["parameters"]["api_token"] == "s3cret"
        assert seen["parameters"]["api_token"] == "***"
        listed = await (await client.get("/api/tests", headers=as_reader)).json()
        assert listed["scenarios"][0]["parameters"]["api_token"] == "***"
        assert "s3cret" not in json.dumps(seen) + json.dumps(listed)
        resp = await client.post("/api/tests/run", json={"name": "small"}, headers=as_reader)
        assert resp.status == 403
    finally:
        async with asyncio.timeout(WAIT):
            await service.close()
        await client.close()
