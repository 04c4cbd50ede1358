"""Governors hold their limits under load (real asyncio time, bounded runs)."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh.config import GovernorConfig
from mesh.dispatch.governors import Backpressure, Governors, TokenBucket


async def test_rate_limit_of_20_per_second_holds_within_10_percent_over_5_seconds() -> None:
    bucket = TokenBucket(20)
    granted: list[float] = []
    start = time.monotonic()

    async def worker() -> None:
        while time.monotonic() - start < 5.0:
            await bucket.acquire()
            granted.append(time.monotonic() - start)

    workers = [asyncio.create_task(worker()) for _ in range(8)]
    await asyncio.sleep(5.0)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
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
