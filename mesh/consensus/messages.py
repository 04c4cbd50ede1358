"""Raft messages and log entries.

Frozen msgspec Structs. The same objects travel over ZeroMQ (as JSON objects: ``to_dict`` /
``from_dict``) and through the in-memory simulator. The annotations are the wire schema:
``from_dict`` checks every field against them and raises :class:`msgspec.ValidationError` (a
ValueError) on anything malformed, because a message off the wire must never put a non-integer
term or index into the core (it would be persisted, or compared and crash mid-step). Entry data
is the user's and stays opaque, except the voter list of a config entry.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# Entry kinds
COMMAND = "command"  # a state-machine command (a JSON-able dict)
CONFIG = "config"  # a membership change: data = {"voters": [...], "removed": [...]}
NOOP = "noop"  # appended by a new leader to commit entries of earlier terms

# A term or a log index: a plain non-negative int (never a bool or a float) below 2**48. A real
# cluster never gets near (2**48 terms at one election a millisecond is ~9,000 years); a forged
# huge term would otherwise stop elections for good, because no node could ever exceed it.
MAX_INDEX = 1 << 48
Index = Annotated[int, msgspec.Meta(ge=0, lt=MAX_INDEX)]
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
MAX_VOTERS = 1024  # node ids in a configuration (voters, removed)
# Entries in one AppendEntries: raft.max_append_entries (default 512) is what a leader sends; the
# bound keeps a forged message from making a follower allocate and persist without limit.
MAX_ENTRIES_PER_MESSAGE = 1 << 16
NodeIds = Annotated[list[NodeId], msgspec.Meta(max_length=MAX_VOTERS)]


_json = msgspec.json.Encoder()


class _Wire(msgspec.Struct, frozen=True):
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict this travels as (bytes as base64)."""
        return msgspec.to_builtins(self)

    def to_json(self) -> bytes:
        """``to_dict()`` as compact UTF-8 JSON, encoded in one pass (no intermediate dicts):
        what a Raft message travels as, and what an entry's size is counted in."""
        return _json.encode(self)

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        """Rebuild from a decoded JSON object; raises msgspec.ValidationError if malformed."""
        return msgspec.convert(d, cls)


class _ConfigData(msgspec.Struct):
    voters: NodeIds
    # Nodes removed through the admin API: never added back automatically (auto_join), only by
    # an explicit add. Absent when empty, so the wire shape of older entries is unchanged.
    removed: NodeIds = []


class Entry(_Wire, frozen=True, rename={"term": "t", "index": "i", "kind": "k", "data": "d"}):
    term: Index
    index: Index
    kind: Literal["command", "config", "noop"] = COMMAND
    data: Any = None

    def __post_init__(self) -> None:
        if self.kind == CONFIG:  # the core reads the voters: they must be node ids
            msgspec.convert(self.data, _ConfigData)


class Snapshot(_Wire, frozen=True, omit_defaults=True):
    """State-machine image covering every entry up to and including ``index``."""

    index: Index
    term: Index
    voters: Annotated[tuple[NodeId, ...], msgspec.Meta(max_length=MAX_VOTERS)]
    data: bytes = b""  # a bytearray too: a received image is handed over without a copy
    removed: Annotated[tuple[NodeId, ...], msgspec.Meta(max_length=MAX_VOTERS)] = ()


class HardState(msgspec.Struct, frozen=True):
    """What must be on disk (fsync'd) before a node answers anyone."""

    term: int = 0
    voted_for: str | None = None
    commit: int = 0


class Message(_Wire, frozen=True, kw_only=True, tag_field="type"):
    """Base of the Raft messages; on the wire ``type`` names the subclass (its ``tag``)."""

    src: NodeId
    dst: NodeId
    term: Index

    @property
    def type(self) -> str:
        return self.__struct_config__.tag  # type: ignore[return-value]

    @staticmethod
    def from_dict(d: Any) -> AnyMessage:
        """Rebuild a message of any type; raises msgspec.ValidationError if malformed."""
        return msgspec.convert(d, AnyMessage)  # type: ignore[arg-type]


class VoteRequest(Message, tag="vote"):
    last_log_index: Index
    last_log_term: Index
    pre_vote: bool = False
    # Set when the election was triggered by a leadership transfer: voters then ignore their
    # "I heard from a leader recently" guard (Raft §3.10 / etcd's campaignTransfer).
    transfer: bool = False


class VoteResponse(Message, tag="vote_resp"):
    granted: bool
    pre_vote: bool = False


class AppendEntries(Message, tag="append"):
    prev_log_index: Index
    prev_log_term: Index
    entries: Annotated[tuple[Entry, ...], msgspec.Meta(max_length=MAX_ENTRIES_PER_MESSAGE)] = ()
    leader_commit: Index = 0
    # Set on a heartbeat whose answer would tell the leader nothing new: a follower whose log
    # matches then stays silent (a rejection is always sent). Absent from older leaders, whose
    # followers answer every heartbeat as before.
    quiet: bool = False


class AppendResponse(Message, tag="append_resp"):
    success: bool
    # On success: the highest index known to match the leader's log.
    # On failure: a hint where the leader should retry (follower's last index + 1 or conflict).
    match_index: Index = 0
    reject_hint: Index = 0


class InstallSnapshot(Message, tag="snap"):
    snapshot: Snapshot


class TimeoutNow(Message, tag="timeout_now"):
    """Leader → transfer target: start an election right now (leadership transfer)."""


AnyMessage = (
    VoteRequest | VoteResponse | AppendEntries | AppendResponse | InstallSnapshot | TimeoutNow
)
