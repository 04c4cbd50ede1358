"""What one HTTP client may cost a node: connections, time, bytes and JSON nesting.

- ``max_connections``: connections beyond it get ``503`` and are closed at once, so a flood of
  idle or slow clients cannot take every file descriptor or the event loop.
- ``header_timeout``: a connection must deliver a complete request head within this many seconds
  of opening (or of its previous response); a slowloris client is closed. aiohttp's keep-alive
  timer (``keepalive_timeout``) is started when a connection opens and is not reset by partial
  data, so it is that bound.
- ``body_timeout``: the whole body must arrive within this many seconds, else ``408``.
- ``max_body_bytes``: a larger body answers ``413`` (aiohttp's ``client_max_size``).
- ``max_json_depth``: a body nested deeper answers ``400`` at parse time (never a
  ``RecursionError``); ``NaN`` and ``Infinity`` are not JSON and answer ``400`` too (the Raft log
  could not store them).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import attrs
from aiohttp import web

from mesh.api.schema import BadRequest

__all__ = ["LIMITS_KEY", "ApiLimits", "body_limits", "limit_connections", "loads"]


@attrs.frozen
class ApiLimits:
    max_body_bytes: int = 1024 * 1024
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_json_depth: int = 64


LIMITS_KEY: web.AppKey[ApiLimits] = web.AppKey("limits", ApiLimits)

_BUSY = b'{"error": "too many connections to this node; retry later"}'
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"request body is not valid JSON: {name} is not a JSON number")


def loads(raw: bytes, max_depth: int) -> Any:
    """Parse a JSON body; ``BadRequest`` if it is not JSON, holds NaN/Infinity or nests deeper
    than ``max_depth`` arrays and objects."""
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, BadRequest):
            raise
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    # Cheap bound first: fewer brackets than the limit cannot nest deeper than it.
    if raw.count(b"[") + raw.count(b"{") > max_depth and _depth(value) > max_depth:
        raise _too_deep(max_depth)
    return value


def _too_deep(max_depth: int) -> BadRequest:
    return BadRequest(f"request body is nested too deeply (more than {max_depth} levels)")


def _depth(value: Any) -> int:
    """Nesting depth of arrays and objects, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in children)
    return deepest


def body_limits(limits: ApiLimits) -> Any:
    """Middleware: the body is read whole within ``body_timeout`` (else 408) and within
    ``max_body_bytes`` (else 413) before any handler (or the forwarding to the leader) runs."""

    @web.middleware
    async def read_body(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.can_read_body:
            try:
                async with asyncio.timeout(limits.body_timeout):
                    await request.read()  # cached: handlers read it again for free
            except TimeoutError:
                return web.json_response(
                    {"error": f"request body not received within {limits.body_timeout:g}s"},
                    status=408,
                )
            except web.HTTPRequestEntityTooLarge:
                return web.json_response(
                    {"error": f"request body too large (limit {limits.max_body_bytes} bytes)"},
                    status=413,
                )
        return await handler(request)

    return read_body


def limit_connections(server: Any, max_connections: int) -> None:
    """Answer 503 and close every connection of ``server`` (an aiohttp ``web.Server``, the
    runner's protocol factory) beyond ``max_connections`` open at once."""
    admit = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        if len(server.connections) >= max_connections:
            transport.write(_BUSY_RESPONSE)
            transport.close()
            return  # not registered: its connection_lost finds nothing to remove
        admit(handler, transport)

    server.connection_made = connection_made
