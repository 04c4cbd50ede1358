"""Per-schedule fire metrics: fires by outcome, skipped and missed fires by reason, lateness.

Fed by every execution record the state machine writes (``SchedulerState._record``) and by the
missed fire times the catch-up cap leaves out, so every node counts the same fires (like the
``fires_*`` counters), whichever is leader. They are not part of the replicated image: a node
counts from its start (or from the snapshot it installed), as Prometheus counters do after a
restart.

Label cardinality is bounded: the first ``max_schedules`` schedules seen get their own series,
every later one is counted under ``schedule_id="_other"`` (docs/observability.md).
Pure data: no clock, no I/O; GET /metrics reads :meth:`FireMetrics.export`.
"""

from __future__ import annotations

import bisect
import collections
from datetime import datetime
from typing import Any

__all__ = ["BUCKETS", "OTHER", "FireMetrics", "Lateness", "lateness"]

OTHER = "_other"
DEFAULT_MAX_SCHEDULES = 100
# Seconds from a fire's scheduled time (jitter included) to its start.
BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class Lateness:
    """A histogram: counts per bucket of :data:`BUCKETS` (and one above), their sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)  # a start a clock skew puts before its time counts as on time
        self.sum += seconds
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bound >= seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: ``(le, count of observations <= le)``, ending with ``+Inf``."""
        out, total = [], 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


def lateness(ex: dict[str, Any], late: float | None = None) -> float | None:
    """A record's lateness in seconds: ``late`` when the caller has it, else from the record
    (start minus scheduled fire time); None for a run that never started."""
    if late is None:
        started, scheduled = ex.get("started_at"), ex.get("scheduled_fire_time")
        if started and scheduled:
            late = (
                datetime.fromisoformat(started) - datetime.fromisoformat(scheduled)
            ).total_seconds()
    return late


class FireMetrics:
    def __init__(self, max_schedules: int = DEFAULT_MAX_SCHEDULES) -> None:
        self.max_schedules = max_schedules
        self._own: set[str] = set()
        self.fires: collections.Counter[tuple[str, str]] = collections.Counter()
        self.skipped: collections.Counter[tuple[str, str]] = collections.Counter()
        self.missed: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lateness: dict[str, Lateness] = {}
        self.lateness_all = Lateness()

    def label(self, schedule_id: str) -> str:
        """The ``schedule_id`` label of a schedule: its id, or :data:`OTHER` past the bound."""
        if schedule_id in self._own:
            return schedule_id
        if len(self._own) < self.max_schedules:
            self._own.add(schedule_id)
            return schedule_id
        return OTHER

    def record(self, ex: dict[str, Any], late: float | None = None) -> None:
        """Count one execution record (run-now jobs, which have no schedule, are not fires);
        ``late``: its lateness in seconds when the caller has it (else read from the record)."""
        sid = ex.get("schedule_id")
        if sid is None:
            return
        label = self.label(sid)
        outcome = ex.get("outcome") or "unknown"
        self.fires[(label, outcome)] += 1
        if outcome == "skipped":
            self.skipped[(label, ex.get("reason") or "unknown")] += 1
        elif outcome == "missed_start_deadline":
            self.missed[(label, "start_deadline")] += 1
        late = lateness(ex, late)
        if late is not None:
            self.lateness_all.observe(late)
            self.lateness.setdefault(label, Lateness()).observe(late)

    def missed_by_catch_up(self, schedule_id: str, n: int) -> None:
        """``n`` missed fire times the coalesce "all" catch-up cap did not run."""
        if n:
            self.missed[(self.label(schedule_id), "catch_up_cap")] += n

    def export(self) -> dict[str, Any]:
        """A copy for one scrape."""
        return {
            "fires": dict(self.fires),
            "skipped": dict(self.skipped),
            "missed": dict(self.missed),
            "lateness": {sid: (h.cumulative(), h.sum) for sid, h in self.lateness.items()},
            "lateness_all": (self.lateness_all.cumulative(), self.lateness_all.sum),
        }
