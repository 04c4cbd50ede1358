"""Rotating JSON-lines event log: one line per cluster-level event, for people and tools.

Each line is ``{"ts": "2026-11-23T10:30:00.123456Z", "type": ..., "node": ..., **fields}``,
flushed to the OS as soon as it is written (not fsync'd: this is observability, not state).
Rotation follows ``logging.handlers.RotatingFileHandler``: ``events.jsonl`` →
``events.jsonl.1`` … ``events.jsonl.N``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from mesh.security.redact import DEFAULT_SENSITIVE_KEYS, redact

logger = logging.getLogger(__name__)

# The event types the node emits (see docs/observability.md). emit() accepts any type.
NODE_STARTED = "node_started"
NODE_STOPPED = "node_stopped"
PEER_UP = "peer_up"
PEER_SUSPECT = "peer_suspect"
PEER_DOWN = "peer_down"
TERM_CHANGED = "term_changed"
ELECTION_STARTED = "election_started"
LEADER_ELECTED = "leader_elected"
STEPPED_DOWN = "stepped_down"
LEADERSHIP_TRANSFERRED = "leadership_transferred"
QUORUM_LOST = "quorum_lost"
QUORUM_REGAINED = "quorum_regained"
SNAPSHOT_TAKEN = "snapshot_taken"
SNAPSHOT_INSTALLED = "snapshot_installed"
CONFIG_CHANGED = "config_changed"
FRAME_DROPPED = "frame_dropped"
NODE_FAILED = "node_failed"  # an internal fault stops the node; the process exits 70

EVENT_TYPES = frozenset(
    {
        NODE_STARTED,
        NODE_STOPPED,
        PEER_UP,
        PEER_SUSPECT,
        PEER_DOWN,
        TERM_CHANGED,
        ELECTION_STARTED,
        LEADER_ELECTED,
        STEPPED_DOWN,
        LEADERSHIP_TRANSFERRED,
        QUORUM_LOST,
        QUORUM_REGAINED,
        SNAPSHOT_TAKEN,
        SNAPSHOT_INSTALLED,
        CONFIG_CHANGED,
        FRAME_DROPPED,
        NODE_FAILED,
    }
)

_RESERVED = ("ts", "type", "node")


def iso_utc(ts: float) -> str:
    """Unix time → fixed-width ISO-8601 UTC with microseconds, e.g. ``2026-11-23T10:30:00.123456Z``.

    Fixed width, so the strings sort in time order (SQLite ``ORDER BY ts`` works).
    """
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_json(value: dict[str, Any]) -> str:
    """Encode ``value`` as compact JSON, never raising: what JSON cannot hold becomes ``str()``."""
    try:
        return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)
    except Exception:  # non-str keys, NaN/inf, cycles, deep nesting, a failing __str__ …
        return json.dumps(_jsonable(value, 0), separators=(",", ":"), allow_nan=False)


def _jsonable(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < 20 and isinstance(value, dict):
        return {_safe_str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 20 and isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value]
    return _safe_str(value)


def _safe_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


class EventLog:
    """Append-only JSONL event log of one node, rotated at ``max_bytes`` keeping ``backups``."""

    def __init__(
        self,
        path: str | Path,
        node_id: str,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        backups: int = 5,
        clock: Callable[[], float] = time.time,
        sensitive_keys: tuple[str, ...] = DEFAULT_SENSITIVE_KEYS,
    ) -> None:
        self.path = Path(path)
        # Values of these keys, at any depth of a field, are written as "***" (security.md).
        self.sensitive_keys = sensitive_keys
        self.node_id = node_id
        self.max_bytes = max_bytes
        self.backups = backups
        self._clock = clock
        self._lock = threading.Lock()  # emit() may be called from executor threads too
        self._failing = False
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = self._open()

    def emit(self, type: str, **fields: Any) -> None:
        """Append one event line and flush it. Never raises for field values or I/O errors."""
        record: dict[str, Any] = {"ts": iso_utc(self._clock()), "type": type, "node": self.node_id}
        for key, value in fields.items():
            # The envelope wins; a colliding field (e.g. node=<peer>) is kept as "node_".
            record[f"{key}_" if key in _RESERVED else key] = value
        data = (to_json(redact(record, self.sensitive_keys)) + "\n").encode("utf-8")
        with self._lock:
            if self._closed:
                logger.debug("event %s emitted after close; dropped", type)
                return
            try:
                if self._file is None:  # a failed rotation left no file open; try again
                    self._file = self._open()
                if self._should_rotate(self._file, len(data)):
                    f, self._file = self._file, None
                    f.close()
                    self._rotate()
                    self._file = self._open()
                self._file.write(data)
                self._file.flush()
                self._failing = False
            except OSError:
                # Observability must not take the node down; report once per failure streak.
                if not self._failing:
                    logger.warning("cannot write event log %s", self.path, exc_info=True)
                self._failing = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None

    def _open(self) -> BinaryIO:
        f = open(self.path, "ab")  # kept open for the log's lifetime
        # A process killed mid-line leaves a torn last line; end it so the next event starts on
        # a line of its own (readers skip the fragment).
        if f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
                    f.flush()
        return f

    def _should_rotate(self, f: BinaryIO, incoming: int) -> bool:
        if self.max_bytes <= 0:  # like RotatingFileHandler: 0 disables rotation
            return False
        size = f.tell()
        return size > 0 and size + incoming > self.max_bytes

    def _rotate(self) -> None:
        # Called with the current file closed; the caller reopens the base name afterwards.
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self._backup(i)
                if src.exists():
                    os.replace(src, self._backup(i + 1))
            os.replace(self.path, self._backup(1))
        else:
            self.path.unlink(missing_ok=True)

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Parse an event log file, skipping lines that are not JSON objects (a torn last line)."""
    events: list[dict[str, Any]] = []
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return events
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:  # includes UnicodeDecodeError
            continue
        if isinstance(event, dict):
            events.append(event)
    return events
