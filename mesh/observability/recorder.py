"""Observability as a subscriber: the node reports events, this records them.

The node, membership and snapshot code emit events to an ``EventBus`` (an ``EventSink``) and do
not know who listens. The ``Recorder`` subscribes and writes:

- every event to the rotating JSONL event log (``events.jsonl``);
- leadership changes to ``broker_state.db``'s ``leadership_log``; peer and node state to its
  ``instances``; peer state changes as counts to ``event_metrics`` (flushed every
  ``METRICS_FLUSH_SECONDS``);
- warnings and errors of the ``mesh`` loggers to its ``node_log``.

Tests subscribe to the same bus to wait on an event instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from mesh.observability.eventlog import EventLog
from mesh.observability.logredact import RedactingFilter
from mesh.observability.state_db import StateDB

log = logging.getLogger("mesh.observability")

METRICS_FLUSH_SECONDS = 10.0  # event_metrics rows in broker_state.db are written this often

# Events that only feed broker_state.db: they are not part of the documented JSONL stream.
STATE_DB_ONLY = frozenset({"leader_observed"})

Subscriber = Callable[[str, dict[str, Any]], None]


class EventBus:
    """Fan-out of events to subscribers; a failing subscriber is logged and skipped."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(event, fields)`` for every event; returns a function that unsubscribes."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def emit(self, event: str, **fields: Any) -> None:
        for fn in list(self._subscribers):
            try:
                fn(event, fields)
            except Exception:  # observability must never take the node down
                log.exception("event subscriber failed on %s", event)


class _StateDBLogHandler(logging.Handler):
    """Warnings and errors of this node also go to broker_state.db's node_log table."""

    def __init__(self, statedb: StateDB) -> None:
        super().__init__(logging.WARNING)
        self.statedb = statedb

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.statedb.log(record.levelname, record.getMessage(), logger=record.name)
        except Exception:  # the log must never take the node down
            self.handleError(record)


class Recorder:
    def __init__(
        self,
        node_id: str,
        *,
        mesh_address: str,
        http_address: str,
        eventlog: EventLog,
        statedb: StateDB,
    ) -> None:
        self.node_id = node_id
        self.mesh_address = mesh_address
        self.http_address = http_address
        self.eventlog = eventlog
        self.statedb = statedb
        self._log_handler = _StateDBLogHandler(statedb)
        # It runs before the root logger's handlers: it needs its own filter.
        self._log_handler.addFilter(RedactingFilter(eventlog.sensitive_keys))
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        logging.getLogger("mesh").addHandler(self._log_handler)
        self._task = asyncio.get_running_loop().create_task(
            self._flush_loop(), name="metrics-flush"
        )

    def _close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        logging.getLogger("mesh").removeHandler(self._log_handler)
        self.statedb.close()
        self.eventlog.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_SECONDS)
            self.statedb.flush_metrics()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event not in STATE_DB_ONLY:
            self.eventlog.emit(event, **fields)
        db = self.statedb
        # The recorder lives as long as the node: it starts and ends with the node's events.
        if event == "node_started":
            self._own_instance("alive", fields.get("role"))
            self._start()
        elif event == "node_stopped":
            self._own_instance("stopped", None)
            self._close()
        elif event == "leader_elected":
            db.record_leadership(self.node_id, fields["term"], "elected")
        elif event == "stepped_down":
            db.record_leadership(
                self.node_id, fields["term"], "stepped_down", detail=str(fields.get("new_leader"))
            )
        elif event == "leader_observed":
            db.record_leadership(fields["leader"], fields["term"], "observed")
        elif event == "leadership_transferred" and fields.get("succeeded"):
            db.record_leadership(
                self.node_id, fields["term"], "transferred", detail=f"to {fields.get('target')}"
            )
        elif event in ("peer_up", "peer_suspect", "peer_down"):
            db.count(event)
            if fields.get("peer"):
                db.upsert_instance(
                    fields["peer"],
                    pid=None,
                    mesh_address=fields.get("address"),
                    http_address=fields.get("http"),
                    state={"peer_up": "alive", "peer_suspect": "suspect"}.get(event, "dead"),
                    role=fields.get("role"),
                )

    def _own_instance(self, state: str, role: str | None) -> None:
        self.statedb.upsert_instance(
            self.node_id,
            pid=os.getpid(),
            mesh_address=self.mesh_address,
            http_address=self.http_address,
            state=state,
            role=role,
        )
