"""cancel_other's stopping of runs: the handler's ``cancel_job`` (and who may send it), the
leader's sweep that sends it, and embedded runs on the leader.

The handler is a real ``HandlerProcess`` whose node is not there: messages are handed to it as
its transport would hand them over, with the sender's key name and role.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from apscheduler import Job

import tests.fixtures.handler_tasks  # noqa: F401  (registers the tasks)
from mesh.contracts import Incoming
from mesh.dispatch import protocol as p
from mesh.dispatch.handler import HandlerProcess
from mesh.scheduling import cancel
from mesh.scheduling.executor import MeshJobExecutor
from mesh.scheduling.outcomes import RunCancelled
from mesh.scheduling.session import LeaderSession
from mesh.scheduling.state import JobState
from tests.fakes import FakeReplica
from tests.netutil import free_mesh_address
from tests.waiting import wait_until_async

WAIT = 5.0


@pytest.fixture
async def handler() -> AsyncIterator[HandlerProcess]:
    h = HandlerProcess("h1", [free_mesh_address()])
    await h.start()
    yield h
    await h.stop(drain_timeout=0)


def run(handler: HandlerProcess, task: str, args: list[Any], token: int = 5) -> None:
    """A node's dispatch of job "job1" (key "key1") with fencing token ``token``."""
    payload = {
        "dispatch_id": "d1",
        "job_id": "job1",
        "task": task,
        "args": args,
        "idempotency_key": "key1",
        "fencing_token": token,
        "attempt": 1,
        "start_by": p.deadline_clock() + 60,
    }
    send(handler, p.DISPATCH, payload)


def send(
    handler: HandlerProcess, kind: str, payload: dict[str, Any], sender: str = "n1", role="node"
) -> None:
    address = next(iter(handler.nodes))
    handler._on_message(Incoming(kind, payload, b"", b"", address, sender, role))


def cancel_of(job_id: str = "job1", key: str = "key1", token: int = 5) -> dict[str, Any]:
    return {"job_id": job_id, "idempotency_key": key, "fencing_token": token}


async def test_a_cancel_from_the_leader_stops_an_async_run_and_its_result_says_cancelled(
    handler: HandlerProcess,
) -> None:
    run(handler, "slow", [30])
    send(handler, p.CANCEL_JOB, cancel_of())
    finished = await wait_until_async(lambda: handler.idempotency.get("key1"), WAIT)
    assert finished.outcome == p.CANCELLED
    assert handler.counters["cancelled"] == 1 and handler.active_jobs == 0


@pytest.mark.parametrize("role", ["handler", "replica"])
async def test_a_cancel_from_a_key_that_is_not_a_nodes_is_dropped(
    handler: HandlerProcess, role: str
) -> None:
    run(handler, "slow", [30])
    send(handler, p.CANCEL_JOB, cancel_of(), sender="h2", role=role)
    assert handler.rejections.counts["role"] == 1
    assert handler.active_jobs == 1 and not handler._running["key1"].cancelled


async def test_a_cancel_for_a_job_the_handler_does_not_run_is_ignored(
    handler: HandlerProcess,
) -> None:
    run(handler, "slow", [30])
    send(handler, p.CANCEL_JOB, cancel_of(job_id="job2"))  # the key is ours, the job is not
    send(handler, p.CANCEL_JOB, cancel_of(job_id="job9", key="key9"))
    assert handler.counters["cancel_refused.unknown_job"] == 2
    assert handler.active_jobs == 1 and not handler._running["key1"].cancelled


async def test_a_cancel_with_an_older_fencing_token_is_ignored(handler: HandlerProcess) -> None:
    run(handler, "slow", [30], token=5)
    send(handler, p.CANCEL_JOB, cancel_of(token=4))
    assert handler.counters["cancel_refused." + p.STALE_FENCING_TOKEN] == 1
    assert handler.active_jobs == 1 and not handler._running["key1"].cancelled


@pytest.mark.parametrize(
    "payload", [{}, {"job_id": "job1"}, cancel_of(token=-1), {**cancel_of(), "job_id": ""}]
)
async def test_a_malformed_cancel_is_counted_and_stops_nothing(
    handler: HandlerProcess, payload: dict[str, Any]
) -> None:
    run(handler, "slow", [30])
    send(handler, p.CANCEL_JOB, payload)
    assert handler.counters["bad_requests"] == 1 and handler.active_jobs == 1


async def test_a_sync_run_cannot_be_stopped_and_runs_to_its_end(
    handler: HandlerProcess, tmp_path: Any
) -> None:
    run(handler, "count_to_file", [str(tmp_path / "runs"), 0.3])
    send(handler, p.CANCEL_JOB, cancel_of())
    assert handler.counters["cancel_refused.sync_task"] == 1
    finished = await wait_until_async(lambda: handler.idempotency.get("key1"), WAIT)
    assert finished.outcome == "success"


# --------------------------------------------------------------------------- the leader


class Sent:
    def __init__(self) -> None:
        self.cancels: list[tuple[str, str, int]] = []

    def cancel(self, handler_id: str, job: Job, fencing_token: int) -> bool:
        self.cancels.append((handler_id, str(job.id), fencing_token))
        return True

    def offers(self, task: str) -> bool:
        return False


