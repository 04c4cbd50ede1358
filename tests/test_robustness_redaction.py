"""Secrets in user data stay out of the JSONL event log and the log lines: the values of
sensitive keys (``security.sensitive_keys``) are written as "***"."""

from __future__ import annotations

import logging
import time

from mesh.observability.eventlog import EventLog, read_events
from mesh.observability.logredact import RedactingFilter

SECRET = "S3CRET-planted-7f1c"


def test_the_event_log_masks_sensitive_keys_at_any_depth(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "n0")
    log.emit(
        "job_failed",
        job={"kwargs": {"password": SECRET, "headers": {"X-Api-Key": SECRET}}, "n": 1},
        token=SECRET,
    )
    log.close()
    assert SECRET not in path.read_text(encoding="utf-8")
    (event,) = read_events(path)
    assert event["token"] == "***"
    assert event["job"] == {"kwargs": {"password": "***", "headers": {"X-Api-Key": "***"}}, "n": 1}


def test_the_event_log_uses_the_configured_sensitive_keys(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "n0", sensitive_keys=("pin",))
    log.emit("x", data={"pin": SECRET, "password": "visible"})
    log.close()
    (event,) = read_events(path)
    assert event["data"] == {"pin": "***", "password": "visible"}


def test_log_lines_mask_sensitive_keys_in_formatted_mappings(tmp_path) -> None:
    path = tmp_path / "node.log"
    handler = logging.FileHandler(path)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("mesh.test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("job kwargs %s", {"api_key": SECRET, "n": 1})
        logger.warning("named %(kwargs)s", {"kwargs": {"secret": SECRET}})
        logger.warning({"authorization": SECRET})
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = path.read_text(encoding="utf-8")
    assert SECRET not in text
    assert "'n': 1" in text and text.count("***") == 3


def test_a_secret_in_a_schedule_never_reaches_the_event_log_or_stderr(cluster_factory) -> None:
    cluster = cluster_factory(1, extra_args=("--log-level", "DEBUG"))
    node = cluster.wait_for_leader()
    body = {
        "id": "leaky",
        "task": "no_such_task",
        "trigger": {"type": "interval", "seconds": 1},
        "kwargs": {"password": SECRET, "headers": {"Authorization": SECRET}},
    }
    status, _ = node.request("POST", "/api/schedules", body, timeout=5)
    assert status == 201
    status, _ = node.request("POST", "/api/jobs", {"task": "t", "kwargs": {"token": SECRET}})
    assert status == 202
    time.sleep(2.5)  # a few fires: what the node logs about them is what we search
    cluster.stop_all()
    for path in (node.stderr_path, node.stdout_path, node.events_path):
        assert SECRET not in path.read_text(encoding="utf-8"), path.name
