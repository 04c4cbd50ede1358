"""ZMQEventBroker: APScheduler's event-broker contract, over real MeshTransports on 127.0.0.1.

The first group is ported from APScheduler's own tests/test_eventbrokers.py at tag 4.0.0a6
(github.com/agronholm/apscheduler). Each runs twice: "local" publishes and subscribes on one
broker, "mesh" publishes on broker A and subscribes on broker B, whose transport is subscribed
to A's PUB socket. The rest covers what the mesh adds: exactly-once delivery on both sides,
echo suppression, undecodable broadcasts, peers coming and going, the shared handler slot.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from logging import Logger
from typing import Any, NamedTuple

import pytest
from anyio import (
    CancelScope,
    WouldBlock,
    create_memory_object_stream,
    fail_after,
    move_on_after,
    sleep,
)
from apscheduler import AsyncScheduler, Event, JobAdded, ScheduleAdded, TaskAdded
from apscheduler.abc import EventBroker
from apscheduler.datastores.memory import MemoryDataStore

from mesh.scheduling.broker import ZMQEventBroker
from mesh.transport import MeshTransport
from tests.netutil import free_mesh_address

# Bound on waiting for a SUB socket to connect (the "slow joiner") or an event to arrive.
CONNECT_TIMEOUT = 5.0
DELIVERY_TIMEOUT = 3.0

_probe_ids = itertools.count()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fence() -> TaskAdded:
    return TaskAdded(task_id=f"fence-{uuid.uuid4()}")


def _nothing_waiting(receive: Any) -> bool:
    """Whether nothing was delivered to ``receive`` (buffered, or a sender blocked on it)."""
    try:
        receive.receive_nowait()
    except WouldBlock:
        return True
    return False


async def _receive_until(receive: Any, fence: Event) -> list[Event]:
    """Events received before ``fence`` (which is not included)."""
    received: list[Event] = []
    with fail_after(DELIVERY_TIMEOUT):
        while (event := await receive.receive()) != fence:
            received.append(event)
    return received


async def wait_until_connected(publisher: ZMQEventBroker, subscriber: ZMQEventBroker) -> None:
    """Publish probes until ``subscriber`` gets one, then drain every probe in flight.

    A SUB socket misses what is published before its connection is up. Once one probe is
    through, a fence published after all probes arrives last (one TCP stream, in order), so
    no stray probe reaches the test's own subscriptions.
    """
    send, receive = create_memory_object_stream[Event](math.inf)
    with send, receive:
        subscription = subscriber.subscribe(send.send_nowait, {TaskAdded})
        try:
            with fail_after(CONNECT_TIMEOUT):
                while True:
                    await publisher.publish(TaskAdded(task_id=f"probe-{next(_probe_ids)}"))
                    with move_on_after(0.05):
                        await receive.receive()
                        break
                fence = _fence()
                await publisher.publish(fence)
                while await receive.receive() != fence:
                    pass
        finally:
            subscription.unsubscribe()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def logger() -> Logger:
    return logging.getLogger("apscheduler")


@pytest.fixture
async def transports() -> AsyncIterator[tuple[MeshTransport, MeshTransport]]:
    a = MeshTransport("node-a", free_mesh_address())
    b = MeshTransport("node-b", free_mesh_address())
    try:
        await a.start()
        await b.start()
        yield a, b
    finally:
        await a.close()
        await b.close()


@asynccontextmanager
async def started_in_own_task(logger: Logger, *brokers: ZMQEventBroker) -> AsyncIterator[None]:
    """Start ``brokers`` in a task of their own and stop them on exit.

    pytest-asyncio runs a fixture's setup and teardown in different tasks, but the anyio task
    group inside a broker must be exited by the task that entered it.
    """
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def host() -> None:
        async with AsyncExitStack() as exit_stack:
            for broker in brokers:
                await broker.start(exit_stack, logger)
            started.set_result(None)
            await stop.wait()

    task = asyncio.create_task(host())
    await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # start() failed: raise its error here
    try:
        yield
    finally:
        stop.set()
        await task


@pytest.fixture
async def brokers(
    transports: tuple[MeshTransport, MeshTransport], logger: Logger
) -> AsyncIterator[tuple[ZMQEventBroker, ZMQEventBroker]]:
    """Brokers A and B, started, each subscribed to the other, connections up both ways."""
    ta, tb = transports
    a = ZMQEventBroker(ta, peers=[tb.bound_address])
    b = ZMQEventBroker(tb, peers=[ta.bound_address])
    async with started_in_own_task(logger, a, b):
        await wait_until_connected(a, b)
        await wait_until_connected(b, a)
        yield a, b


class Route(NamedTuple):
    publisher: EventBroker
    subscriber: EventBroker


@pytest.fixture(params=["local", "mesh"])
def route(request: pytest.FixtureRequest, brokers: tuple[ZMQEventBroker, ZMQEventBroker]) -> Route:
    a, b = brokers
    return Route(a, a) if request.param == "local" else Route(a, b)


@pytest.fixture
def raw_event_broker(transports: tuple[MeshTransport, MeshTransport]) -> ZMQEventBroker:
    ta, tb = transports
    return ZMQEventBroker(ta, peers=[tb.bound_address])


# ---------------------------------------------------------------------------- ported upstream


async def test_publish_subscribe(route: Route) -> None:
    send, receive = create_memory_object_stream[Event](2)
    with send, receive:
        route.subscriber.subscribe(send.send)
        route.subscriber.subscribe(send.send_nowait)
        event = ScheduleAdded(
            schedule_id="schedule1",
            task_id="task1",
            next_fire_time=datetime(2021, 9, 11, 12, 31, 56, 254867, UTC),
        )
        await route.publisher.publish(event)

        with fail_after(DELIVERY_TIMEOUT):
            event1 = await receive.receive()
            event2 = await receive.receive()

    assert event1 == event2
    assert isinstance(event1, ScheduleAdded)
    assert isinstance(event1.timestamp, datetime)
    assert event1.schedule_id == "schedule1"
    assert event1.task_id == "task1"
    assert event1.next_fire_time == datetime(2021, 9, 11, 12, 31, 56, 254867, UTC)


async def test_subscribe_one_shot(route: Route) -> None:
    send, receive = create_memory_object_stream[Event](2)
    witness_send, witness_receive = create_memory_object_stream[Event](math.inf)
    with send, receive, witness_send, witness_receive:
        route.subscriber.subscribe(send.send, one_shot=True)
        route.subscriber.subscribe(witness_send.send_nowait)
        event = ScheduleAdded(
            schedule_id="schedule1",
            task_id="task1",
            next_fire_time=datetime(2021, 9, 11, 12, 31, 56, 254867, UTC),
        )
        await route.publisher.publish(event)
        event = ScheduleAdded(
            schedule_id="schedule2",
            task_id="task1",
            next_fire_time=datetime(2021, 9, 12, 8, 42, 11, 968481, UTC),
        )
        await route.publisher.publish(event)
        fence = _fence()
        await route.publisher.publish(fence)

        with fail_after(DELIVERY_TIMEOUT):
            received_event = await receive.receive()

        # Deliveries start in publishing order: once the fence reached the other subscriber,
        # a second delivery to the one-shot subscription would already have been made.
        witnessed = await _receive_until(witness_receive, fence)
        assert [e.schedule_id for e in witnessed] == ["schedule1", "schedule2"]
        assert _nothing_waiting(receive)

    assert isinstance(received_event, ScheduleAdded)
    assert received_event.schedule_id == "schedule1"
    assert received_event.task_id == "task1"


async def test_unsubscribe(route: Route) -> None:
    send, receive = create_memory_object_stream[Event]()
    with send, receive:
        subscription = route.subscriber.subscribe(send.send)
        await route.publisher.publish(Event())
        with fail_after(DELIVERY_TIMEOUT):
            await receive.receive()

        subscription.unsubscribe()
        witness_send, witness_receive = create_memory_object_stream[Event](math.inf)
        with witness_send, witness_receive:
            route.subscriber.subscribe(witness_send.send_nowait)
            event, fence = Event(), _fence()
            await route.publisher.publish(event)
            await route.publisher.publish(fence)
            # The fence reached a subscriber that is still there, after the event: a delivery
            # to the removed subscription would have started before it.
            assert await _receive_until(witness_receive, fence) == [event]
        assert _nothing_waiting(receive)


async def test_publish_no_subscribers(route: Route, caplog: pytest.LogCaptureFixture) -> None:
    send, receive = create_memory_object_stream[Event](math.inf)
    with send, receive:
        # Only the fence's type is subscribed to: the Event has no subscriber. Once the fence
        # is delivered, the Event has been handled (and any error logged).
        route.subscriber.subscribe(send.send_nowait, {TaskAdded})
        fence = _fence()
        await route.publisher.publish(Event())
        await route.publisher.publish(fence)
        assert await _receive_until(receive, fence) == []
    assert not caplog.text


async def test_publish_exception(route: Route, caplog: pytest.LogCaptureFixture) -> None:
    def bad_subscriber(event: Event) -> None:
        raise Exception("foo")

    timestamp = datetime.now(UTC)
    send, receive = create_memory_object_stream[Event]()
    with send, receive:
        route.subscriber.subscribe(bad_subscriber)
        route.subscriber.subscribe(send.send)
        await route.publisher.publish(Event(timestamp=timestamp))

        with fail_after(DELIVERY_TIMEOUT):
            received_event = await receive.receive()
        assert received_event.timestamp == timestamp
        assert "Error delivering Event" in caplog.text


async def test_cancel_start(raw_event_broker: ZMQEventBroker, logger: Logger) -> None:
    with CancelScope() as scope:
        scope.cancel()
        async with AsyncExitStack() as exit_stack:
            await raw_event_broker.start(exit_stack, logger)


async def test_cancel_stop(raw_event_broker: ZMQEventBroker, logger: Logger) -> None:
    with CancelScope() as scope:
        async with AsyncExitStack() as exit_stack:
            await raw_event_broker.start(exit_stack, logger)
            scope.cancel()


# ---------------------------------------------------------------------------- mesh delivery


async def test_remote_subscribers_get_each_event_exactly_once(
    brokers: tuple[ZMQEventBroker, ZMQEventBroker],
) -> None:
    a, b = brokers
    send, receive = create_memory_object_stream[Event](math.inf)
    with send, receive:
        b.subscribe(send.send_nowait)
        received_before = b.counters["received"]  # the fixture's probes
        event, fence = ScheduleAdded(schedule_id="s1", task_id="t1", next_fire_time=None), _fence()
        await a.publish(event)
        await a.publish(fence)
        assert await _receive_until(receive, fence) == [event]
    assert b.counters["received"] - received_before == 2


async def test_local_subscribers_get_each_event_once_even_if_it_echoes_back(
    brokers: tuple[ZMQEventBroker, ZMQEventBroker],
) -> None:
    a, _ = brokers
    echoed: list[Any] = []

    def spy(topic: str, payload: dict[str, Any]) -> None:  # chained the way a node would
        echoed.append(payload.get("event"))
        a.handle_broadcast(topic, payload)

    a.transport.set_broadcast_handler(spy)
    # A node never subscribes to its own PUB, but if its broadcasts did come back...
    a.transport.subscribe(a.transport.bound_address)
    with fail_after(CONNECT_TIMEOUT):
        while not echoed:
            await a.publish(TaskAdded(task_id=f"probe-{next(_probe_ids)}"))
            await sleep(0.05)

    send, receive = create_memory_object_stream[Event](math.inf)
    with send, receive:
        a.subscribe(send.send_nowait, {ScheduleAdded})
        event = ScheduleAdded(schedule_id="s1", task_id="t1", next_fire_time=None)
        await a.publish(event)
        with fail_after(CONNECT_TIMEOUT):
            while a.generate_notification_str(event) not in echoed:  # noqa: ASYNC110
                await sleep(0.01)
        # Same path as the echo, so it is delivered after anything the echo caused.
        marker = ScheduleAdded(schedule_id="marker", task_id="t1", next_fire_time=None)
        assert a.handle_broadcast("apscheduler", _wire(a, marker, origin="node-x"))
        assert await _receive_until(receive, marker) == [event]
    assert a.counters["echoes"] >= 1


async def test_scheduler_on_one_node_informs_subscribers_on_another(
    transports: tuple[MeshTransport, MeshTransport], logger: Logger
) -> None:
    # run_job() waits for the JobReleased event it publishes itself: proof of local delivery.
    ta, tb = transports
    b = ZMQEventBroker(tb, peers=[ta.bound_address])
    async with AsyncExitStack() as exit_stack:
        await b.start(exit_stack, logger)
        send, receive = create_memory_object_stream[Event](math.inf)
        b.subscribe(send.send_nowait, {JobAdded})
        a = ZMQEventBroker(ta, peers=[tb.bound_address])
        async with AsyncScheduler(MemoryDataStore(), a, logger=logger) as scheduler:
            await wait_until_connected(a, b)
            await scheduler.start_in_background()
            with fail_after(DELIVERY_TIMEOUT):
                assert await scheduler.run_job(tick) == "tock"
                job_added = await receive.receive()
    assert isinstance(job_added, JobAdded)
    assert job_added.task_id == f"{__name__}:tick"


def tick() -> str:
    return "tock"


# ---------------------------------------------------------------------------- bad input


def _garbage_payloads() -> list[Any]:
    return [
        pytest.param({}, id="no-fields"),
        pytest.param({"event": 1, "origin": "node-x"}, id="event-not-str"),
        pytest.param({"event": "Event x", "origin": None}, id="origin-not-str"),
        pytest.param({"event": "ScheduleAdded", "origin": "node-x"}, id="no-separator"),
        pytest.param({"event": "Event abcde", "origin": "node-x"}, id="not-base64"),
        pytest.param({"event": "Event " + _b64(b"{no json"), "origin": "node-x"}, id="not-json"),
        pytest.param({"event": "NoSuchEvent " + _b64(b"{}"), "origin": "node-x"}, id="unknown"),
        pytest.param({"event": "Job " + _b64(b"{}"), "origin": "node-x"}, id="not-an-event"),
        pytest.param(
            {"event": "ScheduleAdded " + _b64(b'{"task_id": "t"}'), "origin": "node-x"},
            id="missing-fields",
        ),
        pytest.param(["not", "a", "dict"], id="not-a-dict"),
    ]


@pytest.mark.parametrize("payload", _garbage_payloads())
async def test_undecodable_broadcast_is_counted_and_dropped(
    transports: tuple[MeshTransport, MeshTransport],
    logger: Logger,
    payload: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = ZMQEventBroker(transports[0])
    send, receive = create_memory_object_stream[Event](math.inf)
    async with AsyncExitStack() as exit_stack:
        await broker.start(exit_stack, logger)
        broker.subscribe(send.send_nowait)

        assert broker.handle_broadcast("apscheduler", payload) is True
        assert broker.counters["dropped"] == 1
        assert "dropped a broadcast" in caplog.text

        # The broker still works, and the garbage never reached a subscriber.
        fence = _fence()
        assert broker.handle_broadcast("apscheduler", _wire(broker, fence, origin="node-x"))
        assert await _receive_until(receive, fence) == []


def _wire(broker: ZMQEventBroker, event: Event, origin: str) -> dict[str, Any]:
    return {"event": broker.generate_notification_str(event), "origin": origin}


async def test_garbage_from_a_peer_is_dropped_and_later_events_still_arrive(
    brokers: tuple[ZMQEventBroker, ZMQEventBroker],
) -> None:
    a, b = brokers
    send, receive = create_memory_object_stream[Event](math.inf)
    with send, receive:
        b.subscribe(send.send_nowait)
        a.transport.publish("apscheduler", {"event": "garbage"})
        a.transport.publish("apscheduler", {"event": "NoSuchEvent e30=", "origin": "node-a"})
        fence = _fence()
        await a.publish(fence)
        assert await _receive_until(receive, fence) == []
    assert b.counters["dropped"] == 2


async def test_own_broadcast_is_ignored(brokers: tuple[ZMQEventBroker, ZMQEventBroker]) -> None:
    a, _ = brokers
    send, receive = create_memory_object_stream[Event](math.inf)
    with send, receive:
        a.subscribe(send.send_nowait)
        assert a.handle_broadcast("apscheduler", _wire(a, Event(), origin="node-a"))
        assert a.counters["echoes"] == 1
        fence = _fence()
        assert a.handle_broadcast("apscheduler", _wire(a, fence, origin="node-x"))
        assert await _receive_until(receive, fence) == []


async def test_other_topics_are_left_to_the_next_handler(
    brokers: tuple[ZMQEventBroker, ZMQEventBroker],
) -> None:
    a, _ = brokers
    assert a.handle_broadcast("members", {"event": "garbage"}) is False
    assert a.counters["dropped"] == 0


async def test_broadcast_after_stop_is_ignored(
    transports: tuple[MeshTransport, MeshTransport], logger: Logger
) -> None:
    broker = ZMQEventBroker(transports[0])
    async with AsyncExitStack() as exit_stack:
        await broker.start(exit_stack, logger)
    assert broker.handle_broadcast("apscheduler", _wire(broker, Event(), origin="node-x"))
    assert broker.counters["ignored_stopped"] == 1


async def test_broadcast_failure_still_delivers_locally(logger: Logger) -> None:
    transport = MeshTransport("node-c", free_mesh_address())
    await transport.start()
    broker = ZMQEventBroker(transport)
    send, receive = create_memory_object_stream[Event](math.inf)
    async with AsyncExitStack() as exit_stack:
        await broker.start(exit_stack, logger)
        broker.subscribe(send.send_nowait)
        await transport.close()  # no PUB socket any more: transport.publish raises
        event = Event()
        await broker.publish(event)
        with fail_after(DELIVERY_TIMEOUT):
            assert await receive.receive() == event
    assert broker.counters["publish_failed"] == 1
    assert broker.counters["published"] == 0


# ---------------------------------------------------------------------------- peers, handler slot


async def test_peer_added_after_start_is_heard(
    transports: tuple[MeshTransport, MeshTransport], logger: Logger
) -> None:
    ta, tb = transports
    a, b = ZMQEventBroker(ta), ZMQEventBroker(tb)
    async with AsyncExitStack() as exit_stack:
        await a.start(exit_stack, logger)
        await b.start(exit_stack, logger)
        b.add_peer(ta.bound_address)
        assert b.peers == {ta.bound_address}
        await wait_until_connected(a, b)


async def test_removed_peer_is_no_longer_heard(
    brokers: tuple[ZMQEventBroker, ZMQEventBroker], logger: Logger
) -> None:
    a, b = brokers
    # A third broker that still listens to A is the witness: when A's broadcast has reached
    # it, it has reached every subscriber still connected to A's PUB socket.
    tc = MeshTransport("node-c", free_mesh_address())
    await tc.start()
    try:
        c = ZMQEventBroker(tc, peers=[a.transport.bound_address])
        async with started_in_own_task(logger, c):
            await wait_until_connected(a, c)
            b.remove_peer(a.transport.bound_address)
            assert b.peers == frozenset()
            send, receive = create_memory_object_stream[Event](math.inf)
            seen_send, seen_receive = create_memory_object_stream[Event](math.inf)
            with send, receive, seen_send, seen_receive:
                b.subscribe(send.send_nowait, {Event})  # not the probes and fences (TaskAdded)
                c.subscribe(seen_send.send_nowait)
                event, fence = Event(), _fence()
                await a.publish(event)
                await a.publish(fence)
                assert await _receive_until(seen_receive, fence) == [event]
                assert _nothing_waiting(receive)
    finally:
        await tc.close()


async def test_node_can_chain_its_own_broadcast_handler(
    transports: tuple[MeshTransport, MeshTransport], logger: Logger
) -> None:
    ta, tb = transports
    a = ZMQEventBroker(ta, peers=[tb.bound_address])
    b = ZMQEventBroker(tb, peers=[ta.bound_address], install_handler=False)
    others: list[tuple[str, dict[str, Any]]] = []

    def node_handler(topic: str, payload: dict[str, Any]) -> None:
        if not b.handle_broadcast(topic, payload):
            others.append((topic, payload))

    tb.set_broadcast_handler(node_handler)
    async with AsyncExitStack() as exit_stack:
        await a.start(exit_stack, logger)
        await b.start(exit_stack, logger)
        await wait_until_connected(a, b)
        send, receive = create_memory_object_stream[Event](math.inf)
        with send, receive:
            b.subscribe(send.send_nowait)
            ta.publish("members", {"alive": ["node-a"]})
            fence = _fence()
            await a.publish(fence)
            assert await _receive_until(receive, fence) == []
    assert others == [("members", {"alive": ["node-a"]})]


# ---------------------------------------------------------------------------- construction


def test_topic_must_be_a_valid_broadcast_topic() -> None:
    with pytest.raises(ValueError, match="topic"):
        ZMQEventBroker(MeshTransport("node-c", free_mesh_address()), topic="Not A Topic")


def test_client_only_transport_is_rejected() -> None:
    with pytest.raises(ValueError, match="bound transport"):
        ZMQEventBroker(MeshTransport("handler-1", None))


def test_peer_address_must_be_a_mesh_address() -> None:
    transport = MeshTransport("node-c", free_mesh_address())
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        ZMQEventBroker(transport, peers=["localhost:5000"])
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        ZMQEventBroker(transport).add_peer("localhost:5000")


async def test_events_outside_remote_events_stay_local(
    brokers: tuple[ZMQEventBroker, ZMQEventBroker],
) -> None:
    a, b = brokers
    a.remote_events = frozenset({ScheduleAdded, TaskAdded})
    local_send, local_receive = create_memory_object_stream[Event](math.inf)
    remote_send, remote_receive = create_memory_object_stream[Event](math.inf)
    with local_send, local_receive, remote_send, remote_receive:
        a.subscribe(local_send.send_nowait)
        b.subscribe(remote_send.send_nowait)
        job_event = JobAdded(job_id=uuid.uuid4(), task_id="t", schedule_id=None)
        kept = ScheduleAdded(schedule_id="s", task_id="t", next_fire_time=None)
        fence = _fence()
        for event in (job_event, kept, fence):
            await a.publish(event)
        assert await _receive_until(remote_receive, fence) == [kept]
        assert await _receive_until(local_receive, fence) == [job_event, kept]
