"""Bounded waits on a condition: what a test does instead of sleeping and then asserting.

``wait_until`` (threads, processes) and ``wait_until_async`` (inside the event loop) poll
``condition`` until it returns something truthy and return that value; at ``timeout`` they raise
``AssertionError`` with ``message`` (a string, or a callable that describes what was seen), so a
red test says what it waited for. They never sleep longer than needed: a condition that already
holds returns at once.

A test that must show that something did *not* happen first waits here for a positive sign that
the system had every chance to do it (a later commit applied, a later event delivered, a later
fire of another schedule), then asserts the absence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from mesh import supervise

T = TypeVar("T")

INTERVAL = 0.01  # seconds between two looks at the condition

Message = str | Callable[[], str]


def _describe(message: Message, timeout: float) -> str:
    text = message() if callable(message) else message
    return f"timed out after {timeout:g}s waiting for {text}"


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    message: Message = "the condition",
    *,
    interval: float = INTERVAL,
) -> T:
    """Poll ``condition`` until it is truthy; returns its value, AssertionError at ``timeout``.
    The harness's own poller (``mesh.supervise.wait_until``), failing as a test fails."""
    return supervise.wait_until(
        condition,
        timeout,
        message if isinstance(message, str) else "the condition",
        interval=interval,
        error=AssertionError,
        diagnostics=None if isinstance(message, str) else message,
    )


async def wait_until_async(
    condition: Callable[[], T],
    timeout: float,
    message: Message = "the condition",
    *,
    interval: float = INTERVAL,
) -> T:
    """``wait_until`` for the event loop: the loop runs while the condition is false."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(_describe(message, timeout))
        await asyncio.sleep(interval)


def one_leader_agreed(http_urls: list[str], voters: int) -> list[dict] | None:
    """The nodes' ``/api/health`` answers once every node names a leader, the same leader and
    term, and ``voters`` voters; None until then (a predicate for ``wait_until``)."""
    healths = [supervise.get_json(url + "/api/health") for url in http_urls]
    if not all(h and h["leader_id"] and len(h["voters"]) == voters for h in healths):
        return None
    return healths if len({(h["leader_id"], h["term"]) for h in healths}) == 1 else None
