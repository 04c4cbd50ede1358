"""Targets (``target.tags``, ``broadcast``), in-process: handler tags from hellos, routing by
tags, ``no_handler``, and a broadcast fire split into replicated runs (``shard``).

The leader is a real LeaderSession on a FakeReplica (jobs are added and acquired through the
fake log and applied by the real state machine), the handlers are scripted FakeHandlers.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from apscheduler import Job, JobOutcome, JobResult

from mesh.config import DispatchConfig
from mesh.consensus.messages import COMMAND, Entry
from mesh.dispatch import protocol as p
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.dispatch.handler import HandlerProcess, parse_dispatch
from mesh.dispatch.registry import HandlerRegistry
from mesh.scheduling.controls import Controls, Target, with_controls
from mesh.scheduling.executor import MeshJobExecutor, remote_task
from mesh.scheduling.outcomes import NoHandler
from mesh.scheduling.session import LeaderSession
from mesh.scheduling.state import SchedulerState, dump_job, dump_result, shard_id
from tests.fakes import HOLD, FakeBus, FakeHandler, FakeReplica, ManualClock

TERM = 2
TASK = "unit_target_task"  # a name no other test module registers
WAIT = 5.0  # bound on every run: a hang fails the test instead of stalling the run
FIRE = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
EU_GPU = {"region": "eu", "gpu": "yes"}


class _Broker:
    """The store's event broker: what the leader publishes (JobAdded wakes the job loop)."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def publish(self, event: Any) -> None:
        self.events.append(event)


class Leader:
    def __init__(self, *, settle: float = 0.0) -> None:
        self.replica = FakeReplica("n1")
        self.state: SchedulerState = self.replica.state_machine
        self.bus = FakeBus()
        self.clock = ManualClock()
        self.registry = HandlerRegistry(clock=self.clock, settle=settle)
        self.dispatcher = HandlerDispatcher(
            self.replica,
            self.bus,
            self.replica,
            self.state,
            registry=self.registry,
            settings=DispatchConfig(backoff_initial=0.001, backoff_max=0.01, no_handler_wait=60),
        )
        self.replica.become_leader(TERM)
        self.session = LeaderSession(self.replica, self.state, TERM)
        self.broker = _Broker()
        self.session.store._event_broker = self.broker  # type: ignore[assignment]
        self.executor = MeshJobExecutor(self.session, dispatcher=self.dispatcher)

    def handler(self, handler_id: str, tags: dict[str, str], **kw: Any) -> FakeHandler:
        h = FakeHandler(self.bus, handler_id, (TASK,), **kw)
        h.hello(tags=tags)
        return h

    async def job(self, target: Target | None, *, fire: datetime = FIRE) -> Job:
        """A fire of schedule ``s`` with ``target``, added and acquired by this leader."""
        metadata = with_controls({}, Controls(target=target)) if target else {}
        job = Job(
            task_id=TASK,
            executor="mesh",
            args=("v",),
            schedule_id="s",
            scheduled_fire_time=fire,
            metadata=metadata,
        )
        await self.replica.propose({"op": "add_job", "job": dump_job(job)})
        await self.acquire(job.id)
        return job

    async def acquire(self, job_id: UUID) -> None:
        await self.replica.propose(
            {
                "op": "acquire_jobs",
                "scheduler_id": self.session.identity,
                "ids": [str(job_id)],
                "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat(),
                "term": TERM,
            }
        )

    async def run(self, job: Job) -> Any:
        return await asyncio.wait_for(self.executor.run_job(remote_task, job), WAIT)


def tags(**kv: str) -> Target:
    return Target(tags=kv)


# --------------------------------------------------------------------------- handler tags


