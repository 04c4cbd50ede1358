"""Sampling the leader with py-spy while it is under load (optional: ``--profile``).

py-spy is not a dependency: ``pip install py-spy`` into the venv. Its ``raw`` output is one
collapsed stack per line (``frame;frame;...;leaf COUNT``); :func:`summarize` turns that into the
functions with the most samples on top of the stack (self) and anywhere on it (inclusive).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record`` on ``pid`` for ``seconds``; None when py-spy is missing."""
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/mesh/", "python3.11/"):
        if marker in path:
            path = ("mesh/" if marker == "/mesh/" else "") + path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def _is_idle(leaf: str) -> bool:
    """The event loop waiting in the selector (sampled with ``--idle``)."""
    return leaf.startswith(("select (", "poll (", "epoll")) or "selectors.py" in leaf


def summarize(raw: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive shares of the *busy* samples per function from py-spy's raw output;
    ``busy_percent`` is the share of all samples in which the main thread was not idle."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [
            _short(f)
            for f in stack.split(";")
            if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += n
        leaf = frames[-1]
        if _is_idle(leaf):
            idle += n
            continue
        self_counts[leaf] += n
        for f in set(frames):
            incl_counts[f] += n

    busy = total - idle

    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": f, "samples": n, "percent": round(100.0 * n / busy, 1)}
            for f, n in c.most_common(top)
        ]

    return {
        "samples": total,
        "busy_percent": round(100.0 * busy / total, 1) if total else None,
        "self": share(self_counts),
        "inclusive": share(incl_counts),
    }
