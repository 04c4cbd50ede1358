"""GET /api/executions filtered by ``outcome`` and ``since``, alone, together, and across pages.

The history is built by applying the very commands a leader commits (``add_job``, then
``release_job`` with the job's result) to a real SchedulerState, served over HTTP by the real
app (aiohttp's test server) on a follower node. Each record's task is its label, so the
expected answers below are written out by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from apscheduler import Job, JobOutcome, JobResult

from mesh.api.http import create_app
from mesh.config import GovernorConfig
from mesh.consensus.messages import COMMAND, Entry
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.dispatch.governors import Governors
from mesh.scheduling.service import SchedulingService
from mesh.scheduling.state import SchedulerState, dump_job, dump_result
from tests.fakes import FakeBus, FakeReplica

T = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
M = timedelta(minutes=1)


# label: (schedule id or None for a run-now job, fire time, started_at, finished_at, outcome)
RECORDS: dict[str, tuple[str | None, datetime | None, datetime | None, datetime, JobOutcome]] = {
    "a-early": ("a", T - 2 * H, T - 2 * H, T - 2 * H + M, JobOutcome.success),
    "b-early": ("b", T - H, T - H, T - H + M, JobOutcome.error),
    "run-old": (None, None, T - 30 * M, T - 29 * M, JobOutcome.success),
    "a-at": ("a", T, T, T + M, JobOutcome.error),
    "a-late-missed": ("a", T + H, None, T + H + 5 * M, JobOutcome.missed_start_deadline),
    "b-late": ("b", T + 2 * H, T + 2 * H, T + 2 * H + M, JobOutcome.success),
    "run-abandoned": (None, None, None, T + 10 * M, JobOutcome.abandoned),
    "a-late-err": ("a", T + 3 * H, T + 3 * H, T + 3 * H + M, JobOutcome.error),
    "a-late-err2": ("a", T + 4 * H, T + 4 * H, T + 4 * H + M, JobOutcome.error),
    # Fired before T, started after it (a long queue): its fire time is what counts.
    "a-started-late": ("a", T - H, T + H, T + H + M, JobOutcome.success),
    "run-new": (None, None, T + 5 * H, T + 5 * H + M, JobOutcome.cancelled),
}
# The order the jobs finished (the history's order); a schedule's jobs are added by fire time.
FINISHED = list(RECORDS)
NEWEST_FIRST = FINISHED[::-1]


def build_history(state: SchedulerState) -> None:
    jobs = {
        label: Job(task_id=label, schedule_id=sid, scheduled_fire_time=fire, executor="x")
        for label, (sid, fire, *_rest) in RECORDS.items()
    }
    index = 0

    def apply(command: dict[str, Any]) -> Any:
        nonlocal index
        index += 1
        return state.apply(Entry(1, index, COMMAND, command))

    fire_order = sorted(RECORDS, key=lambda label: RECORDS[label][1] or T)
    for label in fire_order:
        assert apply({"op": "add_job", "job": dump_job(jobs[label])}), label
    for label in FINISHED:
        _sid, _fire, started, finished, outcome = RECORDS[label]
        result = JobResult.from_job(jobs[label], outcome, started_at=started, finished_at=finished)
        command = {
            "op": "release_job",
            "job_id": str(jobs[label].id),
            "result": dump_result(result),
            "handler_id": "h1",
        }
        assert apply(command), label


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    replica = FakeReplica("n2")  # a follower: reads are served from its replica of the state
    state = replica.state_machine
    build_history(state)
    dispatcher = HandlerDispatcher(
        replica, FakeBus(), replica, state, governors=Governors(GovernorConfig())
    )
    service = SchedulingService(replica, state, dispatcher=dispatcher)
    client = TestClient(TestServer(create_app(replica, replica, service)))
    await client.start_server()
    try:
        yield client
    finally:
        async with asyncio.timeout(5):
            await service.close()
        await client.close()


async def get(client: TestClient, query: str) -> dict[str, Any]:
    resp = await client.get(f"/api/executions?{query}")
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def labels(client: TestClient, query: str) -> list[str]:
    body = await get(client, query)
    assert body["next"] is None, body["next"]  # every query here fits in one page
    return [ex["task"] for ex in body["executions"]]


async def error_of(client: TestClient, query: str) -> str:
    resp = await client.get(f"/api/executions?{query}")
    assert resp.status == 400, await resp.text()
    return str((await resp.json())["error"])


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("success", ["a-started-late", "b-late", "run-old", "a-early"]),
        ("error", ["a-late-err2", "a-late-err", "a-at", "b-early"]),
        ("missed_start_deadline", ["a-late-missed"]),
        ("abandoned", ["run-abandoned"]),
        ("cancelled", ["run-new"]),
        ("deserialization_failed", []),
    ],
)
async def test_outcome_keeps_only_the_records_with_that_outcome(
    client: TestClient, outcome: str, expected: list[str]
) -> None:
    assert await labels(client, f"outcome={outcome}") == expected


SINCE_T = [
    "run-new",
    "a-late-err2",
    "a-late-err",
    "run-abandoned",
    "b-late",
    "a-late-missed",
    "a-at",
]


@pytest.mark.parametrize(
    "since",
    [
        "2026-05-01T12:00:00Z",
        "2026-05-01T12:00:00",  # no offset: UTC
        "2026-05-01T12:00",
        "2026-05-01T14:00:00%2B02:00",
        "2026-05-01T07:00:00.000-05:00",
        "2026-05-01t12:00:00z",
        "2026-05-01%2012:00:00%2B00:00",
    ],
)
async def test_since_keeps_the_records_at_or_after_it_by_fire_time_else_start_else_finish(
    client: TestClient, since: str
) -> None:
    # a-at fired exactly at T (kept); a-started-late fired before T and started after (left
    # out); run-old started before T; run-abandoned never started and finished after T.
    assert await labels(client, f"since={since}") == SINCE_T


async def test_since_is_inclusive_to_the_microsecond(client: TestClient) -> None:
    assert await labels(client, "since=2026-05-01T12:00:00.000001Z") == SINCE_T[:-1]
    assert await labels(client, "since=2026-05-01T11:59:59.999999Z") == SINCE_T


async def test_since_at_the_ends_of_the_calendar_answers(client: TestClient) -> None:
    # Converting these to UTC would overflow; comparing them does not.
    assert await labels(client, "since=0001-01-01T00:00:00%2B01:00") == NEWEST_FIRST
    assert await labels(client, "since=9999-12-31T23:59:59-01:00") == []


async def test_the_filters_combine(client: TestClient) -> None:
    query = "schedule_id=a&outcome=error&since=2026-05-01T12:00:00Z"
    assert await labels(client, query) == ["a-late-err2", "a-late-err", "a-at"]
    assert await labels(client, "schedule_id=b&outcome=success") == ["b-late"]
    assert await labels(client, "outcome=success&since=2026-05-01T12:00:00Z") == ["b-late"]
    assert await labels(client, "schedule_id=b&outcome=abandoned") == []


@pytest.mark.parametrize("limit", [1, 2, 3, 4])
async def test_pages_of_a_filtered_list_join_into_the_filtered_list(
    client: TestClient, limit: int
) -> None:
    filters = "outcome=error&since=2026-05-01T11:00:00Z"
    expected = ["a-late-err2", "a-late-err", "a-at", "b-early"]
    got: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = f"{filters}&limit={limit}" + (f"&after={cursor}" if cursor else "")
        body = await get(client, query)
        page = body["executions"]
        pages += 1
        assert len(page) <= limit
        got += [ex["task"] for ex in page]
        cursor = body["next"]
        if cursor is None:
            break
        assert cursor == page[-1]["job_id"]  # the last record returned, which matches
    assert got == expected
    assert pages == -(-len(expected) // limit)  # no empty last page: next is null exactly then


async def test_after_a_record_the_filters_leave_out_lists_the_older_matching_ones(
    client: TestClient,
) -> None:
    everything = (await get(client, ""))["executions"]
    assert [ex["task"] for ex in everything] == NEWEST_FIRST
    ids = {ex["task"]: ex["job_id"] for ex in everything}
    query = f"outcome=error&after={ids['a-started-late']}&since=2026-05-01T12:00:00Z"
    assert await labels(client, query) == ["a-late-err2", "a-late-err", "a-at"]


@pytest.mark.parametrize("value", ["bogus", "", "SUCCESS", "running", "success%20"])
async def test_an_outcome_that_no_record_can_hold_is_a_400_naming_the_outcomes(
    client: TestClient, value: str
) -> None:
    message = await error_of(client, f"outcome={value}")
    assert message.startswith("outcome:"), message
    for name in ("success", "error", "missed_start_deadline", "cancelled", "abandoned"):
        assert name in message, message


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yesterday",
        "2026-05-01",  # a date alone
        "1714564800",  # a Unix time
        "2026-W18-5T12:00:00",
        "2026-05-01T12:00:00Zjunk",
        "\u0662\u0660\u0662\u0666-05-01T12:00:00Z",  # Arabic-Indic digits
    ],
)
async def test_a_since_that_is_not_a_date_time_is_a_400_with_an_example(
    client: TestClient, value: str
) -> None:
    message = await error_of(client, f"since={value}")
    assert message.startswith("since: not an ISO-8601 date-time such as"), message


@pytest.mark.parametrize(
    "value",
    [
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-05-01T24:00:00Z",
        "2026-05-01T12:00+25:00",
    ],
)
async def test_a_since_with_values_out_of_range_is_a_400_saying_why(
    client: TestClient, value: str
) -> None:
    message = await error_of(client, f"since={value.replace('+', '%2B')}")
    assert message.startswith("since:") and "is not a valid date-time (" in message, message


async def test_an_offset_whose_plus_was_not_encoded_gets_a_hint(client: TestClient) -> None:
    message = await error_of(client, "since=2026-05-01T14:00:00+02:00")
    assert "%2B" in message, message


async def test_the_mesh_outcomes_are_filters_too() -> None:
    replica = FakeReplica("n2")
    state = replica.state_machine
    for i, outcome in enumerate(("timeout", "skipped", "no_handler", "timeout")):
        job = Job(task_id=f"{outcome}-{i}", schedule_id="m", scheduled_fire_time=T + i * M,
                  executor="x")  # fmt: skip
        state.apply(Entry(1, 2 * i + 1, COMMAND, {"op": "add_job", "job": dump_job(job)}))
        result = JobResult.from_job(job, JobOutcome.error, started_at=None, finished_at=T + H)
        release = {"op": "release_job", "job_id": str(job.id), "result": dump_result(result),
                   "outcome": outcome}  # fmt: skip
        assert state.apply(Entry(1, 2 * i + 2, COMMAND, release))
    service = SchedulingService(replica, state)
    client = TestClient(TestServer(create_app(replica, replica, service)))
    await client.start_server()
    try:
        assert await labels(client, "outcome=timeout") == ["timeout-3", "timeout-0"]
        assert await labels(client, "outcome=skipped") == ["skipped-1"]
        assert await labels(client, "outcome=no_handler&schedule_id=m") == ["no_handler-2"]
    finally:
        await service.close()
        await client.close()
