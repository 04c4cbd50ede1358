"""HandlerDispatcher on a FakeReplica and a FakeBus, with scripted handlers (in-process).

Each test builds a leader of term 1 (``Leader``): the dispatcher, a real ``SchedulerState`` fed
through the fake log, a handler registry on a clock that stands still (handlers stay alive), and
a ``LeaderSession`` whose jobs are really added and acquired through the log, so the assignment
command the dispatcher commits is applied by the real state machine.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler import Job

from mesh.config import DispatchConfig
from mesh.contracts import term_identity
from mesh.dispatch import protocol as p
from mesh.dispatch.dispatcher import WATCH_INTERVAL, Fenced, HandlerDispatcher
from mesh.dispatch.registry import CIRCUIT_COOLDOWN, CIRCUIT_FAILURES, HandlerRegistry
from mesh.scheduling.controls import Controls, with_controls
from mesh.scheduling.executor import TaskUnavailable
from mesh.scheduling.outcomes import JobTimedOut
from mesh.scheduling.session import LeaderSession
from mesh.scheduling.state import RemoteJobError, dump_job, idempotency_key
from mesh.tasks import JobContext
from tests.fakes import BUSY, FAIL, HOLD, SILENT, FakeBus, FakeHandler, FakeReplica, ManualClock

TERM = 1
WAIT = 5.0  # bound on every dispatch: a hang fails the test instead of stalling the run
FAST = {"backoff_initial": 0.001, "backoff_max": 0.01}
FIRE = datetime(2024, 1, 1, tzinfo=UTC)


class Leader:
    def __init__(self, *, bus: FakeBus | None = None, **settings: Any) -> None:
        self.replica = FakeReplica("n1", mesh_address="tcp://127.0.0.1:7100")
        self.replica.add_peer("n2", "tcp://127.0.0.1:7200", "127.0.0.1:8200")
        self.state = self.replica.state_machine
        self.bus = bus or FakeBus()
        self.registry = HandlerRegistry(clock=ManualClock())
        self.dispatcher = HandlerDispatcher(
            self.replica,
            self.bus,
            self.replica,
            self.state,
            registry=self.registry,
            settings=DispatchConfig(**{**FAST, **settings}),
        )
        self.session: LeaderSession | None = None

    def lead(self) -> LeaderSession:
        self.replica.become_leader(TERM)
        self.session = LeaderSession(self.replica, self.state, TERM)
        return self.session

    def handler(self, handler_id: str, tasks: tuple[str, ...] = ("echo",), **kw: Any) -> Any:
        h = FakeHandler(self.bus, handler_id, tasks, **kw)
        h.hello()
        return h

    async def job(
        self,
        task: str = "echo",
        *,
        value: str = "x",
        schedule_id: str | None = None,
        fire: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        holder: str | None = None,
    ) -> Job:
        """A job added and acquired (by this leader's session, or ``holder``) through the log."""
        job = Job(
            task_id=task,
            executor="mesh",
            args=(value,),
            schedule_id=schedule_id,
            scheduled_fire_time=fire,
            metadata=metadata or {},
        )
        assert self.session is not None
        await self.replica.propose({"op": "add_job", "job": dump_job(job)})
        await self.replica.propose(
            {
                "op": "acquire_jobs",
                "scheduler_id": holder or self.session.identity,
                "ids": [str(job.id)],
                "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat(),
                "term": TERM,
            }
        )
        return job

    async def dispatch(self, job: Job) -> tuple[Any, str]:
        assert self.session is not None
        ctx = JobContext(
            job_id=str(job.id),
            task=job.task_id,
            schedule_id=job.schedule_id,
            scheduled_fire_time=job.scheduled_fire_time,
            idempotency_key=idempotency_key(job),
            attempt=1,
            fencing_token=TERM,
        )
        return await asyncio.wait_for(self.dispatcher.dispatch(job, ctx, self.session), WAIT)


# --------------------------------------------------------------------------- routing


async def test_equally_loaded_handlers_take_jobs_in_turn() -> None:
    leader = Leader()
    leader.lead()
    for hid in ("a", "b", "c"):
        leader.handler(hid)
    ran_on = [(await leader.dispatch(await leader.job()))[1] for _ in range(4)]
    assert ran_on == ["a", "b", "c", "a"]


async def test_a_job_goes_to_the_least_loaded_handler_even_out_of_turn() -> None:
    leader = Leader()
    leader.lead()
    a = leader.handler("a", concurrency=2)
    b = leader.handler("b", concurrency=4)
    a.script(HOLD, HOLD)
    b.script(HOLD, HOLD)
    running = []
    for n in range(1, 4):
        running.append(asyncio.create_task(leader.dispatch(await leader.job())))
        await leader.bus.wait_sent(p.DISPATCH_START, n)
    # In turn the third job would be a's; a is half full, b a quarter: b takes it.
    assert (len(a.held), len(b.held)) == (1, 2)
    a.finish_all()
    b.finish_all()
    assert sorted(h for _, h in await asyncio.gather(*running)) == ["a", "b", "b"]


async def test_a_sticky_schedule_goes_back_to_the_handler_that_ran_its_previous_job() -> None:
    leader = Leader()
    leader.lead()
    leader.handler("a")
    leader.handler("b")
    sticky = {"affinity": "sticky"}
    first = await leader.job(schedule_id="s", fire=FIRE, metadata=sticky)
    second = await leader.job(schedule_id="s", fire=FIRE + timedelta(minutes=1), metadata=sticky)
    assert (await leader.dispatch(first))[1] == "a"
    assert (await leader.dispatch(second))[1] == "a"  # b's turn, but the schedule sticks to a


# --------------------------------------------------------------------------- assignment


async def test_the_assignment_is_committed_by_this_leader_before_the_dispatch_is_sent() -> None:
    leader = Leader()
    session = leader.lead()
    leader.handler("a")
    job = await leader.job()
    seen_at_send: list[tuple[list[dict[str, Any]], str | None]] = []

    def on_send(msg: Any) -> None:
        if msg.kind == p.DISPATCH:
            seen_at_send.append(
                (leader.replica.commands("assign_job"), leader.state.jobs[job.id].handler)
            )

    leader.bus.on_send(on_send)
    await leader.dispatch(job)
    [(assigned, handler_of_job)] = seen_at_send
    assert assigned == [
        {
            "op": "assign_job",
            "job_id": str(job.id),
            "handler_id": "a",
            "scheduler_id": session.identity,
        }
    ]
    assert session.identity == term_identity("n1", TERM)
    assert handler_of_job == "a"


async def test_a_job_its_fire_round_assigned_here_is_dispatched_without_a_second_commit() -> None:
    leader = Leader()
    leader.lead()
    leader.handler("a")
    leader.handler("b")
    job = await leader.job()
    # As the fire round's lease records it: this term's lease and the handler it goes to.
    leader.state.jobs[job.id].handler = "b"
    _, handler_id = await leader.dispatch(job)
    assert handler_id == "b"
    assert leader.replica.commands("assign_job") == []
    assert [m.payload["job_id"] for m in leader.bus.sent_of(p.DISPATCH)] == [str(job.id)]


async def test_a_job_leased_by_another_leader_is_fenced_and_never_dispatched() -> None:
    leader = Leader()
    leader.lead()
    leader.handler("a")
    job = await leader.job(holder=term_identity("n2", TERM + 1))
    with pytest.raises(Fenced):
        await leader.dispatch(job)
    assert leader.bus.sent_of(p.DISPATCH) == []


# --------------------------------------------------------------------------- faults


async def test_an_at_capacity_refusal_is_not_counted_as_a_failed_attempt() -> None:
    leader = Leader(max_attempts=1)
    leader.lead()
    a = leader.handler("a")
    a.script(BUSY)
    value, handler_id = await leader.dispatch(await leader.job(value="done"))
    assert (value, handler_id) == ("done", "a")
    assert len(a.dispatches) == 2
    assert leader.registry.handlers["a"].consecutive_failures == 0


async def test_a_missing_ack_retries_on_another_handler_with_the_same_idempotency_key() -> None:
    leader = Leader(ack_timeout=0.2)
    leader.lead()
    a = leader.handler("a")
    b = leader.handler("b")
    a.script(SILENT)
    job = await leader.job(value="done")
    assert await leader.dispatch(job) == ("done", "b")
    [to_a], [to_b] = a.dispatches, b.dispatches
    assert to_a["idempotency_key"] == to_b["idempotency_key"] == idempotency_key(job)
    assert to_a["dispatch_id"] != to_b["dispatch_id"]
    assert (to_a["attempt"], to_b["attempt"]) == (1, 2)
    assert leader.registry.handlers["a"].consecutive_failures == 1


async def test_an_ack_arriving_after_the_leader_gave_up_is_told_not_to_start() -> None:
    leader = Leader(ack_timeout=0.2)
    leader.lead()
    a = leader.handler("a")
    b = leader.handler("b")
    a.script(SILENT)
    await leader.dispatch(await leader.job())
    late = a.dispatches[0]["dispatch_id"]
    a.ack(late)
    assert a.starts[late] is False
    assert all(b.starts.values())  # the retry that ran was started


async def test_an_error_raised_by_the_task_is_the_jobs_outcome_and_not_retried() -> None:
    leader = Leader()
    leader.lead()
    a = leader.handler("a")
    b = leader.handler("b")
    a.script(FAIL)
    with pytest.raises(RemoteJobError, match="boom"):
        await leader.dispatch(await leader.job())
    assert b.dispatches == []


async def test_a_job_whose_task_no_handler_offers_fails_with_task_unavailable_after_its_wait() -> (
    None
):
    leader = Leader(no_handler_wait=0.2)
    leader.lead()
    leader.handler("a", tasks=("other",))
    job = await leader.job("echo")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TaskUnavailable, match="no handler offered task 'echo'"):
        await leader.dispatch(job)
    assert loop.time() - started >= 0.2
    assert leader.bus.sent_of(p.DISPATCH) == []


