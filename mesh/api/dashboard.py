"""The dashboard (``GET /``, docs/dashboard.md) and the two reads made for it.

- ``GET /`` and ``GET /dashboard/<file>``: the page, its script (ES modules) and its style,
  shipped in the package (``mesh/dashboard/static``) and read once at start: no CDN, no build
  step, works offline. They are open paths (no token: the page holds no data; every read it
  then makes sends the token the user typed) and carry a strict Content-Security-Policy (no
  inline script, no other origin), so that a value shown on the page can never run as code.
- ``GET /api/whoami``: the caller's role and whether this node takes writes, so the page shows
  only the actions that would be allowed.
- ``GET /api/overview``: one answer for the overview page, whatever the number of schedules:
  counts, the next fires (from the due index), running jobs, fire activity over the last ten
  minutes (from the execution history), recent leader changes and the members.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import attrs
from aiohttp import web

from mesh.api.auth import ANONYMOUS, CALLER_KEY
from mesh.api.schema import BadRequest, iso, trigger_to_json
from mesh.contracts import NodeView
from mesh.scheduling.state import SchedulerState

__all__ = ["DashboardFiles", "add_dashboard_routes", "overview"]

NEXT_FIRES = 20
RUNNING_SHOWN = 50
LEADERSHIP_SHOWN = 20
BUCKET_SECONDS = 10
BUCKETS = 60  # ten minutes of activity

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(html|js|css|svg|png)")
# Nothing but this origin's own files: a schedule id or an error text shown on the page cannot
# load or run anything, and the page cannot be framed (clickjacking of its buttons).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated with the ETag: an upgraded node serves new files
}


@attrs.frozen
class _File:
    body: bytes
    content_type: str
    etag: str


@attrs.frozen
class DashboardFiles:
    """The static files, by name, read once."""

    files: dict[str, _File]

    @classmethod
    def load(cls) -> DashboardFiles:
        folder = resources.files("mesh.dashboard") / "static"
        files: dict[str, _File] = {}
        for entry in folder.iterdir():
            if not entry.is_file() or not _NAME.fullmatch(entry.name):
                continue
            body = entry.read_bytes()
            suffix = entry.name[entry.name.rindex(".") :]
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            files[entry.name] = _File(body, _CONTENT_TYPES[suffix], etag)
        if "index.html" not in files:
            raise FileNotFoundError(f"the dashboard's index.html is missing from {folder}")
        return cls(files)

    def response(self, request: web.Request, name: str) -> web.Response:
        f = self.files.get(name)
        if f is None:
            raise web.HTTPNotFound(reason=f"no dashboard file {name[:64]!r}")
        headers = {**SECURITY_HEADERS, "ETag": f.etag}
        if request.headers.get("If-None-Match") == f.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=f.body, headers={**headers, "Content-Type": f.content_type})


def whoami(request: web.Request, view: NodeView, read_only: bool) -> dict[str, Any]:
    """Who the caller is to this node, and what it may do here."""
    caller = request.get(CALLER_KEY, ANONYMOUS)
    health = view.health()
    node_role = health.get("role")
    writes = not read_only and node_role != "replica"
    return {
        "name": caller.name,
        "role": caller.role,
        "may_operate": writes and caller.may("operate"),
        "may_admin": writes and caller.may("admin"),
        "read_only": not writes,
        "node_id": health.get("node_id"),
        "node_role": node_role,
        "zone": health.get("zone"),
    }


def overview(
    view: NodeView,
    state: SchedulerState,
    *,
    handlers: Callable[[], list[dict[str, Any]]],
    leadership: Callable[[int], list[dict[str, Any]]],
    read_only: bool,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The overview page's data in one answer; its cost does not grow with the schedules."""
    now = now or datetime.now(UTC)
    health = view.health()
    # Started: leased and due (a job fired ahead is leased before its time: not running yet).
    running = [
        js
        for js in state.jobs.values()
        if js.job.acquired_by is not None
        and (js.job.scheduled_fire_time is None or js.job.scheduled_fire_time <= now)
    ]
    return {
        "node_id": health.get("node_id"),
        "role": health.get("role"),
        "leader_id": health.get("leader_id"),
        "term": health.get("term"),
        "commit_index": health.get("commit_index"),
        "has_quorum": health.get("has_quorum"),
        "read_only": read_only or health.get("role") == "replica",
        "now": iso(now),
        "schedules": len(state.schedules),
        "paused": sum(1 for s in state.schedules.values() if s.paused),
        "jobs_pending": len(state.jobs) - len(running),
        "jobs_running": len(running),
        "handlers": len(handlers()),
        "running": [
            {
                "job_id": str(js.job.id),
                "schedule_id": js.job.schedule_id,
                "task": js.job.task_id,
                "scheduled_fire_time": iso(js.job.scheduled_fire_time),
                "attempt": js.attempts,
                "term": js.term,
                "handler_id": js.handler,
            }
            for js in running[:RUNNING_SHOWN]
        ],
        "next_fires": [
            {
                "schedule_id": s.id,
                "task": s.task_id,
                "next_fire_time": iso(s.next_fire_time),
                "trigger": trigger_to_json(s.trigger),
            }
            for s in state.upcoming(NEXT_FIRES)
        ],
        "activity": activity(state.executions, now),
        "leadership": [
            {
                "ts": row.get("ts"),
                "node_id": row.get("instance_id"),
                "term": row.get("term"),
                "event": row.get("event_type"),
                "detail": row.get("detail", ""),
            }
            for row in leadership(LEADERSHIP_SHOWN)
        ],
        "members": view.cluster().get("members", []),
    }


