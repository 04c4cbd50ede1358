"""Outcomes of a fire beyond APScheduler's ``JobOutcome``, and the exceptions that carry them.

APScheduler knows ``success``, ``error``, ``missed_start_deadline``, ``cancelled``,
``abandoned`` (and ``deserialization_failed``). The mesh's controls add three an execution
record (and ``GET /api/executions?outcome=``) can hold:

- ``timeout``: the run exceeded the schedule's ``timeout`` (docs/scheduling.md, "Timeout");
- ``skipped``: the fire did not run because of the schedule's ``overlap`` policy;
- ``no_handler``: no live handler matched the fire's ``target``.

A run that ends in one of them raises a :class:`MeshOutcome` subclass on the leader (an
APScheduler job that raises ends as ``error``); the data store records the subclass's
``outcome`` with the release, and the execution record shows it.
"""

from __future__ import annotations

from apscheduler import JobOutcome

MESH_OUTCOMES: tuple[str, ...] = ("timeout", "skipped", "no_handler")
# Outcomes the leader may name in a ``release_job`` command: the mesh's, and APScheduler's
# ``cancelled`` for a run stopped by the overlap policy ``cancel_other`` (RunCancelled).
LEADER_OUTCOMES: tuple[str, ...] = (*MESH_OUTCOMES, "cancelled")
# Every outcome an execution record can hold.
OUTCOMES: tuple[str, ...] = (*(o.name for o in JobOutcome), *MESH_OUTCOMES)
# Outcomes that count as a failed run (retry, ``keep_failed``, the ``failure`` alert).
FAILED: frozenset[str] = frozenset({"error", "timeout", "no_handler", "abandoned"})


class MeshOutcome(Exception):
    """A run that ended with one of :data:`MESH_OUTCOMES`."""

    outcome = "error"
    # The error ``type`` its execution record shows (None: the class's name).
    error_type: str | None = None


class JobTimedOut(MeshOutcome):
    outcome = "timeout"
    error_type = "TimeoutError"  # what the handler reports; not the leader's class name


class NoHandler(MeshOutcome):
    outcome = "no_handler"


class RunCancelled(MeshOutcome):
    """The run was stopped (or never started) because its schedule's ``cancel_other`` overlap
    policy asked it to: a newer fire takes its place."""

    outcome = "cancelled"


def outcome_of(exc: BaseException | None) -> str | None:
    """The mesh outcome an exception stands for, or None (APScheduler's own outcome stands)."""
    return exc.outcome if isinstance(exc, MeshOutcome) else None