def cool_down_open_circuit(leader: Leader, handler: FakeHandler) -> None:
    """Open the handler's circuit, then let its cool-down pass (it heartbeats all along)."""
    for _ in range(CIRCUIT_FAILURES):
        leader.registry.record_failure(leader.registry.handlers[handler.handler_id])
    leader.registry.clock.advance(CIRCUIT_COOLDOWN + 0.1)
    handler.hello()


async def test_after_the_cool_down_one_probe_job_goes_to_the_handler_at_a_time() -> None:
    leader = Leader(no_handler_wait=0.3)
    leader.lead()
    a = leader.handler("a", concurrency=2)
    cool_down_open_circuit(leader, a)
    a.script(HOLD)
    probe = asyncio.create_task(leader.dispatch(await leader.job(value="probe")))
    await leader.bus.wait_sent(p.DISPATCH_START)
    with pytest.raises(TaskUnavailable, match="stayed busy or unhealthy"):
        await leader.dispatch(await leader.job())  # a has a free slot, but the probe is out
    a.finish_all()
    assert await probe == ("probe", "a")
    assert await leader.dispatch(await leader.job(value="closed")) == ("closed", "a")


async def test_a_probe_that_ends_in_a_task_error_lets_the_next_job_probe_the_handler() -> None:
    leader = Leader(no_handler_wait=1.0)
    leader.lead()
    a = leader.handler("a")
    cool_down_open_circuit(leader, a)
    a.script(FAIL)
    with pytest.raises(RemoteJobError):
        await leader.dispatch(await leader.job())
    assert await leader.dispatch(await leader.job(value="next")) == ("next", "a")


