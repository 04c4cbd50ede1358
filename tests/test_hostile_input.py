"""Issue 12's probes, against the HTTP API of a real 3-node mesh: no user input answers 500,
imports a module, stalls the leader or moves leadership.

One cluster serves every test (module scope). After each probe the leader must still be the
same node in the same term and answer at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, NodeProcess

CANARY_MODULE = "tests.fixtures.import_canary"


class Mesh:
    def __init__(self, cluster: Cluster, canary: Path) -> None:
        self.cluster = cluster
        self.canary = canary
        self.leader = cluster.wait_for_leader(timeout=20.0)
        self.term = self.leader.health()["term"]  # type: ignore[index]
        self.follower = next(n for n in cluster.nodes if n is not self.leader)

    def assert_leader_steady(self) -> None:
        """Same leader, same term, answering at once; every node agrees."""
        started = time.monotonic()
        h = self.leader.health(timeout=2.0)
        assert h is not None, f"the leader stopped answering\n{self.cluster.diagnostics()}"
        assert time.monotonic() - started < 1.0, "the leader answered slowly"
        assert (h["role"], h["term"]) == ("leader", self.term), (h, self.cluster.diagnostics())
        assert self.cluster.leader_now() is self.leader


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("hostile")
    canary = root / "canary.txt"
    cluster = Cluster(
        root,
        3,
        ("--tasks", "tests.fixtures.hostile_tasks"),
        env={"HOSTILE_CANARY": str(canary)},
    )
    try:
        cluster.start()
        yield Mesh(cluster, canary)
    finally:
        cluster.stop_all()


def post_raw(node: NodeProcess, path: str, raw: bytes) -> tuple[int, Any]:
    """POST bytes as they are (a body json.dumps itself could not produce)."""
    req = urllib.request.Request(
        node.http + path, data=raw, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"error": text.decode(errors="replace")}


def post(node: NodeProcess, path: str, body: Any) -> tuple[int, Any]:
    return node.request("POST", path, body, timeout=10.0)


def fire_counters(node: NodeProcess) -> dict[str, float]:
    """The replicated ``schedulezero_fires_*_total`` counters in ``node``'s ``/metrics``."""
    text = node.metrics_text()
    assert text is not None, f"{node.node_id} does not answer /metrics"
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("schedulezero_fires_") and s.name.endswith("_total")
    }


