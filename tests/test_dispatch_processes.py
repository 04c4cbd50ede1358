"""Dispatch end to end: real node processes, real handler processes, on 127.0.0.1.

Jobs go in through a follower (``POST /api/jobs``); the leader dispatches them to handler
processes running ``tests.fixtures.dispatch_tasks``, whose tasks record every run in files. The
tests then read those files and the replicated execution history: who ran what, how often, with
which attempt number and when.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, HandlerProc, NodeProcess
from tests.waiting import wait_until

TASKS = "tests.fixtures.dispatch_tasks"
OTHER_TASKS = "tests.fixtures.handler_tasks"  # offers none of the tasks above
SUBMITTERS = 8  # concurrent HTTP clients submitting jobs
FINISHED = {"success", "error", "missed_start_deadline", "cancelled", "abandoned"}

pytestmark = pytest.mark.timeout(90)

HandlerFactory = Callable[..., HandlerProc]


@pytest.fixture
def handler_factory(tmp_path: Path) -> Iterator[HandlerFactory]:
    """``handler_factory(handler_id, mesh, tasks=(TASKS,), concurrency=4, start=True)`` → a
    ``HandlerProc``; every handler is stopped after the test, pass or fail."""
    made: list[HandlerProc] = []

    def factory(
        handler_id: str,
        mesh: Iterable[str],
        *,
        tasks: Iterable[str] = (TASKS,),
        concurrency: int = 4,
        start: bool = True,
    ) -> HandlerProc:
        h = HandlerProc(
            handler_id,
            list(mesh),
            list(tasks),
            tmp_path / "handlers" / handler_id,
            concurrency=concurrency,
        )
        made.append(h)
        if start:
            h.start()
        return h

    try:
        yield factory
    finally:
        for h in made:
            if h.running:
                h.kill(signal.SIGKILL)  # nothing to drain: the test is over


# ---------------------------------------------------------------------------- helpers


def _meshes(cluster: Cluster) -> list[str]:
    return [n.mesh for n in cluster.nodes]


def _follower(cluster: Cluster) -> tuple[NodeProcess, NodeProcess]:
    leader = cluster.wait_for_leader()
    return leader, next(n for n in cluster.running() if n is not leader)


def _handlers(node: NodeProcess) -> dict[str, dict[str, Any]]:
    body = node.get_json("/api/handlers")
    return {h["handler_id"]: h for h in body["handlers"]} if body else {}


def _wait_alive(
    cluster: Cluster, handlers: Iterable[HandlerProc], timeout: float = 15.0
) -> dict[str, dict[str, Any]]:
    """Wait until the leader sees every handler alive (with its current pid)."""
    want = {h.handler_id: h.pid for h in handlers}

    def check() -> dict[str, dict[str, Any]] | None:
        leader = cluster.leader_now()
        if leader is None:
            return None
        seen = _handlers(leader)
        ok = all(
            hid in seen and seen[hid]["state"] == "alive" and seen[hid]["pid"] == pid
            for hid, pid in want.items()
        )
        return seen if ok else None

    return cluster.wait_for(check, timeout, f"handlers {sorted(want)} alive on the leader")


def _submit(node: NodeProcess, task: str, kwargs_list: list[dict[str, Any]]) -> list[str]:
    """POST one run-now job per kwargs, from several clients at once; returns the job ids."""

    def one(kwargs: dict[str, Any]) -> str:
        status, body = node.request(
            "POST", "/api/jobs", {"task": task, "kwargs": kwargs}, timeout=15
        )
        assert status == 202, (status, body)
        return body["job_id"]

    with ThreadPoolExecutor(SUBMITTERS) as pool:
        return list(pool.map(one, kwargs_list))


def _executions(node: NodeProcess) -> dict[str, dict[str, Any]]:
    body = node.get_json("/api/executions?limit=10000", timeout=5.0)
    return {e["job_id"]: e for e in body["executions"]} if body else {}


def _wait_finished(
    cluster: Cluster, node: NodeProcess, job_ids: list[str], timeout: float
) -> dict[str, dict[str, Any]]:
    """Wait until every job has an execution record; returns them by job id."""
    want = set(job_ids)

    def check() -> dict[str, dict[str, Any]] | None:
        got = _executions(node)
        return got if want <= got.keys() else None

    return cluster.wait_for(check, timeout, f"{len(want)} jobs to finish", interval=0.2)


def _statuses(node: NodeProcess, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """GET /api/jobs/{id} for every job."""

    def one(job_id: str) -> tuple[str, dict[str, Any]]:
        status, body = node.request("GET", f"/api/jobs/{job_id}", timeout=5)
        assert status == 200, (job_id, status, body)
        return job_id, body

    with ThreadPoolExecutor(SUBMITTERS) as pool:
        return dict(pool.map(one, job_ids))


def _records(path: Path) -> list[dict[str, Any]]:
    paths = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    out = []
    for p in paths:
        if p.exists():
            out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    # An end sorts before a start at the same instant: touching intervals do not overlap.
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _max_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


# ---------------------------------------------------------------------------- tests


def test_three_handlers_share_300_jobs_evenly_and_each_job_runs_once(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3)
    _, follower = _follower(cluster)
    handlers = [handler_factory(f"h{i}", _meshes(cluster)) for i in range(3)]
    _wait_alive(cluster, handlers)
    out = tmp_path / "runs"
    out.mkdir()

    job_ids = _submit(follower, "tally", [{"out_dir": str(out)}] * 300)
    executions = _wait_finished(cluster, follower, job_ids, 60)

    shares = Counter(executions[j]["handler_id"] for j in job_ids)
    print(f"distribution of 300 jobs: {dict(sorted(shares.items()))}")
    assert set(shares) == {"h0", "h1", "h2"}
    assert all(90 <= n <= 110 for n in shares.values()), shares
    statuses = _statuses(follower, job_ids)
    assert {j for j, s in statuses.items() if s["status"] != "success"} == set()
    ends = [r for r in _records(out) if r["event"] == "end"]
    runs = Counter(r["job_id"] for r in ends)
    assert set(runs) == set(job_ids) and set(runs.values()) == {1}
    assert Counter(r["handler_id"] for r in ends) == shares
    assert {r["attempt"] for r in ends} == {1}


def test_killing_a_handler_mid_run_loses_no_job_and_retries_its_jobs_elsewhere(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3)
    _, follower = _follower(cluster)
    handlers = [handler_factory(f"h{i}", _meshes(cluster)) for i in range(3)]
    victim = handlers[1]
    _wait_alive(cluster, handlers)
    out = tmp_path / "runs"
    out.mkdir()
    victim_file = out / f"{victim.handler_id}.jsonl"

    def burst(n: int) -> list[str]:
        return _submit(
            follower,
            "tally",
            [{"out_dir": str(out), "seconds": 0.05 + (i % 6) / 100} for i in range(n)],
        )

    def victim_busy() -> bool:
        recs = _records(victim_file)
        started = Counter(r["idempotency_key"] for r in recs)
        return len(recs) >= 10 and any(n == 1 for n in started.values())

    job_ids = burst(30) + burst(30)
    cluster.wait_for(victim_busy, 20, "the victim handler to be mid-job", interval=0.005)
    victim.kill(signal.SIGKILL)
    for _ in range(3):
        job_ids += burst(30)
        time.sleep(0.2)
    executions = _wait_finished(cluster, follower, job_ids, 60)

    statuses = _statuses(follower, job_ids)
    assert {j for j, s in statuses.items() if s["status"] != "success"} == set()
    records = _records(out)
    ends = defaultdict(list)
    for r in records:
        if r["event"] == "end":
            ends[r["idempotency_key"]].append(r)
    assert len(ends) == len(job_ids) == 150
    # At least once: a second run is only allowed as a retry of a job the victim was running.
    for runs in ends.values():
        if len(runs) > 1:
            assert victim.handler_id in {r["handler_id"] for r in runs}, runs
            assert all(a > 1 for a in sorted(r["attempt"] for r in runs)[1:]), runs
    victim_recs = [r for r in records if r["handler_id"] == victim.handler_id]
    victim_ended = {r["idempotency_key"] for r in victim_recs if r["event"] == "end"}
    cut_short = {r["job_id"] for r in victim_recs if r["idempotency_key"] not in victim_ended}
    print(
        f"victim ran {len(victim_ended)} jobs, {len(cut_short)} cut short by SIGKILL; "
        f"duplicates: {sum(len(r) > 1 for r in ends.values())}; "
        f"shares: {dict(Counter(executions[j]['handler_id'] for j in job_ids))}"
    )
    assert cut_short, "the victim was killed mid-job, so some of its jobs were cut short"
    for job_id in cut_short:
        assert executions[job_id]["handler_id"] not in (None, victim.handler_id)
        retried = [r for r in records if r["job_id"] == job_id and r["event"] == "end"]
        assert len(retried) == 1 and retried[0]["attempt"] > 1, retried


def test_a_restarted_handler_rejoins_the_rotation(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3)
    leader, follower = _follower(cluster)
    handlers = [handler_factory(f"h{i}", _meshes(cluster)) for i in range(3)]
    comeback = handlers[2]
    _wait_alive(cluster, handlers)
    out = tmp_path / "runs"
    out.mkdir()

    def shares(n: int) -> Counter[str]:
        job_ids = _submit(follower, "tally", [{"out_dir": str(out)}] * n)
        executions = _wait_finished(cluster, follower, job_ids, 30)
        assert {executions[j]["outcome"] for j in job_ids} == {"success"}
        return Counter(executions[j]["handler_id"] for j in job_ids)

    assert shares(30)[comeback.handler_id] > 0
    old_pid = comeback.pid
    comeback.kill(signal.SIGKILL)
    cluster.wait_for(
        lambda: _handlers(leader)[comeback.handler_id]["state"] == "dead",
        10,
        "the leader to see the killed handler dead",
    )
    assert shares(30)[comeback.handler_id] == 0
    comeback.restart()
    seen = _wait_alive(cluster, handlers)
    assert seen[comeback.handler_id]["pid"] not in (None, old_pid)
    after = shares(60)
    print(f"after the restart: {dict(sorted(after.items()))}")
    assert after[comeback.handler_id] >= 12, after


def test_jobs_of_a_handler_restarted_mid_job_under_the_same_id_are_retried_not_stranded(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    # Back within DEAD_AFTER, the new process heartbeats under the old id, so the handler never
    # looks dead: only its new incarnation tells the leader that the old jobs are gone.
    cluster = cluster_factory(3)
    _, follower = _follower(cluster)
    handler = handler_factory("h0", _meshes(cluster))
    _wait_alive(cluster, [handler])
    out = tmp_path / "runs"
    out.mkdir()

    job_ids = _submit(follower, "tally", [{"out_dir": str(out), "seconds": 1.0}] * 2)
    cluster.wait_for(lambda: len(_records(out)) == 2, 10, "both jobs to start")
    handler.kill(signal.SIGKILL)
    handler.restart()
    executions = _wait_finished(cluster, follower, job_ids, 10)

    assert {executions[j]["outcome"] for j in job_ids} == {"success"}
    ends = [r for r in _records(out) if r["event"] == "end"]
    assert sorted((r["job_id"], r["attempt"]) for r in ends) == sorted((j, 2) for j in job_ids)


def test_a_schedule_for_a_task_no_handler_offers_yet_warns_then_runs_when_one_arrives(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3)
    _, follower = _follower(cluster)
    bystander = handler_factory("bystander", _meshes(cluster), tasks=(OTHER_TASKS,))
    _wait_alive(cluster, [bystander])
    out = tmp_path / "runs"
    out.mkdir()

    status, created = follower.request(
        "POST",
        "/api/schedules",
        {
            "id": "early",
            "task": "tally",
            "trigger": {"type": "interval", "seconds": 0.5},
            "kwargs": {"out_dir": str(out)},
            "misfire_grace_time": 30,
        },
    )
    assert status == 201, created
    assert created["warnings"] and "tally" in created["warnings"][0], created
    second_fire = datetime.fromisoformat(created["next_fire_time"]) + timedelta(seconds=0.5)

    def fired_twice() -> bool:
        body = follower.get_json("/api/schedules/early")
        last = body and body["last_fire_time"]
        return bool(last) and datetime.fromisoformat(last) >= second_fire

    # Two fires made jobs while the bystander (without the task) was there to be wrongly
    # picked: they wait for a handler that offers it, neither run nor fail.
    cluster.wait_for(fired_twice, 10, "the schedule to fire twice")
    assert _records(out) == []
    assert follower.get_json("/api/executions?schedule_id=early")["executions"] == []
    late = handler_factory("late", [cluster.nodes[0].mesh])
    cluster.wait_for(lambda: len(_records(out)) >= 3, 20, "runs on the late handler")

    def executed() -> list[dict[str, Any]] | None:
        body = follower.get_json("/api/executions?schedule_id=early&limit=100")
        return body["executions"] if body and len(body["executions"]) >= 3 else None

    history = cluster.wait_for(executed, 10, "the runs in the execution history")
    assert {(e["outcome"], e["handler_id"]) for e in history} == {("success", "late")}, history
    assert {r["handler_id"] for r in _records(out)} == {"late"}
    assert late.running


def test_a_job_for_a_task_no_handler_offers_ends_with_an_error_naming_the_task(
    cluster_factory, handler_factory
) -> None:
    cluster = cluster_factory(3, config={"dispatch": {"no_handler_wait": 1.0}})
    _, follower = _follower(cluster)
    _wait_alive(cluster, [handler_factory("h0", _meshes(cluster))])

    submitted = time.monotonic()
    status, body = follower.request("POST", "/api/jobs", {"task": "no_such_task"})
    assert status == 202, body
    assert any("no_such_task" in w for w in body.get("warnings", [])), body

    def finished() -> dict[str, Any] | None:
        st, job = follower.request("GET", f"/api/jobs/{body['job_id']}")
        return job if st == 200 and job["status"] in FINISHED else None

    job = cluster.wait_for(finished, 15, "the job to end")
    waited = time.monotonic() - submitted
    assert job["status"] == "error", job
    assert "no_such_task" in job["error"]["message"], job
    assert "no_handler_wait, 1s" in job["error"]["message"], job  # which wait ran out
    print(f"no handler after {waited:.2f}s: {job['error']}")
    assert waited >= 1.0


def test_a_task_concurrency_limit_holds_across_handlers(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3, config={"governors": {"task_concurrency": {"sleepy": 2}}})
    _, follower = _follower(cluster)
    handlers = [handler_factory(f"h{i}", _meshes(cluster), concurrency=4) for i in range(3)]
    _wait_alive(cluster, handlers)
    out = tmp_path / "intervals.jsonl"

    job_ids = _submit(follower, "sleepy", [{"path": str(out), "seconds": 0.25}] * 20)
    _wait_finished(cluster, follower, job_ids, 40)

    records = _records(out)
    assert sorted(r["job_id"] for r in records) == sorted(job_ids)
    peak = _max_overlap([(r["start"], r["end"]) for r in records])
    print(f"max overlap of 20 sleepy jobs (limit 2): {peak}")
    assert peak == 2
    assert len({r["handler_id"] for r in records}) > 1  # the limit is mesh-wide, not per handler


def test_a_task_rate_limit_holds_end_to_end(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3, config={"governors": {"task_rates": {"ticky": 20}}})
    _, follower = _follower(cluster)
    handlers = [handler_factory(f"h{i}", _meshes(cluster)) for i in range(3)]
    _wait_alive(cluster, handlers)
    out = tmp_path / "starts.jsonl"

    job_ids = _submit(follower, "ticky", [{"path": str(out)}] * 150)
    _wait_finished(cluster, follower, job_ids, 40)

    starts = sorted(r["at"] for r in _records(out))
    assert len(starts) == 150
    busiest = _max_in_window(starts, 1.0)
    first_five = sum(1 for t in starts if t < starts[0] + 5.0)
    print(
        f"rate 20/s: busiest 1 s window {busiest} starts; first 5 s {first_five} starts; "
        f"150 starts over {starts[-1] - starts[0]:.2f} s"
    )
    assert busiest <= 22
    assert 90 <= first_five <= 110


def test_jobs_waiting_for_a_rate_limit_queue_for_busy_handlers_instead_of_failing(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    # The handlers (2 slots, 0.5 s jobs: 4 jobs/s) are slower than the rate (10/s). A job must
    # pick its handler after its token, not before: a handler picked while the job queued for
    # its token is busy by then, refuses (at_capacity) and the job used up its attempts.
    cluster = cluster_factory(3, config={"governors": {"task_rates": {"sleepy": 10}}})
    leader, follower = _follower(cluster)
    handlers = [handler_factory(f"h{i}", _meshes(cluster), concurrency=1) for i in range(2)]
    _wait_alive(cluster, handlers)
    out = tmp_path / "intervals.jsonl"

    job_ids = _submit(follower, "sleepy", [{"path": str(out), "seconds": 0.5}] * 12)
    executions = _wait_finished(cluster, follower, job_ids, 30)

    failed = {
        j: executions[j].get("error") for j in job_ids if executions[j]["outcome"] != "success"
    }
    assert failed == {}
    assert {h["state"] for h in _handlers(leader).values()} == {"alive"}
    assert Counter(executions[j]["handler_id"] for j in job_ids) == {"h0": 6, "h1": 6}


def test_a_handler_started_before_the_mesh_connects_and_receives_jobs(
    cluster_factory, handler_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3, start=False)
    early = handler_factory("early", [cluster.nodes[0].mesh])
    # Its first hello timed out (its log says so): it is up and retrying, nothing listens yet.
    wait_until(
        lambda: not early.running or "not reachable yet" in early.stderr_path.read_text(),
        15,
        lambda: f"the handler to report the node not reachable yet\n{early.output_tail()}",
    )
    assert early.running, early.output_tail()
    cluster.start()
    _, follower = _follower(cluster)
    _wait_alive(cluster, [early])
    out = tmp_path / "runs"
    out.mkdir()

    job_ids = _submit(follower, "tally", [{"out_dir": str(out)}] * 10)
    executions = _wait_finished(cluster, follower, job_ids, 20)

    assert {(e["outcome"], e["handler_id"]) for e in executions.values()} == {("success", "early")}


def test_jobs_beyond_the_queue_limit_get_429(cluster_factory) -> None:
    cluster = cluster_factory(
        3,
        config={"governors": {"max_queued_jobs": 5}, "dispatch": {"no_handler_wait": 30}},
    )
    _, follower = _follower(cluster)

    answers = [
        follower.request("POST", "/api/jobs", {"task": "nohandler"}, timeout=10) for _ in range(7)
    ]

    assert [status for status, _ in answers] == [202] * 5 + [429] * 2, answers
    error = answers[5][1]["error"]
    assert "queued" in error and "limit 5" in error and "retry later" in error, error
