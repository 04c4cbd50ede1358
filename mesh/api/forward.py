"""Writes are the leader's: how a follower hands one to the leader, and how the leader answers.

A follower sends a write (``POST``/``PUT``/``DELETE``/``PATCH`` under ``/api/``) to the leader as
one ``api_forward`` request over the mesh (the DEALER it already holds to the leader, CURVE on a
secured mesh) and relays the answer. The leader runs the forwarded request through **its own
aiohttp application**, the same middlewares and handlers as a request from the network: the
caller's token is checked there, with the same roles, limits (body size, JSON depth), audit entry,
error answers and headers. Why not factor the write handlers out and call them directly: every
rule that makes a write a write (authentication, read-only zones, limits, the leader's 32-slot
gate, the audit, the error mapping) is an aiohttp middleware, and a second path through them
would drift from the first. Building a request costs tens of microseconds; the second HTTP hop it
replaces cost a client round trip, an HTTP parse and serialise on each side (docs/performance.md).

The request is built as aiohttp's own parser would build it from the caller's request line and
headers (``_forwarded_request``) and handed to ``Application._handle``, the entry point aiohttp's
server calls for every request. Both are aiohttp internals that have been stable across 3.x;
tests/test_forward_mesh.py exercises them on every run, so an aiohttp upgrade that changes them
fails there, not in production.

What the leader accepts (``parse_forward``): only from a ``node`` key whose name is the node the
message claims to come from (``contracts.refusal``; a handler or replica key is refused and
counted), a method of the write set, a request target under ``/api/`` of at most
``MAX_TARGET_CHARS`` printable ASCII characters, only the ``Authorization`` and ``Content-Type``
headers within aiohttp's own header bounds, a base64 body (the leader's ``max_body_bytes`` then
answers 413 as over HTTP) and a client address of at most 128 characters. Anything else is dropped
and counted (``malformed``). The handler is registered only once the application is frozen (its
middlewares built), so no request can reach a handler without them.

Rolling upgrades: a node lists the request kinds it answers in its pings (``accepts``); a follower
forwards over the mesh only to a leader that said it takes ``api_forward`` and otherwise over
HTTP as before (``X-ScheduleZero-Forwarded-By``), which every version serves; so does a write too
large for one mesh message (``max_frame_bytes``), which the transport refuses before sending
anything. A forward is sent once and never retried by another way: a request that timed out may
have been applied, so it answers 503 ("did not answer"), like an HTTP forward that timed out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import attrs
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from mesh.api.auth import CLIENT_HEADER, FORWARDED_BY_HEADER, FORWARDED_KEY
from mesh.api.limits import LIMITS_KEY
from mesh.contracts import (
    Incoming,
    LeaderLink,
    MessageBus,
    NodeView,
    Replica,
    refusal,
    term_identity,
)

log = logging.getLogger("mesh.api.forward")

__all__ = [
    "COMMIT_HEADER",
    "FORWARDED_HEADER",
    "FORWARD_KIND",
    "SERVED_BY_HEADER",
    "WRITE_METHODS",
    "forwarding_middleware",
    "parse_forward",
    "serve_forwarded_writes",
]

FORWARD_KIND = "api_forward"
FORWARDED_HEADER = FORWARDED_BY_HEADER
COMMIT_HEADER = "X-ScheduleZero-Commit-Index"
SERVED_BY_HEADER = "X-ScheduleZero-Served-By"  # "<leader id>@<term>" that committed the write
WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
NO_LEADER_WAIT = 3.0  # how long a write waits for an election before answering 503
FORWARD_TIMEOUT = 10.0
# A leader whose mesh connection is down (its process died) answers 503 at once, as an HTTP
# connection refused did, instead of after FORWARD_TIMEOUT: nothing was sent then.
FORWARD_CONNECT_TIMEOUT = 1.0
APPLIED_WAIT = 1.0  # read your writes: how long a follower waits to apply the leader's commit
MAX_WRITES_IN_FLIGHT = 32

# The bounds of aiohttp's own HTTP parser (request line, one header field): a follower never
# receives more, so it never has to send more.
MAX_TARGET_CHARS = 8190
MAX_HEADER_CHARS = 8190
MAX_CLIENT_CHARS = 128
FORWARDED_HEADERS = ("Authorization", "Content-Type")  # what the leader's middlewares read
# The leader's headers a follower relays with its answer (as the HTTP forward always did).
RELAYED_HEADERS = (SERVED_BY_HEADER, "WWW-Authenticate")
_ANSWER_HEADERS = (*RELAYED_HEADERS, COMMIT_HEADER)
_PAYLOAD_KEYS = frozenset({"node", "method", "target", "headers", "body", "client"})
_NODE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_PRINTABLE = re.compile(r"[\x21-\x7e]*")  # a request target: no spaces, controls or non-ASCII
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")  # a header value: no CR, LF, NUL or non-ASCII


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# --------------------------------------------------------------------------- the follower


def forwarding_middleware(
    replica: Replica,
    view: NodeView,
    client_ssl: ssl.SSLContext | None = None,
    link: LeaderLink | None = None,
) -> tuple[Any, Callable[[web.Application], Awaitable[None]]]:
    """Writes are the leader's: a follower forwards them and answers with the leader's reply.

    Without a leader the write waits up to NO_LEADER_WAIT for an election, then gets 503 — it
    never hangs. After a forwarded write succeeds, the follower waits (briefly) until it has
    applied that commit index itself, so the client can read its own write from this node.

    ``link`` (the node) carries the write over the mesh to a leader that takes it (module
    docstring); otherwise it goes over HTTP, with the caller's ``Authorization``, and
    ``client_ssl`` (the nodes serve HTTPS) makes that HTTPS. Either way the leader checks (and
    audits) the caller's own token and role. Returns the middleware and its cleanup.
    """
    scheme = "https" if client_ssl is not None else "http"
    session: dict[str, aiohttp.ClientSession] = {}
    write_slots = asyncio.Semaphore(MAX_WRITES_IN_FLIGHT)

    async def over_http(request: web.Request, target: str) -> web.Response:
        body = await request.read()
        if "s" not in session or session["s"].closed:
            session["s"] = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT),
                connector=aiohttp.TCPConnector(ssl=client_ssl if client_ssl else True),
            )
        headers = {
            "Content-Type": request.headers.get("Content-Type", "application/json"),
            FORWARDED_HEADER: replica.node_id,
            CLIENT_HEADER: request.remote or "",
        }
        if authorization := request.headers.get("Authorization"):
            headers["Authorization"] = authorization
        try:
            async with session["s"].request(
                request.method,
                f"{scheme}://{target}{request.rel_url}",
                data=body,
                headers=headers,
            ) as resp:
                payload = await resp.read()
                out = web.Response(
                    body=payload,
                    status=resp.status,
                    content_type=resp.content_type if payload else None,
                )
                for name in (*RELAYED_HEADERS, COMMIT_HEADER):
                    if value := resp.headers.get(name):
                        out.headers[name] = value
        except (aiohttp.ClientError, TimeoutError) as e:
            return _json_error(503, f"leader at {target} did not answer: {type(e).__name__}")
        request[FORWARDED_KEY] = target  # the leader answered, and audited it
        return out

    async def over_mesh(request: web.Request, address: str) -> web.Response:
        assert link is not None
        payload = forward_payload(request, replica.node_id, await request.read())
        try:
            # What the leader would drop unanswered (a header HTTP allows and the mesh message
            # does not, say) goes over HTTP: the caller must get the leader's answer, not 503.
            parse_forward(payload)
            answer = await link.request(
                address,
                FORWARD_KIND,
                payload,
                timeout=FORWARD_TIMEOUT,
                connect_timeout=FORWARD_CONNECT_TIMEOUT,
            )
        except ValueError:  # not sent: not for the mesh, or larger than one message may be
            return await over_http(request, str(view.leader_http()))
        except (TimeoutError, ConnectionError) as e:
            return _json_error(503, f"leader at {address} did not answer: {type(e).__name__}")
        try:
            out = parse_answer(answer)
        except ValueError as e:
            log.warning("malformed answer to a forwarded write from %s: %s", address, e)
            return _json_error(
                503, f"leader at {address} gave a malformed answer; the write may have been applied"
            )
        request[FORWARDED_KEY] = address  # the leader answered, and audited it
        return out

    @web.middleware
    async def forward(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method not in WRITE_METHODS or not request.path.startswith("/api/"):
            return await handler(request)
        if request.headers.get(FORWARDED_HEADER) and not replica.is_leader:
            return _json_error(503, "no leader available: leadership moved during forwarding")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NO_LEADER_WAIT
        while not replica.is_leader and view.leader_http() is None:
            if loop.time() >= deadline:
                return _json_error(503, "no leader available (election in progress or no quorum)")
            await asyncio.sleep(0.05)
        if replica.is_leader:
            term = replica.term
            # A bounded number of writes in flight: a burst of hundreds must queue here rather
            # than flood the event loop that also carries the heartbeats.
            async with write_slots:
                response = await handler(request)
            response.headers[COMMIT_HEADER] = str(replica.commit_index)
            response.headers[SERVED_BY_HEADER] = term_identity(replica.node_id, term)
            return response
        address = link.leader_accepting(FORWARD_KIND) if link is not None else None
        if address is not None:
            out = await over_mesh(request, address)
        else:
            out = await over_http(request, str(view.leader_http()))
        commit = out.headers.pop(COMMIT_HEADER, None)
        if commit is not None and commit.isdigit() and out.status < 300:
            await replica.wait_applied(int(commit), timeout=APPLIED_WAIT)
        return out

    async def close(_app: web.Application) -> None:
        if "s" in session:
            await session["s"].close()

    return forward, close


def forward_payload(request: web.Request, node_id: str, body: bytes) -> dict[str, Any]:
    """The ``api_forward`` request for a write this node received with ``body``."""
    headers = {name: v for name in FORWARDED_HEADERS if (v := request.headers.get(name))}
    return {
        "node": node_id,
        "method": request.method,
        "target": request.raw_path,
        "headers": headers,
        "body": base64.b64encode(body).decode("ascii"),
        "client": (request.remote or "")[:MAX_CLIENT_CHARS],
    }


def parse_answer(answer: Any) -> web.Response:
    """The leader's answer as the response to relay; ValueError when it is not one."""
    if not isinstance(answer, dict):
        raise ValueError("not an object")
    status, body, ctype, headers = (answer.get(k) for k in ("status", "body", "type", "headers"))
    if type(status) is not int or not 200 <= status <= 599:
        raise ValueError(f"status {status!r}")
    if not isinstance(body, str) or not (ctype is None or isinstance(ctype, str)):
        raise ValueError("body or type")
    if not isinstance(headers, dict) or not all(
        k in _ANSWER_HEADERS and isinstance(v, str) and _FIELD_VALUE.fullmatch(v)
        for k, v in headers.items()
    ):
        raise ValueError("headers")
    try:
        raw = base64.b64decode(body, validate=True)
    except binascii.Error as e:
        raise ValueError(f"body: {e}") from None
    out = web.Response(body=raw, status=status, content_type=ctype if raw else None)
    out.headers.update(headers)
    return out