def leader(term: int = 3) -> tuple[LeaderSession, MeshJobExecutor, Sent]:
    replica = FakeReplica("n1")
    replica.become_leader(term)
    session = LeaderSession(replica, replica.state_machine, term)
    sent = Sent()
    return session, MeshJobExecutor(session, dispatcher=sent), sent  # type: ignore[arg-type]


def flagged(session: LeaderSession, *, handler: str | None, leased: bool) -> Job:
    job = Job(task_id="t", schedule_id="s", executor="mesh")
    js = JobState(job, handler=handler, cancel=True)
    if leased:
        job.acquired_by = session.identity
    session.state.jobs[job.id] = js
    session.state.cancelling[job.id] = None
    return job


async def test_the_leader_sends_a_flagged_jobs_cancel_to_its_handler_and_again_later() -> None:
    session, executor, sent = leader()
    job = flagged(session, handler="h1", leased=True)
    marks: dict[Any, float] = {}
    cancel.sweep(session, executor, sent, marks, now=100.0)  # type: ignore[arg-type]
    cancel.sweep(session, executor, sent, marks, now=100.1)  # type: ignore[arg-type]
    assert sent.cancels == [("h1", str(job.id), 3)]
    cancel.sweep(session, executor, sent, marks, now=100.0 + cancel.RESEND_SECONDS)  # type: ignore[arg-type]
    assert len(sent.cancels) == 2


async def test_a_new_leader_sends_the_cancel_once_it_has_taken_the_job_over() -> None:
    session, executor, sent = leader(term=4)
    job = flagged(session, handler="h1", leased=False)  # lease reset by the new term
    cancel.sweep(session, executor, sent, {}, now=1.0)  # type: ignore[arg-type]
    assert sent.cancels == []
    job.acquired_by = session.identity  # its job loop re-dispatched it to h1
    cancel.sweep(session, executor, sent, {}, now=2.0)  # type: ignore[arg-type]
    assert sent.cancels == [("h1", str(job.id), 4)]


async def test_a_flagged_job_no_one_ever_dispatched_ends_cancelled_without_running() -> None:
    session, executor, _ = leader()
    job = flagged(session, handler=None, leased=True)
    with pytest.raises(RunCancelled):
        await executor.run_job(lambda: None, job)


async def test_an_embedded_async_run_on_the_leader_is_stopped_by_the_sweep() -> None:
    session, executor, sent = leader()
    job = Job(task_id="slow", args=(30,), schedule_id="s", executor="mesh")
    session.state.jobs[job.id] = JobState(job)
    running = asyncio.ensure_future(executor.run_job(lambda: None, job))
    await wait_until_async(lambda: executor.stop(job.id) or None, WAIT, "the run started")
    session.state.jobs[job.id].cancel = True
    session.state.cancelling[job.id] = None
    cancel.sweep(session, executor, sent, {}, now=1.0)  # type: ignore[arg-type]
    with pytest.raises(RunCancelled):
        await asyncio.wait_for(running, WAIT)
    assert sent.cancels == []


# --------------------------------------------------------------------------- the dispatcher


async def test_the_dispatcher_sends_cancel_job_and_a_cancelled_result_ends_the_run() -> None:
    from tests.fakes import HOLD
    from tests.test_dispatcher_unit import Leader

    leader = Leader()
    leader.lead()
    a = leader.handler("a")
    a.script(HOLD)
    job = await leader.job()
    running = asyncio.create_task(leader.dispatch(job))
    await leader.bus.wait_sent(p.DISPATCH_START, 1)
    assert leader.dispatcher.cancel("a", job, 7)
    [sent] = [m for m in leader.bus.sent if m.kind == p.CANCEL_JOB]
    assert sent.identity == b"a"
    assert sent.payload == {"job_id": str(job.id), "idempotency_key": "job:" + str(job.id),
                            "fencing_token": 7}  # fmt: skip
    assert not leader.dispatcher.cancel("nobody", job, 7)
    [dispatch_id] = list(a.held)
    d = a.held.pop(dispatch_id)
    result = {"dispatch_id": dispatch_id, "handler_id": "a", "job_id": d["job_id"],
              "idempotency_key": d["idempotency_key"], "outcome": p.CANCELLED}  # fmt: skip
    leader.bus.deliver(p.JOB_RESULT, result, identity=a.identity)
    with pytest.raises(RunCancelled):
        await asyncio.wait_for(running, WAIT)


async def test_the_cancel_loop_sleeps_until_a_run_is_flagged_then_sends_its_cancel() -> None:
    session, executor, sent = leader()
    loop = asyncio.create_task(cancel.cancel_flagged(session, executor, sent))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(cancel.SWEEP_SECONDS * 2)
        assert sent.cancels == []  # nothing flagged: it waits (woken, not polling)
        job = flagged(session, handler="h1", leased=True)
        session.state._wake_watchers()  # what the state machine does when it flags a run
        await wait_until_async(lambda: sent.cancels or None, WAIT, "the cancel")
        assert sent.cancels == [("h1", str(job.id), 3)]
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert session.state._watchers == set()  # the loop stopped watching when it ended
