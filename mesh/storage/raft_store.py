"""Durable Raft state in SQLite: hard state, log entries and the latest snapshot.

One ``save()`` is one transaction (group commit): a whole Ready batch — snapshot, entries, hard
state — becomes durable at once or not at all. A snapshot's *data* lives in a file beside the
database (``snapshots/snap-<term>-<index>.bin``, written and fsync'd before the row that names
it is committed), because it is large: 55 MB at 100,000 schedules. It can then be written by
another process (``MeshNode`` forks one so the event loop never serializes it) and streamed to a
lagging follower in chunks. With ``sync=True`` the connection runs
``PRAGMA synchronous=FULL``, so SQLite fsyncs the WAL before ``COMMIT`` returns; with
``sync=False`` (tests, benchmarks) it runs ``NORMAL``: committed data survives a killed process
but not a power cut.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from mesh.consensus.messages import Entry, HardState, Snapshot
from mesh.storage.sqlite import connect, ensure_schema

SCHEMA_COMPONENT = "raft"
SCHEMA_VERSION = 2  # 2: snapshot data in a file (column ``file``), no longer inline
SNAPSHOT_DIR = "snapshots"

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
    " data BLOB NOT NULL,"
    " file TEXT)",
)


def _dumps(value: object) -> str:
    # Consensus data must round-trip exactly, so no default=str fallback: a value that is not
    # JSON-able is a bug in the caller and fails before anything is written.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _config_column(voters: Sequence[str], removed: Sequence[str]) -> str:
    """The ``voters`` column: the voter list, or with removed nodes (the admin API's) an object
    ``{"voters": [...], "removed": [...]}``."""
    if not removed:
        return _dumps(list(voters))
    return _dumps({"voters": list(voters), "removed": list(removed)})


class RaftStore:
    """The node's Raft log store on ``broker_state.db`` (tables ``raft_*``)."""

    def __init__(self, path: str | Path, *, sync: bool = True) -> None:
        self.path = Path(path)
        self.snapshot_dir = self.path.parent / SNAPSHOT_DIR
        self._conn = connect(self.path, synchronous="FULL" if sync else "NORMAL")
        try:
            ensure_schema(self._conn, SCHEMA_COMPONENT, SCHEMA_VERSION, _DDL)
            self._migrate()
        except BaseException:
            self._conn.close()
            raise
        self._remove_stale_files(tmp_too=True)
        self._sizes = _LogSizes(self._conn)

    def _migrate(self) -> None:
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(raft_snapshot)")}
        if "file" not in columns:  # version 1: the data was inline; move it to a file
            self._conn.execute("ALTER TABLE raft_snapshot ADD COLUMN file TEXT")
        row = self._conn.execute(
            "SELECT idx, term, data FROM raft_snapshot WHERE id = 1 AND file IS NULL"
        ).fetchone()
        if row is not None:
            name = write_snapshot_file(self.snapshot_dir, row[0], row[1], bytes(row[2]))
            self._conn.execute(
                "UPDATE raft_snapshot SET file = ?, data = x'' WHERE id = 1", (name,)
            )

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
            snapshot = self._read_snapshot(with_data=True)
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

    def snapshot_file(self) -> tuple[int, int, Path] | None:
        """``(index, term, path)`` of the stored snapshot's data file, or None."""
        row = self._conn.execute(
            "SELECT idx, term, file FROM raft_snapshot WHERE id = 1"
        ).fetchone()
        if row is None or row[2] is None:
            return None
        return int(row[0]), int(row[1]), self.snapshot_dir / row[2]

    def last_index(self) -> int:
        """Index of the last stored entry; the snapshot's index if the log is empty; else 0."""
        return self._last_index()

    def log_bytes(self, after: int, through: int) -> int:
        """Characters of JSON the stored entries with index in (``after``, ``through``] take:
        what a snapshot at ``through`` would let the node drop (memory and disk)."""
        return self._sizes.between(after, through)

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
            name = write_snapshot_file(
                self.snapshot_dir, snapshot.index, snapshot.term, snapshot.data
            )
            config = _config_column(snapshot.voters, snapshot.removed)
            snap_row = (snapshot.index, snapshot.term, config, name)

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
            self._sizes = _LogSizes(conn)
            raise
        if snap_row is not None:
            self._remove_stale_files()

    def record_snapshot(
        self, index: int, term: int, voters: Sequence[str], name: str, removed: Sequence[str] = ()
    ) -> None:
        """Make the snapshot already written to ``snapshot_dir/name`` (``write_snapshot_file``)
        the stored one, taken by this node at an applied index (so the log agrees with it). The
        log entries it covers are no longer read; ``trim`` deletes them, a few at a time."""
        row = (index, term, _config_column(voters, removed), name)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._write_snapshot(row, drop_covered=False)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            self._sizes = _LogSizes(conn)
            raise
        self._remove_stale_files()

    def trim(self, limit: int) -> int:
        """Delete up to ``limit`` of the oldest entries the stored snapshot covers, in one
        transaction; return how many were deleted (0: none left)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            covered = self._snapshot_index()
            deleted = conn.execute(
                "DELETE FROM raft_log WHERE idx IN"
                " (SELECT idx FROM raft_log WHERE idx <= ? ORDER BY idx LIMIT ?)",
                (covered, limit),
            ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return deleted

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
        self._sizes.drop_through(upto_index)

    def close(self) -> None:
        self._conn.close()

    # -- steps of save(), each inside the caller's transaction ---------------------------------

    def _write_snapshot(self, row: tuple[int, int, str, str], *, drop_covered: bool = True) -> None:
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
            if drop_covered:
                conn.execute("DELETE FROM raft_log WHERE idx <= ?", (index,))
            self._sizes.drop_through(index)
        else:
            conn.execute("DELETE FROM raft_log")
            self._sizes.reset(index)
        conn.execute(
            "INSERT OR REPLACE INTO raft_snapshot (id, idx, term, voters, data, file)"
            " VALUES (1, ?, ?, ?, x'', ?)",
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
        self._sizes.put(first, [len(r[3]) for r in rows])

    def _write_hard_state(self, hs: HardState) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO raft_hard_state (id, term, voted_for, commit_index)"
            " VALUES (1, ?, ?, ?)",
            (hs.term, hs.voted_for, hs.commit),
        )

    # -- helpers --------------------------------------------------------------------------------

    def _read_snapshot(self, *, with_data: bool = False) -> Snapshot | None:
        row = self._conn.execute(
            "SELECT idx, term, voters, file FROM raft_snapshot WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        data = b""
        if with_data:
            data = (self.snapshot_dir / row[3]).read_bytes()
        config = json.loads(row[2])
        if isinstance(config, list):  # no removed nodes: the plain voter list
            config = {"voters": config}
        return Snapshot(
            index=row[0],
            term=row[1],
            voters=tuple(config["voters"]),
            data=data,
            removed=tuple(config.get("removed", ())),
        )

    def _remove_stale_files(self, *, tmp_too: bool = False) -> None:
        """Delete snapshot files other than the stored one (replaced ones, leftovers of a crash
        between writing a file and recording it). Files being written are ``*.tmp``: they are
        removed only on open (``tmp_too``), when no writer of this node can be running."""
        if not self.snapshot_dir.is_dir():
            return
        row = self._conn.execute("SELECT file FROM raft_snapshot WHERE id = 1").fetchone()
        keep = row[0] if row is not None else None
        stale = list(self.snapshot_dir.glob("snap-*.bin"))
        if tmp_too:
            stale += self.snapshot_dir.glob("snap-*.tmp")
        for p in stale:
            if p.name != keep:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _snapshot_index(self) -> int:
        row = self._conn.execute("SELECT idx FROM raft_snapshot WHERE id = 1").fetchone()
        return 0 if row is None else int(row[0])

    def _last_index(self) -> int:
        # Entries the snapshot covers may still be stored until trimmed: they never count.
        row = self._conn.execute("SELECT MAX(idx) FROM raft_log").fetchone()
        snapshot_index = self._snapshot_index()
        return max(int(row[0]), snapshot_index) if row[0] is not None else snapshot_index


class _LogSizes:
    """The sizes of the stored entries as running totals, so that the bytes of any range of the
    log cost two lookups (the node asks after every batch whether a snapshot is due). Kept in
    step with ``raft_log`` by the writes above; read from the table when opened, and again
    when a transaction is rolled back."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute("SELECT idx, length(data) FROM raft_log ORDER BY idx").fetchall()
        self.reset(rows[0][0] - 1 if rows else 0)
        if rows:
            self.put(rows[0][0], [n for _idx, n in rows])

    def reset(self, base: int) -> None:
        """An empty log after index ``base``."""
        self._base = base  # _totals[k]: characters of the entries base+1 .. base+k
        self._totals = [0]

    def put(self, first: int, sizes: list[int]) -> None:
        """Entries from ``first`` on, replacing any stored from there (a conflicting append)."""
        if first <= self._base:
            self.reset(first - 1)
        del self._totals[first - self._base :]
        total = self._totals[-1]
        for n in sizes:
            total += n
            self._totals.append(total)

    def drop_through(self, index: int) -> None:
        """Forget the entries up to ``index`` (compacted)."""
        k = min(max(index - self._base, 0), len(self._totals) - 1)
        del self._totals[:k]
        self._base += k

    def between(self, after: int, through: int) -> int:
        last = len(self._totals) - 1

        def total(index: int) -> int:
            return self._totals[min(max(index - self._base, 0), last)]

        return max(0, total(through) - total(after))


def _check_contiguous(entries: Sequence[Entry]) -> None:
    for prev, cur in itertools.pairwise(entries):
        if cur.index != prev.index + 1:
            raise ValueError(f"entries are not contiguous: {prev.index} then {cur.index}")


def snapshot_file_name(index: int, term: int) -> str:
    return f"snap-{term}-{index}.bin"


def write_snapshot_file(
    directory: Path, index: int, term: int, data: bytes | bytearray | memoryview | Iterable[bytes]
) -> str:
    """Write ``data`` (bytes, or pieces of them) durably as the snapshot file for
    ``(index, term)``; return its name.

    Written to a ``.tmp`` name unique to this process, fsync'd, renamed into place and the
    directory fsync'd, so a crash leaves either no file or the whole file. Safe to call from a
    forked child: it touches no SQLite connection and no lock of the parent.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = snapshot_file_name(index, term)
    tmp = directory / f"{name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        if isinstance(data, bytes | bytearray | memoryview):  # an installed image: one piece
            f.write(data)
        else:
            for piece in data:
                f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return name