def test_a_hellos_tags_are_kept_and_shown_with_the_handler() -> None:
    registry = HandlerRegistry(clock=ManualClock())
    registry.on_hello({"handler_id": "h1", "tasks": [TASK], "tags": {"region": "eu"}})
    registry.on_hello({"handler_id": "h2", "tasks": [TASK]})  # an older handler: no tags
    shown = {h["handler_id"]: h["tags"] for h in registry.to_json()}
    assert shown == {"h1": {"region": "eu"}, "h2": {}}


def test_a_later_hello_replaces_the_handlers_tags() -> None:
    registry = HandlerRegistry(clock=ManualClock())
    registry.on_hello({"handler_id": "h1", "tasks": [TASK], "tags": {"region": "eu"}})
    registry.on_hello({"handler_id": "h1", "tasks": [TASK], "tags": {"region": "us"}})
    assert registry.handlers["h1"].tags == {"region": "us"}


@pytest.mark.parametrize(
    "bad",
    [
        {"re gion": "eu"},  # a key outside the charset
        {"region": ""},  # an empty value
        {"region": "e" * 129},  # too long
        {"region": 1},  # not a string
        {"region": None},
        ["region", "eu"],  # not an object
        "region=eu",
        {f"k{i}": "v" for i in range(33)},  # too many
        {"region": "eu\n"},  # a newline (would forge log lines and table rows)
    ],
)
async def test_a_hello_with_malformed_tags_is_refused_whole_and_registers_nothing(bad: Any) -> None:
    leader = Leader()
    reply = FakeHandler(leader.bus, "h1", (TASK,)).hello(tags=bad)
    assert reply is None
    assert "h1" not in leader.registry.handlers
    assert [reason for _, reason in leader.bus.rejected] == ["malformed"]


def test_a_handler_process_refuses_tags_a_node_would_refuse() -> None:
    with pytest.raises(ValueError, match="tags"):
        HandlerProcess("h1", ["tcp://127.0.0.1:7100"], tasks={}, tags={"a b": "c"})
    ok = HandlerProcess("h1", ["tcp://127.0.0.1:7100"], tasks={}, tags={"region": "eu"})
    assert ok.hello_payload()["tags"] == {"region": "eu"}


# --------------------------------------------------------------------------- routing


async def test_a_targeted_job_goes_only_to_a_handler_having_all_its_tags() -> None:
    leader = Leader()
    leader.handler("a", {"region": "eu"})
    leader.handler("b", {"region": "us", "gpu": "yes"})
    leader.handler("c", {"region": "eu", "gpu": "yes", "rack": "7"})
    for _ in range(3):
        job = await leader.job(Target(tags=EU_GPU))
        assert await leader.run(job) == "v"
        assert leader.session.take_runner(job.id) == "c"


async def test_an_untargeted_job_goes_to_any_handler_tagged_or_not() -> None:
    leader = Leader()
    leader.handler("a", {"region": "eu"})
    leader.handler("b", {})
    ran = set()
    for _ in range(2):
        job = await leader.job(None)
        await leader.run(job)
        ran.add(leader.session.take_runner(job.id))
    assert ran == {"a", "b"}


async def test_a_target_no_live_handler_matches_ends_at_once_as_no_handler() -> None:
    leader = Leader()  # no_handler_wait is 60 s: only the target rule can end it within WAIT
    leader.handler("a", {"region": "us"})
    job = await leader.job(tags(region="eu"))
    with pytest.raises(NoHandler, match="region=eu"):
        await leader.run(job)
    assert leader.bus.sent_of(p.DISPATCH) == []


async def test_a_tag_target_is_not_met_by_an_embedded_task_on_the_leader() -> None:
    import mesh
    from mesh.tasks import REGISTRY

    def embedded(value: str) -> str:
        return f"embedded:{value}"

    mesh.task(name=TASK)(embedded)
    try:
        leader = Leader()
        job = await leader.job(tags(region="eu"))
        with pytest.raises(NoHandler):
            await leader.run(job)
    finally:
        REGISTRY.pop(TASK, None)


