"""Tasks the chaos workload schedules on handler processes.

Every execution appends one JSON line to ``<out_dir>/<pid>.jsonl`` (one file per process, so
concurrent handlers never interleave) and fsyncs it: the history checker reads these files as
"every execution seen by handlers".
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any

import mesh


@mesh.task
def chaos_record(schedule_id: str, out_dir: str) -> str:
    ctx = mesh.job_context()
    record = {
        "schedule_id": schedule_id,
        "fire": ctx.scheduled_fire_time.isoformat() if ctx.scheduled_fire_time else None,
        "key": ctx.idempotency_key,
        "attempt": ctx.attempt,
        "token": ctx.fencing_token,
        "job_id": ctx.job_id,
        "pid": os.getpid(),
        "at": time.time(),
    }
    _append(Path(out_dir) / f"{os.getpid()}.jsonl", record)
    return "ok"


@mesh.task
async def chaos_overlap(schedule_id: str, out_dir: str, seconds: float) -> str:
    """A run longer than its schedule's interval (the overlap rule): one line per run, written
    at its end, with the run's start and end (``start``, ``end``, seconds since the epoch)."""
    ctx = mesh.job_context()
    start = time.time()
    await asyncio.sleep(seconds)
    record = {
        "schedule_id": schedule_id,
        "fire": ctx.scheduled_fire_time.isoformat() if ctx.scheduled_fire_time else None,
        "key": ctx.idempotency_key,
        "attempt": ctx.attempt,
        "start": start,
        "end": time.time(),
        "pid": os.getpid(),
    }
    _append(Path(out_dir) / f"overlap-{os.getpid()}.jsonl", record)
    return "ok"


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def failing_tries(idempotency_key: str, max_attempts: int) -> int:
    """How many tries of a fire ``chaos_flaky`` fails: 0 to ``max_attempts`` (all of them),
    fixed by the fire's idempotency key, so the checker knows it too."""
    return zlib.crc32(idempotency_key.encode()) % (max_attempts + 1)


@mesh.task
def chaos_flaky(schedule_id: str, out_dir: str, max_attempts: int) -> int:
    """Record the run like ``chaos_record`` (with its try number), then fail if this fire's
    first ``failing_tries`` tries must fail: the retry policy's workload."""
    ctx = mesh.job_context()
    record = {
        "schedule_id": schedule_id,
        "fire": ctx.scheduled_fire_time.isoformat() if ctx.scheduled_fire_time else None,
        "key": ctx.idempotency_key,
        "try": ctx.try_number,
        "attempt": ctx.attempt,
        "pid": os.getpid(),
        "at": time.time(),
    }
    _append(Path(out_dir) / f"{os.getpid()}.jsonl", record)
    if ctx.try_number <= failing_tries(ctx.idempotency_key, max_attempts):
        raise RuntimeError(f"try {ctx.try_number} fails on purpose")
    return ctx.try_number
