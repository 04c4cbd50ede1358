"""The chaos checker's retry rule on made-up histories: each kind of violation is caught."""

from __future__ import annotations

from typing import Any

import pytest

from chaos.checker import RETRY_MARGIN, check_retries
from chaos.workload_tasks import failing_tries
from mesh.scheduling.controls import Retry

RETRY = Retry(max_attempts=3, initial_delay=0.3, multiplier=2)
STOP = 1000.0


def key_failing(k: int) -> str:
    """A fire's idempotency key whose first ``k`` tries fail."""
    return next(
        key
        for n in range(1000)
        if failing_tries(key := f"retry-0@2026-01-01T00:00:{n:02d}+00:00", 3) == k
    )


def history(key: str, *runs: tuple[int, float]) -> list[dict[str, Any]]:
    return [{"schedule_id": "retry-0", "key": key, "try": t, "at": at} for t, at in runs]


def violations(records: list[dict[str, Any]]) -> list[str]:
    return check_retries(records, {"retry-0": RETRY}, STOP)["violations"]


def test_a_clean_history_passes() -> None:
    records = (
        history(key_failing(0), (1, 10.0))
        + history(key_failing(2), (1, 10.0), (2, 10.4), (3, 11.1))
        + history(key_failing(3), (1, 10.0), (2, 10.4), (3, 11.1))  # exhausted
        + history(key_failing(1), (1, STOP - 1))  # too close to the end to judge
    )
    assert violations(records) == []


@pytest.mark.parametrize(
    ("runs", "found"),
    [
        (((1, 10.0), (1, 10.5), (2, 11.0)), "ran twice"),
        (((1, 10.0), (2, 10.1)), "after the failed one"),
        (((1, 10.0),), "retry lost"),
        (((1, 10.0), (2, 10.4), (3, 11.1)), "beyond the last one due"),
    ],
)
def test_each_violation_is_caught(runs: tuple[tuple[int, float], ...], found: str) -> None:
    assert any(found in v for v in violations(history(key_failing(1), *runs)))


def test_the_margin_covers_every_backoff() -> None:
    assert RETRY_MARGIN > sum(RETRY.delay(t) for t in range(1, RETRY.max_attempts))
