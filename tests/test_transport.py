"""The ZeroMQ transport: wire codec and MeshTransport over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio

from mesh import eventloop
from mesh.transport import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL,
    FrameError,
    Incoming,
    MeshTransport,
    decode,
    encode,
    pub_address_of,
    split_address,
)
from tests.netutil import free_mesh_address
from tests.waiting import Message, wait_until_async

# ---------------------------------------------------------------------------- helpers

AUTO = "auto"
MakeNode = Callable[..., Awaitable[MeshTransport]]


@pytest.fixture
async def make_node() -> AsyncIterator[MakeNode]:
    """Start transports on fresh ports and close them all after the test."""
    made: list[MeshTransport] = []

    async def factory(node_id: str, bind: str | None = AUTO, **kwargs: Any) -> MeshTransport:
        transport = MeshTransport(node_id, free_mesh_address() if bind == AUTO else bind, **kwargs)
        made.append(transport)
        await transport.start()
        return transport

    yield factory
    for transport in made:
        await transport.close()


RawDealer = Callable[[str], zmq.asyncio.Socket]


@pytest.fixture
async def raw_dealer() -> AsyncIterator[RawDealer]:
    """Plain zmq DEALERs (no codec, no IMMEDIATE) for sending arbitrary frames to a node."""
    ctx = zmq.asyncio.Context()
    sockets: list[zmq.asyncio.Socket] = []

    def factory(address: str) -> zmq.asyncio.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sockets.append(sock)
        return sock

    yield factory
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()


async def eventually(
    predicate: Callable[[], object], within: float = 3.0, what: Message = "the condition"
) -> None:
    await wait_until_async(predicate, within, what)


async def send_until_queued(
    sender: MeshTransport, address: str, kind: str, payload: dict, within: float = 3.0
) -> None:
    """send() refuses until the DEALER is connected (IMMEDIATE); retry until it queues."""
    await eventually(lambda: sender.send(address, kind, payload), within)


def unread_request_waits(server: MeshTransport) -> bool:
    """Whether a message waits on the server's ROUTER that its reader has not taken yet."""
    router = server._router
    return router is not None and bool(router.getsockopt(zmq.EVENTS) & zmq.POLLIN)


def echo_doubled(incoming: Incoming) -> dict | None:
    return {"kind": incoming.kind, "n": incoming.payload.get("n", 0) * 2}


# ---------------------------------------------------------------------------- codec


def test_encode_then_decode_returns_kind_rid_and_payload() -> None:
    payload = {"term": 3, "entries": [{"t": 1, "d": "ünï"}], "ok": True}
    frames = encode("raft", payload, rid=b"42")
    assert frames[0] == PROTOCOL and len(frames) == 4
    assert decode(frames) == ("raft", b"42", payload)


def test_encode_uses_compact_json() -> None:
    assert encode("ping", {"a": 1, "b": [1, 2]})[3] == b'{"a":1,"b":[1,2]}'


def test_one_way_message_has_empty_rid() -> None:
    assert decode(encode("ping", {}))[1] == b""


def test_frame_error_is_a_value_error_carrying_its_reason() -> None:
    with pytest.raises(ValueError) as info:
        decode([PROTOCOL, b"ping"])
    assert isinstance(info.value, FrameError)
    assert info.value.reason == "shape"


@pytest.mark.parametrize("count", [0, 1, 3, 5])
def test_decode_rejects_wrong_frame_count_as_shape(count: int) -> None:
    frames = [PROTOCOL, b"ping", b"", b"{}", b"extra"][:count]
    with pytest.raises(FrameError) as info:
        decode(frames)
    assert info.value.reason == "shape"


def test_decode_rejects_overlong_rid_as_shape() -> None:
    with pytest.raises(FrameError) as info:
        decode([PROTOCOL, b"ping", b"r" * 33, b"{}"])
    assert info.value.reason == "shape"


