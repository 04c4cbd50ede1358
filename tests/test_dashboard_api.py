"""The dashboard's routes and the reads made for it, in-process on FakeReplicas.

``GET /`` and ``GET /dashboard/<file>`` (the shipped files, with a strict CSP), ``GET
/api/whoami`` (role and rights), ``GET /api/overview`` (one bounded answer), the ``q`` and
``paused`` filters of ``GET /api/schedules``, and the pause note. The page itself runs in a
real browser in tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from apscheduler import Job, JobOutcome, JobResult, Schedule
from apscheduler.triggers.interval import IntervalTrigger

from mesh.api.auth import ApiTokens, create_token
from mesh.api.dashboard import BUCKET_SECONDS, BUCKETS, activity
from mesh.api.http import READ_ONLY_NODE, create_app
from mesh.consensus.messages import COMMAND, Entry
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.dispatch.governors import Governors
from mesh.scheduling.service import SchedulingService
from mesh.scheduling.state import dump_job, dump_result
from tests.apierrors import error_of
from tests.fakes import FakeBus, FakeReplica, embedded_tasks

WAIT = 5.0
TASK = "unit_dashboard_echo"


@pytest.fixture
def tasks() -> Iterator[None]:
    with embedded_tasks(TASK, "unit_dashboard_blocking"):
        yield


@pytest.fixture
async def leader(tasks: None) -> AsyncIterator[Any]:
    """``make(**create_app options)`` → (client, service) of a leader served over HTTP."""
    made: list[tuple[TestClient, SchedulingService]] = []

    async def make(**options: Any) -> tuple[TestClient, SchedulingService]:
        replica = FakeReplica("n1")
        state = replica.state_machine
        dispatcher = HandlerDispatcher(replica, FakeBus(), replica, state, governors=Governors())
        service = SchedulingService(replica, state, dispatcher=dispatcher)
        client = TestClient(TestServer(create_app(replica, replica, service, **options)))
        await client.start_server()
        made.append((client, service))
        replica.become_leader(1)
        await service.wait_ready(WAIT)
        return client, service

    try:
        yield make
    finally:
        for client, service in made:
            async with asyncio.timeout(WAIT):
                await service.close()
            await client.close()


def body(schedule_id: str, *, task: str = TASK, paused: bool = False, **trigger: Any) -> dict:
    return {
        "id": schedule_id,
        "task": task,
        "trigger": {"type": "interval", **(trigger or {"hours": 1})},
        "paused": paused,
    }


async def create(client: TestClient, spec: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/api/schedules", json=spec)
    assert resp.status == 201, await resp.text()
    return await resp.json()


# --------------------------------------------------------------------------- the files


async def test_the_page_is_served_at_the_root_with_a_strict_content_security_policy(
    leader: Any,
) -> None:
    client, _ = await leader()
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "<html" in (await resp.text()).lower()
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_every_shipped_file_is_served_with_its_type_and_revalidated_by_etag(
    leader: Any,
) -> None:
    client, _ = await leader()
    static = Path(__file__).parent.parent / "mesh" / "dashboard" / "static"
    names = sorted(p.name for p in static.iterdir() if p.is_file())
    assert "index.html" in names
    for name in names:
        resp = await client.get(f"/dashboard/{name}")
        assert resp.status == 200, name
        assert await resp.read() == (static / name).read_bytes()
        etag = resp.headers["ETag"]
        again = await client.get(f"/dashboard/{name}", headers={"If-None-Match": etag})
        assert again.status == 304, name


@pytest.mark.parametrize(
    "path",
    ["/dashboard/nope.js", "/dashboard/..%2Fhttp.py", "/dashboard/%2e%2e%2fauth.py", "/dashboard/"],
)
async def test_no_file_outside_the_shipped_ones_is_served(leader: Any, path: str) -> None:
    client, _ = await leader()
    resp = await client.get(path)
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_the_page_needs_no_token_but_its_reads_do(leader: Any, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    create_token(tokens_file, "viewer", "read")
    client, _ = await leader(tokens=ApiTokens(tokens_file))
    assert (await client.get("/")).status == 200
    await error_of(await client.get("/api/overview"), 401)
    await error_of(await client.get("/api/whoami"), 401)


# --------------------------------------------------------------------------- whoami


async def test_whoami_without_tokens_may_do_everything(leader: Any) -> None:
    client, _ = await leader()
    me = await (await client.get("/api/whoami")).json()
    assert me == {
        "name": None,
        "role": None,
        "may_operate": True,
        "may_admin": True,
        "read_only": False,
        "node_id": "n1",
        "node_role": "leader",
        "zone": None,
    }


@pytest.mark.parametrize(
    ("role", "may_operate", "may_admin"),
    [("read", False, False), ("operate", True, False), ("admin", True, True)],
)
async def test_whoami_gives_the_tokens_role_and_rights(
    leader: Any, tmp_path: Path, role: str, may_operate: bool, may_admin: bool
) -> None:
    tokens_file = tmp_path / "tokens.json"
    token = create_token(tokens_file, f"t-{role}", role)
    client, _ = await leader(tokens=ApiTokens(tokens_file))
    resp = await client.get("/api/whoami", headers={"Authorization": f"Bearer {token}"})
    me = await resp.json()
    assert (me["name"], me["role"]) == (f"t-{role}", role)
    assert (me["may_operate"], me["may_admin"], me["read_only"]) == (
        may_operate,
        may_admin,
        False,
    )


async def test_on_a_read_only_node_nobody_may_write(leader: Any, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    token = create_token(tokens_file, "boss", "admin")
    client, _ = await leader(tokens=ApiTokens(tokens_file), read_only=READ_ONLY_NODE)
    me = await (
        await client.get("/api/whoami", headers={"Authorization": f"Bearer {token}"})
    ).json()
    assert me["role"] == "admin"
    assert (me["may_operate"], me["may_admin"], me["read_only"]) == (False, False, True)


# --------------------------------------------------------------------------- overview


async def test_the_overview_counts_and_lists_the_soonest_active_fires_first(leader: Any) -> None:
    client, _ = await leader()
    await create(client, body("later", hours=3))
    await create(client, body("sooner", minutes=5))
    await create(client, body("paused-soonest", paused=True, seconds=30))
    await create(client, body("soonest", minutes=1))
    ov = await (await client.get("/api/overview")).json()
    assert (ov["node_id"], ov["role"], ov["leader_id"], ov["term"]) == ("n1", "leader", "n1", 1)
    assert (ov["schedules"], ov["paused"], ov["read_only"]) == (4, 1, False)
    assert [f["schedule_id"] for f in ov["next_fires"]] == ["soonest", "sooner", "later"]
    assert ov["next_fires"][0]["trigger"]["type"] == "interval"
    assert len(ov["activity"]["buckets"]) == BUCKETS
    assert datetime.fromisoformat(ov["now"]).tzinfo is not None


async def test_the_overview_shows_the_leadership_history_it_is_given(leader: Any) -> None:
    rows = [
        {"ts": "2026-11-29T10:00:01Z", "instance_id": "n2", "term": 2, "event_type": "elected"},
        {"ts": "2026-11-29T10:00:00Z", "instance_id": "n1", "term": 1, "event_type": "elected"},
    ]
    asked: list[int] = []

    def history(limit: int) -> list[dict[str, Any]]:
        asked.append(limit)
        return rows[:limit]

    client, _ = await leader(leadership=history)
    ov = await (await client.get("/api/overview")).json()
    assert [(e["node_id"], e["term"], e["event"]) for e in ov["leadership"]] == [
        ("n2", 2, "elected"),
        ("n1", 1, "elected"),
    ]
    assert asked and asked[0] <= 20


async def test_the_overview_is_bounded_with_ten_thousand_schedules(leader: Any) -> None:
    client, service = await leader()
    # Straight into the state as a snapshot would put them: the API is not what is measured.
    state = service.state
    now = datetime.now(UTC)
    for i in range(10_000):
        s = Schedule(
            id=f"s{i:05d}",
            task_id=TASK,
            trigger=IntervalTrigger(hours=1),
            job_executor="x",
            next_fire_time=now + timedelta(hours=1, seconds=10_000 - i),
        )
        state._put_schedule(s)
    resp = await client.get("/api/overview")
    ov = await resp.json()
    assert ov["schedules"] == 10_000
    assert len(ov["next_fires"]) == 20
    assert ov["next_fires"][0]["schedule_id"] == "s09999"
    assert len(await resp.read()) < 64 * 1024


async def test_the_overview_takes_no_query(leader: Any) -> None:
    client, _ = await leader()
    await error_of(await client.get("/api/overview?limit=5"), 400)


def execution(finished: datetime, outcome: str, late_ms: float | None) -> dict[str, Any]:
    due = finished - timedelta(seconds=1)
    began = due + timedelta(milliseconds=late_ms) if late_ms is not None else None
    return {
        "scheduled_fire_time": due.isoformat(),
        "started_at": began.isoformat() if began else None,
        "finished_at": finished.isoformat(),
        "outcome": outcome,
    }


def test_activity_buckets_fires_outcomes_and_lateness_by_finish_time() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    window = timedelta(seconds=BUCKET_SECONDS * BUCKETS)
    history = [
        execution(now - window - timedelta(seconds=1), "success", 5),  # before the window
        execution(now - timedelta(seconds=25), "success", 4),
        execution(now - timedelta(seconds=24), "error", 8),
        execution(now - timedelta(seconds=23), "success", 100),
        execution(now - timedelta(seconds=1), "missed_start_deadline", None),
    ]
    buckets = activity(history, now)["buckets"]
    assert sum(b["fires"] for b in buckets) == 4
    busy = buckets[BUCKETS - 3]
    assert (busy["fires"], busy["succeeded"], busy["failed"]) == (3, 2, 1)
    assert (busy["lateness_p50_ms"], busy["lateness_max_ms"]) == (8.0, 100.0)
    last = buckets[-1]
    assert (last["fires"], last["failed"], last["lateness_p50_ms"]) == (1, 1, None)
    assert buckets[0]["start"] == (now - window).isoformat()


async def test_the_overview_activity_comes_from_the_replicated_history(leader: Any) -> None:
    client, service = await leader()
    state = service.state
    now = datetime.now(UTC)
    job = Job(task_id=TASK, schedule_id="x", scheduled_fire_time=now, executor="x")
    state.apply(Entry(1, 10_000, COMMAND, {"op": "add_job", "job": dump_job(job)}))
    result = JobResult.from_job(job, JobOutcome.success, started_at=now, finished_at=now)
    release = {"op": "release_job", "job_id": str(job.id), "result": dump_result(result)}
    assert state.apply(Entry(1, 10_001, COMMAND, release))
    ov = await (await client.get("/api/overview")).json()
    assert sum(b["succeeded"] for b in ov["activity"]["buckets"]) == 1


# --------------------------------------------------------------------------- schedule filters


async def test_schedules_filter_by_text_in_the_id_or_task_and_by_paused(leader: Any) -> None:
    client, _ = await leader()
    await create(client, body("nightly-backup"))
    await create(client, body("Hourly-Report", paused=True))
    await create(client, body("cleanup"))

    async def ids(query: str) -> list[str]:
        resp = await client.get(f"/api/schedules?{query}")
        assert resp.status == 200, await resp.text()
        return [s["id"] for s in (await resp.json())["schedules"]]

    assert await ids("q=REPORT") == ["Hourly-Report"]
    assert await ids("q=dashboard_echo") == ["Hourly-Report", "cleanup", "nightly-backup"]
    assert await ids("paused=true") == ["Hourly-Report"]
    assert await ids("paused=false") == ["cleanup", "nightly-backup"]
    assert await ids("q=e&paused=false&limit=1") == ["cleanup"]
    assert await ids("q=e&paused=false&limit=1&after=cleanup") == ["nightly-backup"]
    assert await ids("q=nothing-like-it") == []


async def test_a_bad_paused_filter_is_a_400_naming_it(leader: Any) -> None:
    client, _ = await leader()
    message = await error_of(await client.get("/api/schedules?paused=yes"), 400)
    assert message.startswith("paused:")


# --------------------------------------------------------------------------- the pause note


async def test_a_pause_note_is_kept_while_paused_and_dropped_on_resume(leader: Any) -> None:
    client, _ = await leader()
    # Its first fire far ahead: nothing fires it between the create and the pause.
    created = await create(client, body("nightly", hours=24, start_time="2030-01-01T00:00:00Z"))
    resp = await client.post("/api/schedules/nightly/pause", json={"note": " db migration "})
    paused = await resp.json()
    assert resp.status == 200
    assert paused["paused"] is True
    assert paused["note"] == "db migration"
    assert paused["next_fire_time"] == created["next_fire_time"]  # the trigger is untouched
    got = await (await client.get("/api/schedules/nightly")).json()
    assert got["note"] == "db migration"
    resumed = await (await client.post("/api/schedules/nightly/resume")).json()
    assert resumed["paused"] is False
    assert resumed["note"] == ""


async def test_a_pause_without_a_body_still_works(leader: Any) -> None:
    client, _ = await leader()
    await create(client, body("plain"))
    resp = await client.post("/api/schedules/plain/pause")
    assert resp.status == 200
    assert (await resp.json())["paused"] is True


@pytest.mark.parametrize(
    ("payload", "start"),
    [
        ({"note": "x" * 1001}, "note"),
        ({"note": 5}, "note"),
        ({"why": "unknown field"}, ""),
        ([1, 2], "request body"),
    ],
)
async def test_a_bad_pause_body_is_a_400_and_changes_nothing(
    leader: Any, payload: Any, start: str
) -> None:
    client, _ = await leader()
    await create(client, body("keep"))
    message = await error_of(await client.post("/api/schedules/keep/pause", json=payload), 400)
    assert message.startswith(start), message
    assert (await (await client.get("/api/schedules/keep")).json())["paused"] is False