# --------------------------------------------------------------------------- the leader


@attrs.frozen
class ForwardedWrite:
    """A valid ``api_forward`` request: what the follower's caller sent it."""

    node: str
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    client: str


def parse_forward(payload: dict[str, Any]) -> ForwardedWrite:
    """The write a follower forwarded, or ValueError saying what is wrong with the message."""
    if set(payload) != _PAYLOAD_KEYS:
        raise ValueError(f"fields {sorted(payload)[:8]!r}, expected {sorted(_PAYLOAD_KEYS)!r}")
    node, method, target = payload["node"], payload["method"], payload["target"]
    headers, body, client = payload["headers"], payload["body"], payload["client"]
    if not isinstance(node, str) or not _NODE_ID.fullmatch(node):
        raise ValueError("node: not a node id")
    if method not in WRITE_METHODS:
        raise ValueError(f"method {str(method)[:16]!r} is not a write")
    if (
        not isinstance(target, str)
        or len(target) > MAX_TARGET_CHARS
        or not target.startswith("/")
        or not _PRINTABLE.fullmatch(target)
        # The path as the follower's (and the leader's) middlewares see it: decoded.
        or not _url(target).path.startswith("/api/")
    ):
        raise ValueError("target: not a request target under /api/")
    if not isinstance(headers, dict) or not all(
        k in FORWARDED_HEADERS
        and isinstance(v, str)
        and len(v) <= MAX_HEADER_CHARS
        and _FIELD_VALUE.fullmatch(v)
        for k, v in headers.items()
    ):
        raise ValueError(f"headers: only {', '.join(FORWARDED_HEADERS)}, bounded")
    if not isinstance(client, str) or len(client) > MAX_CLIENT_CHARS:
        raise ValueError("client: not an address")
    if not _FIELD_VALUE.fullmatch(client):
        raise ValueError("client: not printable")
    if not isinstance(body, str):
        raise ValueError("body: not base64")
    try:
        raw = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError("body: not base64") from None
    return ForwardedWrite(node, method, target, headers, raw, client)


