"""Governors hold their limits under load (bounded runs).

The rate test runs on an event loop with a virtual clock (the token bucket's clock is injected):
it checks the bucket's arithmetic, not the machine's speed. Whether the bucket keeps its rate
against the wall clock is measured by the benchmark.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

import pytest

from mesh.config import GovernorConfig
from mesh.dispatch.governors import Backpressure, Governors, TokenBucket

TURN_SECONDS = 1e-6  # virtual time one turn of the event loop takes


class _NoWaitSelector(selectors.BaseSelector):
    """Never sleeps: a select() that would wait for a timer moves the virtual clock instead.

    Every turn of the loop also costs one virtual microsecond, as on a real machine: a sleep
    shorter than the clock's float resolution (the bucket's remainder after rounding) would
    otherwise find the clock where it was and sleep again forever.
    """

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # no timer at all: wait for I/O like a real loop
            return self._real.select(None)
        ready = self._real.select(0)
        self.now += TURN_SECONDS if ready else max(timeout, TURN_SECONDS)
        return ready

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing else is ready."""

    def __init__(self) -> None:
        self._selector_clock = _NoWaitSelector()
        super().__init__(self._selector_clock)

    def time(self) -> float:
        return self._selector_clock.now


async def _grant_times(rate: float, workers: int, seconds: float) -> list[float]:
    """Seconds (since the start) at which ``workers`` competing tasks got a token."""
    loop = asyncio.get_running_loop()
    bucket = TokenBucket(rate, clock=loop.time)
    start = loop.time()
    granted: list[float] = []

    async def worker() -> None:
        while loop.time() - start < seconds:
            await bucket.acquire()
            granted.append(loop.time() - start)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return granted


def test_rate_limit_of_20_per_second_holds_within_10_percent_over_5_seconds() -> None:
    loop = VirtualClockLoop()
    try:
        granted = loop.run_until_complete(_grant_times(rate=20, workers=8, seconds=5.0))
    finally:
        loop.close()
    in_window = [t for t in granted if t < 5.0]
    assert 90 <= len(in_window) <= 110, len(in_window)
    # No single second exceeds the rate by more than the burst.
    for second in range(5):
        n = sum(1 for t in in_window if second <= t < second + 1)
        assert n <= 21, (second, n)


async def test_task_concurrency_limit_is_never_exceeded() -> None:
    gov = Governors(GovernorConfig(task_concurrency={"t": 3}))
    running = peak = 0

    async def job() -> None:
        nonlocal running, peak
        async with gov.task_slot("t"):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.wait_for(asyncio.gather(*(job() for _ in range(60))), 10)
    assert peak == 3


async def test_global_concurrency_limit_spans_tasks() -> None:
    gov = Governors(GovernorConfig(concurrency=2))
    running = peak = 0

    async def job(task: str) -> None:
        nonlocal running, peak
        async with gov.task_slot(task):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.wait_for(asyncio.gather(*(job(f"t{i % 4}") for i in range(40))), 10)
    assert peak == 2


def test_queue_limit_raises_backpressure() -> None:
    gov = Governors(GovernorConfig(max_queued_jobs=5))
    gov.check_queue(4)
    with pytest.raises(Backpressure, match="retry later"):
        gov.check_queue(5)


def test_token_bucket_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
