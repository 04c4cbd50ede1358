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
    "accepted": bool, "reason", "needs_start": bool}``. A handler refuses a dispatch whose
    fencing token is lower than the highest it has seen (``reason: "stale_fencing_token"``), or
    when it is full (``"at_capacity"``) or does not offer the task (``"unknown_task"``).
    ``needs_start`` is true when the dispatch would start a new execution: the handler holds a
    slot for it and runs nothing until ``dispatch_start`` (false when it answers from its
    idempotency window or joins the execution already running for the key).
``dispatch_start`` leader → handler: ``{"dispatch_id", "start": bool}``. Sent when the
    acknowledgement arrives while the leader still waits for it; a late acknowledgement (the
    leader already retried elsewhere) gets ``start: false``. A handler that gets no start within
    ``START_WINDOW`` of its acknowledgement drops the dispatch, and answers a late start with a
    ``job_result`` of outcome ``"not_started"``. So a dispatch delayed in the network (a
    partition, a retransmission after heal) can never run after the leader gave up on it.
``job_result``     handler → the node the dispatch came from: ``{"dispatch_id", "job_id",
    "idempotency_key", "handler_id", "outcome": "success"|"error", "return_value", "error":
    {"type", "message"} | None, "duration_ms", "cached": bool}``. ``cached`` is true when the
    handler answered from its idempotency window instead of running the task again.
"""

from __future__ import annotations

HELLO = "handler_hello"
DISPATCH = "dispatch"
DISPATCH_ACK = "dispatch_ack"
DISPATCH_START = "dispatch_start"
JOB_RESULT = "job_result"

HEARTBEAT_INTERVAL = 0.5  # seconds between hellos
SUSPECT_AFTER = 1.5  # no hello for this long: no new dispatches
DEAD_AFTER = 3.0  # no hello for this long: shown dead, gets no new dispatches
START_WINDOW = 3.0  # a handler waits this long (its own clock) for dispatch_start
NOT_STARTED = "not_started"  # job_result outcome: the dispatch expired before it started

STALE_FENCING_TOKEN = "stale_fencing_token"
AT_CAPACITY = "at_capacity"
UNKNOWN_TASK = "unknown_task"
