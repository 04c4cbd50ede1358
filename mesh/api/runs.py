"""``POST /api/schedules/{id}/trigger`` and ``/backfill``: runs outside a schedule's times.

Both are writes (role ``operate``), forwarded to the leader like every write; the leader reads
its clock here (the trigger's fire time, the "not in the future" bound of a backfill) and the
state machine builds the jobs from the replicated schedule (mesh.scheduling.backfill).
docs/scheduling.md ("trigger", "backfill") says what they do; docs/api.md lists the answers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiohttp import web

from mesh.api.limits import LIMITS_KEY, loads
from mesh.api.schema import BadRequest, parse_backfill_body
from mesh.scheduling import backfill

if TYPE_CHECKING:
    from mesh.scheduling.service import SchedulingService


def add_run_routes(app: web.Application, service: SchedulingService) -> None:
    async def trigger(request: web.Request) -> web.Response:
        raw = await request.read()  # no body, or an empty object
        if raw.strip():
            body = loads(raw, request.app[LIMITS_KEY].max_json_depth)
            if body != {}:
                raise BadRequest("request body: a trigger takes no fields (send none, or {})")
        answer = await service.trigger(request.match_info["id"], datetime.now(UTC))
        return web.json_response(answer, status=202)

    async def backfill_range(request: web.Request) -> web.Response:
        from mesh.scheduling.service import BackfillQueueFull

        schedule_id = request.match_info["id"]
        body = loads(await request.read(), request.app[LIMITS_KEY].max_json_depth)
        start, end = parse_backfill_body(body, now=datetime.now(UTC))
        try:
            answer = await service.backfill(schedule_id, start, end)
        except (backfill.TooManyFireTimes, backfill.NotIterable) as e:
            raise BadRequest(str(e)) from None
        except BackfillQueueFull as e:
            return web.json_response({"error": str(e)}, status=409)
        return web.json_response(answer, status=202)

    app.router.add_post("/api/schedules/{id}/trigger", trigger)
    app.router.add_post("/api/schedules/{id}/backfill", backfill_range)