def finished_job(mesh: Mesh, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = mesh.follower.get_json(f"/api/jobs/{job_id}")
        return job if job and job.get("status") not in ("pending", "running") else None

    return mesh.cluster.wait_for(done, 15.0, f"job {job_id} to finish")


def assert_refused(status: int, body: Any, *words: str) -> None:
    assert status == 400, body
    for word in words:
        assert word in body["error"], body


def test_user_data_naming_an_apscheduler_object_is_opaque_and_never_imported(mesh: Mesh) -> None:
    kwargs = {"p": {"_apscheduler_json": [f"{CANARY_MODULE}:Canary", {}]}}
    status, body = post(mesh.follower, "/api/jobs", {"task": "hostile_echo", "kwargs": kwargs})
    assert status == 202, body
    job = finished_job(mesh, body["job_id"])
    assert job["status"] == "success", job
    assert job["return_value"] == {"args": [], "kwargs": kwargs}  # as sent, end to end
    assert not mesh.canary.exists(), mesh.canary.read_text()
    schedule = {
        "id": "opaque",
        "task": "hostile_noop",
        "trigger": {"type": "interval", "hours": 1},
        "args": [{"_apscheduler_json": [f"{CANARY_MODULE}:Canary", {}]}],
        "metadata": kwargs,
    }
    status, body = post(mesh.follower, "/api/schedules", schedule)
    assert status == 201, body
    assert (body["args"], body["metadata"]) == (schedule["args"], kwargs)
    assert mesh.follower.get_json("/api/schedules/opaque")["args"] == schedule["args"]
    assert not mesh.canary.exists()
    mesh.assert_leader_steady()


@pytest.mark.parametrize("coalesce", ["latest", "all"])
def test_an_interval_of_one_second_started_a_year_ago_never_stalls_the_leader(
    mesh: Mesh, coalesce: str
) -> None:
    start = (datetime.now(UTC) - timedelta(days=365)).isoformat()
    sid = f"year-ago-{coalesce}"
    before = fire_counters(mesh.leader)
    status, body = post(
        mesh.follower,
        "/api/schedules",
        {
            "id": sid,
            "task": "hostile_noop",
            "trigger": {"type": "interval", "seconds": 1, "start_time": start},
            "coalesce": coalesce,
        },
    )
    assert status == 201, body

    def caught_up() -> dict[str, Any] | None:
        s = mesh.leader.get_json(f"/api/schedules/{sid}")
        nft = s and s["next_fire_time"]
        recent = nft and datetime.fromisoformat(nft) > datetime.now(UTC) - timedelta(seconds=30)
        return s if recent else None

    mesh.cluster.wait_for(caught_up, 10.0, f"{sid} to reach the present")
    mesh.assert_leader_steady()
    status, _ = mesh.leader.request("DELETE", f"/api/schedules/{sid}", timeout=10.0)
    assert status == 204
    history = mesh.leader.get_json(f"/api/executions?schedule_id={sid}&limit=10000")
    # "all" runs at most the latest 100 missed fire times (docs/scheduling.md), plus the
    # fires of the few seconds the test took.
    assert len(history["executions"]) <= 100 + 30, len(history["executions"])
    # The skipped ones are counted, in the replicated counter every voter exports alike.
    skipped = "schedulezero_fires_skipped_total"
    after = fire_counters(mesh.leader)
    assert set(after) == {
        "schedulezero_fires_recorded_total",
        "schedulezero_fires_deduplicated_total",
        skipped,
    }
    missed = 365 * 86400
    if coalesce == "all":
        assert missed - 200 <= after[skipped] - before[skipped] <= missed, (before, after)
    else:
        assert after[skipped] == before[skipped]  # "latest" runs one: nothing is skipped
    assert after["schedulezero_fires_recorded_total"] > before["schedulezero_fires_recorded_total"]

    def replicated() -> bool:
        return fire_counters(mesh.follower)[skipped] == fire_counters(mesh.leader)[skipped]

    mesh.cluster.wait_for(replicated, 10.0, "the follower's fires_skipped to equal the leader's")


@pytest.mark.parametrize(
    ("trigger", "words"),
    [
        ({"type": "calendarinterval", "years": 10**18}, ("trigger.years", "from 0 to 100")),
        ({"type": "interval", "seconds": 10**400}, ("trigger",)),
        ({"type": "interval", "days": 10**6}, ("at most", "100 years")),
        ({"type": "interval", "seconds": 1, "start_time": "9999-12-31T00:00:00Z"}, ("years",)),
        ({"type": "cron", "expr": "0 0 30 2 *"}, ("never fires",)),
        ({"type": "cron", "day": 31, "month": "apr,jun"}, ("never fires",)),
        ({"type": "cron", "year": 2020}, ("never fires",)),
    ],
)
def test_out_of_range_or_never_firing_triggers_are_refused(
    mesh: Mesh, trigger: dict[str, Any], words: tuple[str, ...]
) -> None:
    started = time.monotonic()
    status, body = post(mesh.follower, "/api/schedules", {"task": "t", "trigger": trigger})
    assert_refused(status, body, *words)
    assert time.monotonic() - started < 2.0
    mesh.assert_leader_steady()


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("field", ["args", "kwargs", "metadata"])
@pytest.mark.parametrize("depth", [40, 700])
def test_user_data_nested_deeper_than_32_levels_is_refused(
    mesh: Mesh, field: str, depth: int
) -> None:
    deep = nested(depth)
    value = {"deep": deep} if field != "args" else [deep]
    body = {"task": "t", "trigger": {"type": "interval", "hours": 1}, field: value}
    # Within the body's 64 levels the schema names the field and its bound; deeper, the HTTP
    # layer refuses the whole body while parsing it (api.max_json_depth).
    expect = (field, "32") if depth < 64 else ("nested too deeply", "64")
    assert_refused(*post(mesh.follower, "/api/schedules", body), *expect)
    if field != "metadata":
        job = {"task": "t", field: value}
        assert_refused(*post(mesh.follower, "/api/jobs", job), *expect)
    mesh.assert_leader_steady()


def test_a_body_nested_5000_deep_is_a_400_on_every_route(mesh: Mesh) -> None:
    # The probe: a RecursionError anywhere on the request's path (parsing, the audit
    # record looking for a schedule id) was a 500.
    raw = b"[" * 5000 + b"]" * 5000
    for node in (mesh.follower, mesh.leader):
        for path in ("/api/schedules", "/api/jobs"):
            status, body = post_raw(node, path, raw)
            assert status == 400 and "nested too deeply" in body["error"], (path, body)
    mesh.assert_leader_steady()


@pytest.mark.parametrize(
    "query",
    ["limit=%C2%B2", "limit=0", "limit=10001", "limit=-1", "limit=1&limit=2", "x=1", "after="],
)
def test_a_bad_query_parameter_is_a_400(mesh: Mesh, query: str) -> None:
    for path in ("/api/executions", "/api/schedules", "/api/handlers"):
        status, body = mesh.follower.request("GET", f"{path}?{query}")
        assert status == 400, (path, query, body)
    mesh.assert_leader_steady()


def test_every_list_pages_with_limit_and_after(mesh: Mesh) -> None:
    for i in range(5):
        body = {
            "id": f"page-{i}",
            "task": "hostile_noop",
            "trigger": {"type": "interval", "hours": 1},
        }
        assert post(mesh.follower, "/api/schedules", body)[0] == 201
    ids: list[str] = []
    cursor: str | None = None
    while True:
        query = "limit=2" + (f"&after={cursor}" if cursor else "")
        page = mesh.follower.get_json(f"/api/schedules?{query}")
        assert len(page["schedules"]) <= 2
        ids += [s["id"] for s in page["schedules"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert [i for i in ids if i.startswith("page-")] == [f"page-{i}" for i in range(5)]
    assert ids == sorted(ids)
    everything = mesh.follower.get_json("/api/schedules")
    assert [s["id"] for s in everything["schedules"]] == ids and everything["next"] is None

    for _ in range(3):
        status, body = post(mesh.follower, "/api/jobs", {"task": "hostile_noop"})
        assert status == 202
        finished_job(mesh, body["job_id"])
    first = mesh.follower.get_json("/api/executions?limit=2")
    assert len(first["executions"]) == 2 and first["next"] == first["executions"][-1]["job_id"]
    second = mesh.follower.get_json(f"/api/executions?limit=2&after={first['next']}")
    older = mesh.follower.get_json("/api/executions?limit=4")["executions"][2:]
    assert second["executions"] == older
    assert mesh.follower.get_json("/api/handlers?limit=1")["next"] is None


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_a_task_returning_nan_or_infinity_is_recorded_as_an_error(mesh: Mesh, kind: str) -> None:
    status, body = post(mesh.follower, "/api/jobs", {"task": "hostile_nan", "args": [kind]})
    assert status == 202, body
    job = finished_job(mesh, body["job_id"])
    assert job["status"] == "error", job
    assert "not plain JSON" in job["error"]["message"], job
    mesh.assert_leader_steady()
    # The leader still records what comes next.
    status, body = post(mesh.follower, "/api/jobs", {"task": "hostile_echo", "args": [1]})
    assert finished_job(mesh, body["job_id"])["status"] == "success"
