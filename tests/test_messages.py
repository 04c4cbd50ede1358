"""Raft messages off the wire: round trips, and every malformed field is rejected."""

from __future__ import annotations

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
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_a_wrongly_typed_field_is_rejected(field: str, value: object) -> None:
    d = GOOD[1].to_dict()
    d[field] = value
    with pytest.raises((TypeError, ValueError, KeyError)):
        Message.from_dict(d)


def test_a_missing_required_field_is_rejected() -> None:
    d = GOOD[0].to_dict()
    del d["last_log_term"]
    with pytest.raises(KeyError):
        Message.from_dict(d)


def test_an_unknown_type_is_rejected() -> None:
    with pytest.raises(ValueError):
        Message.from_dict({"type": "gossip", "src": "a", "dst": "b", "term": 1})
