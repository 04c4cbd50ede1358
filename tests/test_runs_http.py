"""``POST /api/schedules/{id}/trigger`` and ``/backfill`` over HTTP on a FakeReplica leader
(aiohttp's test server, a real AsyncScheduler on the fake log, embedded tasks): the answers,
the runs they queue, and a clear 4xx (never a 500) for every bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mesh.api.http import create_app
from mesh.scheduling.service import SchedulingService
from tests.apierrors import error_of
from tests.fakes import FakeReplica, embedded_tasks

WAIT = 5.0
TASK = "unit_runs_echo"


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    """A leader's API with one paused schedule ``s`` (every 10 s from 2020) of an embedded
    task: nothing fires by itself, so the test's runs are the only ones."""
    with embedded_tasks(TASK, TASK + "_blocking"):
        replica = FakeReplica("n1")
        service = SchedulingService(replica, replica.state_machine)
        client = TestClient(TestServer(create_app(replica, replica, service)))
        await client.start_server()
        replica.become_leader(1)
        await service.wait_ready(WAIT)
        body = {
            "id": "s",
            "task": TASK,
            "trigger": {"type": "interval", "seconds": 10, "start_time": "2020-01-01T00:00:00Z"},
            "paused": True,
        }
        assert (await client.post("/api/schedules", json=body)).status == 201
        try:
            yield client
        finally:
            async with asyncio.timeout(WAIT):
                await service.close()
            await client.close()


async def executions(client: TestClient, n: int) -> list[dict[str, Any]]:
    """The schedule's execution records, oldest first, once there are ``n``."""
    async with asyncio.timeout(WAIT):
        while True:
            got = await (await client.get("/api/executions?schedule_id=s")).json()
            if len(got["executions"]) >= n:
                return list(reversed(got["executions"]))
            await asyncio.sleep(0.02)


async def test_trigger_runs_a_paused_schedule_once_now_with_its_own_key(
    client: TestClient,
) -> None:
    resp = await client.post("/api/schedules/s/trigger")
    assert resp.status == 202
    answer = await resp.json()
    assert answer["idempotency_key"].startswith("s@") and answer["idempotency_key"].endswith(
        "#trigger"
    )
    [record] = await executions(client, 1)
    assert record["job_id"] == answer["job_id"]
    assert record["idempotency_key"] == answer["idempotency_key"]
    assert record["outcome"] == "success"


async def test_backfill_runs_each_fire_time_once_in_order_and_not_again(
    client: TestClient,
) -> None:
    body = {"start": "2024-01-01T00:00:00Z", "end": "2024-01-01T00:01:00Z"}
    resp = await client.post("/api/schedules/s/backfill", json=body)
    assert resp.status == 202
    answer = await resp.json()
    assert (answer["fire_times"], answer["already_run"], len(answer["job_ids"])) == (6, 0, 6)
    records = await executions(client, 6)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    expected = [f"s@{(start + timedelta(seconds=10 * k)).isoformat()}" for k in range(6)]
    assert [r["idempotency_key"] for r in records] == expected
    assert [r["job_id"] for r in records] == answer["job_ids"]
    assert [r["outcome"] for r in records] == ["success"] * 6
    again = await client.post("/api/schedules/s/backfill", json=body)
    assert (await again.json()) == {"fire_times": 6, "already_run": 6, "job_ids": []}


FUTURE = (datetime.now(UTC) + timedelta(days=1)).isoformat()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "request body"),
        ([], "request body"),
        ({"start": "2024-01-01T00:00:00Z"}, "end"),
        ({"start": "2024-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}, "end: must be later"),
        ({"start": "2024-01-02T00:00:00Z", "end": "2024-01-01T00:00:00Z"}, "end: must be later"),
        ({"start": "2024-01-01T00:00:00", "end": "2024-01-02T00:00:00Z"}, "start: needs an offset"),
        ({"start": "yesterday", "end": "2024-01-02T00:00:00Z"}, "start: must be an ISO-8601"),
        ({"start": 5, "end": "2024-01-02T00:00:00Z"}, "start: must be"),
        ({"start": "0001-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z"}, "start: must be in"),
        ({"start": "2024-01-01T00:00:00Z", "end": FUTURE}, "end: must not be in the future"),
        ({"start": "2014-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}, "at most 1000"),
        ({"start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z", "x": 1}, "unknown"),
        ({"start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00+99:00"}, "end:"),
    ],
)
async def test_a_bad_backfill_is_a_clear_400(client: TestClient, body: Any, message: str) -> None:
    resp = await client.post("/api/schedules/s/backfill", json=body)
    assert message in await error_of(resp, 400)


async def test_a_huge_range_names_its_count_and_the_bound(client: TestClient) -> None:
    body = {"start": "2014-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}
    error = await error_of(await client.post("/api/schedules/s/backfill", json=body), 400)
    assert error.startswith("the range holds 31553280 fire times; a backfill runs at most 1000")


@pytest.mark.parametrize("path", ["/api/schedules/nope/trigger", "/api/schedules/nope/backfill"])
async def test_an_unknown_schedule_is_a_404(client: TestClient, path: str) -> None:
    body = {"start": "2024-01-01T00:00:00Z", "end": "2024-01-01T00:01:00Z"}
    resp = await client.post(path, json=body if path.endswith("backfill") else None)
    assert await error_of(resp, 404) == "no schedule with id 'nope'"


@pytest.mark.parametrize(
    "raw", [b"{x", b'{"now": 1}', b"[]", b'"a"', b"null", b"{" * 5000, b"\xff\xfe"]
)
async def test_a_trigger_with_a_body_other_than_an_empty_object_is_a_400(
    client: TestClient, raw: bytes
) -> None:
    resp = await client.post("/api/schedules/s/trigger", data=raw)
    assert resp.status == 400
    resp = await client.post("/api/schedules/s/backfill", data=raw)
    assert resp.status == 400


async def test_a_trigger_the_overlap_policy_skips_says_so_and_is_recorded_skipped(
    client: TestClient,
) -> None:
    body = {
        "id": "one-at-a-time",
        "task": TASK + "_blocking",  # runs until the test ends
        "trigger": {"type": "interval", "hours": 1},
        "paused": True,
        "overlap": "skip",
    }
    assert (await client.post("/api/schedules", json=body)).status == 201
    first = await (await client.post("/api/schedules/one-at-a-time/trigger")).json()
    assert first["queued"] is True
    second = await (await client.post("/api/schedules/one-at-a-time/trigger")).json()
    assert second["queued"] is False  # the first is still running
    async with asyncio.timeout(WAIT):
        while True:
            got = await client.get("/api/executions?schedule_id=one-at-a-time&outcome=skipped")
            records = (await got.json())["executions"]
            if records:
                break
            await asyncio.sleep(0.02)
    assert [r["idempotency_key"] for r in records] == [second["idempotency_key"]]
    assert records[0]["reason"] == "overlap"
