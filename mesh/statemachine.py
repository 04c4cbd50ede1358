"""The replicated state machine contract.

Every node applies the same committed entries in the same order to its state machine. Commands
carry resulting state, never clock-dependent calls, so applying them is deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from mesh.consensus.messages import COMMAND, Entry


class StateMachine(Protocol):
    def apply(self, entry: Entry) -> Any:
        """Apply one committed entry; the return value answers the proposer."""

    def snapshot(self) -> bytes:
        """The whole state, for log compaction and for followers that fell behind."""

    def snapshot_chunks(self) -> Iterable[bytes]:
        """The bytes of ``snapshot()`` in pieces, for a writer that streams them to a file."""

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's."""


class KVStateMachine:
    """A minimal key-value state machine: the mesh core's default and its test subject."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def apply(self, entry: Entry) -> Any:
        if entry.kind != COMMAND or not isinstance(entry.data, dict):
            return None
        op = entry.data.get("op")
        if op == "set":
            self.data[entry.data["key"]] = entry.data.get("value")
            return entry.data.get("value")
        if op == "delete":
            return self.data.pop(entry.data["key"], None)
        return None

    def snapshot(self) -> bytes:
        return json.dumps(self.data, sort_keys=True).encode()

    def snapshot_chunks(self) -> Iterable[bytes]:
        return (self.snapshot(),)

    def restore(self, data: bytes) -> None:
        self.data = json.loads(data) if data else {}
