"""The schedule body's added fields (mesh.scheduling.controls): parsed, stored, shown."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mesh.api.schema import BadRequest, parse_schedule_body, schedule_to_json
from mesh.scheduling import controls
from mesh.scheduling.controls import Controls, Retry, controls_of, with_controls

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
BASE = {"task": "t", "trigger": {"type": "interval", "seconds": 5}}


def parse(**fields: Any) -> Any:
    return parse_schedule_body({**BASE, **fields}, now=NOW)


def test_defaults_store_nothing_in_metadata() -> None:
    spec = parse(metadata={"owner": "ops"})
    assert spec.controls == controls.DEFAULT
    assert with_controls(spec.metadata, spec.controls) == {"owner": "ops"}


def test_every_added_field_is_parsed_and_round_trips_through_metadata() -> None:
    body = {
        "overlap": "buffer_one",
        "retry": {"max_attempts": 4, "initial_delay": 0.5, "max_delay": 8, "multiplier": 3,
                  "on_exhausted": "pause"},
        "timeout": 2.5,
        "target": {"tags": {"region": "eu"}, "broadcast": True},
        "history": {"keep_success": 5, "keep_failed": 50},
        "remaining_runs": 10,
        "notify": {"webhook": "https://ops.example/hook", "on": ["failure", "paused"]},
        "note": "  why  ",
    }  # fmt: skip
    spec = parse(**body)
    stored = with_controls(spec.metadata, spec.controls)
    assert set(stored) == {controls.KEY}
    got = controls_of(stored)
    assert got == spec.controls
    assert got.note == "why"
    assert got.retry == Retry(max_attempts=4, initial_delay=0.5, max_delay=8, multiplier=3,
                              on_exhausted="pause")  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "starts"),
    [
        ({"overlap": "sometimes"}, "overlap: must be one of"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts: must be an integer from 1"),
        ({"retry": {"initial_delay": 10, "max_delay": 1}}, "retry.max_delay: must be at least"),
        ({"retry": {"on_exhausted": "explode"}}, "retry.on_exhausted: must be one of"),
        ({"retry": {"tries": 3}}, "unknown field 'tries'"),
        ({"timeout": 0}, "timeout: must be a number of seconds > 0"),
        ({"timeout": -1}, "timeout: must be"),
        ({"target": {"tags": {"bad key!": "x"}}}, "target.tags"),
        ({"target": {"tags": {"k": "v" * 200}}}, "target.tags"),
        ({"history": {"keep_success": -1}}, "history.keep_success"),
        ({"remaining_runs": -2}, "remaining_runs: must be"),
        ({"notify": {"webhook": "ftp://x"}}, "notify.webhook: must be an http"),
        ({"notify": {"webhook": "https://x", "on": ["sometimes"]}}, "notify.on"),
        ({"notify": {"webhook": "https://x", "on": []}}, "notify.on: must name"),
        ({"note": "x" * 1001}, "note: must be a text of at most 1000"),
        ({"metadata": {"schedulezero": {"overlap": "skip"}}}, "metadata.schedulezero: this key"),
    ],
)
def test_bad_added_fields_get_a_400_naming_the_field(fields: dict[str, Any], starts: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse(**fields)
    assert starts in str(info.value)


def test_a_stored_value_this_version_cannot_read_counts_as_no_controls() -> None:
    assert controls_of({controls.KEY: {"overlap": "from-the-future"}}) == controls.DEFAULT
    assert controls_of({"owner": "x"}) == controls.DEFAULT


def test_the_api_shows_the_controls_as_fields_and_hides_the_key() -> None:
    from apscheduler import Schedule
    from apscheduler.triggers.interval import IntervalTrigger

    c = Controls(overlap="skip", remaining_runs=3)
    s = Schedule(id="a", task_id="t", trigger=IntervalTrigger(seconds=5, start_time=NOW),
                 job_executor="x", metadata=with_controls({"owner": "o"}, c))  # fmt: skip
    shown = schedule_to_json(s)
    assert shown["metadata"] == {"owner": "o"}
    assert shown["overlap"] == "skip" and shown["remaining_runs"] == 3
    # What the API shows is accepted back as a body with the same controls.
    body = {k: shown[k] for k in ("task", "trigger", "overlap", "remaining_runs", "retry")}
    assert parse_schedule_body(body, now=NOW).controls == c


@pytest.mark.parametrize(("failures", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0)])
def test_retry_delay_is_exponential_and_capped(failures: int, delay: float) -> None:
    assert Retry(initial_delay=1, multiplier=2, max_delay=60).delay(failures) == delay


def test_retry_delay_with_a_huge_multiplier_does_not_overflow() -> None:
    assert Retry(initial_delay=1, multiplier=100, max_delay=604800).delay(100) == 604800


def test_notify_alerts_on_every_event_of_a_fire_that_did_not_run_as_it_should_by_default() -> None:
    from mesh.config import NotifyConfig

    spec = parse(notify={"webhook": "https://ops.example/hook"})
    assert spec.controls.notify is not None
    want = ["failure", "missed", "skipped", "timeout", "no_handler"]
    assert spec.controls.notify.on == want
    assert list(NotifyConfig().on) == want  # the cluster default's, the same
