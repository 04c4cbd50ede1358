"""Tasks the chaos workload schedules on handler processes.

Every execution appends one JSON line to ``<out_dir>/<pid>.jsonl`` (one file per process, so
concurrent handlers never interleave) and fsyncs it: the history checker reads these files as
"every execution seen by handlers".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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
    path = Path(out_dir) / f"{os.getpid()}.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return "ok"