def _url(target: str) -> URL:
    """The URL aiohttp's HTTP parser makes of an origin-form request target."""
    path, _, fragment = target.partition("#")
    path, _, query = path.partition("?")
    return URL.build(path=path, query_string=query, fragment=fragment, encoded=True)


class _MeshPeer(BaseProtocol):
    """The connection a forwarded request "arrived" on: the mesh, no socket of aiohttp's."""

    ssl_context = None
    peername = None
    sockname = None
    max_field_size = MAX_HEADER_CHARS
    max_headers = 128


def _forwarded_request(app: web.Application, write: ForwardedWrite) -> web.Request:
    """The request aiohttp's server would build had the follower sent ``write`` over HTTP."""
    loop = asyncio.get_running_loop()
    headers = CIMultiDict(write.headers)
    headers[FORWARDED_HEADER] = write.node
    headers[CLIENT_HEADER] = write.client
    raw_headers = tuple((k.encode(), v.encode()) for k, v in headers.items())
    message = RawRequestMessage(
        write.method,
        write.target,
        HttpVersion11,
        CIMultiDictProxy(headers),
        raw_headers,
        False,  # should_close
        None,  # compression
        False,  # upgrade
        False,  # chunked
        _url(write.target),
    )
    protocol = _MeshPeer(loop)
    payload: StreamReader = EMPTY_PAYLOAD
    if write.body:
        payload = StreamReader(protocol, 2**16, loop=loop)
        payload.feed_data(write.body)
        payload.feed_eof()
    return web.Request(
        message,
        payload,
        protocol,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # no writer: the answer goes back as a mesh message
        asyncio.current_task(),  # type: ignore[arg-type]
        loop,
        client_max_size=app[LIMITS_KEY].max_body_bytes,
        remote=f"mesh:{write.node}",  # the audit's "peer": the node key it came over
        host="mesh",
    )


