"""The ``overlap`` control: what a fire does while its schedule's previous run is unfinished.

Temporal's five policies (docs/scheduling.md, "overlap"):

- ``allow_all`` (the default): every fire time runs, whatever is still running.
- ``skip``: the fire does not run; it is recorded with outcome ``skipped``.
- ``buffer_one``: the fire is held until the schedule's runs have finished, then runs; at most
  one fire is held, a further one is skipped.
- ``buffer_all``: every fire is held, and they run one after another in fire-time order (at
  most :data:`MAX_BUFFERED` held; beyond that a fire is skipped).
- ``cancel_other``: the runs still going are asked to stop (outcome ``cancelled``) and the fire
  is held until they have; runs that never started end at once as ``cancelled``.

Pure decisions over the schedule's open jobs (``SchedulerState.open_jobs``): no clock, no I/O.
The state machine applies them when a job enters (``_admit``) and when one finishes
(``_op_release_job``), so every node, and every later leader, holds the same decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import attrs

if TYPE_CHECKING:
    from mesh.scheduling.state import JobState

MAX_BUFFERED = 1000  # held jobs per schedule under buffer_all (Temporal bounds its buffer too)
REASON = "overlap"  # the ``reason`` of records the policies write

Action = Literal["run", "hold", "skip"]


@attrs.frozen
class Decision:
    """What a new job of the schedule does, and what happens to its older open jobs:
    ``stop`` are asked to stop (flagged ``cancel``), ``drop`` never started and end now."""

    action: Action
    stop: tuple[JobState, ...] = ()
    drop: tuple[JobState, ...] = ()


RUN = Decision("run")


def decide(policy: str, open_jobs: Sequence[JobState], origin: str) -> Decision:
    """The decision for a new job of ``origin`` given the schedule's ``open_jobs`` (oldest
    first). A retry continues the run that failed (it held the schedule's slot), and a backfill
    runs its times one after another on its own, so no policy applies to either."""
    if policy == "allow_all" or not open_jobs or origin in ("retry", "backfill"):
        return RUN
    held = [js for js in open_jobs if js.held]
    if policy == "skip":
        return Decision("skip")
    if policy == "buffer_one":
        return Decision("skip" if held else "hold")
    if policy == "buffer_all":
        return Decision("skip" if len(held) >= MAX_BUFFERED else "hold")
    if policy == "cancel_other":
        drop = tuple(js for js in open_jobs if js.held or not _may_have_started(js))
        stop = tuple(js for js in open_jobs if js not in drop)
        return Decision("hold" if stop else "run", stop=stop, drop=drop)
    return RUN  # a policy this version does not know (written by a newer one): no control


def _may_have_started(js: JobState) -> bool:
    """Whether the job may be running somewhere: leased to a leader now, or dispatched to a
    handler by an earlier one (the lease was reset, the handler may still run it)."""
    return js.job.acquired_by is not None or js.handler is not None


def next_to_release(open_jobs: Sequence[JobState]) -> JobState | None:
    """The held job to run now that a run finished: the oldest held one, once no other run
    of the schedule is unfinished."""
    if any(not js.held for js in open_jobs):
        return None
    return open_jobs[0] if open_jobs else None


def rebased_deadline(js: JobState, released_at: datetime) -> datetime | None:
    """A released job's start deadline, measured from its release instead of its fire time:
    it waited on purpose, and its misfire grace time starts when it may run."""
    job = js.job
    if job.start_deadline is None or job.scheduled_fire_time is None:
        return job.start_deadline
    start = max(released_at, job.scheduled_fire_time)
    return start + (job.start_deadline - job.scheduled_fire_time)
