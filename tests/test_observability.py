"""EventLog (rotating JSONL) and StateDB (observability tables of broker_state.db)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.consensus.messages import Entry, HardState
from mesh.observability import EventLog, StateDB, read_events
from mesh.storage import RaftStore


class FakeClock:
    def __init__(self, t: float = 1_795_429_800.123456) -> None:  # 2026-11-23T10:30:00.123456Z
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- EventLog -----------------------------------------------------------------------------------


def test_each_event_is_one_json_line_with_ts_type_and_node(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "node-a", clock=FakeClock())

    log.emit("leader_elected", term=3, leader="node-a")
    log.emit("peer_down", peer="node-b")

    lines = path.read_text().splitlines()  # readable before close: flushed after each line
    assert [json.loads(line) for line in lines] == [
        {
            "ts": "2026-11-23T10:30:00.123456Z",
            "type": "leader_elected",
            "node": "node-a",
            "term": 3,
            "leader": "node-a",
        },
        {
            "ts": "2026-11-23T10:30:00.123456Z",
            "type": "peer_down",
            "node": "node-a",
            "peer": "node-b",
        },
    ]
    log.close()


def test_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "data" / "node-a" / "events.jsonl"
    log = EventLog(path, "node-a")
    log.emit("node_started")
    log.close()
    assert [e["type"] for e in read_events(path)] == ["node_started"]


def test_rotation_keeps_n_backups_and_never_loses_the_current_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "n", max_bytes=400, backups=3)

    for seq in range(200):
        log.emit("frame_dropped", seq=seq, reason="bad_json")
        assert read_events(path)[-1]["seq"] == seq
    log.close()

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2", "events.jsonl.3"]
    files = [path.with_name(f"events.jsonl.{i}") for i in (3, 2, 1)] + [path]
    assert all(0 < f.stat().st_size <= 400 for f in files)
    seqs = [e["seq"] for f in files for e in read_events(f)]
    # Oldest backup → current file is one unbroken run ending with the last event.
    assert seqs == list(range(seqs[0], 200))


def test_a_line_larger_than_max_bytes_is_still_written(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "n", max_bytes=100, backups=1)
    log.emit("node_started")
    log.emit("config_changed", voters=["x" * 50] * 5)
    log.close()
    assert [e["type"] for e in read_events(path)] == ["config_changed"]
    assert [e["type"] for e in read_events(path.with_name("events.jsonl.1"))] == ["node_started"]


def test_reopening_appends_and_counts_the_existing_size_toward_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first = EventLog(path, "n", max_bytes=300, backups=2)
    for seq in range(3):
        first.emit("peer_up", seq=seq)
    first.close()

    second = EventLog(path, "n", max_bytes=300, backups=2)
    for seq in range(3, 6):
        second.emit("peer_up", seq=seq)
    second.close()

    seqs = [e["seq"] for f in (path.with_name("events.jsonl.1"), path) for e in read_events(f)]
    assert seqs == list(range(6))
    assert path.stat().st_size <= 300


def test_non_json_values_are_stringified_never_raised(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "n")
    cyclic: list[object] = []
    cyclic.append(cyclic)

    log.emit("frame_dropped", raw=b"\xff\x00", peers={"b", "a"}, err=ValueError("boom"), path=path)
    log.emit("frame_dropped", ratio=float("nan"), by_peer={("a", 1): 2}, loop=cyclic)
    log.close()

    first, second = read_events(path)
    assert first["raw"] == str(b"\xff\x00")
    assert first["err"] == "boom"
    assert first["path"] == str(path)
    assert second["ratio"] == "nan"
    assert second["by_peer"] == {"('a', 1)": 2}
    assert isinstance(second["loop"], list)


def test_fields_never_overwrite_the_envelope(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "node-a")
    log.emit("peer_up", node="node-b", ts="yesterday")
    log.close()
    (event,) = read_events(path)
    assert (event["node"], event["node_"], event["ts_"]) == ("node-a", "node-b", "yesterday")
    assert event["ts"].endswith("Z")


def test_read_events_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"ts": "t", "type": "node_started", "node": "n"}\n{"ts": "t", "type": "pe')
    assert [e["type"] for e in read_events(path)] == ["node_started"]


def test_after_a_torn_last_line_new_events_start_on_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"ts": "t", "type": "node_started", "node": "n"}\n{"ts": "t", "type": "pe')
    log = EventLog(path, "n")
    log.emit("node_started")
    log.close()
    assert [e["type"] for e in read_events(path)] == ["node_started", "node_started"]


def test_read_events_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_events(tmp_path / "nope.jsonl") == []


def test_emit_after_close_is_dropped_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "n")
    log.close()
    log.emit("node_stopped")
    log.close()
    assert read_events(path) == []


# -- StateDB --------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "broker_state.db"


@pytest.fixture
def state(db_path: Path, clock: FakeClock) -> Iterator[StateDB]:
    db = StateDB(db_path, clock=clock, node_id="node-a")
    yield db
    db.close()


def test_instance_upsert_keeps_first_seen_and_updates_the_rest(
    state: StateDB, clock: FakeClock
) -> None:
    state.upsert_instance(
        "node-a", pid=100, mesh_address="tcp://10.0.0.1:7000", http_address=None, state="starting"
    )
    clock.t += 60
    state.upsert_instance(
        "node-a",
        pid=101,
        mesh_address="tcp://10.0.0.1:7000",
        http_address="10.0.0.1:8080",
        state="running",
        role="leader",
    )

    (row,) = state.instances()
    assert row == {
        "instance_id": "node-a",
        "pid": 101,
        "mesh_address": "tcp://10.0.0.1:7000",
        "http_address": "10.0.0.1:8080",
        "first_seen": "2026-11-23T10:30:00.123456Z",
        "last_seen": "2026-11-23T10:31:00.123456Z",
        "state": "running",
        "role": "leader",
        "is_active": True,
    }


def test_stopped_instance_is_inactive(state: StateDB) -> None:
    state.upsert_instance(
        "node-a", pid=1, mesh_address="tcp://a:1", http_address=None, state="running"
    )
    state.upsert_instance(
        "node-a", pid=1, mesh_address="tcp://a:1", http_address=None, state="stopped"
    )
    assert state.instances()[0]["is_active"] is False


def test_leadership_history_is_newest_first_with_the_instance_pid(
    state: StateDB, clock: FakeClock
) -> None:
    state.upsert_instance(
        "node-a", pid=4242, mesh_address="tcp://a:1", http_address=None, state="running"
    )
    state.record_leadership("node-a", 1, "elected")
    clock.t += 1
    state.record_leadership("node-a", 1, "transferred", "to node-b")
    clock.t += 1
    state.record_leadership("node-b", 2, "observed")

    history = state.leadership_history()

    assert [(h["instance_id"], h["term"], h["event_type"]) for h in history] == [
        ("node-b", 2, "observed"),
        ("node-a", 1, "transferred"),
        ("node-a", 1, "elected"),
    ]
    assert [h["pid"] for h in history] == [None, 4242, 4242]
    assert history[1]["detail"] == "to node-b"
    assert history[0]["ts"] > history[1]["ts"] > history[2]["ts"]
    assert len(state.leadership_history(limit=2)) == 2


def test_unknown_leadership_event_type_is_refused(state: StateDB) -> None:
    with pytest.raises(ValueError, match="unknown leadership event"):
        state.record_leadership("node-a", 1, "crowned")


def test_metrics_accumulate_in_memory_and_flush_one_row_per_type(
    state: StateDB, db_path: Path
) -> None:
    for _ in range(5):
        state.count("frame_dropped")
    state.count("peer_down", 2)
    assert state.metrics_totals() == {"frame_dropped": 5, "peer_down": 2}

    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM event_metrics").fetchone() == (0,)
        state.flush_metrics()
        rows = conn.execute(
            "SELECT event_type, instance_id, count FROM event_metrics ORDER BY event_type"
        ).fetchall()
        assert rows == [("frame_dropped", "node-a", 5), ("peer_down", "node-a", 2)]

        state.count("frame_dropped", 3)
        state.flush_metrics()
        state.flush_metrics()  # nothing pending: no empty rows
        assert conn.execute("SELECT COUNT(*) FROM event_metrics").fetchone() == (3,)
    finally:
        conn.close()
    assert state.metrics_totals() == {"frame_dropped": 8, "peer_down": 2}


def test_close_flushes_pending_metrics(db_path: Path, clock: FakeClock) -> None:
    db = StateDB(db_path, clock=clock)
    db.count("quorum_lost")
    db.close()
    again = StateDB(db_path, clock=clock)
    try:
        assert again.metrics_totals() == {"quorum_lost": 1}
    finally:
        again.close()


def test_node_log_rows_are_written_with_json_context(state: StateDB, db_path: Path) -> None:
    state.log("info", "joined cluster", peers=["b", "c"], term=4)
    state.log("warning", "slow fsync", err=OSError("EIO"))

    assert [(r["level"], r["message"]) for r in state.log_history()] == [
        ("WARNING", "slow fsync"),
        ("INFO", "joined cluster"),
    ]
    conn = sqlite3.connect(db_path)
    try:
        ts, level, message, context = conn.execute(
            "SELECT ts, level, message, context FROM node_log ORDER BY id"
        ).fetchone()
    finally:
        conn.close()
    assert (ts, level, message) == ("2026-11-23T10:30:00.123456Z", "INFO", "joined cluster")
    assert json.loads(context) == {"peers": ["b", "c"], "term": 4}
    assert state.log_history()[0]["context"]["err"] == "EIO"


def test_state_db_and_raft_store_share_one_file(db_path: Path, clock: FakeClock) -> None:
    raft = RaftStore(db_path, sync=False)
    db = StateDB(db_path, clock=clock, node_id="node-a")
    try:
        raft.save(
            entries=[Entry(term=1, index=1, data={"op": "x"})], hard_state=HardState(1, "a", 0)
        )
        db.log("info", "between raft writes")
        db.count("peer_up")
        raft.save(entries=[Entry(term=1, index=2, data={"op": "y"})])
        db.flush_metrics()
        assert raft.last_index() == 2
    finally:
        db.close()
        raft.close()

    conn = sqlite3.connect(db_path)
    try:
        versions = dict(conn.execute("SELECT component, version FROM schema_version"))
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
    assert versions == {"raft": 2, "observability": 1}


def test_a_node_below_debug_drops_apschedulers_per_job_lines_and_keeps_the_rest() -> None:
    """The two per-job INFO lines of the pinned APScheduler are the ones dropped (their text
    is read from its source, so an upgrade that rewords them fails here)."""
    import inspect
    import logging

    import apscheduler._schedulers.async_ as aps

    from mesh.app import _JOB_LINES, _quiet_job_lines

    source = inspect.getsource(aps)
    assert all(f'"{line}"' in source for line in _JOB_LINES)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("apscheduler", logging.INFO, __file__, 1, msg, ("id",), None)

    assert not any(_quiet_job_lines(record(line)) for line in _JOB_LINES)
    assert _quiet_job_lines(record("Job %s raised an exception"))
    assert _quiet_job_lines(record("Scheduler started"))
