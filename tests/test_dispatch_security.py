"""Identity is the key, on both ends of the handler protocol.

Node side: the dispatcher on a ``KeyedBus`` (a FakeBus whose messages arrive as an authenticated
CURVE transport delivers them: ``sender``/``sender_role`` set from the key of the connection).
Hellos, acknowledgements and results count only from a ``handler`` key naming itself, answers
only from the handler the dispatch went to, and malformed ones are refused and counted.

Handler side: a real ``HandlerProcess`` fed ``Incoming`` messages as its transport would hand
them over; it acts only on ``node`` keys, and without keys it keeps to loopback.

Over CURVE: the dispatcher on a real secured transport (``TransportBus``), a real handler
process with its key, and a raw transport holding another handler's key as the attacker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import tests.fixtures.handler_tasks  # noqa: F401  (registers the tasks)
from mesh.contracts import Incoming, MessageHandler
from mesh.dispatch import protocol as p
from mesh.dispatch.handler import HandlerProcess, run_handler
from mesh.scheduling.executor import TaskUnavailable
from mesh.security.keys import KeyFileError, KeyRing, create_key
from mesh.security.policy import InsecureStart
from mesh.transport.zmq import MeshTransport
from tests.fakes import HOLD, FakeBus
from tests.netutil import free_mesh_address
from tests.test_dispatcher_unit import Leader
from tests.waiting import wait_until_async

NOT_LOOPBACK = "tcp://192.0.2.7:7000"  # TEST-NET-1: never loopback, never resolved


class KeyedBus(FakeBus):
    """A FakeBus on an authenticated mesh: a message from routing id X arrives as sent by the
    ``handler`` key X, unless :meth:`deliver_as` names another key."""

    def deliver(
        self, kind: str, payload: dict[str, Any], *, identity: bytes = b"", address: str = ""
    ) -> dict[str, Any] | None:
        return self.deliver_as(identity.decode(), "handler", kind, payload)

    def deliver_as(
        self, key: str, role: str, kind: str, payload: dict[str, Any]
    ) -> dict[str, Any] | None:
        # As the CURVE transport does: the identity to answer is the key's name.
        msg = Incoming(kind, payload, b"1", key.encode(), "", sender=key, sender_role=role)
        return self.handlers[kind](msg)


def hello(handler_id: str, tasks: tuple[str, ...] = ("echo",)) -> dict[str, Any]:
    return {"handler_id": handler_id, "tasks": list(tasks), "pid": 1, "started_at": "t0"}


def reasons(bus: FakeBus) -> list[str]:
    return [reason for _, reason in bus.rejected]


# --------------------------------------------------------------------------- node side


def test_a_hello_claiming_another_handlers_id_is_refused_and_counted() -> None:
    bus = KeyedBus()
    leader = Leader(bus=bus)
    leader.handler("h1")  # h1's own key
    answer = bus.deliver_as("h2", "handler", p.HELLO, hello("h1", tasks=("echo", "steal")))
    assert answer is None  # no registration, and no map of the mesh
    assert reasons(bus) == ["sender_mismatch"]
    h1 = leader.registry.handlers["h1"]
    assert (h1.tasks, h1.identity) == (frozenset({"echo"}), b"h1")
    assert "h2" not in leader.registry.handlers


def test_a_hello_from_a_node_key_is_refused() -> None:
    bus = KeyedBus()
    leader = Leader(bus=bus)
    assert bus.deliver_as("n2", "node", p.HELLO, hello("n2")) is None
    assert reasons(bus) == ["role"]
    assert leader.registry.handlers == {}
    assert not leader.dispatcher.offers("echo")


def test_a_hello_from_its_own_handler_key_registers_it_and_is_answered() -> None:
    bus = KeyedBus()
    leader = Leader(bus=bus)
    answer = bus.deliver_as("h1", "handler", p.HELLO, hello("h1"))
    assert answer is not None and answer["node_id"] == "n1"
    assert bus.rejected == []
    assert leader.registry.handlers["h1"].identity == b"h1"


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (p.HELLO, {"handler_id": "h1", "tasks": "echo"}),
        (p.HELLO, {"tasks": ["echo"]}),
        (p.HELLO, {"handler_id": "h1", "tasks": ["echo"], "clock": -1.0}),
        (p.HELLO, {"handler_id": "h1", "tasks": ["echo"], "clock": "soon"}),
        (p.HELLO, {"handler_id": "h1", "tasks": ["echo"], "running": "key"}),
        (p.DISPATCH_ACK, {"dispatch_id": "d1", "handler_id": "h1", "accepted": "yes"}),
        (p.JOB_RESULT, {"dispatch_id": "d1", "handler_id": "h1", "outcome": "maybe"}),
    ],
    ids=[
        "hello-tasks-not-a-list",
        "hello-without-id",
        "hello-clock-negative",
        "hello-clock-not-a-number",
        "hello-running-not-a-list",
        "ack-accepted-not-bool",
        "bad-outcome",
    ],
)
def test_a_malformed_message_from_a_handler_is_refused_and_counted(
    kind: str, payload: dict[str, Any]
) -> None:
    bus = KeyedBus()
    leader = Leader(bus=bus)
    assert bus.deliver_as("h1", "handler", kind, payload) is None
    assert reasons(bus) == ["malformed"]
    assert leader.registry.handlers == {}


@pytest.mark.parametrize(
    ("claimed", "reason"),
    [("h2", "not_assigned"), ("h1", "sender_mismatch")],
    ids=["as-itself", "as-the-assigned-handler"],
)
async def test_a_result_from_another_handler_than_the_assigned_one_is_refused(
    claimed: str, reason: str
) -> None:
    bus = KeyedBus()
    leader = Leader(bus=bus)
    leader.lead()
    h1 = leader.handler("h1")
    leader.handler("h2", tasks=("other",))  # a valid handler key, not given this job
    h1.script(HOLD)
    running = asyncio.create_task(leader.dispatch(await leader.job(value="real")))
    [start] = await bus.wait_sent(p.DISPATCH_START, identity=b"h1")
    forged = {
        "dispatch_id": start.payload["dispatch_id"],
        "handler_id": claimed,
        "outcome": "success",
        "return_value": "forged",
    }
    bus.deliver_as("h2", "handler", p.JOB_RESULT, forged)
    assert reasons(bus) == [reason]
    h1.finish_all()
    assert await running == ("real", "h1")


async def test_a_refusal_from_another_handler_than_the_assigned_one_is_ignored() -> None:
    bus = KeyedBus()
    leader = Leader(bus=bus, max_attempts=1)
    leader.lead()
    leader.handler("h1")
    leader.handler("h2", tasks=("other",))

    def forge(sent: Any) -> None:
        # Before h1 can acknowledge (its answers come a loop iteration later): h2 refuses in
        # its name, which would make the leader give up on h1.
        if sent.kind == p.DISPATCH and sent.identity == b"h1":
            ack = {
                "dispatch_id": sent.payload["dispatch_id"],
                "handler_id": "h2",
                "accepted": False,
                "reason": p.UNKNOWN_TASK,
            }
            bus.deliver_as("h2", "handler", p.DISPATCH_ACK, ack)

    bus.on_send(forge)
    try:
        assert await leader.dispatch(await leader.job(value="real")) == ("real", "h1")
    except TaskUnavailable as e:  # the old code: the forged refusal counted
        pytest.fail(f"a forged refusal ended the job: {e}")
    assert reasons(bus) == ["not_assigned"]


# --------------------------------------------------------------------------- handler side


def dispatch_payload(n: int = 1) -> dict[str, Any]:
    return {
        "dispatch_id": f"d{n}",
        "job_id": f"job{n}",
        "task": "echo",
        "args": ["x"],
        "idempotency_key": f"key{n}",
        "fencing_token": 1,
        "attempt": 1,
    }


@pytest.fixture
async def handler() -> Any:
    """A running handler whose node is not there: messages are handed to it as its transport
    would hand them over."""
    h = HandlerProcess("h1", [free_mesh_address()])
    await h.start()
    yield h
    await h.stop(drain_timeout=0)


@pytest.mark.parametrize("role", ["handler", "replica"])
async def test_a_dispatch_from_a_key_that_is_not_a_nodes_is_dropped(
    handler: HandlerProcess, role: str
) -> None:
    address = next(iter(handler.nodes))
    msg = Incoming(p.DISPATCH, dispatch_payload(), b"", b"", address, "h2", role)
    handler._on_message(msg)
    assert handler.active_jobs == 0
    assert handler.rejections.counts["role"] == 1
    # The same dispatch from a node key is taken (the rule tells roles apart).
    handler._on_message(Incoming(p.DISPATCH, dispatch_payload(), b"", b"", address, "n1", "node"))
    assert handler.active_jobs == 1


async def test_a_start_from_a_handler_key_starts_nothing(handler: HandlerProcess) -> None:
    address = next(iter(handler.nodes))
    handler._on_message(Incoming(p.DISPATCH, dispatch_payload(), b"", b"", address, "n1", "node"))
    start = {"dispatch_id": "d1", "start": True}
    handler._on_message(Incoming(p.DISPATCH_START, start, b"", b"", address, "h2", "handler"))
    assert handler.rejections.counts["role"] == 1
    assert handler.succeeded == 0 and not handler._job_tasks


async def test_without_keys_a_learned_non_loopback_leader_is_not_dialled(
    handler: HandlerProcess,
) -> None:
    link = next(iter(handler.nodes.values()))
    reply = {"node_id": "n1", "term": 2, "leader_id": "n2", "leader_mesh": NOT_LOOPBACK}
    handler._on_hello_reply(link, reply)
    assert NOT_LOOPBACK not in handler.nodes
    assert handler.rejections.counts["insecure_address"] == 1


async def test_with_insecure_a_learned_non_loopback_leader_is_dialled() -> None:
    h = HandlerProcess("h1", [free_mesh_address()], insecure=True)
    try:
        link = next(iter(h.nodes.values()))
        reply = {"node_id": "n1", "term": 2, "leader_id": "n2", "leader_mesh": NOT_LOOPBACK}
        h._on_hello_reply(link, reply)
        assert NOT_LOOPBACK in h.nodes
    finally:
        await h.stop(drain_timeout=0)


def test_without_keys_a_non_loopback_node_address_refuses_to_start() -> None:
    with pytest.raises(InsecureStart, match="handler h1 has no CURVE keys"):
        HandlerProcess("h1", [NOT_LOOPBACK])
    HandlerProcess("h1", [NOT_LOOPBACK], insecure=True)  # the operator's explicit choice


def test_a_handler_id_that_is_not_its_keys_name_is_refused(tmp_path: Path) -> None:
    create_key(tmp_path, "h2", "handler")
    with pytest.raises(ValueError, match="must be the name of its key"):
        HandlerProcess("h1", [NOT_LOOPBACK], keys=KeyRing(tmp_path, "h2"))


def test_a_node_key_cannot_run_a_handler(tmp_path: Path) -> None:
    create_key(tmp_path, "n1", "node")
    with pytest.raises(ValueError, match="needs a handler key"):
        HandlerProcess("n1", [NOT_LOOPBACK], keys=KeyRing(tmp_path, "n1"))


def test_run_handler_refuses_keys_without_a_handler_id_and_plaintext_off_loopback(
    tmp_path: Path,
) -> None:
    tasks = ["tests.fixtures.handler_tasks"]
    with pytest.raises(KeyFileError, match="--keys needs --handler-id"):
        run_handler([NOT_LOOPBACK], tasks, None, keys_dir=tmp_path)
    with pytest.raises(KeyFileError, match="no secret key for 'h1'"):
        run_handler([NOT_LOOPBACK], tasks, "h1", keys_dir=tmp_path)
    with pytest.raises(InsecureStart):
        run_handler([NOT_LOOPBACK], tasks, "h1")


# --------------------------------------------------------------------------- over CURVE


class TransportBus:
    """The MessageBus of a node, on a real (secured) transport: what MeshNode does for it."""

    def __init__(self, transport: MeshTransport) -> None:
        self.transport = transport
        self.handlers: dict[str, MessageHandler] = {}
        transport.set_handler(self._on_message)

    def _on_message(self, msg: Incoming) -> dict[str, Any] | None:
        fn = self.handlers.get(msg.kind)
        return fn(msg) if fn is not None else None

    def handle(self, kind: str, fn: MessageHandler) -> None:
        self.handlers[kind] = fn

    def send_to_identity(self, identity: bytes, kind: str, payload: dict[str, Any]) -> bool:
        return self.transport.send_to_identity(identity, kind, payload)

    def reject(self, msg: Incoming, reason: str, detail: str = "") -> None:
        self.transport.rejections.reject(reason, msg.sender or "?", detail)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    for name, role in [("n1", "node"), ("n2", "node"), ("h1", "handler"), ("h2", "handler")]:
        create_key(tmp_path, name, role)
    return tmp_path


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    """Transports and handlers to close after the test, last made first."""
    made: list[Any] = []
    yield made
    for thing in reversed(made):
        if isinstance(thing, HandlerProcess):
            await thing.stop(drain_timeout=0)
        else:
            await thing.close()


async def secured_node(keydir: Path, key: str, closing: list[Any]) -> tuple[Leader, MeshTransport]:
    """A leader-to-be (replica "n1") whose dispatcher listens on a transport holding ``key``."""
    transport = MeshTransport(key, free_mesh_address(), keys=KeyRing(keydir, key))
    closing.append(transport)
    leader = Leader(bus=TransportBus(transport))  # type: ignore[arg-type]
    await transport.start()
    return leader, transport


async def test_over_curve_another_key_cannot_take_a_handlers_id_and_the_handler_keeps_its_jobs(
    keydir: Path, closing: list[Any]
) -> None:
    leader, node = await secured_node(keydir, "n1", closing)
    h1 = HandlerProcess("h1", [node.bound_address], keys=KeyRing(keydir, "h1"))
    closing.append(h1)
    await h1.start()
    await wait_until_async(lambda: "h1" in leader.registry.handlers, 5, "h1 registered")

    thief = MeshTransport("h2", None, keys=KeyRing(keydir, "h2"))
    closing.append(thief)
    await thief.start()
    with pytest.raises(TimeoutError):  # refused: not even a reply
        await thief.request(node.bound_address, p.HELLO, hello("h1", ("echo", "x")), 1.0)
    assert node.rejections.counts["sender_mismatch"] == 1
    assert leader.registry.handlers["h1"].tasks == frozenset(h1.tasks)

    leader.lead()
    job = await leader.job(value="mine")
    assert await leader.dispatch(job) == ("mine", "h1")


async def test_over_curve_a_hello_reply_naming_another_node_than_its_key_is_refused(
    keydir: Path, closing: list[Any]
) -> None:
    # The node holds key n2 but answers as n1 (its replica's id): a lie about who it is.
    _, node = await secured_node(keydir, "n2", closing)
    h1 = HandlerProcess("h1", [node.bound_address], keys=KeyRing(keydir, "h1"))
    closing.append(h1)
    await h1.start()
    await wait_until_async(
        lambda: h1.rejections.counts["sender_mismatch"], 5, "the lying reply refused"
    )
    [link] = h1.nodes.values()
    assert link.node_id is None and link.reachable is not True


async def test_a_batch_of_results_is_judged_item_by_item() -> None:
    """A forged item in a ``job_results`` batch (another handler's dispatch, or another
    handler's name) is refused; the batch's honest items still end their jobs."""
    bus = KeyedBus()
    leader = Leader(bus=bus)
    leader.lead()
    h1 = leader.handler("h1", concurrency=4)
    h2 = leader.handler("h2", tasks=("other",))
    for h in (h1, h2):
        h.hello(clock=500.0)
    h1.script(HOLD, HOLD)
    jobs = [await leader.job(value=v) for v in ("a", "b")]
    running = [asyncio.create_task(leader.dispatch(job)) for job in jobs]
    await wait_until_async(lambda: len(h1.dispatches) == 2, timeout=5)
    ids = [d["dispatch_id"] for d in h1.dispatches]

    def item(dispatch_id: str, handler_id: str, value: str) -> dict[str, Any]:
        return {
            "dispatch_id": dispatch_id,
            "handler_id": handler_id,
            "outcome": "success",
            "return_value": value,
        }

    bus.deliver_as("h2", "handler", p.JOB_RESULTS, {"items": [item(ids[0], "h2", "forged")]})
    bus.deliver_as(
        "h1",
        "handler",
        p.JOB_RESULTS,
        {"items": [item(ids[0], "h2", "x"), item(ids[1], "h1", "b")]},
    )
    assert reasons(bus) == ["not_assigned", "sender_mismatch"]
    assert await running[1] == ("b", "h1")
    assert not running[0].done()
    h1.finish(ids[0])
    assert await running[0] == ("a", "h1")


@pytest.mark.parametrize(
    "payload", [{"items": []}, {"items": "x"}, {}], ids=["empty", "not-a-list", "no-items"]
)
def test_a_malformed_batch_of_results_is_refused_and_counted(payload: dict[str, Any]) -> None:
    bus = KeyedBus()
    Leader(bus=bus)
    bus.deliver_as("h1", "handler", p.JOB_RESULTS, payload)
    assert reasons(bus) == ["malformed"]
