"""Tasks the benchmark runs.

``bench_noop`` is offered by the handler processes (``--tasks bench.tasks``); ``noop`` is the
same trivial coroutine for APScheduler alone (the baseline), so both sides run identical work.
"""

from __future__ import annotations

import mesh


async def noop() -> int:
    """The trivial task: returns at once."""
    return 1


@mesh.task(name="bench_noop")
async def bench_noop() -> int:
    return 1
