"""Sample tasks for ``make run`` / ``schedulezero up``: something to watch fire."""

from __future__ import annotations

import logging
import os

import mesh

log = logging.getLogger("mesh.sample")


@mesh.task
async def heartbeat(message: str = "hello") -> str:
    """Log a line (with the job's identity) and return it."""
    ctx = mesh.job_context()
    line = (
        f"{message} — fire {ctx.scheduled_fire_time} attempt {ctx.attempt} "
        f"term {ctx.fencing_token} pid {os.getpid()}"
    )
    log.warning("heartbeat: %s", line)
    print(f"heartbeat: {line}", flush=True)
    return line


@mesh.task(name="add")
def add(a: float, b: float) -> float:
    """A sync task: run it now with ``POST /api/jobs {"task": "add", "args": [1, 2]}``."""
    return a + b
