"""HandlerRegistry: liveness from heartbeats and the circuit breaker, on an injected clock."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.dispatch.protocol import DEAD_AFTER, SUSPECT_AFTER
from mesh.dispatch.registry import (
    CIRCUIT_COOLDOWN,
    CIRCUIT_FAILURES,
    HandlerInfo,
    HandlerRegistry,
)
from tests.fakes import ManualClock


def hello(handler_id: str = "h1", **fields: Any) -> dict[str, Any]:
    return {
        "handler_id": handler_id,
        "tasks": ["echo"],
        "concurrency": 2,
        "pid": 100,
        "started_at": "2024-01-01T00:00:00Z",
        **fields,
    }


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def registry(clock: ManualClock) -> HandlerRegistry:
    return HandlerRegistry(clock=clock)


def open_circuit(registry: HandlerRegistry) -> HandlerInfo:
    """Handler h1, registered and failed CIRCUIT_FAILURES times in a row: its circuit is open."""
    info = registry.on_hello(hello())
    assert info is not None
    for _ in range(CIRCUIT_FAILURES):
        registry.record_failure(info)
    return info


def state_of(registry: HandlerRegistry, handler_id: str = "h1") -> str:
    return next(h["state"] for h in registry.to_json() if h["handler_id"] == handler_id)


def test_a_hello_registers_an_alive_handler_offering_its_tasks(registry: HandlerRegistry) -> None:
    info = registry.on_hello(hello(tasks=["echo", "slow"], concurrency=3))
    assert info is not None
    assert registry.state(info) == "alive"
    assert registry.offers("echo") and registry.offers("slow")
    assert not registry.offers("other")
    assert [h.handler_id for h in registry.routable("slow")] == ["h1"]
    [shown] = registry.to_json()
    assert (shown["state"], shown["tasks"], shown["concurrency"]) == ("alive", ["echo", "slow"], 3)


def test_a_handler_silent_past_suspect_after_is_suspect_and_offered_no_jobs(
    registry: HandlerRegistry, clock: ManualClock
) -> None:
    registry.on_hello(hello())
    clock.advance(SUSPECT_AFTER)
    assert state_of(registry) == "alive"
    clock.advance(0.01)
    assert state_of(registry) == "suspect"
    assert not registry.offers("echo")
    assert registry.routable("echo") == []


def test_a_handler_silent_past_dead_after_is_dead(
    registry: HandlerRegistry, clock: ManualClock
) -> None:
    registry.on_hello(hello())
    clock.advance(DEAD_AFTER)
    assert state_of(registry) == "suspect"
    clock.advance(0.01)
    assert state_of(registry) == "dead"


def test_a_new_hello_brings_a_dead_handler_back(
    registry: HandlerRegistry, clock: ManualClock
) -> None:
    registry.on_hello(hello())
    clock.advance(DEAD_AFTER + 1)
    registry.on_hello(hello())
    assert state_of(registry) == "alive"
    assert registry.offers("echo")


def test_a_draining_handler_is_shown_draining_and_offered_no_jobs(
    registry: HandlerRegistry,
) -> None:
    registry.on_hello(hello(draining=True))
    assert state_of(registry) == "draining"
    assert not registry.offers("echo")
    assert registry.routable("echo") == []


@pytest.mark.parametrize(
    "payload",
    [
        {"tasks": ["echo"]},  # no handler id
        hello(handler_id=""),
        hello(tasks="echo"),
        hello(concurrency=0),
        hello(active_jobs=-1),
        "not an object",
    ],
    ids=["no-id", "empty-id", "tasks-not-a-list", "zero-concurrency", "negative-count", "str"],
)
def test_a_malformed_hello_is_dropped(registry: HandlerRegistry, payload: Any) -> None:
    assert registry.on_hello(payload) is None
    assert registry.handlers == {}


# --------------------------------------------------------------------------- circuit breaker


def test_the_circuit_opens_after_consecutive_failures(registry: HandlerRegistry) -> None:
    info = registry.on_hello(hello())
    assert info is not None
    for _ in range(CIRCUIT_FAILURES - 1):
        registry.record_failure(info)
    assert registry.routable("echo") == [info]
    registry.record_failure(info)
    assert registry.routable("echo") == []
    assert state_of(registry) == "unhealthy"


def test_a_success_resets_the_count_of_consecutive_failures(registry: HandlerRegistry) -> None:
    info = registry.on_hello(hello())
    assert info is not None
    for _ in range(CIRCUIT_FAILURES - 1):
        registry.record_failure(info)
    registry.record_success(info)
    registry.record_failure(info)
    assert registry.routable("echo") == [info]


def test_an_open_circuit_lets_a_probe_through_after_the_cool_down(
    registry: HandlerRegistry, clock: ManualClock
) -> None:
    info = open_circuit(registry)
    clock.advance(CIRCUIT_COOLDOWN - 0.01)
    registry.on_hello(hello())  # still heartbeating: alive, but its circuit is open
    assert registry.routable("echo") == []
    clock.advance(0.02)
    assert registry.routable("echo") == [info]


def test_a_failed_probe_reopens_the_circuit_at_once(
    registry: HandlerRegistry, clock: ManualClock
) -> None:
    info = open_circuit(registry)
    clock.advance(CIRCUIT_COOLDOWN + 0.01)
    registry.on_hello(hello())
    registry.record_failure(info)  # one failure, not CIRCUIT_FAILURES more
    assert registry.routable("echo") == []
    assert state_of(registry) == "unhealthy"


def test_a_successful_probe_closes_the_circuit(
    registry: HandlerRegistry, clock: ManualClock
) -> None:
    info = open_circuit(registry)
    clock.advance(CIRCUIT_COOLDOWN + 0.01)
    registry.on_hello(hello())
    registry.record_success(info)
    registry.record_failure(info)
    assert registry.routable("echo") == [info]
    assert state_of(registry) == "alive"


def test_a_restarted_handler_starts_with_a_closed_circuit(registry: HandlerRegistry) -> None:
    info = open_circuit(registry)
    registry.on_hello(hello(pid=101, started_at="2024-01-01T00:05:00Z"))
    assert registry.routable("echo") == [info]
    assert state_of(registry) == "alive"