async def _answer(app: web.Application, write: ForwardedWrite) -> dict[str, Any]:
    """Run ``write`` through the application and return its answer as a mesh reply."""
    request = _forwarded_request(app, write)
    try:
        response = await app._handle(request)
    except web.HTTPException as e:  # aiohttp's server turns these into the answer, so do we
        response = e
    except Exception:
        log.exception("unhandled error serving forwarded %s %s", write.method, write.target)
        response = _json_error(500, "internal error (see the node's log)")
    body = response.body if isinstance(response, web.Response) else None
    raw = bytes(body) if isinstance(body, bytes | bytearray) else b""
    return {
        "status": response.status,
        "body": base64.b64encode(raw).decode("ascii"),
        "type": response.content_type if raw else None,
        "headers": {k: v for k in _ANSWER_HEADERS if (v := response.headers.get(k)) is not None},
    }


def serve_forwarded_writes(app: web.Application, bus: MessageBus) -> None:
    """Answer ``api_forward`` requests on ``bus`` with ``app``, once ``app`` has started.

    Registered at start-up, when aiohttp has frozen the application and built its middleware
    chain: a request run before that would reach its handler without authentication.
    """

    def on_forward(msg: Incoming) -> Awaitable[dict[str, Any]] | None:
        reason = refusal(msg, msg.payload.get("node"), "node")
        if reason is not None:
            bus.reject(msg, reason, f"{FORWARD_KIND} from a {msg.sender_role} key")
            return None
        try:
            write = parse_forward(msg.payload)
        except ValueError as e:
            bus.reject(msg, "malformed", f"{FORWARD_KIND}: {e}")
            return None
        return _answer(app, write)

    async def start(_app: web.Application) -> None:
        bus.handle(FORWARD_KIND, on_forward)

    app.on_startup.append(start)
