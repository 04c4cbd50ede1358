"""The handler protocol's payload types, and the registry's reading of handler hellos."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from mesh.dispatch.protocol import NOT_STARTED, DispatchAck, JobResult, decode
from mesh.dispatch.registry import HandlerRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hello(**fields: Any) -> dict[str, Any]:
    """A hello as a handler sends it, with ``fields`` overriding."""
    payload: dict[str, Any] = {
        "handler_id": "h1",
        "tasks": ["a", "b"],
        "concurrency": 4,
        "pid": 1234,
        "host": "box",
        "active_jobs": 1,
        "succeeded": 5,
        "failed": 2,
        "avg_ms": 12.5,
        "max_fencing_token": 3,
        "started_at": "2026-01-01T00:00:00+00:00",
        "draining": False,
    }
    payload.update(fields)
    return payload


def test_a_hello_is_recorded_in_the_registry() -> None:
    registry = HandlerRegistry(clock=Clock())
    info = registry.on_hello(hello())
    assert info is registry.handlers["h1"]
    assert (info.tasks, info.concurrency, info.pid, info.host) == (
        frozenset({"a", "b"}),
        4,
        1234,
        "box",
    )
    [row] = registry.to_json()
    assert (row["active_jobs"], row["succeeded"], row["failed"], row["avg_ms"]) == (1, 5, 2, 12.5)
    assert row["state"] == "alive"


def test_a_minimal_hello_gets_the_defaults() -> None:
    registry = HandlerRegistry(clock=Clock())
    info = registry.on_hello({"handler_id": "h1", "tasks": []})
    assert (info.concurrency, info.pid, info.host, info.draining) == (1, None, None, False)


@pytest.mark.parametrize(
    "fields",
    [
        {"handler_id": ""},
        {"handler_id": 7},
        {"tasks": "a,b"},
        {"tasks": ["a", 5]},
        {"concurrency": 0},
        {"concurrency": "4"},
        {"pid": "1234"},
        {"active_jobs": -1},
        {"avg_ms": "fast"},
        {"draining": "yes"},
    ],
)
def test_a_malformed_hello_is_dropped_and_changes_nothing(fields: dict[str, Any]) -> None:
    clock = Clock()
    registry = HandlerRegistry(clock=clock)
    registry.on_hello(hello())
    clock.now += 10  # dead by now, unless the malformed hello counted as a heartbeat
    assert registry.on_hello(hello(**fields)) is None
    info = registry.handlers["h1"]
    assert registry.state(info) == "dead"
    assert (info.tasks, info.concurrency) == (frozenset({"a", "b"}), 4)


def test_a_hello_lacking_its_handler_id_is_dropped() -> None:
    registry = HandlerRegistry(clock=Clock())
    payload = hello()
    del payload["handler_id"]
    assert registry.on_hello(payload) is None
    assert registry.handlers == {}


def test_a_not_started_result_decodes_without_the_fields_of_a_run() -> None:
    result = decode(
        {
            "dispatch_id": "d1",
            "handler_id": "h1",
            "outcome": NOT_STARTED,
            "error": {"type": "NotStarted", "message": "late"},
        },
        JobResult,
    )
    assert (result.outcome, result.job_id, result.error.type) == (NOT_STARTED, None, "NotStarted")


@pytest.mark.parametrize(
    "payload",
    [
        {"dispatch_id": "d1", "handler_id": "h1", "outcome": "maybe"},
        {"dispatch_id": "d1", "handler_id": "h1", "outcome": "error", "error": "boom"},
        {"dispatch_id": "d1", "handler_id": "h1", "outcome": "error", "error": {"type": 1}},
        {"handler_id": "h1", "outcome": "success"},
    ],
)
def test_a_malformed_result_is_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(payload, JobResult)


@pytest.mark.parametrize(
    "payload",
    [
        {"dispatch_id": "d1", "handler_id": "h1"},
        {"dispatch_id": "d1", "handler_id": "h1", "accepted": "yes"},
        {"dispatch_id": None, "handler_id": "h1", "accepted": True},
        {"dispatch_id": "d1", "handler_id": "h1", "accepted": False, "reason": 3},
    ],
)
def test_a_malformed_ack_is_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(payload, DispatchAck)
