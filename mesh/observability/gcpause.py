"""Keep Python's cyclic garbage collector from stopping a node's event loop for long.

A full (generation 2) collection walks every tracked object, and runs each time the objects that
survived into the oldest generation have grown by a quarter. A node holds hundreds of
thousands of long-lived ones (the replicated state, the decoded Raft log since the last
snapshot, the history), so at 1,000 fires/s the full collections grew from 60 ms to over a
second within a minute, the Raft timer ran as late, and the leadership moved every few seconds
(docs/performance.md, "Steady load").

:func:`install` freezes what is alive (``gc.freeze``: moved to a permanent generation that
collections skip) at start and every ``FREEZE_SECONDS``, so a full collection only walks what
was created since. Frozen objects are still freed by reference counting when they die; only a
*cycle* among objects that were alive at a freeze is never reclaimed, a small cost for a
process whose long-lived data is plain dicts, lists and attrs objects. Collections that still
take ``WARN_SECONDS`` or more are logged, at most every ``LOG_SECONDS``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

log = logging.getLogger("mesh.gc")

FREEZE_SECONDS = 2.0
WARN_SECONDS = 0.1
LOG_SECONDS = 60.0


class GcWatch:
    """Times every collection (``gc.callbacks``); ``slow`` counts those of ``WARN_SECONDS`` or
    more and ``longest`` is the longest seen, in seconds."""

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self.clock = clock
        self.slow = 0
        self.longest = 0.0
        self._started = 0.0
        self._logged_at = float("-inf")

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self.clock()
            return
        took = self.clock() - self._started
        self.longest = max(self.longest, took)
        if took < WARN_SECONDS:
            return
        self.slow += 1
        now = self.clock()
        if now - self._logged_at >= LOG_SECONDS:
            self._logged_at = now
            log.warning(
                "a generation-%d garbage collection stopped the event loop for %.0f ms "
                "(%d of %.0f ms or more so far)",
                info.get("generation", -1), took * 1000, self.slow, WARN_SECONDS * 1000,
            )  # fmt: skip


async def freeze_loop(interval: float = FREEZE_SECONDS) -> None:
    """Freeze what is alive now and every ``interval`` seconds, until cancelled."""
    while True:
        gc.freeze()
        await asyncio.sleep(interval)


def install() -> GcWatch:
    """Time the collections of this process (idempotent per watch); start ``freeze_loop`` on
    the running loop to keep full collections short."""
    watch = GcWatch()
    gc.callbacks.append(watch)
    return watch
