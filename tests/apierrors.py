"""The API's error contract, checked one way: the expected status, a JSON body ``{"error"}``."""

from __future__ import annotations

from aiohttp import ClientResponse


async def error_of(resp: ClientResponse, status: int) -> str:
    """The ``error`` message of an answer that must have ``status`` and a JSON error body."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    return str(body["error"])
