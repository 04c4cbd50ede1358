"""The alert outbox: which ``notify`` events are still to be sent, replicated with the state.

The state machine records an alert event when an execution record is written
(``SchedulerState._record``) or a schedule goes from running to paused
(``SchedulerState._put_schedule``), in the same apply, so every node holds the same outbox:

- a record's outcome names the event: ``error`` and ``abandoned`` are ``failure``,
  ``missed_start_deadline`` is ``missed``; ``skipped``, ``timeout`` and ``no_handler`` are
  themselves. A failed run followed by a retry (its record carries ``retry_at``) is not the
  fire's last word: it alerts nothing; the last try's record does.
- the target is the schedule's ``notify``, else the cluster default; the event is recorded only
  when that target's ``on`` lists it. The default is *replicated* (``notify_default``, which a
  leader commits from its config when it takes office), never read from a node's config during
  apply: nodes may have different configs and must still record the same events.

Each event has a stable id (``uuid5`` of its sequence number in the outbox and what it is
about): it is the alert's idempotency key, the same whichever leader sends it and however often.
The leader's sender (``mesh.dispatch.alerts``) posts it and commits ``alerts_done``; until then
the event stays, so a new leader sends what the old one did not confirm (the receiver
deduplicates by key). The outbox is bounded: past :data:`MAX_OUTBOX` the oldest event is dropped,
counted and logged. Pure data: no clock, no I/O.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from apscheduler import Schedule

from mesh.scheduling import outcomes
from mesh.scheduling.controls import Notify, controls_of

__all__ = ["MAX_OUTBOX", "RECORD_EVENTS", "Outbox", "event_of_record"]

log = logging.getLogger("mesh.scheduling.alerts")

MAX_OUTBOX = 1000  # a constant, not a setting: every node must drop the same events
_NAMESPACE = uuid.UUID("2f6c2a8e-5d0b-4d57-9a57-0c1d3f4e6a10")
# The event a record's outcome stands for (outcomes not listed alert nothing).
RECORD_EVENTS: dict[str, str] = {
    "error": "failure",
    "abandoned": "failure",
    "missed_start_deadline": "missed",
    "skipped": "skipped",
    "timeout": "timeout",
    "no_handler": "no_handler",
}


def event_of_record(ex: dict[str, Any]) -> str | None:
    """The alert event of an execution record, or None (success, or a try that will be retried)."""
    outcome = ex.get("outcome")
    if ex.get("retry_at") and outcome in outcomes.FAILED:
        return None
    return RECORD_EVENTS.get(outcome)  # type: ignore[arg-type]


class Outbox:
    """Alert events not yet confirmed sent, oldest first, and the replicated counters."""

    def __init__(self, *, enabled: bool = True, on_event: Callable[[], None] | None = None) -> None:
        self.enabled = enabled  # False: records nothing (a zone replica's copy)
        self.on_event = on_event  # told of each new event (wakes the leader's sender)
        self.events: dict[str, dict[str, Any]] = {}
        self.default: Notify | None = None  # the cluster default, as the leader committed it
        self.seq = 0  # events recorded so far: part of each new event's id
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def on_record(self, ex: dict[str, Any], schedule: Schedule | None) -> None:
        event = event_of_record(ex)
        if event is None:
            return
        detail: dict[str, Any] = {"error": ex["error"]} if ex.get("error") else {}
        if ex.get("reason"):
            detail["reason"] = ex["reason"]
        self._add(
            event,
            schedule,
            schedule_id=ex.get("schedule_id"),
            fire_time=ex.get("scheduled_fire_time"),
            outcome=ex.get("outcome"),
            job_id=ex.get("job_id"),
            **detail,
        )

    def on_pause(self, schedule: Schedule) -> None:
        self._add(
            "paused",
            schedule,
            schedule_id=schedule.id,
            fire_time=None,
            outcome=None,
            note=controls_of(schedule).note,
        )

    def _add(self, event: str, schedule: Schedule | None, **fields: Any) -> None:
        if not self.enabled:
            return
        target = (controls_of(schedule).notify if schedule is not None else None) or self.default
        if target is None or event not in target.on:
            return
        self.seq += 1
        about = f"{self.seq}|{event}|{fields['schedule_id']}|{fields['fire_time']}"
        key = str(uuid.uuid5(_NAMESPACE, about))
        self.events[key] = {"id": key, "event": event, **fields, "webhook": target.webhook}
        if self.on_event is not None:
            self.on_event()
        if len(self.events) > MAX_OUTBOX:
            oldest = next(iter(self.events))
            del self.events[oldest]
            self.dropped += 1
            if self.dropped % 100 == 1:  # a flood of events must not flood the log as well
                log.warning(
                    "alert outbox full (%d events not yet sent): dropped the oldest; %d dropped "
                    "so far (schedulezero_alerts_dropped_total)",
                    MAX_OUTBOX,
                    self.dropped,
                )

    def done(self, sent: list[str], failed: list[str]) -> int:
        """Forget events the leader delivered (``sent``) or gave up on (``failed``)."""
        n = 0
        for ids, kind in ((sent, "sent"), (failed, "failed")):
            for key in ids:
                if self.events.pop(key, None) is not None:
                    setattr(self, kind, getattr(self, kind) + 1)
                    n += 1
        return n

    def set_default(self, notify: Any) -> bool:
        """Replace the cluster default (plain JSON or None); False if it cannot be read."""
        try:
            self.default = None if notify is None else msgspec.convert(notify, Notify)
        except msgspec.ValidationError:
            log.warning("ignoring a notify default this version cannot read: %.200r", notify)
            return False
        return True

    def default_json(self) -> dict[str, Any] | None:
        return None if self.default is None else msgspec.to_builtins(self.default)

    def dump(self) -> dict[str, Any]:
        return {
            "events": list(self.events.values()),
            "default": self.default_json(),
            "counters": [self.seq, self.sent, self.failed, self.dropped],
        }

    def load(self, d: dict[str, Any] | None) -> None:
        if not d:
            return  # a snapshot from before alerts
        self.events = {ev["id"]: ev for ev in d["events"]}
        self.set_default(d.get("default"))
        self.seq, self.sent, self.failed, self.dropped = d["counters"]