@pytest.mark.parametrize("version", [b"SZ2", b"", b"sz1", b"SZ1\x00"])
def test_decode_rejects_other_protocol_versions(version: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode([version, b"ping", b"", b"{}"])
    assert info.value.reason == "version"


@pytest.mark.parametrize("kind", [b"", b"Ping", b"with space", b"k" * 33, "ü".encode(), b"a/b"])
def test_decode_rejects_invalid_kind(kind: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode([PROTOCOL, kind, b"", b"{}"])
    assert info.value.reason == "kind"


def test_decode_accepts_every_allowed_kind_character() -> None:
    assert decode([PROTOCOL, b"a-z_0.9", b"", b"{}"])[0] == "a-z_0.9"


def test_decode_checks_size_before_parsing_json() -> None:
    # Not valid JSON either: "size" proves the oversize frame was never parsed.
    with pytest.raises(FrameError) as info:
        decode([PROTOCOL, b"ping", b"", b"{" * 101], max_bytes=100)
    assert info.value.reason == "size"


def test_decode_rejects_any_oversize_frame() -> None:
    with pytest.raises(FrameError) as info:
        decode([PROTOCOL, b"ping", b"r" * 20, b"{}"], max_bytes=10)
    assert info.value.reason == "size"


def test_default_max_frame_is_16_mib() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 16 * 1024 * 1024


@pytest.mark.parametrize(
    "body",
    [b"{nope", b"[1, 2]", b'"text"', b"null", b"\xff\xfe{}", '{"a": 1}'.encode("utf-16"), b""],
    ids=["garbage", "array", "string", "null", "not-utf8", "utf16", "empty"],
)
def test_decode_rejects_payload_that_is_not_a_utf8_json_object(body: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode([PROTOCOL, b"ping", b"", body])
    assert info.value.reason == "json"


def test_encode_rejects_invalid_kind() -> None:
    with pytest.raises(FrameError) as info:
        encode("Not Valid", {})
    assert info.value.reason == "kind"


def test_encode_rejects_non_dict_payload() -> None:
    with pytest.raises(TypeError):
        encode("ping", [1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- addresses


def test_split_address_returns_host_and_port() -> None:
    assert split_address("tcp://10.0.0.5:7400") == ("10.0.0.5", 7400)
    assert split_address("tcp://[::1]:7400") == ("[::1]", 7400)


@pytest.mark.parametrize(
    "address",
    ["10.0.0.5:7400", "udp://h:1", "tcp://h", "tcp://:7400", "tcp://h:port", "tcp://h:65535"],
)
def test_split_address_rejects_malformed_address_with_clear_message(address: str) -> None:
    with pytest.raises(ValueError, match=r"tcp://HOST:PORT|PORT\+1"):
        split_address(address)


def test_pub_address_is_mesh_port_plus_one() -> None:
    assert pub_address_of("tcp://127.0.0.1:7400") == "tcp://127.0.0.1:7401"


def test_transport_reports_its_bound_and_pub_addresses() -> None:
    transport = MeshTransport("a", "tcp://127.0.0.1:7400")
    assert transport.bound_address == "tcp://127.0.0.1:7400"
    assert transport.pub_address == "tcp://127.0.0.1:7401"


# ---------------------------------------------------------------------------- point-to-point


async def test_one_way_send_reaches_peer_handler_with_kind_and_payload(
    make_node: MakeNode,
) -> None:
    a = await make_node("a")
    b = await make_node("b")
    got: list[Incoming] = []
    b.set_handler(got.append)

    await send_until_queued(a, b.bound_address, "ping", {"term": 7})
    await eventually(lambda: bool(got))

    assert (got[0].kind, got[0].payload, got[0].rid) == ("ping", {"term": 7}, b"")
    assert got[0].identity == b"a"  # the sender's node id is its routing id
    assert a.counters["sent"] >= 1 and b.counters["received"] == 1


async def test_request_returns_the_handler_reply(make_node: MakeNode) -> None:
    server = await make_node("server")
    server.set_handler(echo_doubled)
    client = await make_node("client", bind=None)

    reply = await client.request(server.bound_address, "double", {"n": 21}, timeout=3.0)

    assert reply == {"kind": "double", "n": 42}


async def test_a_request_larger_than_a_frame_is_refused_before_anything_is_sent(
    make_node: MakeNode,
) -> None:
    """The peer would drop it (and ZeroMQ cut the connection): the caller learns it at once and
    may take another way, sure that nothing reached the peer."""
    seen: list[Incoming] = []
    server = await make_node("server")
    server.set_handler(lambda incoming: seen.append(incoming) or {"n": len(seen)})
    client = await make_node("client", bind=None, max_frame_bytes=1024)

    with pytest.raises(FrameError) as refused:
        await client.request(server.bound_address, "big", {"x": "y" * 2000}, timeout=3.0)
    assert refused.value.reason == "size"
    assert await client.request(server.bound_address, "small", {}, timeout=3.0) == {"n": 1}
    assert [m.kind for m in seen] == ["small"]


async def test_async_handler_reply_is_sent_back(make_node: MakeNode) -> None:
    server = await make_node("server")

    async def handler(incoming: Incoming) -> dict:
        await asyncio.sleep(0.01)
        return {"n": incoming.payload["n"] + 1}

    server.set_handler(handler)
    client = await make_node("client", bind=None)

    assert await client.request(server.bound_address, "inc", {"n": 1}, timeout=3.0) == {"n": 2}


async def test_slow_async_handler_does_not_block_other_messages(make_node: MakeNode) -> None:
    server = await make_node("server")
    release = asyncio.Event()

    async def handler(incoming: Incoming) -> dict:
        if incoming.kind == "slow":
            await release.wait()
        return {"kind": incoming.kind}

    server.set_handler(handler)
    client = await make_node("client", bind=None)

    slow = asyncio.create_task(client.request(server.bound_address, "slow", {}, timeout=5.0))
    fast = await client.request(server.bound_address, "fast", {}, timeout=3.0)
    assert fast == {"kind": "fast"} and not slow.done()
    release.set()
    assert await slow == {"kind": "slow"}


async def test_async_handlers_beyond_the_limit_wait_for_a_free_slot(make_node: MakeNode) -> None:
    server = await make_node("server", max_handler_tasks=2)
    release = asyncio.Event()
    running = 0
    most_running = 0

    async def handler(incoming: Incoming) -> dict:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        await release.wait()
        running -= 1
        return {"n": incoming.payload["n"]}

    server.set_handler(handler)
    client = await make_node("client", bind=None)
    requests = [
        asyncio.create_task(client.request(server.bound_address, "work", {"n": n}, timeout=5.0))
        for n in range(6)
    ]
    # A third request waiting unread on the server's socket is the chance to start a third
    # handler: the reader holds off until a slot frees up.
    await eventually(
        lambda: running == 2 and unread_request_waits(server),
        what=lambda: f"two handlers running and a request waiting unread (running: {running})",
    )
    assert most_running == 2
    assert server.counters["received"] == 2

    release.set()
    assert [r["n"] for r in await asyncio.gather(*requests)] == list(range(6))


async def test_request_to_a_down_peer_raises_timeout_error_promptly(
    make_node: MakeNode,
) -> None:
    # "Promptly" compared with a live peer that never answers, measured in the same run: a down
    # peer costs no connect wait on top of the request's own timeout.
    silent = await make_node("silent")
    silent.set_handler(lambda incoming: None)
    client = await make_node("client", bind=None)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await client.request(silent.bound_address, "ping", {}, timeout=0.3)
    unanswered = loop.time() - started

    started = loop.time()
    with pytest.raises(TimeoutError):
        await client.request(free_mesh_address(), "ping", {}, timeout=0.3)
    down = loop.time() - started

    assert down < 2 * unanswered, (down, unanswered)
    assert client.counters["request_timeouts"] == 2
    assert not client._pending  # the pending entries were cleaned up


async def test_a_request_to_a_peer_not_connected_within_the_connect_timeout_is_not_sent(
    make_node: MakeNode,
) -> None:
    """A peer that is down: ConnectionError (nothing sent), not a wait for the whole timeout. A
    peer that is up and silent still times out (the request went out)."""
    silent = await make_node("silent")
    silent.set_handler(lambda incoming: None)
    client = await make_node("client", bind=None)
    with pytest.raises(ConnectionError):
        await client.request(free_mesh_address(), "ping", {}, timeout=30, connect_timeout=0.2)
    with pytest.raises(TimeoutError):
        await client.request(silent.bound_address, "ping", {}, timeout=0.5, connect_timeout=0.2)


async def test_request_unanswered_by_a_live_peer_times_out(make_node: MakeNode) -> None:
    server = await make_node("server")
    server.set_handler(lambda incoming: None)  # never replies
    client = await make_node("client", bind=None)

    with pytest.raises(TimeoutError):
        await client.request(server.bound_address, "ping", {}, timeout=0.3)
    assert not client._pending


async def test_many_concurrent_requests_each_get_their_own_reply(make_node: MakeNode) -> None:
    server = await make_node("server")

    async def handler(incoming: Incoming) -> dict:
        await asyncio.sleep(0.001 * (incoming.payload["n"] % 7))  # finish out of order
        return {"n": incoming.payload["n"] * 2}

    server.set_handler(handler)
    client = await make_node("client", bind=None)

    replies = await asyncio.gather(
        *(client.request(server.bound_address, "double", {"n": n}, timeout=5.0) for n in range(500))
    )

    assert [r["n"] for r in replies] == [n * 2 for n in range(500)]


@pytest.mark.timeout(30)
async def test_send_to_a_non_listening_peer_returns_false_without_blocking(
    make_node: MakeNode,
) -> None:
    a = await make_node("a")
    nobody = free_mesh_address()

    # A send that waited would hang here (the test's timeout); how fast 1,000 refusals are is
    # the benchmark's business.
    results = [a.send(nobody, "ping", {"i": i}) for i in range(1000)]

    assert not any(results)
    assert a.counters["send_dropped"] == 1000


async def test_send_to_identity_reaches_a_dealer_client_that_sent_before(
    make_node: MakeNode,
) -> None:
    server = await make_node("server")
    seen: list[Incoming] = []
    server.set_handler(seen.append)
    client = await make_node("client", bind=None)
    pushed: list[Incoming] = []
    client.set_handler(pushed.append)

    await send_until_queued(client, server.bound_address, "hello", {})
    await eventually(lambda: bool(seen))
    assert server.send_to_identity(seen[0].identity, "work", {"job": 1})
    await eventually(lambda: bool(pushed))

    assert (pushed[0].kind, pushed[0].payload, pushed[0].identity) == ("work", {"job": 1}, b"")
    assert pushed[0].address == server.bound_address


async def test_send_to_unknown_identity_returns_false(make_node: MakeNode) -> None:
    server = await make_node("server")

    assert server.send_to_identity(b"nobody", "work", {}) is False
    assert server.counters["send_dropped"] == 1


async def test_late_reply_after_timeout_is_dropped_not_handled(make_node: MakeNode) -> None:
    server = await make_node("server")

    async def late(incoming: Incoming) -> dict:
        await asyncio.sleep(0.3)
        return {"late": True}

    server.set_handler(late)
    client = await make_node("client", bind=None)
    handled: list[Incoming] = []
    client.set_handler(handled.append)

    with pytest.raises(TimeoutError):
        await client.request(server.bound_address, "slow", {}, timeout=0.1)
    await eventually(lambda: client.counters["replies_unmatched"] == 1)
    assert handled == []


async def _message_arriving_during_a_send_is_read(loop_name: str) -> None:
    """The scenario of the test below, on one event loop; the peer is a plain ROUTER."""
    assert type(asyncio.get_running_loop()).__module__.startswith(loop_name)
    ctx = zmq.Context()
    peer = ctx.socket(zmq.ROUTER)
    peer.setsockopt(zmq.LINGER, 0)
    address = free_mesh_address()
    peer.bind(address)
    node = MeshTransport("node", None)
    seen: list[str] = []
    node.set_handler(lambda incoming: seen.append(incoming.kind))
    try:
        await node.start()
        node.connect(address)
        await send_until_queued(node, address, "hello", {})
        assert peer.poll(3000), "the peer never got hello"
        routing_id, *_ = peer.recv_multipart()
        peer.send_multipart([routing_id, *encode("first", {})])
        await eventually(lambda: seen == ["first"], what=lambda: f"first read; seen {seen}")

        # Without yielding to the loop: wait until the message has signalled the node's
        # DEALER FD, then send on that socket, which takes the signal (libzmq processes a
        # socket's commands at most about once a millisecond during sends, hence the pause).
        peer.send_multipart([routing_id, *encode("second", {})])
        fd = node._dealers[address].getsockopt(zmq.FD)
        assert select.select([fd], [], [], 3.0)[0], "the second message never signalled"
        time.sleep(0.01)
        node.send(address, "ping", {})
        assert not select.select([fd], [], [], 0)[0], "precondition: the send took the edge"

        await eventually(lambda: seen == ["first", "second"], what=lambda: f"seen {seen}")
    finally:
        await node.close()
        peer.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_message_that_arrives_during_a_send_is_read_without_more_traffic(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ZeroMQ's FD is edge-triggered and a send may consume its edge: the transport must look
    # at EVENTS after sending, or the message waits for the next arrival, maybe forever.
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    monkeypatch.setenv(eventloop.ENV, loop_name)
    eventloop.run(_message_arriving_during_a_send_is_read(loop_name))


# ---------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"SZ2", b"ping", b"", b"{}"], "version"),
        ([PROTOCOL, b"ping"], "shape"),
        ([PROTOCOL, b"PING!", b"", b"{}"], "kind"),
        ([PROTOCOL, b"ping", b"", b"{not json"], "json"),
        ([PROTOCOL, b"ping", b"", b"[]"], "json"),
        ([PROTOCOL, b"ping", b"", b'{"pad":"' + b"x" * 1500 + b'"}'], "size"),
    ],
    ids=["version", "two-frames", "kind", "bad-json", "not-object", "oversize"],
)
async def test_malformed_message_is_counted_and_node_still_answers(
    make_node: MakeNode,
    raw_dealer: RawDealer,
    frames: list[bytes],
    reason: str,
) -> None:
    server = await make_node("server", max_frame_bytes=1024)
    server.set_handler(echo_doubled)
    raw = raw_dealer(server.bound_address)

    await raw.send_multipart(frames)
    await raw.send_multipart(encode("double", {"n": 5}, rid=b"r1"))  # same pipe: arrives after
    reply = await asyncio.wait_for(raw.recv_multipart(), 3.0)

    assert decode(reply) == ("reply", b"r1", {"kind": "double", "n": 10})
    assert server.counters[f"dropped_frames.{reason}"] == 1
    assert server.counters["received"] == 1


async def test_message_beyond_maxmsgsize_cuts_that_connection_but_node_keeps_serving(
    make_node: MakeNode, raw_dealer: RawDealer
) -> None:
    server = await make_node("server", max_frame_bytes=1024)
    server.set_handler(echo_doubled)
    hostile = raw_dealer(server.bound_address)
    await hostile.send_multipart([PROTOCOL, b"ping", b"", b"x" * 1_000_000])

    client = await make_node("client", bind=None)
    reply = await client.request(server.bound_address, "double", {"n": 1}, timeout=3.0)

    assert reply == {"kind": "double", "n": 2}


async def test_handler_exception_is_counted_and_loop_survives(make_node: MakeNode) -> None:
    server = await make_node("server")

    def handler(incoming: Incoming) -> dict:
        if incoming.kind == "boom":
            raise RuntimeError("handler bug")
        return {"ok": True}

    server.set_handler(handler)
    client = await make_node("client", bind=None)

    with pytest.raises(TimeoutError):
        await client.request(server.bound_address, "boom", {}, timeout=0.3)
    assert await client.request(server.bound_address, "fine", {}, timeout=3.0) == {"ok": True}
    assert server.counters["handler_errors"] == 1
    # A late reply to "boom" would have come back before the one to "fine" (same pipe).
    assert client.counters["replies_unmatched"] == 0


async def test_async_handler_exception_is_counted_and_loop_survives(
    make_node: MakeNode,
) -> None:
    server = await make_node("server")

    async def handler(incoming: Incoming) -> dict:
        if incoming.kind == "boom":
            raise RuntimeError("handler bug")
        return {"ok": True}

    server.set_handler(handler)
    client = await make_node("client", bind=None)

    with pytest.raises(TimeoutError):
        await client.request(server.bound_address, "boom", {}, timeout=0.3)
    assert await client.request(server.bound_address, "fine", {}, timeout=3.0) == {"ok": True}
    assert server.counters["handler_errors"] == 1
    # A late reply to "boom" would have come back before the one to "fine" (same pipe).
    assert client.counters["replies_unmatched"] == 0


# ---------------------------------------------------------------------------- broadcast


async def test_publish_reaches_a_subscriber(make_node: MakeNode) -> None:
    publisher = await make_node("pub")
    subscriber = await make_node("sub", bind=None)
    got: list[tuple[str, dict]] = []
    subscriber.set_broadcast_handler(lambda topic, payload: got.append((topic, payload)))
    subscriber.subscribe(publisher.bound_address)

    # Slow joiner: messages published before the SUB has connected are lost, so keep going.
    deadline = time.monotonic() + 3.0
    while not got and time.monotonic() < deadline:
        publisher.publish("leader", {"node": "pub", "term": 2})
        await asyncio.sleep(0.02)

    assert got and got[0] == ("leader", {"node": "pub", "term": 2})


async def test_publish_without_a_bound_socket_is_an_error(make_node: MakeNode) -> None:
    client = await make_node("client", bind=None)
    with pytest.raises(RuntimeError):
        client.publish("leader", {})


# ---------------------------------------------------------------------------- lifecycle


async def test_close_is_idempotent_and_releases_ports() -> None:
    address = free_mesh_address()
    host, port = split_address(address)
    transport = MeshTransport("a", address)
    await transport.start()
    await transport.close()
    await transport.close()

    for p in (port, port + 1):  # ROUTER and PUB ports, free at once for anyone
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, p))


async def test_a_new_transport_can_bind_the_address_of_a_closed_one() -> None:
    address = free_mesh_address()
    first = MeshTransport("a", address)
    await first.start()
    await first.close()

    second = MeshTransport("a", address)
    await second.start()
    try:
        assert second.bound_address == address
    finally:
        await second.close()


async def test_close_fails_outstanding_requests(make_node: MakeNode) -> None:
    server = await make_node("server")
    server.set_handler(lambda incoming: None)
    client = MeshTransport("client", None)
    await client.start()

    pending = asyncio.create_task(client.request(server.bound_address, "x", {}, timeout=5.0))
    await eventually(lambda: bool(client._pending))
    await client.close()

    with pytest.raises(ConnectionError):
        await pending


async def test_close_from_inside_a_handler_completes(make_node: MakeNode) -> None:
    a = await make_node("a")
    b = await make_node("b")
    closed = asyncio.Event()

    async def shut_down(incoming: Incoming) -> None:
        await b.close()
        closed.set()

    b.set_handler(shut_down)
    await send_until_queued(a, b.bound_address, "stop", {})

    await asyncio.wait_for(closed.wait(), 3.0)
    host, port = split_address(b.bound_address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as ZeroMQ uses it: the closed connection from `a` sits in TIME_WAIT.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


async def test_binding_a_port_in_use_raises_a_clear_os_error(make_node: MakeNode) -> None:
    taken = await make_node("a")
    with pytest.raises(OSError, match="cannot bind"):
        await make_node("b", bind=taken.bound_address)


async def test_disconnect_then_send_reconnects(make_node: MakeNode) -> None:
    a = await make_node("a")
    b = await make_node("b")
    got: list[Incoming] = []
    b.set_handler(got.append)
    a.connect(b.bound_address)
    a.disconnect(b.bound_address)

    await send_until_queued(a, b.bound_address, "ping", {"again": True})
    await eventually(lambda: bool(got))
    assert got[0].payload == {"again": True}
