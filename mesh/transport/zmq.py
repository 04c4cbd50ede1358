"""MeshTransport: every mesh byte a process sends or receives goes through here.

Why this file is long: it is the one owner of every ZeroMQ socket of a process (four socket
kinds, plain and CURVE, with probing and key reloads, read from the event loop by ``_Reader``);
splitting it would spread the socket lifecycle rules (readers and the edge-triggered FD, close
order, routing ids) across modules that must agree on them.

Sockets of one transport (see docs/architecture.md, "Ports"):

* ROUTER bound on the mesh address ``tcp://HOST:PORT``: all point-to-point traffic *into* this
  process. Peers reach it through their DEALERs; replies go back by routing id.
* one DEALER per peer address, created by :meth:`MeshTransport.connect`: all point-to-point
  traffic *out of* this process, and the replies to our requests.
* PUB bound on ``tcp://HOST:PORT+1``: broadcasts. Wire frames ``[topic, *codec.encode("pub",
  payload)]``, i.e. ``[topic, b"SZ1", b"pub", b"", json]``; the topic follows the kind rules and
  comes first so SUB prefix filtering stays possible later.
* one SUB connected to the PUB of every node passed to :meth:`MeshTransport.subscribe`.

A client-only process (``bind=None``, e.g. a handler) has no ROUTER and no PUB.

The sockets are plain ``zmq.Socket`` objects, not ``zmq.asyncio`` ones (whose future per send and
``EVENTS`` checks per message were a third of an idle node's Python time): the event loop watches
each readable socket's ZeroMQ FD (``loop.add_reader``) and ``_Reader`` drains it with
non-blocking recvs. That FD is edge-triggered, so the rules are: drain while ``EVENTS`` says
``POLLIN`` (at most ``_BATCH`` per wake-up, then continue on the next turn of the loop), check
``EVENTS`` after every send on a socket that has a reader (the send may have taken the edge of a
message that came in meanwhile), and remove the reader before closing the socket.

Sends never block: they use ``NOBLOCK`` and report ``False`` when ZeroMQ would have to wait
(peer not connected, since DEALERs set ``IMMEDIATE``; or high-water mark reached). Raft and the
heartbeats retry on their own schedule, so a dropped message is cheaper than a stalled loop.
A DEALER's very first sends after :meth:`connect` therefore fail until the TCP handshake is done;
:meth:`request` retries within its timeout to absorb that.

Unencrypted (no key ring; loopback only, see mesh.security.policy): the DEALER routing id is
``node_id``, so a ROUTER sees the sender's node id as ``identity`` and, with ``ROUTER_HANDOVER``,
a restarted peer takes over its old routing id at once. Nothing is authenticated.

Secured (``keys=KeyRing``): every socket is CURVE. Server sockets (ROUTER, PUB) admit only the
certificates of the key ring (a ZAP handler, mesh.security.zap), and every message received on
the ROUTER carries its connection's certificate name as ZeroMQ's ``User-Id``: that name is the
authenticated sender (``Incoming.sender``), whatever the payload claims. Client sockets (DEALER,
SUB) dial with the server certificate of the node they expect, so what arrives on them comes from
that node. Routing ids are then secrets: each DEALER picks 16 random bytes, sent only inside the
encrypted handshake, so no other connection can claim (``ROUTER_HANDOVER``) a route it never saw.
The transport maps each certificate name to the routing id its latest message came with, and
sends to that name go there. ``Incoming.identity`` is the sender's name either way.

Which certificate the node at an address holds is learnt, not configured: a DEALER to a new
address starts as one *probe* per ``node`` certificate of the key ring; only the one dialled
with the right server key completes the CURVE handshake (the others fail it, harmlessly), and
with ``IMMEDIATE`` only that one can take a message. It is then kept and the probes closed. A
wrong hint or a forged mDNS record can therefore never make us talk to the wrong key.

The key ring is re-read every ``RELOAD_SECONDS`` and on :meth:`reload_keys` (SIGHUP): a removed
certificate's connections are cut, its messages dropped from then on.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import zmq

from mesh.contracts import BroadcastHandler, Incoming
from mesh.security.audit import Rejections
from mesh.security.keys import RELOAD_SECONDS, KeyRing
from mesh.security.zap import KeyRingAuthenticator
from mesh.transport.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL,
    FrameError,
    decode,
    encode,
    encode_json,
    encode_payload,
    name_from_bytes,
    name_to_bytes,
)

log = logging.getLogger("mesh.transport")

REPLY_KIND = "reply"
PUB_KIND = "pub"
_REPLY_KIND_B = REPLY_KIND.encode()
_PUB_KIND_B = PUB_KIND.encode()

# Messages handled per wake-up of a receive loop before it yields to the event loop.
_BATCH = 64
# request(): backoff while the DEALER is not yet connected (IMMEDIATE makes sends fail fast).
_REQUEST_RETRY_FIRST = 0.005
_REQUEST_RETRY_MAX = 0.1
# start(): how long to retry a bind whose port is still held by a just-closed socket.
_BIND_RETRY_SECONDS = 1.0


def split_address(addr: str) -> tuple[str, int]:
    """Split a mesh address ``tcp://HOST:PORT`` into ``(host, port)``.

    The port must leave room for the PUB socket on PORT+1. IPv6 hosts keep their brackets
    (``tcp://[::1]:5000`` -> ``("[::1]", 5000)``) so the pair can be joined back unchanged.
    """
    if not isinstance(addr, str) or not addr.startswith("tcp://"):
        raise ValueError(f"mesh address must look like tcp://HOST:PORT, got {addr!r}")
    host, sep, port_text = addr[len("tcp://") :].rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"mesh address must look like tcp://HOST:PORT, got {addr!r}")
    port = int(port_text)
    if not 1 <= port <= 65534:
        raise ValueError(
            f"mesh address {addr!r}: port must be 1..65534 (the PUB socket uses PORT+1)"
        )
    return host, port


def pub_address_of(addr: str) -> str:
    """The PUB (broadcast) address of the node whose mesh address is ``addr``: PORT+1."""
    host, port = split_address(addr)
    return f"tcp://{host}:{port + 1}"


Handler = Callable[[Incoming], "dict[str, Any] | Awaitable[dict[str, Any] | None] | None"]


class MeshTransport:
    """ROUTER + DEALERs + PUB/SUB for one process, driven by its asyncio loop.

    ``counters`` holds: ``sent``, ``received``, ``send_dropped``, ``dropped_frames.<reason>``,
    ``handler_errors``, ``published``, ``request_timeouts``, ``replies_unmatched`` (late replies
    to requests that already timed out, or replies from another peer than the one asked;
    dropped, never passed to the handler). Security refusals are counted in ``rejections``.
    """

    def __init__(
        self,
        node_id: str,
        bind: str | None,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        send_hwm: int = 10_000,
        context: zmq.Context | None = None,
        max_handler_tasks: int = 1_000,
        keys: KeyRing | None = None,
        rejections: Rejections | None = None,
    ) -> None:
        routing_id = node_id.encode("utf-8")
        if not routing_id or len(routing_id) > 255 or routing_id[0] == 0:
            raise ValueError(
                f"node_id must be 1..255 UTF-8 bytes not starting with NUL: {node_id!r}"
            )
        if bind is not None:
            host, port = split_address(bind)
            self._bind: str | None = f"tcp://{host}:{port}"
            self._pub_bind: str | None = f"tcp://{host}:{port + 1}"
        else:
            self._bind = self._pub_bind = None
        if keys is not None and keys.name != node_id:
            raise ValueError(f"key ring is for {keys.name!r}, not {node_id!r}: identity is the key")
        self.node_id = node_id
        self.keys = keys
        self.secure = keys is not None
        self.rejections = rejections if rejections is not None else Rejections()
        self._auth: KeyRingAuthenticator | None = None
        self._key_task: asyncio.Task[None] | None = None
        self._routing_id = routing_id
        self._max_frame_bytes = max_frame_bytes
        self._send_hwm = send_hwm
        self._max_handler_tasks = max_handler_tasks
        # Our own context is created on first use, so a transport that never opens a socket
        # holds no I/O thread.
        self._ctx: zmq.Context | None = context
        self._own_context = context is None

        self.counters: collections.Counter[str] = collections.Counter()
        self._handler: Handler | None = None
        self._broadcast_handler: BroadcastHandler | None = None

        self._router: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._dealers: dict[str, zmq.Socket] = {}
        # Secured: address -> certificate name of the node there, once learnt (see above).
        self._names: dict[str, str] = {}
        # Secured: address -> {candidate certificate name: DEALER} while the name is unknown.
        self._probes: dict[str, dict[str, zmq.Socket]] = {}
        # Secured ROUTER: certificate name -> routing id of the connection it last spoke over.
        self._routes: dict[str, bytes] = {}
        self._subs: dict[str, zmq.Socket] = {}  # one SUB per publisher address
        self._subscriptions: set[str] = set()  # wanted, connected or waiting for a name
        self._readers: dict[zmq.Socket, _Reader] = {}
        self._paused: set[_Reader] = set()  # readers waiting for a free handler slot
        self._handler_tasks: set[asyncio.Future[Any]] = set()
        # Requests in flight by (peer address, request id): a reply counts only from the peer asked.
        self._pending: dict[tuple[str, bytes], asyncio.Future[dict[str, Any]]] = {}
        self._rids = itertools.count(1)
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def bound_address(self) -> str:
        """The mesh (ROUTER) address, ``""`` for a client-only transport."""
        return self._bind or ""

    @property
    def pub_address(self) -> str:
        """The broadcast (PUB) address, PORT+1 of the mesh address; ``""`` if client-only."""
        return self._pub_bind or ""

    async def start(self) -> None:
        """Bind ROUTER and PUB (if ``bind``) and start the receive loops."""
        if self._closed:
            raise RuntimeError("MeshTransport is closed")
        if self._started:
            return
        try:
            if self._bind is not None:
                assert self._pub_bind is not None
                if self.keys is not None:
                    # ZAP must answer before the first client knocks: start it before binding.
                    self._auth = KeyRingAuthenticator(self._context(), self.keys, self.rejections)
                    self._auth.start()
                router = self._server_socket(zmq.ROUTER, "mesh")
                self._router = router
                router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                router.setsockopt(zmq.ROUTER_HANDOVER, 1)
                router.setsockopt(zmq.SNDHWM, self._send_hwm)
                router.setsockopt(zmq.RCVHWM, self._send_hwm)
                router.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes + 1024)
                await self._bind_with_retry(router, self._bind)
                pub = self._server_socket(zmq.PUB, "pub")
                self._pub = pub
                pub.setsockopt(zmq.SNDHWM, self._send_hwm)
                await self._bind_with_retry(pub, self._pub_bind)
        except BaseException:
            await self.close()
            raise
        self._started = True
        if self._router is not None:
            on_router = self._on_router_frames_secure if self.secure else self._on_router_frames
            self._spawn_reader(self._router, on_router, copy=not self.secure)
        for address, dealer in self._dealers.items():
            self._spawn_dealer_reader(address, self._names.get(address), dealer)
        for address, probes in self._probes.items():
            for name, probe in probes.items():
                self._spawn_dealer_reader(address, name, probe)
        for address, sub in self._subs.items():
            self._spawn_sub_reader(address, sub)
        if self.keys is not None:
            self._key_task = asyncio.get_running_loop().create_task(
                self._key_loop(), name=f"mesh.transport[{self.node_id}].keys"
            )

    async def _bind_with_retry(self, sock: zmq.Socket, address: str) -> None:
        # A socket closed a moment ago (node restart in the same process) may still hold the
        # port until the ZeroMQ I/O thread gets to it: retry briefly before giving up.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _BIND_RETRY_SECONDS
        while True:
            try:
                sock.bind(address)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or loop.time() >= deadline:
                    raise OSError(exc.errno, f"cannot bind {address}: {exc.strerror}") from exc
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop every loop and close every socket (LINGER=0); safe to call more than once.

        Outstanding ``request()`` calls fail with ConnectionError.
        """
        if self._closed:
            return
        self._closed = True
        # Readers first: no callback may run on an FD whose socket is closed below.
        for reader in self._readers.values():
            reader.stop()
        self._readers.clear()
        self._paused.clear()
        # close() may run inside a handler task: never cancel the caller, or the cancellation
        # would abort close() itself half-way.
        current = asyncio.current_task()
        tasks = [t for t in self._handler_tasks if t is not current]
        if self._key_task is not None and self._key_task is not current:
            tasks.append(self._key_task)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._handler_tasks.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("transport closed"))
        self._pending.clear()
        probes = [sock for group in self._probes.values() for sock in group.values()]
        sockets = [self._router, self._pub, *self._subs.values(), *self._dealers.values(), *probes]
        self._router = self._pub = None
        self._dealers.clear()
        self._probes.clear()
        self._subs.clear()
        self._subscriptions.clear()
        for sock in sockets:
            if sock is not None:
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context and self._ctx is not None:
            # term() waits for the I/O thread to release the listening ports.
            self._ctx.term()

    def _context(self) -> zmq.Context:
        if self._ctx is None:
            # Plain sockets, not zmq.asyncio: the event loop watches their FDs (see _Reader).
            self._ctx = zmq.Context()
        return self._ctx

    def _socket(self, socket_type: int) -> zmq.Socket:
        sock = self._context().socket(socket_type)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _server_socket(self, socket_type: int, domain: str) -> zmq.Socket:
        sock = self._socket(socket_type)
        if self.keys is not None:
            sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
        return sock

    def _client_socket(self, socket_type: int, server: str | None) -> zmq.Socket:
        """A socket that dials; secured, it completes a handshake only with ``server``'s key."""
        sock = self._socket(socket_type)
        if self.keys is not None:
            cert = self.keys.get(server) if server is not None else None
            if cert is None:
                sock.close(linger=0)
                raise KeyError(f"no trusted certificate named {server!r}")
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
            sock.setsockopt(zmq.CURVE_SERVERKEY, cert.public)
        return sock

    # ------------------------------------------------------------------ keys

    def name_at(self, address: str) -> str | None:
        """The certificate name of the node at ``address``, once a handshake proved it (secured)."""
        return self._names.get(address)

    def reload_keys(self) -> tuple[set[str], set[str]]:
        """Re-read the key directory now (SIGHUP); returns (added, removed) certificate names.

        A removed certificate is cut off at once: its routes are forgotten (so nothing more is
        sent to it), our DEALER and SUB to it are closed, and its messages are dropped from
        then on by the per-message check. Addresses still being probed get a probe for each
        added ``node`` certificate.
        """
        if self.keys is None or self._closed:
            return set(), set()
        added, removed = self.keys.reload()
        for name in removed:
            self._routes.pop(name, None)
        for address, name in list(self._names.items()):
            if name in removed:
                self._forget_name(address)
        for address, probes in self._probes.items():
            for name in removed & probes.keys():
                self._close_socket(probes.pop(name))
            for name in sorted(added):
                cert = self.keys.get(name)
                if cert and cert.role == "node" and name != self.node_id and name not in probes:
                    probes[name] = self._new_dealer(address, name)
        return added, removed

    async def _key_loop(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            try:
                self.reload_keys()
                self._settle_ready_probes()
            except Exception:  # a bad key file must not stop the reloads
                log.exception("reloading the key ring failed")

    def _settle_ready_probes(self) -> None:
        # With IMMEDIATE, a DEALER is writable only once a connection completed its handshake:
        # the probe that is writable dialled the right key. Lets a SUB waiting for the name of
        # a node we never sent to get connected.
        for address, probes in list(self._probes.items()):
            for name, sock in probes.items():
                events = sock.getsockopt(zmq.EVENTS)
                self._rearm(sock, events)
                if events & zmq.POLLOUT:
                    self._settle(address, name)
                    break

    def _settle(self, address: str, name: str) -> None:
        """The node at ``address`` holds ``name``: keep that probe, close the others."""
        probes = self._probes.pop(address, None)
        if probes is None or name not in probes:
            return
        dealer = probes.pop(name)
        for other in probes.values():
            self._close_socket(other)
        self._dealers[address] = dealer
        self._names[address] = name
        log.debug("%s: the node at %s holds key %s", self.node_id, address, name)
        if address in self._subscriptions and address not in self._subs:
            self._open_sub(address)

    def _forget_name(self, address: str) -> None:
        self._names.pop(address, None)
        dealer = self._dealers.pop(address, None)
        if dealer is not None:
            self._close_socket(dealer)
        sub = self._subs.pop(address, None)
        if sub is not None:
            self._close_socket(sub)

    def _close_socket(self, sock: zmq.Socket) -> None:
        reader = self._readers.pop(sock, None)
        if reader is not None:
            reader.stop()  # before close: the FD number may be reused at once
            self._paused.discard(reader)
        sock.close(linger=0)

    # ------------------------------------------------------------------ handlers

    def set_handler(self, fn: Handler | None) -> None:
        """Install the callback for every valid point-to-point message.

        A sync fn runs inline (in arrival order); an async fn runs as a task so slow handlers
        don't hold up other messages, with at most ``max_handler_tasks`` in flight (beyond
        that the receive loops wait, pushing back on senders through the HWM). A dict returned
        for a request that arrived on the ROUTER is sent back as its reply.
        """
        self._handler = fn

    def set_broadcast_handler(self, fn: BroadcastHandler | None) -> None:
        """Install the sync callback ``fn(topic, payload)`` for subscribed broadcasts."""
        self._broadcast_handler = fn

    # ------------------------------------------------------------------ point-to-point

    def connect(self, address: str) -> None:
        """Ensure a DEALER to the peer at ``address`` exists (idempotent).

        Secured, and the node's certificate not yet known: one probe per ``node`` certificate.
        """
        if address not in self._dealers and address not in self._probes:
            self._connect(address)

    def _connect(self, address: str) -> zmq.Socket | None:
        if self._closed:
            raise RuntimeError("MeshTransport is closed")
        split_address(address)
        if self.keys is None:
            dealer = self._new_dealer(address, None)
        else:
            name = self._names.get(address)
            if name is None or self.keys.get(name) is None:
                candidates = [n for n in self.keys.names("node") if n != self.node_id]
                self._probes[address] = {n: self._new_dealer(address, n) for n in candidates}
                if not candidates:
                    log.warning("no node certificate to dial %s with", address)
                return None
            dealer = self._new_dealer(address, name)
        self._dealers[address] = dealer
        return dealer

    def _new_dealer(self, address: str, server: str | None) -> zmq.Socket:
        dealer = self._client_socket(zmq.DEALER, server)
        # Secured: an unguessable routing id (see the module docstring); else our node id.
        routing_id = b"~" + os.urandom(16) if self.secure else self._routing_id
        dealer.setsockopt(zmq.ROUTING_ID, routing_id)
        dealer.setsockopt(zmq.SNDHWM, self._send_hwm)
        dealer.setsockopt(zmq.RCVHWM, self._send_hwm)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes + 1024)
        dealer.connect(address)
        if self._started:
            self._spawn_dealer_reader(address, server, dealer)
        return dealer

    def disconnect(self, address: str) -> None:
        """Close the DEALER to ``address``, if any; its requests in flight will time out."""
        dealer = self._dealers.pop(address, None)
        if dealer is not None:
            self._close_socket(dealer)
        for probe in self._probes.pop(address, {}).values():
            self._close_socket(probe)

    def send(self, address: str, kind: str, payload: dict[str, Any]) -> bool:
        """Fire-and-forget to the peer at ``address``; False (never a wait) if it can't queue."""
        if self._closed:
            return False
        return self._send_to(address, encode(kind, payload))

    def send_json(self, address: str, kind: str, body: bytes) -> bool:
        """``send`` with a payload already encoded as a JSON object (``codec.encode_json``)."""
        if self._closed:
            return False
        return self._send_to(address, encode_json(kind, body))

    def _send_to(self, address: str, frames: list[bytes], *, count_drop: bool = True) -> bool:
        dealer = self._dealers.get(address)
        if dealer is None and address not in self._probes:
            dealer = self._connect(address)
        if dealer is not None:
            return self._send_frames(dealer, frames, count_drop=count_drop)
        # Probing: only the probe that completed its handshake (the right key) takes it.
        for name, probe in list(self._probes.get(address, {}).items()):
            if self._send_frames(probe, frames, count_drop=False):
                self._settle(address, name)
                return True
        if count_drop:
            self.counters["send_dropped"] += 1
        return False

    def send_to_identity(
        self, identity: bytes, kind: str, payload: dict[str, Any], rid: bytes = b""
    ) -> bool:
        """Send over the ROUTER to a client that has connected to us, by its routing id.

        False if there is no ROUTER, the identity is unknown (ROUTER_MANDATORY) or its queue
        is full.
        """
        if self._router is None:
            return False
        routing = self._route(identity)
        if routing is None:
            return False
        return self._send_frames(self._router, [routing, *encode(kind, payload, rid)])

    def _route(self, identity: bytes) -> bytes | None:
        # Secured, identities are certificate names; the route is their latest connection.
        if not self.secure:
            return identity
        return self._routes.get(identity.decode("utf-8", "replace"))

    def reply(self, incoming: Incoming, payload: dict[str, Any]) -> bool:
        """Answer a request that arrived on our ROUTER (kind "reply", same rid)."""
        if not incoming.rid or not incoming.identity or self._router is None:
            return False
        routing = self._route(incoming.identity)
        if routing is None:
            return False
        frames = [routing, PROTOCOL, _REPLY_KIND_B, incoming.rid, encode_payload(payload)]
        return self._send_frames(self._router, frames)

    async def request(
        self,
        address: str,
        kind: str,
        payload: dict[str, Any],
        timeout: float,
        *,
        connect_timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send a request to ``address`` and return the reply payload.

        Raises TimeoutError if no reply arrives within ``timeout`` seconds, including the
        time spent waiting for the DEALER to connect; ConnectionError, with nothing sent, when
        the peer is not connected within ``connect_timeout`` (a peer that is down answers at
        once instead of after ``timeout``); FrameError("size") (a ValueError), with nothing
        sent, for a payload larger than ``max_frame_bytes``, which the peer would drop (and
        whose connection ZeroMQ would cut). Safe to run many concurrently.
        """
        if self._closed:
            raise ConnectionError("transport closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        rid = b"%x" % next(self._rids)
        frames = encode(kind, payload, rid)
        if len(frames[-1]) > self._max_frame_bytes:
            raise FrameError(
                "size", f"request {kind!r} of {len(frames[-1])} bytes exceeds the frame limit"
            )
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        key = (address, rid)
        self._pending[key] = fut
        send_by = (
            deadline if connect_timeout is None else min(deadline, loop.time() + connect_timeout)
        )
        try:
            delay = _REQUEST_RETRY_FIRST
            # disconnect()/reconnect while we wait: _send_to follows the current socket.
            while not self._send_to(address, frames, count_drop=False):
                if self._closed:
                    raise ConnectionError("transport closed")
                remaining = send_by - loop.time()
                if remaining <= 0 and send_by < deadline:
                    raise ConnectionError(f"request {kind!r} to {address}: peer not connected")
                if remaining <= 0:
                    raise TimeoutError(f"request {kind!r} to {address}: peer not reachable")
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, _REQUEST_RETRY_MAX)
            async with asyncio.timeout_at(deadline):
                return await fut
        except TimeoutError:
            self.counters["request_timeouts"] += 1
            raise
        finally:
            self._pending.pop(key, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # close() may have failed it while we were not awaiting it

    def _send_frames(
        self, sock: zmq.Socket, frames: list[bytes], *, count_drop: bool = True
    ) -> bool:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            sent = False
        except zmq.ZMQError as exc:
            # EHOSTUNREACH from ROUTER_MANDATORY (identity gone), ENOTSOCK after close...
            log.debug("send dropped: %s", exc)
            sent = False
        else:
            sent = True
        reader = self._readers.get(sock)
        if reader is not None and not reader.scheduled:
            # The send may have taken the FD's edge for a message that came in meanwhile.
            self._rearm(sock, sock.getsockopt(zmq.EVENTS))
        if sent:
            self.counters["sent"] += 1
        elif count_drop:
            self.counters["send_dropped"] += 1
        return sent

    def _rearm(self, sock: zmq.Socket, events: int) -> None:
        """After any operation on ``sock`` (which resets its edge-triggered FD): drain it soon
        if a message waits, since the FD may no longer say so."""
        if events & zmq.POLLIN:
            reader = self._readers.get(sock)
            if reader is not None:
                reader.schedule()

    # ------------------------------------------------------------------ broadcast

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Broadcast to every subscriber (PUB drops for slow subscribers rather than block)."""
        if self._pub is None:
            raise RuntimeError("publish needs a bound transport (bind=None has no PUB socket)")
        frames = [name_to_bytes(topic), *encode(PUB_KIND, payload)]
        if self._send_frames(self._pub, frames):
            self.counters["published"] += 1

    def subscribe(self, address: str) -> None:
        """Receive every broadcast of the node whose mesh address is ``address`` (idempotent)."""
        if self._closed:
            raise RuntimeError("MeshTransport is closed")
        if address in self._subscriptions:
            return
        pub_address_of(address)  # validates
        self._subscriptions.add(address)
        if self.keys is None or self._names.get(address) is not None:
            self._open_sub(address)
        elif address not in self._dealers and address not in self._probes:
            # The SUB needs the publisher's key: learn it by probing the node's ROUTER.
            self._connect(address)

    def _open_sub(self, address: str) -> None:
        sub = self._client_socket(zmq.SUB, self._names.get(address))
        sub.setsockopt(zmq.RCVHWM, self._send_hwm)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sub.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes + 1024)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub_address_of(address))
        self._subs[address] = sub
        if self._started:
            self._spawn_sub_reader(address, sub)

    def unsubscribe(self, address: str) -> None:
        """Stop receiving broadcasts from the node at ``address``."""
        self._subscriptions.discard(address)
        sub = self._subs.pop(address, None)
        if sub is not None:
            self._close_socket(sub)

    # ------------------------------------------------------------------ receiving

    def _spawn_reader(
        self, sock: zmq.Socket, on_frames: Callable[[list[Any]], None], copy: bool = True
    ) -> None:
        self._readers[sock] = _Reader(self, sock, on_frames, copy)

    def _spawn_dealer_reader(self, address: str, server: str | None, sock: zmq.Socket) -> None:
        self._spawn_reader(sock, functools.partial(self._on_dealer_frames, address, server))

    def _spawn_sub_reader(self, address: str, sock: zmq.Socket) -> None:
        self._spawn_reader(sock, functools.partial(self._on_sub_frames, address))

    def _handler_slots_full(self) -> bool:
        return len(self._handler_tasks) >= self._max_handler_tasks

    def _drop(self, err: FrameError) -> None:
        self.counters["dropped_frames." + err.reason] += 1
        log.debug("dropped malformed message: %s", err)

    def _on_router_frames(self, frames: list[bytes]) -> None:
        try:
            kind, rid, payload = decode(frames[1:], self._max_frame_bytes)
        except FrameError as err:
            self._drop(err)
            return
        self.counters["received"] += 1
        self._dispatch(Incoming(kind, payload, rid, frames[0]))

    def _on_router_frames_secure(self, frames: list[zmq.Frame]) -> None:
        routing = frames[0].bytes
        try:
            user = frames[-1].get("User-Id")
        except zmq.ZMQError:
            user = None
        assert self.keys is not None
        cert = self.keys.get(user) if user else None
        if cert is None:
            # ZAP admitted it, so the key was removed since: revoked, cut off from now on.
            self.rejections.reject("revoked" if user else "unauthenticated", user or "?")
            return
        try:
            kind, rid, payload = decode([f.bytes for f in frames[1:]], self._max_frame_bytes)
        except FrameError as err:
            self._drop(err)
            return
        self.counters["received"] += 1
        self._routes[user] = routing
        self._dispatch(Incoming(kind, payload, rid, user.encode(), "", user, cert.role))

    def _on_dealer_frames(self, address: str, server: str | None, frames: list[bytes]) -> None:
        sender = role = None
        if server is not None:
            assert self.keys is not None
            if address in self._probes:
                self._settle(address, server)  # a message came over it: its handshake worked
            cert = self.keys.get(server)
            if cert is None:
                self.rejections.reject("revoked", server)
                return
            sender, role = server, cert.role
        try:
            kind, rid, payload = decode(frames, self._max_frame_bytes)
        except FrameError as err:
            self._drop(err)
            return
        self.counters["received"] += 1
        if rid and kind == REPLY_KIND:
            fut = self._pending.pop((address, rid), None)
            if fut is None:
                self.counters["replies_unmatched"] += 1
            elif not fut.done():
                fut.set_result(payload)
            return
        self._dispatch(Incoming(kind, payload, rid, b"", address, sender, role))

    def _on_sub_frames(self, address: str, frames: list[bytes]) -> None:
        if self.keys is not None and self.keys.get(self._names.get(address, "")) is None:
            self.rejections.reject("revoked", self._names.get(address, address))
            return
        try:
            if not frames:
                raise FrameError("shape", "empty broadcast")
            topic = name_from_bytes(frames[0])
            _, _, payload = decode(frames[1:], self._max_frame_bytes)
        except FrameError as err:
            self._drop(err)
            return
        self.counters["received"] += 1
        fn = self._broadcast_handler
        if fn is None:
            return
        try:
            fn(topic, payload)
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("broadcast handler failed on topic %r", topic)

    def _dispatch(self, incoming: Incoming) -> None:
        fn = self._handler
        if fn is None:
            return
        try:
            result = fn(incoming)
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("handler failed on %r message", incoming.kind)
            return
        if result is None:
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._handler_tasks.add(task)
            task.add_done_callback(functools.partial(self._on_handler_done, incoming))
            return
        self._reply_with(incoming, result)

    def _on_handler_done(self, incoming: Incoming, task: asyncio.Future[Any]) -> None:
        self._handler_tasks.discard(task)
        if self._paused and not self._handler_slots_full():
            for reader in self._paused:
                reader.schedule()
            self._paused.clear()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.counters["handler_errors"] += 1
            log.error("handler failed on %r message", incoming.kind, exc_info=exc)
            return
        result = task.result()
        if result is not None and not self._closed:
            self._reply_with(incoming, result)

    def _reply_with(self, incoming: Incoming, result: Any) -> None:
        if not isinstance(result, dict):
            self.counters["handler_errors"] += 1
            log.error(
                "handler returned %s for %r; expected dict or None",
                type(result).__name__,
                incoming.kind,
            )
            return
        if incoming.rid and incoming.identity:
            self.reply(incoming, result)


