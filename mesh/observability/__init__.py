"""Observability: the rotating JSONL event log and the state-db tables of broker_state.db."""

from mesh.observability.eventlog import EVENT_TYPES, EventLog, read_events
from mesh.observability.state_db import StateDB

__all__ = ["EVENT_TYPES", "EventLog", "StateDB", "read_events"]