def activity(executions: Any, now: datetime) -> dict[str, Any]:
    """Fires, outcomes and lateness (start minus scheduled fire time) per ``BUCKET_SECONDS`` over
    the last ``BUCKETS`` buckets, oldest first, from the execution history (newest last)."""
    start = now - timedelta(seconds=BUCKET_SECONDS * BUCKETS)
    counts = [[0, 0, 0] for _ in range(BUCKETS)]  # fires, succeeded, failed
    lateness: list[list[float]] = [[] for _ in range(BUCKETS)]
    for ex in reversed(executions):
        finished = _parse(ex.get("finished_at"))
        if finished is None:
            continue
        if finished < start:
            break  # the history is in finish order
        i = min(BUCKETS - 1, int((finished - start).total_seconds() // BUCKET_SECONDS))
        counts[i][0] += 1
        counts[i][1 if ex.get("outcome") == "success" else 2] += 1
        began, due = _parse(ex.get("started_at")), _parse(ex.get("scheduled_fire_time"))
        if began is not None and due is not None:
            lateness[i].append(max(0.0, (began - due).total_seconds() * 1000))
    buckets = []
    for i in range(BUCKETS):
        late = sorted(lateness[i])
        buckets.append(
            {
                "start": iso(start + timedelta(seconds=i * BUCKET_SECONDS)),
                "fires": counts[i][0],
                "succeeded": counts[i][1],
                "failed": counts[i][2],
                "lateness_p50_ms": round(late[len(late) // 2], 3) if late else None,
                "lateness_max_ms": round(late[-1], 3) if late else None,
            }
        )
    return {"bucket_seconds": BUCKET_SECONDS, "buckets": buckets}


def add_dashboard_routes(
    app: web.Application,
    view: NodeView,
    state: SchedulerState | None,
    *,
    handlers: Callable[[], list[dict[str, Any]]],
    leadership: Callable[[int], list[dict[str, Any]]] | None,
    read_only: bool,
) -> None:
    files = DashboardFiles.load()

    async def index(request: web.Request) -> web.Response:
        return files.response(request, "index.html")

    async def static(request: web.Request) -> web.Response:
        return files.response(request, request.match_info["name"])

    async def who(request: web.Request) -> web.Response:
        return web.json_response(whoami(request, view, read_only))

    app.router.add_get("/", index)
    app.router.add_get("/dashboard/{name}", static)
    app.router.add_get("/api/whoami", who)
    if state is None:
        return

    async def summary(request: web.Request) -> web.Response:
        if request.query:
            raise BadRequest("GET /api/overview takes no query parameters")
        body = overview(
            view,
            state,
            handlers=handlers,
            leadership=leadership or (lambda _limit: []),
            read_only=read_only,
        )
        return web.json_response(body)

    app.router.add_get("/api/overview", summary)


def _parse(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
