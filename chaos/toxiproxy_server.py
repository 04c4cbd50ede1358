"""A toxiproxy-compatible server in Python, for machines without a ``toxiproxy-server`` binary.

The chaos suite injects network faults through toxiproxy's HTTP API. This module serves the same
API as Shopify/toxiproxy 2.x — endpoints, status codes, JSON bodies, error bodies
``{"error": "...", "status": N}`` — and implements its toxics with the same per-connection
semantics, so any toxiproxy client (toxiproxy-python, the Go client, curl) works unchanged.
docs/toxiproxy.md lists what is implemented and where it differs from the real server.

Layout: a ``ProxyCollection`` core (proxies, their toxic chains, their live connections) and a thin
aiohttp app over it. Each accepted client connection becomes a ``Connection`` with two ``Link``s:
``upstream`` (client → server) and ``downstream`` (server → client). A link's reader stamps every
chunk with its arrival time and queues it; the link's processor walks each chunk through the
link's ``Stage``s (one per toxic of that direction) and writes what comes out to the destination.
Toxiproxy runs one goroutine per toxic; one processor per link is equivalent here because every
delay is measured from the chunk's arrival time (so latency still pipelines) and it makes adding,
removing and updating toxics on live connections simple: a chain change is plain list surgery
between two awaits, and a stage that is sleeping is woken ("interrupted") as toxiproxy does.

Randomness (jitter, slicing, toxicity) comes from one injected ``random.Random``; ``--seed``
fixes it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import attrs
import msgspec
from aiohttp import web

from mesh import supervise

log = logging.getLogger("chaos.toxiproxy")

VERSION = "2.12.0+schedulezero"  # the toxiproxy API version we follow, marked as ours
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8474
DIRECTIONS = ("upstream", "downstream")  # toxiproxy lists upstream toxics first
READ_SIZE = 32 * 1024  # the buffer size of Go's io.Copy, so chunks look like toxiproxy's
LINK_BUFFER = 1024  # chunks a link reads ahead of its toxics (toxiproxy's latency buffer)
MAX_ATTRIBUTE = 2**63 - 1  # attributes are int64 in toxiproxy


# ---------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error the API answers as toxiproxy does: ``{"error": message, "status": status}``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


def bad_request_body(detail: str) -> ApiError:
    return ApiError(f"bad request body: {detail}", 400)


def missing_field(field: str) -> ApiError:
    return ApiError(f"missing required field: {field}", 400)


def proxy_not_found() -> ApiError:
    return ApiError("proxy not found", 404)


def toxic_not_found() -> ApiError:
    return ApiError("toxic not found", 404)


class PopulateError(Exception):
    """A populate stopped at ``error``; ``done`` are the proxies created or kept before it."""

    def __init__(self, error: ApiError, done: list[Proxy]) -> None:
        super().__init__(error.message)
        self.error = error
        self.done = done


# ---------------------------------------------------------------------------- addresses


def split_host_port(address: str, field: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → ``(host, port)``; ApiError 400 otherwise."""

    def bad(why: str) -> ApiError:
        return ApiError(f"{field} {address!r} is not a valid host:port: {why}", 400)

    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise bad("missing ']'")
        host, rest = address[1:end], address[end + 1 :]
        if not rest.startswith(":"):
            raise bad("missing port")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise bad("missing port")
        if ":" in host:
            raise bad("too many colons (write IPv6 addresses as [addr]:port)")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise bad(f"port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_listen(address: str) -> tuple[str, int]:
    """The IP and port a listen address binds, as Go's ``net.Listen`` picks them: an empty host
    means every interface, a name means its first address (IPv4 preferred)."""
    host, port = split_host_port(address or ":0", "listen")
    if host == "":
        return "0.0.0.0", port
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host)), port
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ApiError(f"listen {address!r}: cannot resolve {host!r}: {e}", 400) from e
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]), port


