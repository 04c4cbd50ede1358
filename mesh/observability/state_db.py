"""Observability tables in the node's ``broker_state.db``: who ran, who led, what happened.

These rows describe the cluster for people and dashboards; consensus never reads them. Writes use
``PRAGMA synchronous=NORMAL`` (WAL: no fsync per commit, still safe if the process dies) and the
hot-path counters are accumulated in memory and written in batches by ``flush_metrics()``.
Timestamps are ISO-8601 UTC strings, fixed width (``2026-11-23T10:30:00.123456Z``), so they sort
in time order.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.observability.eventlog import iso_utc, to_json
from mesh.storage.sqlite import connect, ensure_schema

SCHEMA_COMPONENT = "observability"
SCHEMA_VERSION = 1

LEADERSHIP_EVENTS = frozenset({"elected", "stepped_down", "transferred", "observed"})
# Instance states that mean "not running"; any other state marks the instance active.
INACTIVE_STATES = frozenset({"stopped", "dead", "down", "left"})

_DDL = (
    "CREATE TABLE IF NOT EXISTS instances ("
    " instance_id TEXT PRIMARY KEY,"
    " pid INTEGER,"
    " mesh_address TEXT NOT NULL,"
    " http_address TEXT,"
    " first_seen TEXT NOT NULL,"
    " last_seen TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " role TEXT,"
    " is_active INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leadership_log ("
    " id INTEGER PRIMARY KEY,"
    " ts TEXT NOT NULL,"
    " instance_id TEXT NOT NULL,"
    " pid INTEGER,"
    " term INTEGER NOT NULL,"
    " event_type TEXT NOT NULL,"
    " detail TEXT NOT NULL DEFAULT '')",
    "CREATE TABLE IF NOT EXISTS event_metrics ("
    " id INTEGER PRIMARY KEY,"
    " ts TEXT NOT NULL,"
    " event_type TEXT NOT NULL,"
    " instance_id TEXT,"
    " count INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS event_metrics_type ON event_metrics (event_type)",
    "CREATE TABLE IF NOT EXISTS node_log ("
    " id INTEGER PRIMARY KEY,"
    " ts TEXT NOT NULL,"
    " level TEXT NOT NULL,"
    " message TEXT NOT NULL,"
    " context TEXT NOT NULL)",
)


class StateDB:
    """The node's observability tables: instances, leadership_log, event_metrics, node_log.

    ``node_id`` (an addition to the seed design's signature) names the instance that
    ``event_metrics`` rows are attributed to.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        node_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.node_id = node_id
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._conn = connect(self.path, synchronous="NORMAL")
        self._conn.row_factory = sqlite3.Row
        try:
            ensure_schema(self._conn, SCHEMA_COMPONENT, SCHEMA_VERSION, _DDL)
        except BaseException:
            self._conn.close()
            raise

    # -- instances ------------------------------------------------------------------------------

    def upsert_instance(
        self,
        node_id: str,
        *,
        pid: int | None,
        mesh_address: str,
        http_address: str | None,
        state: str,
        role: str | None = None,
    ) -> None:
        """Insert or update an instance row; ``first_seen`` keeps its original value."""
        now = self._now()
        self._conn.execute(
            "INSERT INTO instances (instance_id, pid, mesh_address, http_address, first_seen,"
            " last_seen, state, role, is_active) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (instance_id) DO UPDATE SET pid = excluded.pid,"
            " mesh_address = excluded.mesh_address, http_address = excluded.http_address,"
            " last_seen = excluded.last_seen, state = excluded.state, role = excluded.role,"
            " is_active = excluded.is_active",
            (
                node_id,
                pid,
                mesh_address,
                http_address,
                now,
                now,
                state,
                role,
                int(state not in INACTIVE_STATES),
            ),
        )

    def instances(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT * FROM instances ORDER BY instance_id").fetchall()
        return [{**dict(r), "is_active": bool(r["is_active"])} for r in rows]

    # -- leadership -----------------------------------------------------------------------------

    def record_leadership(self, node_id: str, term: int, event_type: str, detail: str = "") -> None:
        """Append a leadership event; ``pid`` is taken from the instance row, if there is one."""
        if event_type not in LEADERSHIP_EVENTS:
            raise ValueError(
                f"unknown leadership event {event_type!r}; "
                f"expected one of {sorted(LEADERSHIP_EVENTS)}"
            )
        self._conn.execute(
            "INSERT INTO leadership_log (ts, instance_id, pid, term, event_type, detail)"
            " VALUES (?, ?, (SELECT pid FROM instances WHERE instance_id = ?), ?, ?, ?)",
            (self._now(), node_id, node_id, term, event_type, detail),
        )

    def leadership_history(self, limit: int = 100) -> list[dict[str, Any]]:
        """Leadership events, newest first."""
        rows = self._conn.execute(
            "SELECT ts, instance_id, pid, term, event_type, detail FROM leadership_log"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [dict(r) for r in rows]

    # -- metrics --------------------------------------------------------------------------------

    def count(self, event_type: str, n: int = 1) -> None:
        """Add ``n`` to an in-memory counter (hot path: no I/O until ``flush_metrics()``)."""
        self._pending[event_type] = self._pending.get(event_type, 0) + n

    def flush_metrics(self) -> None:
        """Write the accumulated counts, one ``event_metrics`` row per event type, and reset."""
        if not self._pending:
            return
        now = self._now()
        rows = [(now, t, self.node_id, n) for t, n in self._pending.items()]
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO event_metrics (ts, event_type, instance_id, count)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise  # the counts stay pending and go out with the next flush
        self._pending.clear()

    def metrics_totals(self) -> dict[str, int]:
        """Total per event type: stored rows plus counts not flushed yet."""
        totals = {
            r["event_type"]: int(r["total"])
            for r in self._conn.execute(
                "SELECT event_type, SUM(count) AS total FROM event_metrics GROUP BY event_type"
            )
        }
        for event_type, n in self._pending.items():
            totals[event_type] = totals.get(event_type, 0) + n
        return totals

    # -- node log -------------------------------------------------------------------------------

    def log(self, level: str, message: str, **context: Any) -> None:
        """Append a ``node_log`` row; ``context`` is stored as JSON (non-JSON values as str)."""
        self._conn.execute(
            "INSERT INTO node_log (ts, level, message, context) VALUES (?, ?, ?, ?)",
            (self._now(), level.upper(), message, to_json(context)),
        )

    def log_history(self, limit: int = 100) -> list[dict[str, Any]]:
        """``node_log`` rows, newest first, with ``context`` decoded."""
        rows = self._conn.execute(
            "SELECT ts, level, message, context FROM node_log ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [{**dict(r), "context": json.loads(r["context"])} for r in rows]

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush pending metrics and close the connection."""
        try:
            self.flush_metrics()
        finally:
            self._conn.close()

    def _now(self) -> str:
        return iso_utc(self._clock())


# --------------------------------------------------------------------------- audit trail

AUDIT_COMPONENT = "audit"
AUDIT_SCHEMA_VERSION = 1
AUDIT_COLUMNS = (
    "ts",
    "node_id",
    "received_by",
    "token",
    "role",
    "method",
    "path",
    "schedule_id",
    "client",
    "peer",
    "status",
)
_AUDIT_DDL = (
    # AUTOINCREMENT: ids are never reused after old rows are trimmed, so an ``after`` cursor a
    # reader holds stays meaningful.
    "CREATE TABLE IF NOT EXISTS audit_log ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " ts TEXT NOT NULL,"
    " node_id TEXT NOT NULL,"
    " received_by TEXT NOT NULL,"
    " token TEXT,"
    " role TEXT,"
    " method TEXT NOT NULL,"
    " path TEXT NOT NULL,"
    " schedule_id TEXT,"
    " client TEXT NOT NULL,"
    " peer TEXT NOT NULL,"
    " status INTEGER NOT NULL)",
)


class AuditLog:
    """The HTTP API's audit trail on this node (table ``audit_log`` in ``broker_state.db``).

    One row per mutation this node answered itself (docs/security.md): the leader's rows cover
    every write it executed, including those a follower forwarded. Kept local rather than
    replicated through Raft: a refused request (401/403, no quorum) must be recorded without a
    quorum, and a flood of bad requests must not grow the replicated log. At most ``keep`` rows
    are kept (the oldest are dropped first), so such a flood cannot fill the disk either.
    """

    def __init__(self, path: str | Path, *, keep: int = 100_000) -> None:
        self.keep = keep
        self._since_trim = 0
        self._conn = connect(Path(path), synchronous="NORMAL")
        self._conn.row_factory = sqlite3.Row
        try:
            ensure_schema(self._conn, AUDIT_COMPONENT, AUDIT_SCHEMA_VERSION, _AUDIT_DDL)
        except BaseException:
            self._conn.close()
            raise

    def record(self, entry: dict[str, Any]) -> int:
        """Append one entry (keys: ``AUDIT_COLUMNS``); returns its id."""
        cur = self._conn.execute(
            f"INSERT INTO audit_log ({', '.join(AUDIT_COLUMNS)})"
            f" VALUES ({', '.join('?' * len(AUDIT_COLUMNS))})",
            tuple(entry.get(c) for c in AUDIT_COLUMNS),
        )
        row_id = int(cur.lastrowid or 0)
        self._since_trim += 1
        if self._since_trim >= max(1, self.keep // 100):
            self._since_trim = 0
            self._conn.execute("DELETE FROM audit_log WHERE id <= ?", (row_id - self.keep,))
        return row_id

    def page(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Entries with an id above ``after``, oldest first, at most ``limit``."""
        rows = self._conn.execute(
            "SELECT * FROM audit_log WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()
        return [dict(r) for r in rows]

    def close(self) -> None:
        self._conn.close()