# --------------------------------------------------------------------------- hello


def test_the_hello_reply_tells_a_handler_where_the_leader_is() -> None:
    leader = Leader()
    leader.replica.step_down("n2", term=3)
    reply = FakeHandler(leader.bus, "a", ("echo",)).hello()
    assert reply == {
        "node_id": "n1",
        "leader_id": "n2",
        "term": 3,
        "leader_mesh": "tcp://127.0.0.1:7200",
        "nodes": ["tcp://127.0.0.1:7100", "tcp://127.0.0.1:7200"],
    }
    assert leader.dispatcher.offers("echo")


# --------------------------------------------------------------------------- one message

HANDLER_CLOCK = 500.0  # what the handler's hellos report; the leader's clock says 1000


def clocked(*script: str, **settings: Any) -> tuple[Leader, Any]:
    """A leader of term 1 and its handler "a", whose hellos report its clock (so it gets the
    one-message dispatch), scripted with ``script``."""
    leader = Leader(**{"ack_timeout": 0.5, **settings})
    leader.lead()
    a = leader.handler("a")
    a.hello(clock=HANDLER_CLOCK)
    a.script(*script)
    return leader, a


async def test_a_handler_reporting_its_clock_gets_one_dispatch_with_a_start_deadline() -> None:
    leader, a = clocked()
    assert await leader.dispatch(await leader.job(value="done")) == ("done", "a")
    [sent] = a.dispatches
    assert sent["start_by"] == HANDLER_CLOCK + 0.5  # ack_timeout ahead, on the handler's clock
    assert leader.bus.sent_of(p.DISPATCH_START) == []


