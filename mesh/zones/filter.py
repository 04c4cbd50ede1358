"""The zone filter: what of the scheduler state may leave a voter for a replica of one zone.

One pure function family over the wire forms of ``mesh.scheduling.state`` (plain JSON values,
never APScheduler objects): :func:`filter_command` for a state-machine command and
:func:`filter_snapshot` for ``SchedulerState.snapshot()`` bytes. Both apply the same rules, so a
replica that restores a filtered snapshot and applies filtered commands holds exactly the
filtered state, and can still answer the API from it:

- each kind in ``drop`` is emptied where it appears, never removed (the commands stay
  applicable): ``args`` → ``[]``; ``kwargs`` and ``metadata`` (schedules, jobs, tasks) → ``{}``;
  ``results`` (a job's return value) → ``null``; ``errors`` (a job's exception, an execution's
  ``error``) → ``null``;
- what is kept of ``args``, ``kwargs``, ``metadata`` and results has the value of every
  sensitive key masked (``"***"``, at any depth: ``mesh.security.redact``);
- anything the filter does not know (a command ``op``, a snapshot section) does not pass: an
  unknown command becomes ``None`` (the replica learns only that an entry was there), an unknown
  snapshot section is left out. A new kind of user data must be taught to the filter before it
  can reach a replica.

A zone not configured gets :data:`STRICTEST`: every kind dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import attrs

from mesh.security.redact import DEFAULT_SENSITIVE_KEYS, redact

__all__ = [
    "DROP_KINDS",
    "STRICTEST",
    "ZoneFilter",
    "filter_command",
    "filter_for",
    "filter_snapshot",
    "filter_snapshot_value",
    "zone_filters",
]

log = logging.getLogger("mesh.zones")

DROP_KINDS = ("args", "kwargs", "results", "errors", "metadata")


@attrs.frozen
class ZoneFilter:
    """What a zone's replicas do not receive: the kinds in ``drop`` (all by default) and the
    values of ``sensitive_keys``."""

    drop: frozenset[str] = attrs.field(default=frozenset(DROP_KINDS), converter=frozenset)
    sensitive_keys: tuple[str, ...] = attrs.field(default=DEFAULT_SENSITIVE_KEYS, converter=tuple)

    def __attrs_post_init__(self) -> None:
        unknown = self.drop - set(DROP_KINDS)
        if unknown:
            raise ValueError(f"unknown drop kinds {sorted(unknown)}: one of {DROP_KINDS}")


STRICTEST = ZoneFilter()


def zone_filters(zones: Mapping[str, Any]) -> dict[str, ZoneFilter]:
    """The filter of each configured zone, from the ``zones`` config (objects or mappings with
    ``drop`` and ``sensitive_keys``)."""
    out = {}
    for name, z in zones.items():
        get = z.get if isinstance(z, Mapping) else lambda k, _z=z: getattr(_z, k)
        out[name] = ZoneFilter(get("drop"), get("sensitive_keys"))
    return out


def filter_for(filters: Mapping[str, ZoneFilter], zone: str | None) -> ZoneFilter:
    """The filter of ``zone``; :data:`STRICTEST` for no zone or one not configured."""
    if zone is None:
        return STRICTEST
    return filters.get(zone, STRICTEST)


# --------------------------------------------------------------------------- user data


def _user(value: Any, f: ZoneFilter, kind: str, empty: Any) -> Any:
    if kind in f.drop:
        return empty
    return redact(value, f.sensitive_keys)


def _call(d: Any, f: ZoneFilter) -> Any:
    """A schedule, job or task record: its args, kwargs and metadata filtered."""
    if not isinstance(d, dict):
        return d
    out = dict(d)
    if "args" in out:
        out["args"] = _user(out["args"], f, "args", [])
    if "kwargs" in out:
        out["kwargs"] = _user(out["kwargs"], f, "kwargs", {})
    if "metadata" in out:
        out["metadata"] = _user(out["metadata"], f, "metadata", {})
    return out


def _result(d: Any, f: ZoneFilter) -> Any:
    """A job result record (``state.dump_result``): its return value and exception filtered."""
    if not isinstance(d, dict):
        return d
    out = dict(d)
    if "return_value" in out:
        out["return_value"] = _user(out["return_value"], f, "results", None)
    if "exception" in out and "errors" in f.drop:
        out["exception"] = None
    return out


def _execution(d: Any, f: ZoneFilter) -> Any:
    if not isinstance(d, dict):
        return d
    out = dict(d)
    if "error" in out and "errors" in f.drop:
        out["error"] = None
    return out


# --------------------------------------------------------------------------- commands


def _task_cmd(c: dict[str, Any], f: ZoneFilter) -> dict[str, Any]:
    return {**c, "task": _call(c.get("task"), f)}


def _schedule_cmd(c: dict[str, Any], f: ZoneFilter) -> dict[str, Any]:
    return {**c, "schedule": _call(c.get("schedule"), f)}


def _job_cmd(c: dict[str, Any], f: ZoneFilter) -> dict[str, Any]:
    return {**c, "job": _call(c.get("job"), f)}


def _round_cmd(c: dict[str, Any], f: ZoneFilter) -> dict[str, Any]:
    rows = c.get("schedules")
    if not isinstance(rows, list):
        return {**c, "schedules": []}
    out = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        jobs = r.get("jobs")
        out.append({**r, "jobs": [_call(j, f) for j in jobs] if isinstance(jobs, list) else []})
    return {**c, "schedules": out}


def _release_job_cmd(c: dict[str, Any], f: ZoneFilter) -> dict[str, Any]:
    return {**c, "result": _result(c.get("result"), f)}


def _batch_cmd(c: dict[str, Any], f: ZoneFilter) -> dict[str, Any]:
    subs = c.get("commands")
    if not isinstance(subs, list):
        return {"op": "batch", "commands": []}
    # A sub-command the filter does not know is left out: the others still apply in order.
    kept = [s for s in (_command(sub, f, nested=True) for sub in subs) if s is not None]
    return {**c, "commands": kept}


def _as_is(c: dict[str, Any], _f: ZoneFilter) -> dict[str, Any]:
    return dict(c)


# Every op of SchedulerState, and what of it is user data. Ops that carry none pass unchanged.
_OPS = {
    "add_task": _task_cmd,
    "add_schedule": _schedule_cmd,
    "add_job": _job_cmd,
    "release_job": _release_job_cmd,
    "batch": _batch_cmd,
    "remove_task": _as_is,
    "remove_schedules": _as_is,
    "acquire_schedules": _as_is,
    "release_schedules": _as_is,  # the advanced trigger and fire times: no user data
    "fire_round": _round_cmd,  # advanced triggers (as release_schedules) and jobs (as add_job)
    "extend_leases": _as_is,
    "acquire_jobs": _as_is,
    "assign_job": _as_is,
    "reset_leases": _as_is,
    "expire_results": _as_is,
    "trigger_schedule": _as_is,  # a schedule id and a time: the job is built from the schedule
    "backfill_schedule": _as_is,  # a schedule id and fire times
    "broadcast": _as_is,  # a job id and handler ids: the runs are built from the job
    "alerts_done": _as_is,  # alert ids (the webhook, in notify_default, never passes)
}


def _command(c: Any, f: ZoneFilter, *, nested: bool = False) -> dict[str, Any] | None:
    if not isinstance(c, dict):
        return None
    op = c.get("op")
    fn = _OPS.get(op) if isinstance(op, str) else None
    if fn is None or (nested and op == "batch"):
        return None
    return fn(c, f)


def filter_command(command: Any, f: ZoneFilter) -> dict[str, Any] | None:
    """``command`` (a state-machine command as committed) as a replica of the zone may see it;
    None when nothing of it may be seen (not a command the filter knows). Never mutates
    ``command`` and never raises: on a malformed command the answer is None."""
    try:
        return _command(command, f)
    except Exception:  # a command the leader wrote oddly must not stop the feed
        log.exception("zone filter: dropping a command it could not filter")
        return None


# --------------------------------------------------------------------------- snapshots


def _each(items: Any, fn: Any, f: ZoneFilter) -> list[Any]:
    return [fn(x, f) for x in items] if isinstance(items, list) else []


def _job_state(d: Any, f: ZoneFilter) -> Any:
    if not isinstance(d, dict):
        return d
    return {**d, "job": _call(d.get("job"), f)}


def filter_snapshot_value(d: Mapping[str, Any], f: ZoneFilter) -> dict[str, Any]:
    """The filtered form of a parsed ``SchedulerState.snapshot()``; sections it does not know
    are left out."""
    out: dict[str, Any] = {
        "tasks": _each(d.get("tasks"), _call, f),
        "schedules": _each(d.get("schedules"), _call, f),
        "jobs": _each(d.get("jobs"), _job_state, f),
        "results": _each(d.get("results"), _result, f),
        "fired": dict(d.get("fired") or {}),
        "executions": _each(d.get("executions"), _execution, f),
        "counters": list(d.get("counters") or [0, 0]),
    }
    if d.get("backfills"):
        out["backfills"] = dict(d["backfills"])  # fire times and job ids, no user data
    return out


def filter_snapshot(data: bytes, f: ZoneFilter) -> bytes:
    """``SchedulerState.snapshot()`` bytes → the same for a replica of the zone (same layout,
    so ``SchedulerState.restore`` reads it). Empty stays empty."""
    if not data:
        return data
    return json.dumps(filter_snapshot_value(json.loads(data), f), separators=(",", ":")).encode()
