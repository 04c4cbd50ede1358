"""The validated schedule the scheduling layer adds; the HTTP API builds it (mesh.api.schema)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec
from apscheduler import CoalescePolicy
from apscheduler.abc import Trigger

from mesh.scheduling.controls import DEFAULT, Controls

__all__ = ["ScheduleSpec"]


class ScheduleSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A validated schedule, ready for ``AsyncScheduler.add_schedule``.

    ``trigger`` is a fresh APScheduler trigger. Triggers are stateful (``next()`` advances them),
    so give each scheduler its own: rebuild one from its JSON form rather than sharing it.
    """

    id: str
    task: str
    trigger: Trigger
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    coalesce: CoalescePolicy = CoalescePolicy.latest
    misfire_grace_time: timedelta | None = None
    max_jitter: timedelta | None = None
    paused: bool = False
    metadata: dict[str, Any] = {}  # the user's (without controls.KEY)
    controls: Controls = DEFAULT  # overlap, retry, timeout, ... (mesh.scheduling.controls)
