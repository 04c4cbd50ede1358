"""Tasks the benchmark's nodes run embedded (``--tasks bench.embedded``); no handler offers
them, so they run inside the leader.

``bench_stamp`` appends one JSON line per run to ``path``: the wall-clock time, the fencing token
(the leader's term) and the fire time. The failover figure reads it: the first line with a term
above the killed leader's is the first fire by the new leader.
"""

from __future__ import annotations

import json
import os
import time

import mesh


@mesh.task(name="bench_stamp")
async def bench_stamp(path: str) -> int:
    ctx = mesh.job_context()
    line = json.dumps(
        {
            "t": time.time(),
            "term": ctx.fencing_token,
            "fire": ctx.scheduled_fire_time.isoformat() if ctx.scheduled_fire_time else None,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
        }
    )
    # One small O_APPEND write: lines from successive leaders never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    return 1
