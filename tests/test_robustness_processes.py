"""A real node process that cannot persist stops loudly, never lives on as a zombie; and an
entry too large for the log is refused with 413 through the whole stack."""

from __future__ import annotations

import sqlite3
import threading

from mesh.node import EXIT_NODE_FAILED


def test_a_node_whose_log_store_is_locked_exits_non_zero_with_a_clear_line(cluster_factory) -> None:
    cluster = cluster_factory(1)
    node = cluster.wait_for_leader()
    # Another process holds the write lock of the node's database past its busy timeout (5 s):
    # the next Ready batch cannot be made durable.
    holder = sqlite3.connect(node.state_db, isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN IMMEDIATE")
        try:
            node.request("POST", "/api/jobs", {"task": "t", "kwargs": {}}, timeout=15)
        except OSError:
            pass  # the node may exit before it answers
        code = node.wait_exit(timeout=30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == EXIT_NODE_FAILED
    stderr = node.stderr_path.read_text(encoding="utf-8")
    assert "FATAL: the Ready loop" in stderr
    assert "database is locked" in stderr
    assert "supervisor restarts it" in stderr
    # Its durable state is consistent: it starts again from it and leads.
    node.restart()
    assert cluster.wait_for_leader() is node


def test_a_write_larger_than_one_log_entry_answers_413(cluster_factory) -> None:
    cluster = cluster_factory(1, config={"raft": {"max_entry_bytes": 4096}})
    node = cluster.wait_for_leader()
    status, body = node.request(
        "POST", "/api/jobs", {"task": "t", "kwargs": {"blob": "x" * 8192}}, timeout=5
    )
    assert status == 413, body
    assert "limit is 4096 bytes" in body["error"]
    status, _ = node.request("POST", "/api/jobs", {"task": "t", "kwargs": {"n": 1}}, timeout=5)
    assert status == 202
    assert node.health()["role"] == "leader"


def test_a_database_lock_shorter_than_the_busy_timeout_is_waited_out(cluster_factory) -> None:
    cluster = cluster_factory(1)
    node = cluster.wait_for_leader()
    holder = sqlite3.connect(
        node.state_db, isolation_level=None, timeout=10, check_same_thread=False
    )
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.0, lambda: holder.execute("ROLLBACK"))
    release.start()
    try:
        status, _ = node.request("POST", "/api/jobs", {"task": "t", "kwargs": {}}, timeout=15)
    finally:
        release.join()
        holder.close()
    assert status == 202
    assert node.running