async def test_a_matching_handler_that_is_busy_is_waited_for_not_no_handler() -> None:
    leader = Leader()
    leader.handler("a", {"region": "us"}, concurrency=2)
    eu = leader.handler("eu", {"region": "eu"})
    eu.script(HOLD)
    first = asyncio.create_task(leader.run(await leader.job(tags(region="eu"))))
    await leader.bus.wait_sent(p.DISPATCH_START, 1)
    second_job = await leader.job(tags(region="eu"), fire=FIRE + timedelta(seconds=1))
    second = asyncio.create_task(leader.run(second_job))
    await asyncio.sleep(0.05)
    assert not second.done()  # waiting for the busy eu handler, not ended, not sent to "a"
    eu.finish_all()
    assert await first == "v"
    assert await second == "v"
    assert leader.session.take_runner(second_job.id) == "eu"


async def test_a_node_that_just_started_waits_to_hear_the_handlers_before_no_handler() -> None:
    leader = Leader(settle=p.SUSPECT_AFTER)
    job = await leader.job(tags(region="eu"))
    run = asyncio.create_task(leader.run(job))
    await asyncio.sleep(0.05)
    assert not run.done()
    leader.handler("eu", {"region": "eu"})  # its first hello reaches the new node
    assert await run == "v"


async def test_a_job_fired_ahead_goes_to_a_matching_handler_and_a_broadcast_to_none_yet() -> None:
    leader = Leader()
    leader.handler("a", {"region": "us"})
    leader.handler("b", {"region": "eu"})
    targeted = Job(
        task_id=TASK,
        executor="mesh",
        metadata=with_controls({}, Controls(target=tags(region="eu"))),
    )
    assert {leader.dispatcher.suggest(targeted) for _ in range(4)} == {"b"}
    broadcast = Job(
        task_id=TASK,
        executor="mesh",
        metadata=with_controls({}, Controls(target=Target(broadcast=True))),
    )
    assert leader.dispatcher.suggest(broadcast) is None


# --------------------------------------------------------------------------- broadcast


async def test_a_broadcast_fire_is_split_into_one_run_per_matching_handler() -> None:
    leader = Leader()
    for hid, region in (("c", "eu"), ("a", "eu"), ("b", "us"), ("d", "eu")):
        leader.handler(hid, {"region": region})
    job = await leader.job(Target(tags={"region": "eu"}, broadcast=True))
    assert await leader.run(job) is None
    assert job.id not in leader.state.jobs  # replaced by its runs; it leaves no record
    runs = sorted(leader.state.jobs.values(), key=lambda js: js.shard or (0, 0))
    assert [(js.shard, js.handler) for js in runs] == [((0, 3), "a"), ((1, 3), "c"), ((2, 3), "d")]
    assert [js.job.id for js in runs] == [shard_id(job.id, i, 3) for i in range(3)]
    assert all(js.job.scheduled_fire_time == FIRE and js.job.acquired_by is None for js in runs)
    assert {e.job_id for e in leader.broker.events} == {js.job.id for js in runs}
    assert leader.bus.sent_of(p.DISPATCH) == []  # the runs are started by the job loop


async def test_each_broadcast_run_goes_to_its_handler_with_its_shard_and_own_key() -> None:
    leader = Leader()
    for hid in ("a", "b", "c"):
        leader.handler(hid, {})
    job = await leader.job(Target(broadcast=True))
    await leader.run(job)
    for js in list(leader.state.jobs.values()):
        await leader.acquire(js.job.id)
        await leader.run(js.job)
    sent = sorted(leader.bus.sent_of(p.DISPATCH), key=lambda m: m.payload["shard_index"])
    key = f"s@{FIRE.isoformat()}"
    assert [
        (
            m.identity,
            m.payload["shard_index"],
            m.payload["shard_count"],
            m.payload["idempotency_key"],
        )
        for m in sent
    ] == [(b"a", 0, 3, f"{key}#0/3"), (b"b", 1, 3, f"{key}#1/3"), (b"c", 2, 3, f"{key}#2/3")]


