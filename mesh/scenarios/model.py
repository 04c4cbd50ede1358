"""The validated forms of a scenario (docs/scenarios.md, "Format").

A :class:`Scenario` is a loaded file: its parameters' defaults and its definition as plain JSON
(what the replicated state keeps). A :class:`Plan` is a scenario resolved with a run's
parameters: every ``${param}`` replaced, every action checked; only ``${iteration}`` is left,
for :func:`mesh.scenarios.format.expand` to fill in per action.
"""

from __future__ import annotations

from typing import Any

import attrs

STEP_TYPES = ("loop", "sleep", "action")
ON_ERROR = ("fail", "continue")
ON_LEADER_CHANGE = ("resume", "fail")
OPERATORS = (">=", "<=", "==", "!=", ">", "<")
METHODS = (
    "create_schedule",
    "delete_schedule",
    "pause_schedule",
    "resume_schedule",
    "run_job",
    "wait_for_fires",
    "http_get",
)
# Fire outcomes a run counts (mesh.scheduling.outcomes and the execution records).
FIRE_OUTCOMES = ("success", "failure", "timeout", "skipped", "missed", "no_handler")

# name → (unit, what it measures). The catalogue of what a scenario can report and assert on.
METRICS: dict[str, tuple[str, str]] = {
    "creation_rate": (
        "schedules/sec",
        "create_schedule actions per second of the steps doing them",
    ),
    "deletion_rate": (
        "schedules/sec",
        "delete_schedule actions per second of the steps doing them",
    ),
    "pause_rate": ("ops/sec", "pause_schedule actions per second of the steps doing them"),
    "resume_rate": ("ops/sec", "resume_schedule actions per second of the steps doing them"),
    "run_job_rate": ("jobs/sec", "run_job actions per second of the steps doing them"),
    "actions_total": ("count", "actions done"),
    "action_errors": ("count", "actions that failed"),
    "action_latency": ("ms", "95th percentile of the time one action took"),
    "http_latency": ("ms", "95th percentile of the time one http_get took"),
    "http_errors": ("count", "http_get actions that failed or had another status"),
    "memory_usage": ("MB", "peak resident memory of the node running the scenario"),
    "scheduler_latency": ("ms", "95th percentile of fire lateness of the run's schedules"),
    "scheduler_latency_p50": ("ms", "median fire lateness of the run's schedules"),
    "scheduler_latency_max": ("ms", "largest fire lateness of the run's schedules"),
    "fires_total": ("count", "fires of the run's schedules recorded"),
    **{
        f"fires_{o}": ("count", f"fires of the run's schedules recorded with outcome {o}")
        for o in FIRE_OUTCOMES
    },
    "duration_seconds": ("s", "wall time of the run, from its start to its end"),
}
# Always in a result, whatever the scenario lists.
ALWAYS_REPORTED = ("duration_seconds", "actions_total", "action_errors", "fires_total")

NAME_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
PARAMETER_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
MAX_SOURCE_BYTES = 64 * 1024
MAX_STEPS = 100
MAX_ITERATIONS = 100_000
MAX_CONCURRENCY = 64
MAX_PARAMETERS = 50
MAX_DEPENDS_ON = 10
MAX_TOTAL_ACTIONS = 1_000_000
MAX_SLEEP_SECONDS = 86_400.0
DEFAULT_TIMEOUT_SECONDS = 3600.0

Scalar = int | float | bool | str


class ScenarioError(ValueError):
    """A scenario (or a run's parameters) that cannot be used; the message says where and why,
    in one line (a YAML mistake: with its line and column)."""


@attrs.frozen
class Action:
    method: str  # one of METHODS
    args: dict[str, Any]  # resolved but for ``${iteration}`` (and ``${run_id}``)


@attrs.frozen
class Step:
    name: str
    type: str  # one of STEP_TYPES
    action: Action | None = None  # loop and action steps
    iterations: int = 1  # a loop's; 1 for an action step
    concurrency: int = 1
    on_error: str = "fail"
    duration: float = 0.0  # a sleep's, in seconds


@attrs.frozen
class Assertion:
    expr: str  # as written, after substitution: "creation_rate > 100"
    metric: str
    op: str  # one of OPERATORS
    threshold: float

    def holds(self, value: float | None) -> bool:
        if value is None:
            return False
        return {
            ">": value > self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            "<=": value <= self.threshold,
            "==": value == self.threshold,
            "!=": value != self.threshold,
        }[self.op]


@attrs.frozen
class Scenario:
    """A loaded scenario file."""

    name: str
    description: str
    parameters: dict[str, Scalar]  # name → default
    depends_on: tuple[str, ...]
    definition: dict[str, Any]  # the file's ``test`` mapping as plain JSON (replicated)
    version: str  # the first 16 hex digits of the source's SHA-256


@attrs.frozen
class Plan:
    """A scenario resolved with one run's parameters: what the runner executes."""

    name: str
    parameters: dict[str, Scalar]  # every parameter's value for this run
    steps: tuple[Step, ...]
    metrics: dict[str, str]  # name → unit: what the result reports, in order
    assertions: tuple[Assertion, ...]
    timeout: float
    on_leader_change: str  # one of ON_LEADER_CHANGE
