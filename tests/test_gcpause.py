"""The node's garbage-collector watch and freezer (mesh.observability.gcpause)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from mesh.observability import gcpause


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_collection_is_counted_and_logged_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    watch = gcpause.GcWatch(clock)
    for took in (0.01, 0.5, 0.2):
        watch("start", {"generation": 2})
        clock.now += took
        watch("stop", {"generation": 2, "collected": 0})
    assert (watch.slow, watch.longest) == (2, 0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "mesh.gc"]
    assert len(lines) == 1 and "for 500 ms" in lines[0]


async def test_the_freeze_loop_moves_what_is_alive_out_of_the_collectors_way() -> None:
    gc.unfreeze()
    alive = [{"n": i} for i in range(1000)]
    freezer = asyncio.create_task(gcpause.freeze_loop(interval=3600))
    try:
        await asyncio.sleep(0)
        assert gc.get_freeze_count() >= len(alive)
    finally:
        freezer.cancel()
        gc.unfreeze()  # leave the test process as it was


def test_install_registers_the_watch_with_the_collector() -> None:
    watch = gcpause.install()
    try:
        assert watch.longest == 0.0
        gc.collect()
        assert watch in gc.callbacks and watch.longest > 0.0  # it timed that collection
    finally:
        gc.callbacks.remove(watch)