async def test_a_broadcast_no_handler_matches_is_no_handler() -> None:
    leader = Leader()
    leader.handler("a", {"region": "us"})
    job = await leader.job(Target(tags={"region": "eu"}, broadcast=True))
    with pytest.raises(NoHandler):
        await leader.run(job)
    assert job.id in leader.state.jobs  # not split: it is released as no_handler


def _entry(index: int, command: dict[str, Any]) -> Entry:
    return Entry(term=TERM, index=index, kind=COMMAND, data=command)


def _split_commands(handlers: list[str], *, holder: str = "n1@2") -> tuple[list[dict], Job]:
    """One fire of a broadcast schedule, leased to ``n1@2``, then ``holder``'s split of it."""
    job = Job(
        task_id=TASK,
        executor="mesh",
        schedule_id="s",
        scheduled_fire_time=FIRE,
        metadata=with_controls({}, Controls(target=Target(broadcast=True))),
    )
    until = (FIRE + timedelta(minutes=1)).isoformat()
    return [
        {"op": "add_job", "job": dump_job(job)},
        {
            "op": "acquire_jobs",
            "scheduler_id": "n1@2",
            "ids": [str(job.id)],
            "until": until,
            "term": TERM,
        },
        {"op": "broadcast", "scheduler_id": holder, "job_id": str(job.id), "handlers": handlers},
    ], job


def _apply(commands: list[dict]) -> SchedulerState:
    state = SchedulerState()
    for i, c in enumerate(commands, 1):
        state.apply(_entry(i, c))
    return state


def _split_state(handlers: list[str], *, holder: str = "n1@2") -> tuple[SchedulerState, Job]:
    commands, job = _split_commands(handlers, holder=holder)
    return _apply(commands), job


def test_splitting_a_broadcast_is_deterministic_on_every_node() -> None:
    commands, job = _split_commands(["a", "b"])
    one, two = _apply(commands), _apply(commands)  # two nodes applying one log
    assert one.snapshot() == two.snapshot()
    by_shard = {js.shard: (jid, js.handler) for jid, js in one.jobs.items()}
    assert by_shard == {
        (0, 2): (shard_id(job.id, 0, 2), "a"),
        (1, 2): (shard_id(job.id, 1, 2), "b"),
    }
    assert one.running_jobs(TASK) == 0  # the leased fire left; its runs are not leased yet


def test_a_split_by_a_leader_that_no_longer_holds_the_job_changes_nothing() -> None:
    state, job = _split_state(["a", "b"], holder="n9@1")
    assert list(state.jobs) == [job.id]
    assert state.jobs[job.id].shard is None


def test_a_run_of_a_broadcast_is_never_split_again() -> None:
    state, _ = _split_state(["a", "b"])
    run = next(iter(state.jobs.values()))
    until = (FIRE + timedelta(minutes=1)).isoformat()
    state.apply(
        _entry(
            4,
            {
                "op": "acquire_jobs",
                "scheduler_id": "n1@2",
                "until": until,
                "ids": [str(run.job.id)],
                "term": TERM,
            },
        )
    )
    result = state.apply(
        _entry(
            5,
            {
                "op": "broadcast",
                "scheduler_id": "n1@2",
                "job_id": str(run.job.id),
                "handlers": ["x", "y", "z"],
            },
        )
    )
    assert result is None
    assert len(state.jobs) == 2


def test_a_snapshot_keeps_the_runs_of_a_broadcast_with_their_shard_and_handler() -> None:
    state, _ = _split_state(["a", "b", "c"])
    restored = SchedulerState()
    restored.restore(state.snapshot())
    assert {jid: (js.shard, js.handler) for jid, js in restored.jobs.items()} == {
        jid: (js.shard, js.handler) for jid, js in state.jobs.items()
    }
    assert restored.open_jobs("s") and len(restored.open_jobs("s")) == 3