async def test_a_dispatch_that_did_not_start_by_its_deadline_goes_back_to_the_same_handler() -> (
    None
):
    """Neither listed as running by a hello sent after ``start_by`` nor answered: it did not
    start and cannot any more. The same handler gets it again (it would answer from its
    idempotency window, had only the result been lost); no failure is counted."""
    leader = Leader(ack_timeout=0.5)
    leader.lead()
    a = leader.handler("a")
    b = leader.handler("b")
    for h in (a, b):
        h.hello(clock=HANDLER_CLOCK)
        h.script(SILENT)  # whichever gets the first dispatch loses it
    run = asyncio.create_task(leader.dispatch(await leader.job(value="done")))
    [first] = await leader.bus.wait_sent(p.DISPATCH)
    x = a if first.identity == b"a" else b
    x.hello(clock=first.payload["start_by"], running=[])
    assert await run == ("done", x.handler_id)
    [_, again] = x.dispatches
    assert again["idempotency_key"] == first.payload["idempotency_key"]
    assert again["dispatch_id"] != first.payload["dispatch_id"]
    assert again["attempt"] == 2
    assert len(a.dispatches) + len(b.dispatches) == 2
    assert leader.registry.handlers[x.handler_id].consecutive_failures == 0


async def test_a_hello_sent_before_the_start_deadline_never_makes_the_leader_give_up() -> None:
    """Until a hello sent at or after ``start_by`` omits the key, the dispatch may still arrive
    and run: the leader must not send the job anywhere else."""
    leader, a = clocked(SILENT)
    run = asyncio.create_task(leader.dispatch(await leader.job(value="done")))
    [first] = await leader.bus.wait_sent(p.DISPATCH)
    start_by = first.payload["start_by"]
    a.hello(clock=start_by - 0.001, running=[])
    await asyncio.sleep(3 * WATCH_INTERVAL)
    assert len(a.dispatches) == 1 and not run.done()
    a.hello(clock=start_by, running=[])
    assert await run == ("done", "a")
    assert len(a.dispatches) == 2


async def test_a_job_a_later_hello_lists_as_running_is_waited_for() -> None:
    leader, a = clocked(HOLD)
    job = await leader.job(value="done")
    run = asyncio.create_task(leader.dispatch(job))
    [first] = await leader.bus.wait_sent(p.DISPATCH)
    a.hello(clock=first.payload["start_by"] + 5, running=[idempotency_key(job)])
    await asyncio.sleep(3 * WATCH_INTERVAL)
    assert len(a.dispatches) == 1 and not run.done()
    a.finish_all()
    assert await run == ("done", "a")


async def test_an_expired_refusal_chooses_again_without_counting_a_failure() -> None:
    leader, a = clocked(SILENT, max_attempts=1)
    run = asyncio.create_task(leader.dispatch(await leader.job(value="done")))
    [first] = await leader.bus.wait_sent(p.DISPATCH)
    a.ack(first.payload["dispatch_id"], accepted=False, reason=p.EXPIRED)
    assert await run == ("done", "a")
    assert leader.registry.handlers["a"].consecutive_failures == 0


