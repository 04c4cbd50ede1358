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
        """Rebuild a message; raises ValueError/KeyError/TypeError on a malformed dict.

        Every field is type-checked: a message off the wire must never put a non-integer term
        or index into the core (it would be persisted, or compared and crash mid-step).
        """
        if not isinstance(d, dict):
            raise TypeError("a raft message must be a JSON object")
        cls = _MESSAGE_TYPES.get(d.get("type", ""))
        if cls is None:
            raise ValueError(f"unknown raft message type {d.get('type')!r}")
        fields: dict[str, Any] = {}
        for f in attrs.fields(cls):
            if f.name not in d:
                if f.default is attrs.NOTHING:
                    raise KeyError(f"raft {cls.type} message lacks {f.name!r}")
                continue
            fields[f.name] = _check_field(cls.type, f.name, d[f.name])
        if "entries" in fields:
            fields["entries"] = tuple(_entry(e) for e in fields["entries"])
        if "snapshot" in fields:
            fields["snapshot"] = _snapshot(fields["snapshot"])
        return cls(**fields)


_INT_FIELDS = {
    "term",
    "last_log_index",
    "last_log_term",
    "prev_log_index",
    "prev_log_term",
    "leader_commit",
    "match_index",
    "reject_hint",
}
_STR_FIELDS = {"src", "dst"}
_BOOL_FIELDS = {"pre_vote", "transfer", "granted", "success"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


def _check_field(kind: str, name: str, value: Any) -> Any:
    ok = (
        (name in _INT_FIELDS and _is_int(value))
        or (name in _STR_FIELDS and isinstance(value, str) and 0 < len(value) <= 255)
        or (name in _BOOL_FIELDS and isinstance(value, bool))
        or (name == "entries" and isinstance(value, list))
        or (name == "snapshot" and isinstance(value, dict))
    )
    if not ok:
        raise TypeError(f"raft {kind} message: bad {name!r} {value!r:.60}")
    return value


def _entry(d: Any) -> Entry:
    if not isinstance(d, dict) or not all(_is_int(d.get(k)) for k in ("t", "i")):
        raise TypeError(f"bad raft entry {d!r:.80}")
    if d.get("k") not in (COMMAND, CONFIG, NOOP):
        raise ValueError(f"bad raft entry kind {d.get('k')!r:.40}")
    if d["k"] == CONFIG:
        voters = d.get("d", {}).get("voters") if isinstance(d.get("d"), dict) else None
        if not isinstance(voters, list) or not all(isinstance(v, str) for v in voters):
            raise TypeError("bad config entry: voters must be a list of node ids")
    return Entry.from_dict(d)


def _snapshot(d: dict[str, Any]) -> Snapshot:
    if not (_is_int(d.get("index")) and _is_int(d.get("term"))):
        raise TypeError("bad snapshot index/term")
    voters = d.get("voters")
    if not isinstance(voters, list) or not all(isinstance(v, str) for v in voters):
        raise TypeError("bad snapshot voters")
    if not isinstance(d.get("data", ""), str):
        raise TypeError("bad snapshot data")
    return Snapshot.from_dict(d)


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