def _set_linger_zero(writer: asyncio.StreamWriter) -> None:
    """Make closing this socket send a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ---------------------------------------------------------------------------- toxics


@attrs.define
class Chunk:
    data: bytes
    timestamp: float  # loop time at which the link read it


Emit = Callable[["Chunk | None"], Awaitable[None]]
Handler = Callable[["Stage", "Chunk | None", Emit], Awaitable[None]]


@attrs.frozen
class ToxicKind:
    """One toxic type: its attributes (all integers, default 0, as in toxiproxy) and behaviour.

    ``handle(stage, item, emit)`` gets a chunk, or None for end of stream, and passes on what
    should continue down the chain by awaiting ``emit`` (``emit(None)`` closes the stream).
    """

    name: str
    attributes: tuple[str, ...]
    handle: Handler
    on_start: Callable[[Stage], None] | None = None  # when the toxic starts on a link
    closes_on_removal: bool = False  # removing it closes the connection (timeout)
    keeps_state: bool = False  # its per-link state survives updates (limit_data)
    minimums: dict[str, int] = attrs.field(factory=dict)
    # The shape of its "attributes" object: the attributes given, unknown names refused.
    attributes_type: type[msgspec.Struct] = attrs.field(
        init=False,
        default=attrs.Factory(lambda self: _attributes_type(self.attributes), takes_self=True),
    )


Attribute = Annotated[int, msgspec.Meta(ge=0, le=MAX_ATTRIBUTE)]  # int64 in toxiproxy


def _attributes_type(names: tuple[str, ...]) -> type[msgspec.Struct]:
    fields = [(name, Attribute | msgspec.UnsetType, msgspec.UNSET) for name in names]
    return msgspec.defstruct("Attributes", fields, kw_only=True, forbid_unknown_fields=True)


async def _noop(stage: Stage, item: Chunk | None, emit: Emit) -> None:
    await emit(item)


async def _latency(stage: Stage, item: Chunk | None, emit: Emit) -> None:
    if item is None:
        await emit(None)
        return
    delay_ms = stage.attr("latency")
    jitter = stage.attr("jitter")
    if jitter > 0:
        delay_ms += stage.rng.randrange(2 * jitter) - jitter
    sleep = delay_ms / 1000 - (stage.now() - item.timestamp)
    if not await stage.sleep(sleep):
        # Later toxics measure from here, so two latency toxics add up.
        item.timestamp += sleep
    await emit(item)


async def _bandwidth(stage: Stage, item: Chunk | None, emit: Emit) -> None:
    if item is None:
        await emit(None)
        return
    rate = stage.attr("rate")  # KB/s, i.e. bytes per millisecond
    if rate <= 0:
        # Toxiproxy never lets data through at rate 0; it is released when the toxic changes.
        await stage.sleep(None)
        await emit(item)
        return
    debt = stage.state.get("debt", 0.0) + len(item.data) / (rate * 1000)
    step = rate * 100  # what 100 ms of bandwidth carries
    data = item.data
    while len(data) > step:
        if await stage.sleep(0.1):
            stage.state.pop("debt", None)
            await emit(Chunk(data, item.timestamp))
            return
        await emit(Chunk(data[:step], item.timestamp))
        data = data[step:]
        debt -= 0.1
    started = stage.now()
    if await stage.sleep(debt):
        stage.state.pop("debt", None)
    else:
        debt -= stage.now() - started  # carry the timer's overshoot into the next chunk
        stage.state["debt"] = debt
    await emit(Chunk(data, item.timestamp))


async def _slow_close(stage: Stage, item: Chunk | None, emit: Emit) -> None:
    if item is None:
        await stage.sleep(stage.attr("delay") / 1000)
    await emit(item)


async def _timeout(stage: Stage, item: Chunk | None, emit: Emit) -> None:
    if item is None:
        await emit(None)
    # Data is dropped on the floor until the timer (if any) closes the connection.


def _timeout_start(stage: Stage) -> None:
    timeout_ms = stage.attr("timeout")
    if timeout_ms > 0:
        stage.start_timer(timeout_ms / 1000)


async def _reset_peer(stage: Stage, item: Chunk | None, emit: Emit) -> None:
    # Like toxiproxy: the first chunk (or end of stream) arms it, and once armed the reset
    # happens even if the toxic is removed meanwhile. The chunk itself is dropped.
    await asyncio.sleep(stage.attr("timeout") / 1000)
    stage.closed = True
    stage.link.connection.reset = True
    await emit(None)


def _slices(rng: random.Random, start: int, end: int, average: int, variation: int) -> list[int]:
    """Slice boundaries ``[s0, e0, s1, e1, ...]`` splitting ``start..end`` around ``average``
    bytes (toxiproxy's recursive halving, with each half kept non-empty)."""
    if (end - start) - average <= variation:
        return [start, end]
    mid = start + (end - start) // 2
    if variation > 0:
        mid += rng.randrange(2 * variation) - variation
    mid = min(max(mid, start + 1), end - 1)
    return _slices(rng, start, mid, average, variation) + _slices(rng, mid, end, average, variation)


async def _slicer(stage: Stage, item: Chunk | None, emit: Emit) -> None:
    if item is None:
        await emit(None)
        return
    data = item.data
    average, variation = stage.attr("average_size"), stage.attr("size_variation")
    bounds = _slices(stage.rng, 0, len(data), average, variation)
    delay = stage.attr("delay") / 1_000_000
    for i in range(0, len(bounds), 2):
        await emit(Chunk(data[bounds[i] : bounds[i + 1]], item.timestamp))
        if await stage.sleep(delay):
            rest = data[bounds[i + 1] :]
            if rest:
                await emit(Chunk(rest, item.timestamp))
            return


async def _limit_data(stage: Stage, item: Chunk | None, emit: Emit) -> None:
    if item is None:
        await emit(None)
        return
    limit = stage.attr("bytes")
    sent = stage.state.setdefault("sent", 0)
    remaining = max(0, limit - sent)
    data = item.data[:remaining]
    if data:
        stage.state["sent"] = sent + len(data)
        await emit(Chunk(data, item.timestamp))
    if limit - stage.state["sent"] <= 0:
        stage.closed = True
        await emit(None)


TOXIC_KINDS: dict[str, ToxicKind] = {
    kind.name: kind
    for kind in (
        ToxicKind("noop", (), _noop),
        ToxicKind("latency", ("latency", "jitter"), _latency),
        ToxicKind("bandwidth", ("rate",), _bandwidth),
        ToxicKind("slow_close", ("delay",), _slow_close),
        ToxicKind("timeout", ("timeout",), _timeout, _timeout_start, closes_on_removal=True),
        ToxicKind("reset_peer", ("timeout",), _reset_peer),
        # average_size 0 would make toxiproxy recurse forever; we refuse it instead.
        ToxicKind(
            "slicer",
            ("average_size", "size_variation", "delay"),
            _slicer,
            minimums={"average_size": 1},
        ),
        ToxicKind("limit_data", ("bytes",), _limit_data, keeps_state=True),
    )
}


@attrs.define(eq=False)
class Toxic:
    """A toxic as the API shows it; shared by every connection of its proxy."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, int]

    @property
    def direction(self) -> str:
        return self.stream.lower()

    @property
    def kind(self) -> ToxicKind:
        return TOXIC_KINDS[self.type]

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": dict(self.attributes),
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
        }


def merge_attributes(kind: ToxicKind, current: dict[str, int], given: Any) -> dict[str, int]:
    """``current`` updated with the ``attributes`` object of a request; ApiError 400 if bad."""
    known = ", ".join(kind.attributes) or "none"
    unknown_hint = f" for toxic type {kind.name} (known: {known})"
    attributes = decode_body(given, kind.attributes_type, "attributes", "attribute", unknown_hint)
    merged = {**current, **msgspec.to_builtins(attributes)}
    for key, minimum in kind.minimums.items():
        if merged[key] < minimum:
            raise bad_request_body(f"attribute {key!r} of a {kind.name} toxic must be >= {minimum}")
    return merged


# ---------------------------------------------------------------------------- connections


class Stage:
    """One toxic on one link: whether it applies to this connection, its state, its timer."""

    def __init__(self, link: Link, toxic: Toxic) -> None:
        self.link = link
        self.toxic = toxic
        self.kind = toxic.kind
        self.rng = link.rng
        self.state: dict[str, Any] = {}
        self.applies = self.rng.random() < toxic.toxicity  # rolled per connection
        self.removed = False
        self.closed = False  # it closed the stream; anything reaching it later is dropped
        self._interrupt = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._timer_fired = False

    def attr(self, name: str) -> int:
        return self.toxic.attributes[name]

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: until interrupted); True if the sleep was interrupted."""
        if seconds is not None and seconds <= 0:
            return False
        event = self._interrupt
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            return False
        return True

    def interrupt(self) -> None:
        """Wake a sleeping handler so it passes its chunk on now (toxiproxy's InterruptToxic)."""
        event, self._interrupt = self._interrupt, asyncio.Event()
        event.set()

    def start(self) -> None:
        if self.applies and self.kind.on_start is not None:
            self.kind.on_start(self)

    def start_timer(self, seconds: float) -> None:
        self._timer_fired = False
        self._timer = self.link.connection.spawn(self._fire_after(seconds))

    async def _fire_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._timer_fired = True
        await self.link.close_from(self)

    def _cancel_timer(self) -> None:
        # A timer that fired is closing the stream: let it finish.
        if self._timer is not None and not self._timer_fired:
            self._timer.cancel()
        self._timer = None

    def restart(self) -> None:
        """After an update: roll toxicity again, wake the handler, restart any timer."""
        self._cancel_timer()
        self.applies = self.rng.random() < self.toxic.toxicity
        if not self.kind.keeps_state:
            self.state.clear()
        self.interrupt()
        self.start()

    def stop(self) -> None:
        self.removed = True
        self._cancel_timer()
        self.interrupt()


class Link:
    """One direction of one connection: source → toxics of that direction → destination."""

    def __init__(
        self,
        connection: Connection,
        direction: str,
        source: asyncio.StreamReader,
        dest: asyncio.StreamWriter,
    ) -> None:
        self.connection = connection
        self.direction = direction
        self.source = source
        self.dest = dest
        self.rng = connection.proxy.rng
        self.stages: list[Stage] = []
        self.finished = False
        self.processor: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=LINK_BUFFER)
        # Held while a chunk walks the chain, so an end of stream never overtakes data.
        self._lock = asyncio.Lock()

    def start(self, toxics: list[Toxic]) -> None:
        self.processor = self.connection.spawn(self._process())
        self.connection.spawn(self._read())
        for toxic in toxics:
            self.add_stage(toxic)

    # chain changes, all synchronous so they happen between two awaits of the processor

    def _stage_of(self, toxic: Toxic) -> Stage | None:
        return next((stage for stage in self.stages if stage.toxic is toxic), None)

    def add_stage(self, toxic: Toxic) -> None:
        stage = Stage(self, toxic)
        self.stages.append(stage)
        stage.start()

    def update_stage(self, toxic: Toxic) -> None:
        stage = self._stage_of(toxic)
        if stage is not None:
            stage.restart()

    def remove_stage(self, toxic: Toxic) -> None:
        stage = self._stage_of(toxic)
        if stage is None:
            return
        index = self.stages.index(stage)
        rest = self.stages[index + 1 :]
        del self.stages[index]
        stage.stop()
        if stage.applies and stage.kind.closes_on_removal and not self.finished:
            stage.closed = True
            self.connection.spawn(self._close_through(rest))

    # the pipeline

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await self.source.read(READ_SIZE):
                await self._queue.put(Chunk(data, loop.time()))
        except OSError:
            pass  # a reset or a socket we closed ends the stream like an EOF
        await self._queue.put(None)

    async def _process(self) -> None:
        try:
            while not self.finished:
                item = await self._queue.get()
                async with self._lock:
                    if self.finished:
                        return
                    await self._walk(list(self.stages), 0, item)
                if item is None:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "proxy %s: %s link failed; closing the connection",
                self.connection.proxy.name,
                self.direction,
            )
            self.connection.abort()

    async def _walk(self, chain: list[Stage], index: int, item: Chunk | None) -> None:
        for i in range(index, len(chain)):
            stage = chain[i]
            if stage.closed:
                return
            if stage.removed or not stage.applies:
                continue

            async def emit(out: Chunk | None, after: int = i + 1) -> None:
                await self._walk(chain, after, out)

            await stage.kind.handle(stage, item, emit)
            return
        await self._deliver(item)

    async def _deliver(self, item: Chunk | None) -> None:
        if self.finished:
            return
        if item is None or self.dest.is_closing():
            self._finish()
            self.connection.close_writer(self.dest)
            return
        self.dest.write(item.data)
        try:
            await self.dest.drain()
        except OSError:
            self._finish()
            self.dest.transport.abort()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.processor is not None and self.processor is not asyncio.current_task():
            self.processor.cancel()  # it may be waiting for data that will never matter

    async def close_from(self, stage: Stage) -> None:
        """``stage`` closes the stream: what follows it in the chain sees the end of stream."""
        stage.closed = True
        async with self._lock:
            if self.finished or stage not in self.stages:
                return
            index = self.stages.index(stage)
            await self._walk(list(self.stages[index + 1 :]), 0, None)

    async def _close_through(self, rest: list[Stage]) -> None:
        async with self._lock:
            if not self.finished:
                await self._walk(rest, 0, None)


