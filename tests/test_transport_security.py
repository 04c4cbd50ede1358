"""CURVE on the transport: who may connect, who a message is from, and revocation.

Real sockets on 127.0.0.1, real key files. Each test would pass a message through (or to) the
wrong peer on a transport without keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from mesh.security import KeyRing, create_key
from mesh.transport import Incoming, MeshTransport, encode
from tests.netutil import free_mesh_address
from tests.waiting import wait_until_async

MakeNode = Callable[..., Awaitable[MeshTransport]]


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    for name, role in [
        ("node-a", "node"),
        ("node-b", "node"),
        ("node-c", "node"),
        ("h1", "handler"),
        ("h2", "handler"),
    ]:
        create_key(d, name, role)
    return d


@pytest.fixture
async def make_node(keydir: Path) -> AsyncIterator[MakeNode]:
    made: list[MeshTransport] = []

    async def factory(node_id: str, *, bind: bool = True, keys: Any = "ring") -> MeshTransport:
        ring = KeyRing(keydir, node_id) if keys == "ring" else keys
        transport = MeshTransport(node_id, free_mesh_address() if bind else None, keys=ring)
        made.append(transport)
        await transport.start()
        return transport

    yield factory
    for transport in made:
        await transport.close()


def recorder(transport: MeshTransport) -> list[Incoming]:
    got: list[Incoming] = []

    def on_message(msg: Incoming) -> dict[str, Any] | None:
        got.append(msg)
        return {"echo": msg.payload, "by": transport.node_id} if msg.rid else None

    transport.set_handler(on_message)
    return got


async def test_request_reply_carries_the_authenticated_sender(make_node: MakeNode) -> None:
    server = await make_node("node-a")
    client = await make_node("node-b")
    got = recorder(server)
    reply = await client.request(server.bound_address, "ping", {"node_id": "node-b"}, timeout=5)
    assert reply == {"echo": {"node_id": "node-b"}, "by": "node-a"}
    assert [(m.sender, m.sender_role, m.identity) for m in got] == [("node-b", "node", b"node-b")]
    # The client learnt which key the node at that address holds by the handshake alone.
    assert client.name_at(server.bound_address) == "node-a"


async def test_a_message_pushed_to_a_client_is_from_the_server_it_dialled(
    make_node: MakeNode,
) -> None:
    server = await make_node("node-a")
    handler = await make_node("h1", bind=False)
    server_got = recorder(server)
    handler_got = recorder(handler)
    assert await handler.request(server.bound_address, "handler_hello", {}, timeout=5)
    assert server_got[0].sender == "h1" and server_got[0].sender_role == "handler"
    assert server.send_to_identity(b"h1", "dispatch", {"job": 1})
    await wait_until_async(lambda: handler_got, 5, "the dispatch")
    assert (handler_got[0].sender, handler_got[0].sender_role) == ("node-a", "node")


async def test_a_plaintext_client_is_refused(make_node: MakeNode) -> None:
    server = await make_node("node-a")
    got = recorder(server)
    plain = MeshTransport("node-b", None)
    try:
        with pytest.raises(TimeoutError):
            await plain.request(server.bound_address, "ping", {"node_id": "node-b"}, timeout=1.0)
    finally:
        await plain.close()
    assert got == []


async def test_an_unknown_key_is_refused_and_counted(make_node: MakeNode, tmp_path: Path) -> None:
    server = await make_node("node-a")
    got = recorder(server)
    # A stranger who trusts node-a's public key (copied) but whose own key is not in node-a's dir.
    other = tmp_path / "stranger"
    create_key(other, "node-x", "node")
    (other / "node-a.key").write_text((server.keys.directory / "node-a.key").read_text())
    stranger = await make_node("node-x", keys=KeyRing(other, "node-x"))
    with pytest.raises(TimeoutError):
        await stranger.request(server.bound_address, "ping", {"node_id": "node-x"}, timeout=1.5)
    assert got == []
    assert server.rejections.counts["unknown_key"] >= 1


async def test_a_handler_key_cannot_subscribe_to_the_node_broadcasts(make_node: MakeNode) -> None:
    node = await make_node("node-a")
    peer = await make_node("node-b")
    handler = await make_node("h1")  # bound only so it can own a SUB like a node would
    heard: dict[str, list[Any]] = {"node-b": [], "h1": []}
    peer.set_broadcast_handler(lambda topic, payload: heard["node-b"].append(payload))
    handler.set_broadcast_handler(lambda topic, payload: heard["h1"].append(payload))
    for t in (peer, handler):
        t.subscribe(node.bound_address)
    # Subscribing needs the publisher's key: learnt by probing its ROUTER (ping it).
    recorder(node)
    for t in (peer, handler):
        await t.request(node.bound_address, "ping", {}, timeout=5)

    async def published() -> bool:
        node.publish("events", {"n": 1})
        await asyncio.sleep(0.05)
        return bool(heard["node-b"])

    for _ in range(100):
        if await published():
            break
    assert heard["node-b"], "a node key may subscribe"
    assert heard["h1"] == []
    assert node.rejections.counts["role"] >= 1


async def test_a_stolen_routing_id_gets_nothing(make_node: MakeNode, keydir: Path) -> None:
    """h2 (a valid handler key) connects with routing id b"h1": sends to h1 still reach h1."""
    server = await make_node("node-a")
    got = recorder(server)
    real = await make_node("h1", bind=False)
    real_got = recorder(real)
    await real.request(server.bound_address, "handler_hello", {"handler_id": "h1"}, timeout=5)

    h2 = KeyRing(keydir, "h2")
    ctx = zmq.asyncio.Context()
    thief = ctx.socket(zmq.DEALER)
    try:
        thief.setsockopt(zmq.LINGER, 0)
        thief.setsockopt(zmq.ROUTING_ID, b"h1")
        thief.setsockopt(zmq.CURVE_SECRETKEY, h2.secret)
        thief.setsockopt(zmq.CURVE_PUBLICKEY, h2.public)
        thief.setsockopt(zmq.CURVE_SERVERKEY, server.keys.get("node-a").public)
        thief.connect(server.bound_address)
        await thief.send_multipart(encode("handler_hello", {"handler_id": "h1"}))
        await wait_until_async(lambda: len(got) == 2, 5, "the thief's hello")
        # The payload claims h1; the connection's key says h2.
        assert (got[1].sender, got[1].payload["handler_id"]) == ("h2", "h1")
        assert server.send_to_identity(b"h1", "dispatch", {"secret": "for h1 only"})
        await wait_until_async(lambda: real_got, 5, "the dispatch at the real h1")
        assert real_got[0].payload == {"secret": "for h1 only"}
        assert await thief.poll(300) == 0, "the thief received a message meant for h1"
    finally:
        thief.close(linger=0)
        ctx.term()


async def test_revoking_a_key_cuts_the_peer_off(make_node: MakeNode, keydir: Path) -> None:
    server = await make_node("node-a")
    got = recorder(server)
    handler = await make_node("h1", bind=False)
    await handler.request(server.bound_address, "handler_hello", {}, timeout=5)
    assert len(got) == 1

    (keydir / "h1.key").unlink()
    _added, removed = server.reload_keys()
    assert removed == {"h1"}
    assert not server.send_to_identity(b"h1", "dispatch", {"job": 1})
    # Its established connection still delivers, but nothing it says is believed any more.
    assert handler.send(server.bound_address, "handler_hello", {})
    await wait_until_async(
        lambda: server.rejections.counts["revoked"] >= 1, 5, "the revoked key's refusal"
    )
    assert len(got) == 1
    # And it cannot connect again.
    fresh = await make_node("h1", bind=False, keys=KeyRing(keydir.parent / "h1-copy", "h1"))
    with pytest.raises(TimeoutError):
        await fresh.request(server.bound_address, "handler_hello", {}, timeout=1.0)


@pytest.fixture(autouse=True)
def _h1_copy(keydir: Path) -> None:
    # h1's own ring kept outside the server's directory, for the revocation test's reconnect.
    copy = keydir.parent / "h1-copy"
    copy.mkdir()
    for name in ("h1.key", "h1.key_secret", "node-a.key"):
        target = copy / name
        target.write_bytes((keydir / name).read_bytes())
        target.chmod((keydir / name).stat().st_mode & 0o777)


async def test_probing_finds_the_right_node_among_several_keys(make_node: MakeNode) -> None:
    a = await make_node("node-a")
    b = await make_node("node-b")
    c = await make_node("node-c")
    for t in (a, b, c):
        recorder(t)
    for t in (b, c):
        reply = await a.request(t.bound_address, "ping", {}, timeout=5)
        assert reply["by"] == t.node_id
        assert a.name_at(t.bound_address) == t.node_id


async def test_a_reply_counts_only_from_the_peer_that_was_asked(make_node: MakeNode) -> None:
    slow = await make_node("node-a")
    other = await make_node("node-b")
    client = await make_node("node-c")
    seen: list[Incoming] = []

    def never_answer(msg: Incoming) -> None:
        seen.append(msg)

    slow.set_handler(never_answer)
    other_got = recorder(other)
    task = asyncio.ensure_future(client.request(slow.bound_address, "ping", {}, timeout=2.0))
    await wait_until_async(lambda: seen, 5, "the request at node-a")
    # node-b answers with node-a's request id: it must not complete node-a's request.
    await client.request(other.bound_address, "ping", {}, timeout=5)  # connects client → b
    assert other_got
    msg = seen[0]
    forged = Incoming("ping", {}, msg.rid, b"node-c", "", "node-c", "node")
    assert other.reply(forged, {"forged": True})
    with pytest.raises(TimeoutError):
        await task
    assert client.counters["replies_unmatched"] >= 1