def test_the_clock_bound_is_the_best_recent_hello_and_never_ahead_of_the_handler() -> None:
    clock = ManualClock(1000.0)
    registry = HandlerRegistry(clock=clock)
    hello = {"handler_id": "a", "tasks": ["echo"], "pid": 1, "started_at": "t0"}
    registry.on_hello({**hello, "clock": 500.0})  # sent at 500 on its clock, seen at 1000 here
    clock.advance(2.0)
    assert registry.handler_clock(registry.handlers["a"]) == pytest.approx(502.0 - 2e-3)
    registry.on_hello({**hello, "clock": 501.0})  # a slow delivery: 1 s late, a worse sample
    assert registry.handler_clock(registry.handlers["a"]) == pytest.approx(502.0 - 2e-3)
    registry.on_hello({**hello, "clock": 502.0})  # delivered at once: the best sample
    assert registry.handler_clock(registry.handlers["a"]) == pytest.approx(502.0)
    registry.on_hello({**hello, "clock": 10.0, "started_at": "t1"})  # a new process
    assert registry.handler_clock(registry.handlers["a"]) == pytest.approx(10.0)
    registry.on_hello({**hello, "started_at": "t1"})  # no clock: the two-phase start
    assert registry.handler_clock(registry.handlers["a"]) is None


async def test_dispatches_to_one_handler_in_one_loop_iteration_travel_as_one_message() -> None:
    leader = Leader()
    leader.lead()
    a = leader.handler("a", concurrency=8)
    a.hello(clock=HANDLER_CLOCK)
    jobs = [await leader.job(value=f"v{i}") for i in range(5)]
    results = await asyncio.gather(*(leader.dispatch(job) for job in jobs))
    assert sorted(results) == [(f"v{i}", "a") for i in range(5)]
    assert a.batches and sum(a.batches) + len(leader.bus.sent_of(p.DISPATCH)) == 5
    assert max(a.batches) > 1


# --------------------------------------------------------------------------- timeouts


def timed_out(handler: FakeHandler, dispatch_id: str) -> None:
    """``handler`` answers the dispatch as a real handler does when its timeout expired."""
    d = handler.held.pop(dispatch_id)
    payload = {
        "dispatch_id": dispatch_id,
        "handler_id": handler.handler_id,
        "job_id": d["job_id"],
        "idempotency_key": d["idempotency_key"],
        "outcome": "error",
        "error": {"type": "TimeoutError", "message": "exceeded 1s", "timed_out": True},
    }
    handler.bus.deliver(p.JOB_RESULT, payload, identity=handler.identity)


async def test_a_timeout_the_handler_reports_is_the_jobs_outcome_and_not_retried_elsewhere() -> (
    None
):
    leader = Leader()
    leader.lead()
    a, b = leader.handler("a"), leader.handler("b")
    a.script(HOLD)
    b.script(HOLD)
    running = asyncio.create_task(leader.dispatch(await leader.job()))
    await leader.bus.wait_sent(p.DISPATCH_START)
    (ran,) = [h for h in (a, b) if h.held]
    timed_out(ran, next(iter(ran.held)))
    with pytest.raises(JobTimedOut, match="exceeded 1s"):
        await running
    assert len(a.dispatches) + len(b.dispatches) == 1


async def test_the_schedules_timeout_wins_over_the_configs() -> None:
    leader = Leader(default_timeout=300, task_timeouts={"echo": 100})
    leader.lead()
    a = leader.handler("a")
    own = with_controls({}, Controls(timeout=2.5))
    await leader.dispatch(await leader.job(schedule_id="s", fire=FIRE, metadata=own))
    await leader.dispatch(await leader.job(schedule_id="s", fire=FIRE + timedelta(seconds=1)))
    assert [d["timeout"] for d in a.dispatches] == [2.5, 100]


async def test_a_retry_is_dispatched_with_its_try_number_and_watched_by_its_run_key() -> None:
    leader = Leader()
    leader.lead()
    a = leader.handler("a")
    a.script(HOLD)
    job = await leader.job(schedule_id="s", fire=FIRE)
    ctx = JobContext(
        job_id=str(job.id), task="echo", schedule_id="s", scheduled_fire_time=FIRE,
        idempotency_key=idempotency_key(job), attempt=4, fencing_token=TERM, try_number=3,
    )  # fmt: skip
    assert leader.session is not None
    running = asyncio.create_task(leader.dispatcher.dispatch(job, ctx, leader.session))
    await leader.bus.wait_sent(p.DISPATCH_START)
    [dispatch] = a.dispatches
    assert (dispatch["try_number"], dispatch["attempt"]) == (3, 4)
    [pending] = leader.dispatcher._pending.values()
    assert pending.key == f"{idempotency_key(job)}#try=3"
    a.finish_all()
    assert await asyncio.wait_for(running, WAIT) == ("x", "a")