def test_a_broadcast_runs_record_names_its_shard_handler_and_own_idempotency_key() -> None:
    state, _ = _split_state(["a", "b"])
    run = next(js for js in state.jobs.values() if js.shard == (1, 2))
    until = (FIRE + timedelta(minutes=1)).isoformat()
    state.apply(
        _entry(
            4,
            {
                "op": "acquire_jobs",
                "scheduler_id": "n1@2",
                "until": until,
                "ids": [str(run.job.id)],
                "term": TERM,
            },
        )
    )
    result = JobResult.from_job(run.job, JobOutcome.success, finished_at=FIRE)
    state.apply(
        _entry(
            5,
            {
                "op": "release_job",
                "scheduler_id": "n1@2",
                "job_id": str(run.job.id),
                "result": dump_result(result),
                "handler_id": "b",
            },
        )
    )
    [record] = state.executions
    assert record["shard"] == [1, 2]
    assert record["handler_id"] == "b"
    assert record["idempotency_key"] == f"s@{FIRE.isoformat()}#1/2"


# --------------------------------------------------------------------------- the handler side


def test_a_dispatch_with_a_shard_outside_its_count_is_malformed() -> None:
    base = {
        "dispatch_id": "d",
        "job_id": "j",
        "task": TASK,
        "idempotency_key": "k",
        "fencing_token": 1,
        "attempt": 1,
    }
    assert parse_dispatch({**base, "shard_index": 2, "shard_count": 3}, "a").shard_index == 2
    plain = parse_dispatch(base, "a")
    assert (plain.shard_index, plain.shard_count) == (0, 1)
    for bad in (
        {"shard_index": 3, "shard_count": 3},
        {"shard_index": -1, "shard_count": 3},
        {"shard_count": 0},
        {"shard_count": p.MAX_SHARDS + 1},
    ):
        with pytest.raises(Exception, match="shard"):
            parse_dispatch({**base, **bad}, "a")


async def test_after_a_failover_only_the_runs_not_done_run_again_each_on_its_handler() -> None:
    leader = Leader()
    for hid in ("a", "b", "c"):
        leader.handler(hid, {})
    job = await leader.job(Target(broadcast=True))
    await leader.run(job)
    runs = {js.shard: js for js in leader.state.jobs.values()}
    done = runs[(1, 3)].job  # run 1 finished under the old leader before it died
    await leader.acquire(done.id)
    await leader.run(done)
    await leader.session.store.release_job(
        leader.session.identity,
        done,
        JobResult.from_job(done, JobOutcome.success, finished_at=FIRE),
    )
    await leader.replica.propose({"op": "reset_leases", "term": TERM + 1})  # the next leader's
    left = sorted(leader.state.jobs.values(), key=lambda js: js.shard or (0, 0))
    assert [(js.shard, js.handler, js.job.acquired_by) for js in left] == [
        ((0, 3), "a", None),
        ((2, 3), "c", None),
    ]
    for js in left:  # started again by the job loop: each back to its own handler
        await leader.acquire(js.job.id)
        await leader.run(js.job)
    sent = [(m.identity, m.payload["shard_index"]) for m in leader.bus.sent_of(p.DISPATCH)]
    assert sorted(sent) == [(b"a", 0), (b"b", 1), (b"c", 2)]  # each run dispatched once


async def test_a_broadcast_run_whose_handler_and_every_other_are_gone_is_no_handler() -> None:
    leader = Leader()
    leader.handler("a", {})
    job = await leader.job(Target(broadcast=True))
    await leader.run(job)
    [run] = leader.state.jobs.values()
    leader.clock.advance(p.DEAD_AFTER + 1)  # "a" stopped saying hello
    leader.dispatcher.settings = DispatchConfig(redispatch_wait=0.05, no_handler_wait=60)
    await leader.acquire(run.job.id)
    with pytest.raises(NoHandler):
        await leader.run(run.job)
