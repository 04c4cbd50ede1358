"""The handler protocol: what travels between mesh nodes and handler processes.

A handler process connects a DEALER (routing id = its handler id) to the ROUTER of every node it
knows. Messages (ZMQ kind → payload):

``handler_hello``  handler → every node, a request every ``HEARTBEAT_INTERVAL``; the node answers
    ``{"node_id", "leader_id", "term", "leader_mesh"}``. Payload: ``{"handler_id", "tasks",
    "concurrency", "pid", "host", "active_jobs", "succeeded", "failed", "avg_ms",
    "max_fencing_token", "started_at"}``. Every node keeps the registry from these, so
    ``GET /api/handlers`` answers on every node.
``dispatch``       leader → handler (ROUTER → DEALER, one-way): ``{"dispatch_id", "job_id",
    "task", "args", "kwargs", "idempotency_key", "fencing_token", "attempt", "schedule_id",
    "scheduled_fire_time", "timeout"}``.
``dispatch_ack``   handler → the node the dispatch came from: ``{"dispatch_id", "handler_id",
    "accepted": bool, "reason"}``. A handler refuses a dispatch whose fencing token is lower
    than the highest it has seen (``reason: "stale_fencing_token"``), or when it is full
    (``"at_capacity"``) or does not offer the task (``"unknown_task"``).
``job_result``     handler → the node the dispatch came from: ``{"dispatch_id", "job_id",
    "idempotency_key", "handler_id", "outcome": "success"|"error", "return_value", "error":
    {"type", "message"} | None, "duration_ms", "cached": bool}``. ``cached`` is true when the
    handler answered from its idempotency window instead of running the task again.
"""

from __future__ import annotations

HELLO = "handler_hello"
DISPATCH = "dispatch"
DISPATCH_ACK = "dispatch_ack"
JOB_RESULT = "job_result"

HEARTBEAT_INTERVAL = 0.5  # seconds between hellos
SUSPECT_AFTER = 1.5  # no hello for this long: no new dispatches
DEAD_AFTER = 3.0  # no hello for this long: in-flight dispatches are retried elsewhere

STALE_FENCING_TOKEN = "stale_fencing_token"
AT_CAPACITY = "at_capacity"
UNKNOWN_TASK = "unknown_task"