class Connection:
    """A client connection, its upstream connection and the two links between them."""

    def __init__(
        self, proxy: Proxy, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.links: dict[str, Link] = {}
        self.reset = False  # a reset_peer fired: close both sockets with a TCP RST
        self.closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._task: asyncio.Task[Any] | None = None

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            host, port = split_host_port(self.proxy.upstream, "upstream")
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError as e:
                # Normal while a node is down (killed, restarting): not worth a warning.
                log.info(
                    "proxy %s: cannot connect to upstream %s: %s",
                    self.proxy.name,
                    self.proxy.upstream,
                    e,
                )
                self.client_writer.close()
                return
            self.upstream_writer = up_writer
            if self.closed:
                return
            self.links = {
                "upstream": Link(self, "upstream", self.client_reader, up_writer),
                "downstream": Link(self, "downstream", up_reader, self.client_writer),
            }
            for direction, link in self.links.items():
                link.start(self.proxy.toxics.chain(direction))
            await asyncio.wait([link.processor for link in self.links.values() if link.processor])
        finally:
            self._cleanup()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "proxy %s: connection task failed", self.proxy.name, exc_info=task.exception()
            )
            self.abort()

    def _writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client_writer, self.upstream_writer) if w is not None]

    def close_writer(self, writer: asyncio.StreamWriter) -> None:
        if self.reset:
            for w in self._writers():
                _set_linger_zero(w)
            writer.transport.abort()
        else:
            writer.close()

    def abort(self) -> None:
        """Close both sockets now and stop every task (proxy disabled, deleted or failed)."""
        if self.closed:
            return
        self.closed = True
        for writer in self._writers():
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def _cleanup(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers():
            if not writer.transport.is_closing():
                writer.transport.abort()
        self.proxy.connections.discard(self)


# ---------------------------------------------------------------------------- proxies


class ToxicCollection:
    """A proxy's toxics, one chain per direction; changes reach live connections at once."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self._chains: dict[str, list[Toxic]] = {direction: [] for direction in DIRECTIONS}

    def chain(self, direction: str) -> list[Toxic]:
        return list(self._chains[direction])

    def all(self) -> list[Toxic]:
        return [toxic for direction in DIRECTIONS for toxic in self._chains[direction]]

    def find(self, name: str) -> Toxic | None:
        return next((toxic for toxic in self.all() if toxic.name == name), None)

    def get(self, name: str) -> Toxic:
        toxic = self.find(name)
        if toxic is None:
            raise toxic_not_found()
        return toxic

    def add(self, toxic: Toxic) -> None:
        if self.find(toxic.name) is not None:
            raise ApiError("toxic already exists", 409)
        self._chains[toxic.direction].append(toxic)
        for link in self.proxy.links(toxic.direction):
            link.add_stage(toxic)

    def update(self, toxic: Toxic, attributes: dict[str, int], toxicity: float) -> None:
        toxic.attributes = attributes
        toxic.toxicity = toxicity
        for link in self.proxy.links(toxic.direction):
            link.update_stage(toxic)

    def remove(self, name: str) -> None:
        toxic = self.get(name)
        self._chains[toxic.direction].remove(toxic)
        for link in self.proxy.links(toxic.direction):
            link.remove_stage(toxic)

    def reset(self) -> None:
        for toxic in self.all():
            self.remove(toxic.name)


@attrs.frozen
class ProxySpec:
    name: str
    listen: str
    upstream: str
    enabled: bool


class Proxy:
    """A named TCP listener forwarding to ``upstream`` through its toxics."""

    def __init__(self, name: str, listen: str, upstream: str, rng: random.Random) -> None:
        self.name = name
        self.listen = listen  # as given until started, then the address actually bound
        self.upstream = upstream
        self.enabled = False
        self.rng = rng
        self.toxics = ToxicCollection(self)
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._generation = 0  # which listener an accepted connection belongs to

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [toxic.to_json() for toxic in self.toxics.all()],
        }

    def links(self, direction: str) -> list[Link]:
        return [c.links[direction] for c in self.connections if direction in c.links]

    async def differs(self, listen: str, upstream: str) -> bool:
        ip, port = await resolve_listen(listen)
        return join_host_port(ip, port) != self.listen or upstream != self.upstream

    async def start(self) -> None:
        if self.enabled:
            return
        ip, port = await resolve_listen(self.listen)
        self._generation += 1
        generation = self._generation

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._accept(generation, reader, writer)

        try:
            server = await asyncio.start_server(accept, ip, port, reuse_address=True)
        except OSError as e:
            # Toxiproxy answers a failed listen with 500 and Go's error text.
            raise ApiError(f"listen tcp {join_host_port(ip, port)}: {e.strerror or e}", 500) from e
        self._server = server
        bound = server.sockets[0].getsockname()
        self.listen = join_host_port(bound[0], bound[1])
        self.enabled = True
        log.info("proxy %s: listening on %s, upstream %s", self.name, self.listen, self.upstream)

    async def stop(self) -> None:
        """Close the listener and every connection; the listen address is kept for restarts."""
        if not self.enabled:
            return
        self.enabled = False
        server, self._server = self._server, None
        self._generation += 1
        if server is not None:
            server.close()
        for connection in list(self.connections):
            connection.abort()
        if server is not None:
            await server.wait_closed()
        log.info("proxy %s: stopped", self.name)

    async def _accept(
        self, generation: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if generation != self._generation:  # accepted just before the listener closed
            writer.transport.abort()
            return
        connection = Connection(self, reader, writer)
        self.connections.add(connection)
        try:
            await connection.run()
        except asyncio.CancelledError:
            pass  # the proxy stopped; the connection is already closed
        finally:
            self.connections.discard(connection)


class ProxyCollection:
    """Every proxy of one server, by name: the state the HTTP API reads and changes."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random()
        self.proxies: dict[str, Proxy] = {}
        self._lock = asyncio.Lock()  # proxy starts and stops await; keep them from interleaving

    def get(self, name: str) -> Proxy:
        proxy = self.proxies.get(name)
        if proxy is None:
            raise proxy_not_found()
        return proxy

    async def create(self, spec: ProxySpec) -> Proxy:
        async with self._lock:
            if spec.name in self.proxies:
                raise ApiError("proxy already exists", 409)
            proxy = Proxy(spec.name, spec.listen, spec.upstream, self.rng)
            if spec.enabled:
                await proxy.start()
            self.proxies[spec.name] = proxy
            return proxy

    async def update(
        self, name: str, listen: str | None, upstream: str | None, enabled: bool | None
    ) -> Proxy:
        async with self._lock:
            proxy = self.get(name)
            listen = proxy.listen if listen is None else listen
            upstream = proxy.upstream if upstream is None else upstream
            enabled = proxy.enabled if enabled is None else enabled
            split_host_port(upstream, "upstream")
            if await proxy.differs(listen, upstream):
                await proxy.stop()  # a new address drops every connection, as toxiproxy does
                proxy.listen, proxy.upstream = listen, upstream
            if enabled and not proxy.enabled:
                await proxy.start()
            elif not enabled:
                await proxy.stop()
            return proxy

    async def remove(self, name: str) -> None:
        async with self._lock:
            proxy = self.get(name)
            await proxy.stop()
            del self.proxies[name]

    async def populate(self, specs: list[ProxySpec]) -> list[Proxy]:
        """Create each proxy, or replace the one of that name if its listen or upstream differ
        (an unchanged proxy is left alone, toxics and all)."""
        async with self._lock:
            done: list[Proxy] = []
            for spec in specs:
                try:
                    done.append(await self._add_or_replace(spec))
                except ApiError as e:
                    raise PopulateError(e, done) from e
            return done

    async def _add_or_replace(self, spec: ProxySpec) -> Proxy:
        existing = self.proxies.get(spec.name)
        if existing is not None:
            if not await existing.differs(spec.listen, spec.upstream):
                return existing
            await existing.stop()
        proxy = Proxy(spec.name, spec.listen, spec.upstream, self.rng)
        if spec.enabled:
            await proxy.start()
        self.proxies[spec.name] = proxy
        return proxy

    async def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        async with self._lock:
            for proxy in list(self.proxies.values()):
                await proxy.start()
                proxy.toxics.reset()

    async def close(self) -> None:
        async with self._lock:
            for proxy in list(self.proxies.values()):
                await proxy.stop()


# ---------------------------------------------------------------------------- request bodies


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise bad_request_body("EOF")  # what Go's decoder says about an empty body
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError as e:
        raise bad_request_body(f"invalid JSON: {e}") from e


# A null or absent field is Go's zero value: "not given".
class ProxyBody(msgspec.Struct):
    """A proxy in ``POST /proxies``, ``/populate`` and ``POST /proxies/{proxy}`` bodies."""

    name: str | None = None
    listen: str | None = None
    upstream: str | None = None
    enabled: bool | None = None


class ToxicUpdate(msgspec.Struct):
    """``POST /proxies/{proxy}/toxics/{toxic}``: what may change on a toxic."""

    toxicity: float | None = None
    attributes: Any = None  # checked against the toxic's type (merge_attributes)


class ToxicBody(ToxicUpdate):
    """``POST /proxies/{proxy}/toxics``."""

    name: str | None = None
    type: str | None = None
    stream: str | None = None


T = TypeVar("T")

_EXPECTED = re.compile(r"Expected `(\w+)[^`]*`(, got `)?.*?(?: - at `\$\.(\w+)`)?$")
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`")
_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean"}


def decode_body(
    value: Any, cls: type[T], what: str, item: str = "field", unknown_hint: str = ""
) -> T:
    """``value`` (a JSON object, or null for none) as ``cls``; ApiError 400 in our words if not.

    ``what`` names the object, ``item`` its fields: "field 'name' must be a string, got number".
    """
    try:
        return msgspec.convert({} if value is None else value, cls)
    except msgspec.ValidationError as e:
        raise bad_request_body(_explain(str(e), value, cls, what, item, unknown_hint)) from None


def _explain(message: str, value: Any, cls: type, what: str, item: str, hint: str) -> str:
    if unknown := _UNKNOWN.match(message):
        return f"unknown {item} {unknown.group(1)!r}{hint}"
    expected = _EXPECTED.match(message)
    if expected is None:  # not a shape this module's types produce; say it as msgspec does
        return f"{what}: {message}"
    word, wrong_type, key = expected.groups()
    if key is None:
        return f"{what} must be a JSON object, got {_json_type(value)}"
    if wrong_type:
        return f"{item} {key!r} must be {_WORDS.get(word, word)}, got {_json_type(value[key])}"
    low, high = _bounds(cls, key)
    return f"{item} {key!r} must be between {low} and {high}"


def _bounds(cls: type, key: str) -> tuple[Any, Any]:
    """The ``ge``/``le`` of a field's ``msgspec.Meta``."""
    field = next(f for f in msgspec.inspect.type_info(cls).fields if f.name == key)
    types = getattr(field.type, "types", (field.type,))
    constrained = next(t for t in types if getattr(t, "ge", None) is not None)
    return constrained.ge, constrained.le


def parse_proxy_spec(body: Any, what: str = "body", where: str = "") -> ProxySpec:
    given = decode_body(body, ProxyBody, what)
    if not given.name:
        raise missing_field(f"name{where}")
    if not given.upstream:
        raise missing_field(f"upstream{where}")
    spec = ProxySpec(
        name=given.name,
        listen=given.listen or "",
        upstream=given.upstream,
        enabled=True if given.enabled is None else given.enabled,
    )
    split_host_port(spec.listen or ":0", "listen")
    split_host_port(spec.upstream, "upstream")
    return spec


def parse_toxicity(given: ToxicUpdate, default: float) -> float:
    toxicity = default if given.toxicity is None else given.toxicity
    if not 0.0 <= toxicity <= 1.0:
        raise bad_request_body(f"toxicity must be between 0 and 1, got {toxicity}")
    return toxicity


def parse_new_toxic(body: Any, existing: ToxicCollection) -> Toxic:
    """Validate in toxiproxy's order: body, stream, type, duplicate name, attributes."""
    given = decode_body(body, ToxicBody, "body")
    stream = "downstream" if given.stream is None else given.stream  # "" is invalid, as in Go
    toxic_type = given.type or ""
    toxicity = parse_toxicity(given, 1.0)
    if stream.lower() not in DIRECTIONS:
        raise ApiError("stream was invalid, can be either upstream or downstream", 400)
    name = given.name or f"{toxic_type}_{stream}"
    kind = TOXIC_KINDS.get(toxic_type)
    if kind is None:
        raise ApiError("invalid toxic type", 400)
    if existing.find(name) is not None:
        raise ApiError("toxic already exists", 409)
    defaults = dict.fromkeys(kind.attributes, 0)
    attributes = merge_attributes(kind, defaults, given.attributes)
    return Toxic(name, toxic_type, stream, toxicity, attributes)


# ---------------------------------------------------------------------------- HTTP API

COLLECTION = web.AppKey("toxiproxy_collection", ProxyCollection)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _collection(request: web.Request) -> ProxyCollection:
    return request.app[COLLECTION]


async def proxy_index(request: web.Request) -> web.Response:
    proxies = _collection(request).proxies
    return _json({name: proxy.to_json() for name, proxy in proxies.items()})


async def proxy_create(request: web.Request) -> web.Response:
    spec = parse_proxy_spec(await read_json(request))
    proxy = await _collection(request).create(spec)
    return _json(proxy.to_json(), 201)


async def populate(request: web.Request) -> web.Response:
    body = await read_json(request)
    if body is None:
        body = []
    if not isinstance(body, list):
        raise bad_request_body(f"expected a JSON array of proxies, got {_json_type(body)}")
    try:
        specs = [
            parse_proxy_spec(item, f"proxy {i}", f" at proxy {i}")
            for i, item in enumerate(body, start=1)
        ]
    except ApiError as e:
        return _json({**e.to_json(), "proxies": []}, e.status)
    try:
        proxies = await _collection(request).populate(specs)
    except PopulateError as e:
        done = [proxy.to_json() for proxy in e.done]
        return _json({**e.error.to_json(), "proxies": done}, e.error.status)
    return _json({"proxies": [proxy.to_json() for proxy in proxies]}, 201)


async def proxy_show(request: web.Request) -> web.Response:
    return _json(_collection(request).get(request.match_info["proxy"]).to_json())


async def proxy_update(request: web.Request) -> web.Response:
    collection = _collection(request)
    name = request.match_info["proxy"]
    collection.get(name)  # 404 before looking at the body, as toxiproxy
    given = decode_body(await read_json(request), ProxyBody, "body")
    proxy = await collection.update(name, given.listen, given.upstream, given.enabled)
    return _json(proxy.to_json())


async def proxy_delete(request: web.Request) -> web.Response:
    await _collection(request).remove(request.match_info["proxy"])
    return web.Response(status=204)


async def toxic_index(request: web.Request) -> web.Response:
    proxy = _collection(request).get(request.match_info["proxy"])
    return _json([toxic.to_json() for toxic in proxy.toxics.all()])


async def toxic_create(request: web.Request) -> web.Response:
    proxy = _collection(request).get(request.match_info["proxy"])
    toxic = parse_new_toxic(await read_json(request), proxy.toxics)
    proxy.toxics.add(toxic)
    return _json(toxic.to_json())  # 200, not 201: toxiproxy's status for a new toxic


async def toxic_show(request: web.Request) -> web.Response:
    proxy = _collection(request).get(request.match_info["proxy"])
    return _json(proxy.toxics.get(request.match_info["toxic"]).to_json())


async def toxic_update(request: web.Request) -> web.Response:
    proxy = _collection(request).get(request.match_info["proxy"])
    toxic = proxy.toxics.get(request.match_info["toxic"])
    given = decode_body(await read_json(request), ToxicUpdate, "body")
    attributes = merge_attributes(toxic.kind, toxic.attributes, given.attributes)
    proxy.toxics.update(toxic, attributes, parse_toxicity(given, toxic.toxicity))
    return _json(toxic.to_json())


async def toxic_delete(request: web.Request) -> web.Response:
    proxy = _collection(request).get(request.match_info["proxy"])
    proxy.toxics.remove(request.match_info["toxic"])
    return web.Response(status=204)


async def reset(request: web.Request) -> web.Response:
    await _collection(request).reset()
    return web.Response(status=204)


async def version(request: web.Request) -> web.Response:
    return web.Response(
        text=json.dumps({"version": VERSION}) + "\n",
        content_type="application/json",
        charset="utf-8",
    )


@web.middleware
async def stop_browsers(request: web.Request, handler: Any) -> web.StreamResponse:
    # Toxiproxy refuses browsers so a web page cannot drive it (a cross-site request guard).
    if request.headers.get("User-Agent", "").startswith("Mozilla/"):
        return web.Response(status=403, text="User agent not allowed\n")
    return await handler(request)


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return _json(e.to_json(), e.status)
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 page not found\n")  # gorilla/mux's answer
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405)
    except web.HTTPRequestEntityTooLarge as e:
        return _json(bad_request_body(e.text or "request body too large").to_json(), 413)
    except web.HTTPException:
        raise
    except Exception as e:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return _json({"error": f"internal error: {e}", "status": 500}, 500)


def make_app(collection: ProxyCollection) -> web.Application:
    app = web.Application(middlewares=[stop_browsers, errors_as_json])
    app[COLLECTION] = collection
    r = app.router
    r.add_post("/reset", reset)
    r.add_get("/proxies", proxy_index)
    r.add_post("/proxies", proxy_create)
    r.add_post("/populate", populate)
    r.add_get("/proxies/{proxy}", proxy_show)
    r.add_post("/proxies/{proxy}", proxy_update)
    r.add_patch("/proxies/{proxy}", proxy_update)
    r.add_delete("/proxies/{proxy}", proxy_delete)
    r.add_get("/proxies/{proxy}/toxics", toxic_index)
    r.add_post("/proxies/{proxy}/toxics", toxic_create)
    r.add_get("/proxies/{proxy}/toxics/{toxic}", toxic_show)
    r.add_post("/proxies/{proxy}/toxics/{toxic}", toxic_update)
    r.add_patch("/proxies/{proxy}/toxics/{toxic}", toxic_update)
    r.add_delete("/proxies/{proxy}/toxics/{toxic}", toxic_delete)
    r.add_get("/version", version)
    return app


# ---------------------------------------------------------------------------- running it


def load_config(path: str | Path) -> list[ProxySpec]:
    """Proxies from a toxiproxy ``-config`` file (a JSON array, as for ``POST /populate``)."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from e
    if not isinstance(body, list):
        raise ValueError(f"config {path}: expected a JSON array of proxies")
    try:
        return [
            parse_proxy_spec(item, f"proxy {i}", f" at proxy {i}")
            for i, item in enumerate(body, start=1)
        ]
    except ApiError as e:
        raise ValueError(f"config {path}: {e.message}") from e


def bound_port(runner: web.AppRunner) -> int:
    """The port the API actually listens on (useful after asking for port 0)."""
    return int(runner.addresses[0][1])


async def start_server(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    seed: int | None = None,
    proxies: Sequence[ProxySpec] = (),
) -> tuple[web.AppRunner, Callable[[], Awaitable[None]]]:
    """Serve the API on ``host:port`` in the running loop; returns ``(runner, stop)``.

    ``bound_port(runner)`` tells the port when ``port`` is 0; ``runner.app[COLLECTION]`` is the
    core. ``await stop()`` closes every proxy and connection, then the API.
    """
    collection = ProxyCollection(random.Random(seed))
    runner = web.AppRunner(make_app(collection), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        if proxies:
            await collection.populate(list(proxies))
    except BaseException:
        await collection.close()
        await runner.cleanup()
        raise

    async def stop() -> None:
        await collection.close()
        await runner.cleanup()

    log.info("toxiproxy API listening on %s", join_host_port(host, bound_port(runner)))
    return runner, stop


@attrs.define
class ToxiproxyHandle:
    """A running toxiproxy API: ours in a thread, a ``toxiproxy-server`` process, or one that
    was already there (``kind`` says which). ``stop()`` ends what this handle started."""

    host: str
    port: int
    kind: str  # "python" | "binary" | "existing"
    _stop: Callable[[], None] = attrs.field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{join_host_port(self.host, self.port)}"

    def stop(self) -> None:
        self._stop()


def serve_in_thread(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, seed: int | None = None
) -> ToxiproxyHandle:
    """Run our server on its own event loop in a daemon thread (port 0 picks a free port)."""
    ready = threading.Event()
    outcome: dict[str, Any] = {}

    async def serve() -> None:
        try:
            runner, stop = await start_server(host, port, seed=seed)
        except BaseException as e:
            outcome["error"] = e
            ready.set()
            return
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        outcome["port"] = bound_port(runner)
        outcome["stop"] = lambda: loop.call_soon_threadsafe(stopping.set)
        ready.set()
        await stopping.wait()
        await stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="toxiproxy", daemon=True)
    thread.start()
    if not ready.wait(timeout=10):
        raise RuntimeError(f"toxiproxy server on {host}:{port} did not start within 10 s")
    if "error" in outcome:
        raise outcome["error"]

    def stop() -> None:
        outcome["stop"]()
        thread.join(timeout=10)

    return ToxiproxyHandle(host, outcome["port"], "python", stop)


def _answers_toxiproxy(host: str, port: int, timeout: float = 0.5) -> bool:
    url = f"http://{join_host_port(host, port)}/version"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return "version" in json.loads(response.read() or b"{}")
    except (OSError, ValueError, urllib.error.URLError):
        return False


def ensure_toxiproxy(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, startup_timeout: float = 10.0
) -> ToxiproxyHandle:
    """A toxiproxy API on ``host:port`` for the chaos suite.

    Reuses one that already answers there; else runs ``toxiproxy-server`` if it is on PATH; else
    starts this module's server in a background thread. Port 0 means a free port.
    """
    if port and _answers_toxiproxy(host, port):
        return ToxiproxyHandle(host, port, "existing", lambda: None)
    binary = shutil.which("toxiproxy-server")
    if binary is None:
        return serve_in_thread(host, port)
    port = port or supervise.free_port(host)
    # Started and stopped like every child of our harnesses: it dies with us, SIGTERM then SIGKILL.
    process = supervise.spawn([binary, "-host", host, "-port", str(port)])
    try:
        supervise.wait_until(
            lambda: process.poll() is not None or _answers_toxiproxy(host, port),
            startup_timeout,
            f"{binary} to answer on {host}:{port}",
            interval=0.05,
            error=RuntimeError,
        )
        if process.poll() is not None:
            raise RuntimeError(f"{binary} exited with code {process.returncode} on {host}:{port}")
    except RuntimeError:
        supervise.stop(process)
        raise

    def stop() -> None:
        supervise.stop(process)

    return ToxiproxyHandle(host, port, "binary", stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.toxiproxy_server",
        description="A toxiproxy-compatible server (HTTP API and toxics of toxiproxy 2.x).",
    )
    # toxiproxy-server spells its flags with one dash; accept both.
    parser.add_argument("--host", "-host", default=DEFAULT_HOST, help="API host (%(default)s)")
    parser.add_argument("--port", "-port", type=int, default=DEFAULT_PORT, help="API port")
    parser.add_argument("--config", "-config", help="JSON file of proxies to create at start")
    parser.add_argument("--seed", "-seed", type=int, help="seed for jitter, slicing, toxicity")
    parser.add_argument("--log-level", default="INFO", help="logging level (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        proxies = load_config(args.config) if args.config else []
    except ValueError as e:
        print(f"toxiproxy_server: {e}", file=sys.stderr)
        return 2

    async def serve() -> None:
        _, stop = await start_server(args.host, args.port, seed=args.seed, proxies=proxies)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        await stop()

    try:
        asyncio.run(serve())
    except OSError as e:
        print(f"toxiproxy_server: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    except PopulateError as e:
        print(f"toxiproxy_server: config {args.config}: {e.error.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
