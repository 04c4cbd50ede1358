"""RaftStore: the durable Raft log on a real SQLite file."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mesh.consensus.messages import CONFIG, NOOP, Entry, HardState, Snapshot
from mesh.storage import RaftStore
from mesh.storage.raft_store import write_snapshot_file

REPO = Path(__file__).resolve().parents[1]


def entries(first: int, last: int, term: int = 1) -> list[Entry]:
    return [
        Entry(term=term, index=i, data={"op": "set", "key": f"k{i}"})
        for i in range(first, last + 1)
    ]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "broker_state.db"


@pytest.fixture
def store(db_path: Path):
    s = RaftStore(db_path, sync=False)
    yield s
    s.close()


def reopen(db_path: Path) -> tuple[HardState, Snapshot | None, list[Entry]]:
    s = RaftStore(db_path, sync=False)
    try:
        return s.load()
    finally:
        s.close()


def test_empty_store_loads_default_hard_state_no_snapshot_no_entries(store: RaftStore) -> None:
    assert store.load() == (HardState(), None, [])
    assert store.last_index() == 0


def test_database_uses_wal_and_records_schema_version(store: RaftStore, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute(
            "SELECT version FROM schema_version WHERE component = 'raft'"
        ).fetchone() == (2,)
    finally:
        conn.close()


def test_save_and_load_round_trip_hard_state_entries_and_snapshot(store: RaftStore) -> None:
    snap = Snapshot(index=10, term=2, voters=("a", "b", "c"), data=b"\x00state\xff")
    log = [
        Entry(term=3, index=11, kind=NOOP, data=None),
        Entry(term=3, index=12, kind=CONFIG, data={"voters": ["a", "b", "c", "d"]}),
        Entry(term=3, index=13, data={"op": "add", "args": [1, 2.5, "x"], "ok": True}),
    ]
    hs = HardState(term=3, voted_for="b", commit=12)

    store.save(snapshot=snap, entries=log, hard_state=hs)

    assert store.load() == (hs, snap, log)
    assert store.last_index() == 13


def test_hard_state_with_no_vote_round_trips(store: RaftStore) -> None:
    store.save(hard_state=HardState(term=7, voted_for=None, commit=0))
    assert store.load()[0] == HardState(term=7, voted_for=None, commit=0)


def test_later_save_overwrites_hard_state(store: RaftStore) -> None:
    store.save(hard_state=HardState(1, "a", 0))
    store.save(hard_state=HardState(2, None, 5))
    assert store.load()[0] == HardState(2, None, 5)


def test_appends_accumulate_in_index_order(store: RaftStore) -> None:
    store.save(entries=entries(1, 3))
    store.save(entries=entries(4, 6))
    assert [e.index for e in store.load()[2]] == [1, 2, 3, 4, 5, 6]


def test_conflicting_append_truncates_the_stored_suffix(store: RaftStore) -> None:
    store.save(entries=entries(1, 5, term=1))

    store.save(entries=entries(3, 3, term=2))

    log = store.load()[2]
    assert [(e.index, e.term) for e in log] == [(1, 1), (2, 1), (3, 2)]
    assert store.last_index() == 3


def test_append_that_would_leave_a_gap_is_refused_and_writes_nothing(store: RaftStore) -> None:
    store.save(entries=entries(1, 2))
    with pytest.raises(ValueError, match="gap"):
        store.save(entries=entries(4, 5), hard_state=HardState(9, "x", 9))
    assert store.load() == (HardState(), None, entries(1, 2))


def test_non_contiguous_batch_is_refused(store: RaftStore) -> None:
    with pytest.raises(ValueError, match="contiguous"):
        store.save(entries=[*entries(1, 2), *entries(4, 4)])
    assert store.load()[2] == []


def test_snapshot_removes_covered_entries_and_load_returns_only_later_ones(
    store: RaftStore, db_path: Path
) -> None:
    store.save(entries=entries(1, 10))
    snap = Snapshot(index=6, term=1, voters=("a",), data=b"image")

    store.save(snapshot=snap)

    _, loaded_snap, log = store.load()
    assert loaded_snap == snap
    assert [e.index for e in log] == [7, 8, 9, 10]
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT MIN(idx) FROM raft_log").fetchone() == (7,)
    finally:
        conn.close()


def test_snapshot_that_disagrees_with_the_log_discards_the_whole_log(store: RaftStore) -> None:
    store.save(entries=entries(1, 10, term=1))

    store.save(snapshot=Snapshot(index=6, term=2, voters=("a",)))

    assert store.load()[2] == []
    assert store.last_index() == 6


def test_snapshot_beyond_the_log_leaves_an_empty_log(store: RaftStore) -> None:
    store.save(entries=entries(1, 3))
    store.save(snapshot=Snapshot(index=50, term=4, voters=("a", "b")))
    assert store.load()[2] == []
    assert store.last_index() == 50


def test_entries_saved_with_a_snapshot_follow_it(store: RaftStore) -> None:
    store.save(
        snapshot=Snapshot(index=50, term=4, voters=("a",)),
        entries=entries(51, 52, term=4),
        hard_state=HardState(4, "a", 50),
    )
    hs, snap, log = store.load()
    assert (hs.commit, snap.index, [e.index for e in log]) == (50, 50, [51, 52])


def test_saving_the_same_snapshot_again_keeps_later_entries(store: RaftStore) -> None:
    store.save(entries=entries(1, 10))
    snap = Snapshot(index=6, term=1, voters=("a",))
    store.save(snapshot=snap)
    store.save(snapshot=snap)
    assert [e.index for e in store.load()[2]] == [7, 8, 9, 10]


def test_snapshot_older_than_the_stored_one_is_refused(store: RaftStore) -> None:
    store.save(snapshot=Snapshot(index=20, term=3, voters=("a",)))
    with pytest.raises(ValueError, match="older"):
        store.save(snapshot=Snapshot(index=10, term=2, voters=("a",)))
    assert store.load()[1].index == 20


def test_entries_covered_by_the_snapshot_are_refused(store: RaftStore) -> None:
    store.save(snapshot=Snapshot(index=20, term=3, voters=("a",)))
    with pytest.raises(ValueError, match="covered"):
        store.save(entries=entries(20, 21, term=3))


def test_compact_deletes_entries_up_to_the_index(store: RaftStore, db_path: Path) -> None:
    store.save(entries=entries(1, 10))
    store.save(snapshot=Snapshot(index=6, term=1, voters=("a",)))
    # save(snapshot=...) already trims covered entries, so plant some behind the store's back
    # (as a crashed older build or a hand repair could) to see compact() remove them.
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany(
            "INSERT INTO raft_log (idx, term, kind, data) VALUES (?, 1, 'command', 'null')",
            [(i,) for i in range(1, 7)],
        )

    store.compact(6)

    try:
        assert conn.execute("SELECT MIN(idx), MAX(idx) FROM raft_log").fetchone() == (7, 10)
    finally:
        conn.close()
    assert [e.index for e in store.load()[2]] == [7, 8, 9, 10]


def test_compact_beyond_the_snapshot_is_refused(store: RaftStore) -> None:
    store.save(entries=entries(1, 10))
    store.save(snapshot=Snapshot(index=4, term=1, voters=("a",)))
    with pytest.raises(ValueError, match="snapshot only covers"):
        store.compact(8)
    assert [e.index for e in store.load()[2]] == [5, 6, 7, 8, 9, 10]


def test_reopening_after_close_keeps_everything(db_path: Path) -> None:
    snap = Snapshot(index=5, term=2, voters=("a", "b"), data=b"img")
    hs = HardState(term=3, voted_for="a", commit=7)
    log = entries(6, 9, term=3)
    s = RaftStore(db_path, sync=True)
    s.save(snapshot=snap, entries=log, hard_state=hs)
    s.close()

    assert reopen(db_path) == (hs, snap, log)


def test_saved_state_survives_the_process_being_killed_right_after_save(db_path: Path) -> None:
    child = textwrap.dedent(
        f"""
        import os, signal
        from mesh.consensus.messages import Entry, HardState, Snapshot
        from mesh.storage import RaftStore

        store = RaftStore({str(db_path)!r}, sync=True)
        store.save(
            snapshot=Snapshot(index=100, term=4, voters=("a", "b", "c"), data=b"img"),
            entries=[Entry(term=5, index=i, data={{"n": i}}) for i in range(101, 601)],
            hard_state=HardState(term=5, voted_for="c", commit=400),
        )
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    hs, snap, log = reopen(db_path)

    assert hs == HardState(term=5, voted_for="c", commit=400)
    assert snap == Snapshot(index=100, term=4, voters=("a", "b", "c"), data=b"img")
    assert [e.index for e in log] == list(range(101, 601))
    assert log[-1] == Entry(term=5, index=600, data={"n": 600})


