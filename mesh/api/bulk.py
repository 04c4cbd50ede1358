"""``POST /api/schedules/bulk``: create or replace many schedules in one commit (docs/api.md).

Every item is validated with the POST /api/schedules parser before anything is written (one bad
item: 400 naming it, nothing written); then the leader proposes them all as one ``batch`` log
entry (split only when it exceeds ``raft.max_entry_bytes``) and answers once it is applied.
A follower forwards the request like every write (mesh.api.http).

An item whose id exists with the same definition is ``unchanged`` and not written: re-applying a
file leaves its schedules (and their next fire times) as they are. A trigger whose start is left
out counts as starting where the stored one starts.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from apscheduler import Schedule

from mesh.api.limits import LIMITS_KEY, loads
from mesh.api.schema import (
    check_bulk_ids,
    iso,
    parse_bulk_envelope,
    parse_bulk_item,
    schedule_to_json,
)
from mesh.scheduling.state import dump_schedule, load_schedule

if TYPE_CHECKING:
    from mesh.scheduling.service import SchedulingService
    from mesh.scheduling.spec import ScheduleSpec

BULK_PATH = "/api/schedules/bulk"
# Parsing yields to the event loop this often (a cron trigger's fire search may take ~10 ms):
# thousands of items must not hold up the heartbeats the loop also carries.
YIELD_EVERY_S = 0.005


def add_bulk_route(app: web.Application, service: SchedulingService) -> None:
    async def bulk(request: web.Request) -> web.Response:
        raw = loads(await request.read(), request.app[LIMITS_KEY].max_json_depth)
        specs, default_start, replace = await _parse(raw)
        outcomes = await service.put_schedules(
            specs, replace=replace, unchanged=_unchanged_check(default_start)
        )
        counts = {"created": 0, "updated": 0, "unchanged": 0}
        for o in outcomes:
            if o.outcome in counts:
                counts[o.outcome] += 1
        body: dict[str, Any] = {
            **counts,
            "conflicts": [o.id for o in outcomes if o.outcome == "conflict"],
            "schedules": [
                {"id": o.id, "outcome": o.outcome, "next_fire_time": iso(o.next_fire_time)}
                for o in outcomes
            ],
        }
        tasks = sorted({s.task for s in specs})
        warnings = [w for task in tasks for w in service.task_warnings(task)]
        if warnings:
            body["warnings"] = warnings
        return web.json_response(body)

    app.router.add_post(BULK_PATH, bulk)


async def _parse(raw: Any) -> tuple[list[ScheduleSpec], set[str], bool]:
    items, replace = parse_bulk_envelope(raw)
    now = datetime.now(UTC)
    specs: list[ScheduleSpec] = []
    default_start: set[str] = set()
    since = time.monotonic()
    for i, item in enumerate(items):
        spec, default = parse_bulk_item(i, item, now=now)
        specs.append(spec)
        if default:
            default_start.add(spec.id)
        if time.monotonic() - since > YIELD_EVERY_S:
            await asyncio.sleep(0)
            since = time.monotonic()
    check_bulk_ids(specs)
    return specs, default_start, replace


def _unchanged_check(default_start: set[str]) -> Any:
    def unchanged(new: Schedule, old: Schedule) -> bool:
        """``new`` defines what ``old`` already does (compared as the API shows them, both
        read back from their stored form; a defaulted start counts as ``old``'s)."""
        mine = _definition(load_schedule(dump_schedule(new)))
        theirs = _definition(old)
        if new.id in default_start:
            for key in ("start_time", "start_date"):
                if key in mine["trigger"] and key in theirs["trigger"]:
                    mine["trigger"][key] = theirs["trigger"][key]
        return mine == theirs

    return unchanged


def _definition(s: Schedule) -> dict[str, Any]:
    out = schedule_to_json(s)
    del out["next_fire_time"], out["last_fire_time"]
    return out
