"""Raft messages off the wire: round trips, and every malformed field is rejected."""

from __future__ import annotations

import json

import msgspec
import pytest

from mesh.consensus.messages import (
    AppendEntries,
    AppendResponse,
    Entry,
    InstallSnapshot,
    Message,
    Snapshot,
    VoteRequest,
)

GOOD = [
    VoteRequest(src="a", dst="b", term=3, last_log_index=7, last_log_term=2, pre_vote=True),
    AppendEntries(
        src="a",
        dst="b",
        term=3,
        prev_log_index=1,
        prev_log_term=1,
        entries=(Entry(3, 2, "command", {"x": 1}), Entry(3, 3, "config", {"voters": ["a"]})),
        leader_commit=1,
    ),
    AppendResponse(src="b", dst="a", term=3, success=False, match_index=4, reject_hint=2),
    InstallSnapshot(src="a", dst="b", term=3, snapshot=Snapshot(5, 2, ("a", "b"), b"\x00data")),
]


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: m.type)
def test_messages_round_trip_through_dicts(msg: Message) -> None:
    assert Message.from_dict(msg.to_dict()) == msg


BAD_FIELDS = [
    ("term", 2.5),
    ("term", "3"),
    ("term", True),
    ("term", -1),
    ("prev_log_index", "x"),
    ("src", 5),
    ("src", ""),
    ("leader_commit", None),
    ("entries", {"t": 1}),
    ("entries", [{"t": 1, "i": "2", "k": "command"}]),
    ("entries", [{"t": 1, "i": 2, "k": "weird"}]),
    ("entries", [{"t": 1, "i": 2, "k": "config", "d": {"voters": "abc"}}]),
    ("entries", [{"t": 1, "i": 2, "k": "config", "d": None}]),
    ("entries", [{"t": 1, "i": 2, "k": "config", "d": {"voters": ["a", 3]}}]),
    ("entries", [{}]),
    ("entries", "xyz"),
    ("type", ["append"]),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_a_wrongly_typed_field_is_rejected(field: str, value: object) -> None:
    d = GOOD[1].to_dict()
    d[field] = value
    # One error type for every malformed message; it is a ValueError, which the node catches.
    with pytest.raises(msgspec.ValidationError):
        Message.from_dict(d)


BAD_SNAPSHOTS = [
    {"index": 1, "term": 1, "voters": 7},
    {"index": 1, "term": 1, "voters": [], "data": 5},
    {"index": 1, "term": 1, "voters": [], "data": "not base64!"},
    {"index": -1, "term": 1, "voters": []},
    {"term": 1, "voters": []},
]


@pytest.mark.parametrize("snapshot", BAD_SNAPSHOTS)
def test_a_malformed_snapshot_is_rejected(snapshot: dict) -> None:
    d = GOOD[3].to_dict()
    d["snapshot"] = snapshot
    with pytest.raises(msgspec.ValidationError):
        Message.from_dict(d)


def test_a_missing_required_field_is_rejected_naming_it() -> None:
    d = GOOD[0].to_dict()
    del d["last_log_term"]
    with pytest.raises(msgspec.ValidationError, match="last_log_term"):
        Message.from_dict(d)


@pytest.mark.parametrize("d", [{"type": "gossip", "src": "a", "dst": "b", "term": 1}, {}, [], 7])
def test_an_unknown_type_or_a_non_object_is_rejected(d: object) -> None:
    with pytest.raises(msgspec.ValidationError):
        Message.from_dict(d)


def test_the_wire_shape_is_unchanged() -> None:
    # Nodes of the previous release decode these keys: the field names are the wire format.
    # A field added since (``quiet``) is one they ignore: messages do not forbid unknown keys.
    d = json.loads(json.dumps(GOOD[1].to_dict()))
    assert d == {
        "type": "append",
        "src": "a",
        "dst": "b",
        "term": 3,
        "prev_log_index": 1,
        "prev_log_term": 1,
        "entries": [
            {"t": 3, "i": 2, "k": "command", "d": {"x": 1}},
            {"t": 3, "i": 3, "k": "config", "d": {"voters": ["a"]}},
        ],
        "leader_commit": 1,
        "quiet": False,
    }
    assert Message.from_dict({**d, "added_later": 1}) == GOOD[1]  # and so do we
    snap = json.loads(json.dumps(GOOD[3].to_dict()))["snapshot"]
    assert snap == {"index": 5, "term": 2, "voters": ["a", "b"], "data": "AGRhdGE="}


def test_entry_data_is_handed_over_untouched() -> None:
    data = {"op": "set", "value": [1, 2.5, None, {"nested": True}]}
    d = GOOD[1].to_dict()
    d["entries"] = [{"t": 3, "i": 2, "k": "command", "d": data}]
    (entry,) = Message.from_dict(d).entries
    assert entry.data is data