def test_save_failing_midway_leaves_the_previous_state_intact(
    store: RaftStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before_snap = Snapshot(index=3, term=1, voters=("a",))
    store.save(entries=entries(1, 6), hard_state=HardState(1, "a", 3))
    store.save(snapshot=before_snap)
    before = store.load()

    def explode(_hs: HardState) -> None:
        raise RuntimeError("disk on fire")

    # The snapshot and the (truncating) append have run inside the transaction when this raises.
    monkeypatch.setattr(store, "_write_hard_state", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.save(
            snapshot=Snapshot(index=5, term=1, voters=("a", "b")),
            entries=entries(6, 8, term=2),
            hard_state=HardState(2, "b", 5),
        )

    assert store.load() == before
    assert reopen(db_path) == before
    monkeypatch.undo()
    store.save(entries=entries(7, 7, term=2))  # the connection is usable again
    assert store.last_index() == 7


def test_non_json_entry_data_is_refused_before_anything_is_written(store: RaftStore) -> None:
    store.save(entries=entries(1, 1))
    with pytest.raises(TypeError):
        store.save(entries=[Entry(term=1, index=2, data={"x": object()})])
    assert store.last_index() == 1


# -- snapshot data files ----------------------------------------------------------------------


def test_snapshot_data_lives_in_a_file_beside_the_database(store: RaftStore, db_path: Path) -> None:
    store.save(entries=entries(1, 5))
    store.save(snapshot=Snapshot(index=3, term=1, voters=("a",), data=b"image-3"))
    found = store.snapshot_file()
    assert found is not None
    index, term, path = found
    assert (index, term) == (3, 1)
    assert path.parent == db_path.parent / "snapshots"
    assert path.read_bytes() == b"image-3"
    conn = sqlite3.connect(db_path)
    try:  # the row names the file; the image is not duplicated in the database
        assert conn.execute("SELECT length(data) FROM raft_snapshot").fetchone() == (0,)
    finally:
        conn.close()
    _, snap, _ = reopen(db_path)
    assert snap is not None and snap.data == b"image-3"


def test_replacing_a_snapshot_deletes_the_old_file(store: RaftStore) -> None:
    store.save(entries=entries(1, 6))
    store.save(snapshot=Snapshot(index=2, term=1, voters=("a",), data=b"two"))
    first = store.snapshot_file()
    store.save(snapshot=Snapshot(index=4, term=1, voters=("a",), data=b"four"))
    second = store.snapshot_file()
    assert first is not None and second is not None
    assert not first[2].exists()
    assert second[2].read_bytes() == b"four"
    assert sorted(p.name for p in second[2].parent.iterdir()) == [second[2].name]


def test_record_snapshot_adopts_a_file_written_elsewhere(store: RaftStore, db_path: Path) -> None:
    # What a forked snapshot writer does: write the file, then the parent records it.
    store.save(entries=entries(1, 5))
    name = write_snapshot_file(store.snapshot_dir, 4, 1, b"from-the-child")
    store.record_snapshot(4, 1, ("a", "b"), name)
    _, snap, log = reopen(db_path)
    assert snap == Snapshot(index=4, term=1, voters=("a", "b"), data=b"from-the-child")
    assert [e.index for e in log] == [5]


def test_leftovers_of_a_crashed_writer_are_removed_on_open(db_path: Path) -> None:
    s = RaftStore(db_path, sync=False)
    s.save(entries=entries(1, 3))
    s.save(snapshot=Snapshot(index=2, term=1, voters=("a",), data=b"kept"))
    write_snapshot_file(s.snapshot_dir, 3, 1, b"never recorded")
    (s.snapshot_dir / "snap-1-3.bin.999.tmp").write_bytes(b"half")
    s.close()
    s = RaftStore(db_path, sync=False)
    try:
        found = s.snapshot_file()
        assert found is not None
        assert [p.name for p in s.snapshot_dir.iterdir()] == [found[2].name]
        assert s.load()[1].data == b"kept"
    finally:
        s.close()


def test_version_1_database_with_an_inline_snapshot_is_migrated(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.executescript(
        """
        CREATE TABLE schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES ('raft', 1);
        CREATE TABLE raft_hard_state (id INTEGER PRIMARY KEY CHECK (id = 1), term INTEGER NOT NULL,
            voted_for TEXT, commit_index INTEGER NOT NULL);
        CREATE TABLE raft_log (idx INTEGER PRIMARY KEY, term INTEGER NOT NULL,
            kind TEXT NOT NULL, data TEXT NOT NULL);
        CREATE TABLE raft_snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), idx INTEGER NOT NULL,
            term INTEGER NOT NULL, voters TEXT NOT NULL, data BLOB NOT NULL);
        INSERT INTO raft_hard_state VALUES (1, 3, 'a', 7);
        INSERT INTO raft_snapshot VALUES (1, 5, 2, '["a","b","c"]', X'6F6C64');
        INSERT INTO raft_log VALUES (6, 3, 'command', '{"op":"set"}');
        """
    )
    conn.close()
    hs, snap, log = reopen(db_path)
    assert hs == HardState(term=3, voted_for="a", commit=7)
    assert snap == Snapshot(index=5, term=2, voters=("a", "b", "c"), data=b"old")
    assert [e.index for e in log] == [6]
    assert (db_path.parent / "snapshots" / "snap-2-5.bin").read_bytes() == b"old"


def _chars(es: list[Entry]) -> int:
    return sum(len(json.dumps(e.data, separators=(",", ":"))) for e in es)


def test_log_bytes_counts_the_stored_entries_in_a_range(store: RaftStore) -> None:
    store.save(entries=entries(1, 6))
    assert store.log_bytes(0, 6) == _chars(entries(1, 6))
    assert store.log_bytes(2, 4) == _chars(entries(3, 4))
    assert store.log_bytes(6, 9) == 0


def test_log_bytes_follows_a_conflicting_append_and_a_snapshot(store: RaftStore) -> None:
    store.save(entries=entries(1, 6))
    longer = [Entry(term=2, index=5, data={"op": "set", "key": "x" * 100})]
    store.save(entries=longer)  # replaces 5 and 6
    assert store.log_bytes(0, 9) == _chars(entries(1, 4)) + _chars(longer)
    store.save(snapshot=Snapshot(index=3, term=1, voters=("a",), data=b"{}"))
    assert store.log_bytes(0, 9) == _chars(entries(4, 4)) + _chars(longer)


def test_log_bytes_is_read_back_on_open(db_path: Path) -> None:
    s = RaftStore(db_path, sync=False)
    s.save(entries=entries(1, 5))
    s.close()
    s = RaftStore(db_path, sync=False)
    try:
        assert s.log_bytes(1, 5) == _chars(entries(2, 5))
    finally:
        s.close()


def _stored_indexes(db_path: Path) -> list[int]:
    conn = sqlite3.connect(db_path)
    try:
        return [r[0] for r in conn.execute("SELECT idx FROM raft_log ORDER BY idx")]
    finally:
        conn.close()


def test_trim_deletes_the_entries_a_recorded_snapshot_covers_a_few_at_a_time(
    store: RaftStore, db_path: Path
) -> None:
    store.save(entries=entries(1, 10))
    name = write_snapshot_file(store.snapshot_dir, 7, 1, b"image")
    store.record_snapshot(7, 1, ("a",), name)
    assert store.load()[2] == entries(8, 10)  # covered entries are never read back
    assert store.trim(3) == 3
    assert _stored_indexes(db_path) == [4, 5, 6, 7, 8, 9, 10]
    while store.trim(3):
        pass
    assert _stored_indexes(db_path) == [8, 9, 10]


def test_entries_follow_a_recorded_snapshot_whose_covered_rows_are_not_trimmed_yet(
    store: RaftStore,
) -> None:
    store.save(entries=entries(1, 8))
    name = write_snapshot_file(store.snapshot_dir, 8, 1, b"image")
    store.record_snapshot(8, 1, ("a",), name)
    assert store.last_index() == 8
    store.save(entries=entries(9, 9))  # appends after the snapshot, not after a stale row
    assert [e.index for e in store.load()[2]] == [9]