class _Reader:
    """Drains one socket of a transport from the event loop, without zmq.asyncio.

    The loop watches the socket's ZeroMQ FD (``add_reader``). That FD is edge-triggered: it
    signals that the socket's state *changed*, and any operation on the socket (recv, send,
    ``EVENTS``) may consume that signal while messages are still queued. So a drain reads while
    ``EVENTS`` says ``POLLIN`` and only then sleeps on the FD, and the transport reschedules a
    drain (:meth:`schedule`) after each send on a socket that has a reader. zmq.asyncio does
    the same bookkeeping with a future and several ``EVENTS`` checks per message; this costs
    one ``EVENTS`` check per message and per send.
    """

    __slots__ = ("copy", "fd", "loop", "on_frames", "scheduled", "sock", "stopped", "transport")

    def __init__(
        self,
        transport: MeshTransport,
        sock: zmq.Socket,
        on_frames: Callable[[list[Any]], None],
        copy: bool,
    ) -> None:
        self.transport = transport
        self.sock = sock
        self.on_frames = on_frames
        # copy=False (secured ROUTER): zmq.Frame objects, which carry the User-Id property.
        self.copy = copy
        self.loop = asyncio.get_running_loop()
        self.fd: int = sock.getsockopt(zmq.FD)
        self.scheduled = False
        self.stopped = False
        self.loop.add_reader(self.fd, self.drain)
        # connect()/bind() may already have consumed the FD's signal for queued messages.
        self.schedule()

    def schedule(self) -> None:
        """Drain on the next turn of the loop (once, however often it is asked)."""
        if not self.scheduled and not self.stopped:
            self.scheduled = True
            self.loop.call_soon(self._scheduled_drain)

    def _scheduled_drain(self) -> None:
        self.scheduled = False
        self.drain()

    def stop(self) -> None:
        """Stop watching the FD; must run before the socket is closed."""
        if not self.stopped:
            self.stopped = True
            self.loop.remove_reader(self.fd)

    def drain(self) -> None:
        """Handle up to ``_BATCH`` queued messages; reschedule itself if more may wait."""
        transport = self.transport
        sock = self.sock
        for _ in range(_BATCH):
            if self.stopped:  # a handler closed this socket (disconnect, settle, close)
                return
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return  # drained: the FD signals the next arrival
                if transport._handler_slots_full():
                    # Resumed by _on_handler_done; meanwhile the HWM pushes back on senders.
                    transport._paused.add(self)
                    return
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=self.copy)
            except zmq.ZMQError as exc:
                if not self.stopped and not transport._closed:
                    log.warning("receive error on %s socket: %s", sock.type, exc)
                    self.loop.call_later(0.01, self.schedule)
                return
            try:
                self.on_frames(frames)
            except Exception:  # a dispatch bug must not take the node off the network
                transport.counters["handler_errors"] += 1
                log.exception("error while dispatching a received message")
        self.schedule()  # a flood on one socket must not starve the event loop
