"""Raft messages and log entries.

Plain frozen attrs classes. Every message knows how to turn itself into a JSON-able dict and back,
so the same objects travel over ZeroMQ and through the in-memory simulator.
"""

from __future__ import annotations

import base64
from typing import Any, ClassVar

import attrs

# Entry kinds
COMMAND = "command"  # a state-machine command (a JSON-able dict)
CONFIG = "config"  # a membership change: data = {"voters": [...]}
NOOP = "noop"  # appended by a new leader to commit entries of earlier terms


@attrs.frozen
class Entry:
    term: int
    index: int
    kind: str = COMMAND
    data: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.term, "i": self.index, "k": self.kind, "d": self.data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        return cls(term=int(d["t"]), index=int(d["i"]), kind=str(d["k"]), data=d.get("d"))


@attrs.frozen
class Snapshot:
    """State-machine image covering every entry up to and including ``index``."""

    index: int
    term: int
    voters: tuple[str, ...]
    data: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "term": self.term,
            "voters": list(self.voters),
            "data": base64.b64encode(self.data).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Snapshot:
        return cls(
            index=int(d["index"]),
            term=int(d["term"]),
            voters=tuple(str(v) for v in d["voters"]),
            data=base64.b64decode(d.get("data") or b""),
        )


@attrs.frozen
class HardState:
    """What must be on disk (fsync'd) before a node answers anyone."""

    term: int = 0
    voted_for: str | None = None
    commit: int = 0


_MESSAGE_TYPES: dict[str, type[Message]] = {}


@attrs.frozen(kw_only=True)
class Message:
    type: ClassVar[str] = ""
    src: str
    dst: str
    term: int

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.type:
            _MESSAGE_TYPES[cls.type] = cls

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["type"] = self.type
        if "entries" in d:
            d["entries"] = [e.to_dict() for e in d["entries"]]
        if "snapshot" in d:
            d["snapshot"] = d["snapshot"].to_dict()
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Message:
        """Rebuild a message; raises ValueError/KeyError/TypeError on a malformed dict."""
        cls = _MESSAGE_TYPES.get(d.get("type", ""))
        if cls is None:
            raise ValueError(f"unknown raft message type {d.get('type')!r}")
        fields = {f.name: d[f.name] for f in attrs.fields(cls) if f.name in d}
        if "entries" in fields:
            fields["entries"] = tuple(Entry.from_dict(e) for e in fields["entries"])
        if "snapshot" in fields:
            fields["snapshot"] = Snapshot.from_dict(fields["snapshot"])
        return cls(**fields)


@attrs.frozen(kw_only=True)
class VoteRequest(Message):
    type: ClassVar[str] = "vote"
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    # Set when the election was triggered by a leadership transfer: voters then ignore their
    # "I heard from a leader recently" guard (Raft §3.10 / etcd's campaignTransfer).
    transfer: bool = False


@attrs.frozen(kw_only=True)
class VoteResponse(Message):
    type: ClassVar[str] = "vote_resp"
    granted: bool
    pre_vote: bool = False


@attrs.frozen(kw_only=True)
class AppendEntries(Message):
    type: ClassVar[str] = "append"
    prev_log_index: int
    prev_log_term: int
    entries: tuple[Entry, ...] = ()
    leader_commit: int = 0


@attrs.frozen(kw_only=True)
class AppendResponse(Message):
    type: ClassVar[str] = "append_resp"
    success: bool
    # On success: the highest index known to match the leader's log.
    # On failure: a hint where the leader should retry (follower's last index + 1 or conflict).
    match_index: int = 0
    reject_hint: int = 0


@attrs.frozen(kw_only=True)
class InstallSnapshot(Message):
    type: ClassVar[str] = "snap"
    snapshot: Snapshot


@attrs.frozen(kw_only=True)
class TimeoutNow(Message):
    """Leader → transfer target: start an election right now (leadership transfer)."""

    type: ClassVar[str] = "timeout_now"
