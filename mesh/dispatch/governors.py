"""Governors: rate limits (token buckets) and concurrency limits on dispatch, and backpressure.

Limits apply on the leader, where every dispatch starts: a global limit, one per task, and one
per handler. A job waits for its tokens and slots; it never overtakes a limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from mesh.config import GovernorConfig


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked (default 1: evenly spaced).

    Over any window of T seconds at most ``burst + rate * T`` acquisitions succeed, so a small
    burst keeps "20/s" true for every second, not just on average.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else 1.0
        self.clock = clock
        self.tokens = self.burst
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self) -> None:
        async with self._lock:  # FIFO: waiters are served in order
            while True:
                self._refill()
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class Backpressure(Exception):
    """Too many jobs are queued: the caller should retry later (HTTP 429)."""


class Governors:
    """The limits of the ``governors`` config section, enforced."""

    def __init__(self, settings: GovernorConfig | None = None) -> None:
        self.settings = s = settings or GovernorConfig()
        self._global_rate = TokenBucket(s.rate, s.burst) if s.rate else None
        self._task_rates = {t: TokenBucket(r, s.burst) for t, r in s.task_rates.items()}
        self._handler_rates = {h: TokenBucket(r, s.burst) for h, r in s.handler_rates.items()}
        self._global_slots = asyncio.Semaphore(s.concurrency) if s.concurrency else None
        self._task_slots = {t: asyncio.Semaphore(n) for t, n in s.task_concurrency.items()}

    def check_queue(self, queued: int) -> None:
        if queued >= self.settings.max_queued_jobs:
            raise Backpressure(
                f"{queued} jobs are queued (limit {self.settings.max_queued_jobs}); retry later"
            )

    @contextlib.asynccontextmanager
    async def task_slot(self, task: str) -> AsyncIterator[None]:
        """Global and per-task concurrency, then global and per-task rate."""
        async with contextlib.AsyncExitStack() as stack:
            for sem in (self._global_slots, self._task_slots.get(task)):
                if sem is not None:
                    await stack.enter_async_context(sem)
            for bucket in (self._global_rate, self._task_rates.get(task)):
                if bucket is not None:
                    await bucket.acquire()
            yield

    async def handler_rate(self, handler_id: str) -> None:
        bucket = self._handler_rates.get(handler_id)
        if bucket is not None:
            await bucket.acquire()
