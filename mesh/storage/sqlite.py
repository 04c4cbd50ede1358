"""Shared SQLite plumbing for the one-file-per-node database, ``broker_state.db``.

Every component (the Raft store, the observability tables) opens its own connection on the same
file. Connections run in autocommit mode and write only inside explicit ``BEGIN IMMEDIATE`` …
``COMMIT`` blocks, so no connection ever sits on an open write transaction that would block
another one on the same thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

DB_FILENAME = "broker_state.db"

# Waiting on another process (e.g. `sqlite3` opened by an operator) for longer than this means
# something is wrong; fail loudly instead of stalling the event loop.
BUSY_TIMEOUT_MS = 5000


def connect(path: str | Path, *, synchronous: str) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with the given ``PRAGMA synchronous`` level (FULL or NORMAL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{path}: cannot enable WAL journal mode (got {mode!r})")
        # Per connection: the Raft store commits with FULL (fsync of the WAL on every commit),
        # observability with NORMAL (no fsync on commit, still crash-safe for the process).
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


def ensure_schema(
    conn: sqlite3.Connection, component: str, version: int, ddl: Sequence[str]
) -> None:
    """Create ``component``'s tables if missing and record its schema version.

    Components share one file, so ``PRAGMA user_version`` (one number per file) cannot describe
    them; each one has a row in ``schema_version`` instead. A file written by a newer version of a
    component is refused rather than misread. Migrations from older versions go here later.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        row = conn.execute(
            "SELECT version FROM schema_version WHERE component = ?", (component,)
        ).fetchone()
        if row is not None and row[0] > version:
            raise RuntimeError(
                f"{component} schema version {row[0]} is newer than this code supports "
                f"({version}); upgrade ScheduleZero Mesh"
            )
        for statement in ddl:
            conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO schema_version (component, version) VALUES (?, ?)",
            (component, version),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
