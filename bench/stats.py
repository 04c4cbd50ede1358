"""Small statistics and /proc readers shared by the benchmark phases."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    """count, p50, p90, p99, mean, min, max of ``values`` times ``scale`` (e.g. 1000 for ms)."""
    if not values:
        return {
            "count": 0,
            "p50": None,
            "p90": None,
            "p99": None,
            "mean": None,
            "min": None,
            "max": None,
        }
    v = [x * scale for x in values]
    return {
        "count": len(v),
        "p50": percentile(v, 50),
        "p90": percentile(v, 90),
        "p99": percentile(v, 99),
        "mean": sum(v) / len(v),
        "min": min(v),
        "max": max(v),
    }


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc/<pid>/stat, in seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MiB; None if it is gone."""
    return _status_mb(pid, "VmRSS:")


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the highest RSS so far) of a process in MiB; None if it is gone."""
    return _status_mb(pid, "VmHWM:")


def _status_mb(pid: int, field: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def parse_time(value: str | None) -> float | None:
    """An ISO-8601 time from the API → unix seconds."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def machine_info() -> dict[str, Any]:
    import platform
    import sys

    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem_gib = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        from importlib.metadata import version

        aps = version("apscheduler")
    except Exception:
        aps = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "apscheduler": aps,
    }


def step_should_stop(steps: Sequence[dict[str, Any]]) -> bool:
    """The fires/s ramp stops when raising the offered rate no longer raises the achieved rate
    (two saturated steps in a row without 10 % growth) or when lateness explodes (p50 > 1 s)."""
    if not steps:
        return False
    last = steps[-1]
    if (last.get("lateness_p50_ms") or 0) > 1000:
        return True
    if len(steps) < 2:
        return False
    prev = steps[-2]
    saturated = all(s["achieved"] < 0.9 * s["offered"] for s in (last, prev))
    return saturated and last["achieved"] < 1.1 * prev["achieved"]
