"""Alerts on a real 3-node mesh: a failing schedule with ``notify`` posts one alert per failed
fire to a local receiver, and a leader killed while alerts are pending loses none and never
sends one under two keys (a re-sent alert has its first key: the receiver deduplicates).

The receiver answers 503 until the leader is killed, so every alert recorded until then is
pending (retried, never confirmed) at the kill; afterwards it answers 200.
"""

from __future__ import annotations

import json
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster

TASKS = ("--tasks", "tests.fixtures.handler_tasks")
# Loopback receivers are refused unless the config allows private targets; quick backoff.
CONFIG = {"notify": {"allow_private": True, "timeout": 2.0, "max_attempts": 20,
                     "backoff_initial": 0.1, "backoff_max": 0.5}}  # fmt: skip


class Receiver:
    """Every POST: its Idempotency-Key, body and the status answered."""

    def __init__(self) -> None:
        self.status = 503
        self.seen: list[tuple[str, dict[str, Any], int]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    status = receiver.status
                    receiver.seen.append((self.headers["Idempotency-Key"], body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def keys(self, status: int | None = None) -> set[str]:
        with self.lock:
            return {k for k, _, s in self.seen if status is None or s == status}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    thread = threading.Thread(target=rx.server.serve_forever, daemon=True)
    thread.start()
    yield rx
    rx.server.shutdown()
    rx.server.server_close()


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def counter(metrics: dict, name: str, node: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted({"node_id": node, **labels}.items()))), 0.0)


def test_failure_alerts_survive_a_leader_kill_once_per_event_none_lost(
    cluster_factory: Any, receiver: Receiver
) -> None:
    cluster: Cluster = cluster_factory(3, TASKS, config=CONFIG)
    leader = cluster.wait_for_leader()
    body = {"id": "flaky", "task": "boom", "trigger": {"type": "interval", "seconds": 0.4},
            "notify": {"webhook": receiver.url, "on": ["failure"]}}  # fmt: skip
    status, created = leader.request("POST", "/api/schedules", body)
    assert status == 201, created
    cluster.wait_for(lambda: len(receiver.keys()) >= 3, 10, "three pending alerts")
    term = leader.health()["term"]
    leader.kill(signal.SIGKILL)
    receiver.status = 200
    new = cluster.wait_for_leader(newer_than_term=term)
    cluster.wait_for(lambda: len(receiver.keys(200)) >= 5, 10, "alerts sent by the new leader")
    assert new.request("POST", "/api/schedules/flaky/pause", {})[0] == 200

    def settled() -> tuple[dict, set[str], list] | None:
        """Metrics, failed jobs and deliveries once the outbox is empty and they agree (a fire
        committed ahead of the pause may still fail and alert: then they agree later)."""
        text = new.metrics_text()
        m = scrape(text) if text else {}
        if not m or counter(m, "schedulezero_alerts_pending", new.node_id) != 0:
            return None
        path = "/api/executions?schedule_id=flaky&outcome=error&limit=1000"
        status, page = new.request("GET", path)
        assert status == 200, page
        failed = {ex["job_id"] for ex in page["executions"]}
        with receiver.lock:
            seen = list(receiver.seen)
        delivered = {a["job_id"] for _, a, s in seen if s == 200}
        return (m, failed, seen) if delivered == failed else None

    metrics, failed_jobs, seen = cluster.wait_for(settled, 15, "every failure alert delivered")
    keys_of: dict[str, set[str]] = defaultdict(set)
    for key, alert, _status in seen:
        assert alert["idempotency_key"] == key
        assert (alert["event"], alert["schedule_id"], alert["outcome"]) == (
            "failure", "flaky", "error")  # fmt: skip
        keys_of[alert["job_id"]].add(key)
    # One key per event, whoever sent it and however often; every failed fire alerted.
    assert all(len(keys) == 1 for keys in keys_of.values()), keys_of
    assert set(keys_of) == failed_jobs
    sent = counter(metrics, "schedulezero_alerts_sent_total", new.node_id)
    recorded = counter(metrics, "schedulezero_alerts_recorded_total", new.node_id)
    assert sent == recorded == len(failed_jobs)
    assert counter(metrics, "schedulezero_alerts_failed_total", new.node_id) == 0
    # The per-schedule counter counts the same fires, on a node that did not lead them all.
    fires = counter(metrics, "schedulezero_schedule_fires_total", new.node_id,
                    schedule_id="flaky", outcome="error")  # fmt: skip
    assert fires == len(failed_jobs)
    # The alerts pending at the kill were delivered by a later leader under their first key.
    pending_at_kill = {k for k, a, s in seen if s == 503}
    resent = {k for k, a, s in seen if s == 200 and a["term"] > term}
    assert pending_at_kill and pending_at_kill <= resent
