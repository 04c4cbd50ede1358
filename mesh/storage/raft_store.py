"""Durable Raft state in SQLite: hard state, log entries and the latest snapshot.

One ``save()`` is one transaction (group commit): a whole Ready batch — snapshot, entries, hard
state — becomes durable at once or not at all. With ``sync=True`` the connection runs
``PRAGMA synchronous=FULL``, so SQLite fsyncs the WAL before ``COMMIT`` returns; with
``sync=False`` (tests, benchmarks) it runs ``NORMAL``: committed data survives a killed process
but not a power cut.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from mesh.consensus.messages import Entry, HardState, Snapshot
from mesh.storage.sqlite import connect, ensure_schema

SCHEMA_COMPONENT = "raft"
SCHEMA_VERSION = 1

_DDL = (
    "CREATE TABLE IF NOT EXISTS raft_hard_state ("
    " id INTEGER PRIMARY KEY CHECK (id = 1),"
    " term INTEGER NOT NULL,"
    " voted_for TEXT,"
    " commit_index INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS raft_log ("
    " idx INTEGER PRIMARY KEY,"
    " term INTEGER NOT NULL,"
    " kind TEXT NOT NULL,"
    " data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS raft_snapshot ("
    " id INTEGER PRIMARY KEY CHECK (id = 1),"
    " idx INTEGER NOT NULL,"
    " term INTEGER NOT NULL,"
    " voters TEXT NOT NULL,"
    " data BLOB NOT NULL)",
)


def _dumps(value: object) -> str:
    # Consensus data must round-trip exactly, so no default=str fallback: a value that is not
    # JSON-able is a bug in the caller and fails before anything is written.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class RaftStore:
    """The node's Raft log store on ``broker_state.db`` (tables ``raft_*``)."""

    def __init__(self, path: str | Path, *, sync: bool = True) -> None:
        self.path = Path(path)
        self._conn = connect(self.path, synchronous="FULL" if sync else "NORMAL")
        try:
            ensure_schema(self._conn, SCHEMA_COMPONENT, SCHEMA_VERSION, _DDL)
        except BaseException:
            self._conn.close()
            raise

    # -- reading ------------------------------------------------------------------------------

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        """Return the hard state, the snapshot (if any) and the entries after it, in order."""
        conn = self._conn
        conn.execute("BEGIN")  # one consistent read snapshot across the three tables
        try:
            row = conn.execute(
                "SELECT term, voted_for, commit_index FROM raft_hard_state WHERE id = 1"
            ).fetchone()
            hard_state = HardState() if row is None else HardState(row[0], row[1], row[2])
            snapshot = self._read_snapshot()
            after = snapshot.index if snapshot is not None else 0
            entries = [
                Entry(term=term, index=idx, kind=kind, data=json.loads(data))
                for idx, term, kind, data in conn.execute(
                    "SELECT idx, term, kind, data FROM raft_log WHERE idx > ? ORDER BY idx",
                    (after,),
                )
            ]
        finally:
            conn.execute("COMMIT")
        return hard_state, snapshot, entries

    def last_index(self) -> int:
        """Index of the last stored entry; the snapshot's index if the log is empty; else 0."""
        return self._last_index()

    # -- writing ------------------------------------------------------------------------------

    def save(
        self,
        *,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
    ) -> None:
        """Persist one Ready batch in a single transaction; durable when this returns.

        Order: the snapshot replaces the stored one and removes the entries it covers; then the
        entries are appended, first truncating any stored suffix from their first index on (a
        conflicting append); then the hard state is written. Raises ``ValueError`` (and writes
        nothing) if the batch would leave a gap or a hole in the log.
        """
        if hard_state is None and not entries and snapshot is None:
            return
        _check_contiguous(entries)
        # Serialise before BEGIN: a bad payload must not abort a half-written transaction.
        rows = [(e.index, e.term, e.kind, _dumps(e.data)) for e in entries]
        snap_row = None
        if snapshot is not None:
            snap_row = (snapshot.index, snapshot.term, _dumps(list(snapshot.voters)), snapshot.data)

        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if snap_row is not None:
                self._write_snapshot(snap_row)
            if rows:
                self._append(rows)
            if hard_state is not None:
                self._write_hard_state(hard_state)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def compact(self, upto_index: int) -> None:
        """Delete entries with index <= ``upto_index``; a snapshot must already cover them."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            snapshot = self._read_snapshot()
            covered = snapshot.index if snapshot is not None else 0
            if upto_index > covered:
                raise ValueError(
                    f"cannot compact up to {upto_index}: the stored snapshot only covers "
                    f"up to {covered}"
                )
            conn.execute("DELETE FROM raft_log WHERE idx <= ?", (upto_index,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()

    # -- steps of save(), each inside the caller's transaction ---------------------------------

    def _write_snapshot(self, row: tuple[int, int, str, bytes]) -> None:
        index, term = row[0], row[1]
        conn = self._conn
        stored = conn.execute("SELECT idx, term FROM raft_snapshot WHERE id = 1").fetchone()
        if stored is not None and index < stored[0]:
            raise ValueError(f"snapshot at {index} is older than the stored one at {stored[0]}")
        # Raft §7: the entries after the snapshot are kept only if the log agrees with the
        # snapshot at its last index; otherwise they belong to another history and must go.
        at_index = conn.execute("SELECT term FROM raft_log WHERE idx = ?", (index,)).fetchone()
        agrees = (at_index is not None and at_index[0] == term) or (
            stored is not None and tuple(stored) == (index, term)
        )
        if agrees:
            conn.execute("DELETE FROM raft_log WHERE idx <= ?", (index,))
        else:
            conn.execute("DELETE FROM raft_log")
        conn.execute(
            "INSERT OR REPLACE INTO raft_snapshot (id, idx, term, voters, data)"
            " VALUES (1, ?, ?, ?, ?)",
            row,
        )

    def _append(self, rows: list[tuple[int, int, str, str]]) -> None:
        conn = self._conn
        first = rows[0][0]
        snapshot_index = self._snapshot_index()
        if first <= snapshot_index:
            raise ValueError(f"entry {first} is covered by the snapshot at {snapshot_index}")
        last = self._last_index()
        if first > last + 1:
            raise ValueError(f"entry {first} would leave a gap after the last index {last}")
        if first <= last:
            conn.execute("DELETE FROM raft_log WHERE idx >= ?", (first,))
        conn.executemany("INSERT INTO raft_log (idx, term, kind, data) VALUES (?, ?, ?, ?)", rows)

    def _write_hard_state(self, hs: HardState) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO raft_hard_state (id, term, voted_for, commit_index)"
            " VALUES (1, ?, ?, ?)",
            (hs.term, hs.voted_for, hs.commit),
        )

    # -- helpers --------------------------------------------------------------------------------

    def _read_snapshot(self) -> Snapshot | None:
        row = self._conn.execute(
            "SELECT idx, term, voters, data FROM raft_snapshot WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        return Snapshot(
            index=row[0], term=row[1], voters=tuple(json.loads(row[2])), data=bytes(row[3])
        )

    def _snapshot_index(self) -> int:
        row = self._conn.execute("SELECT idx FROM raft_snapshot WHERE id = 1").fetchone()
        return 0 if row is None else int(row[0])

    def _last_index(self) -> int:
        row = self._conn.execute("SELECT MAX(idx) FROM raft_log").fetchone()
        return int(row[0]) if row[0] is not None else self._snapshot_index()


def _check_contiguous(entries: Sequence[Entry]) -> None:
    for prev, cur in itertools.pairwise(entries):
        if cur.index != prev.index + 1:
            raise ValueError(f"entries are not contiguous: {prev.index} then {cur.index}")
