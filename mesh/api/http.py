"""The HTTP API every node serves (aiohttp).

Handlers stay thin: they translate HTTP to calls on the node and back. Cross-cutting rules live
in middlewares: every error is JSON ``{"error": "..."}`` with a 4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from mesh.api.auth import (
    ApiTokens,
    AuditSink,
    add_audit_route,
    auth_middleware,
)
from mesh.api.backup import add_backup_route
from mesh.api.bulk import add_bulk_route
from mesh.api.dashboard import add_dashboard_routes
from mesh.api.events import EventHub
from mesh.api.forward import (
    COMMIT_HEADER,
    FORWARDED_HEADER,
    SERVED_BY_HEADER,
    WRITE_METHODS,
    forwarding_middleware,
    serve_forwarded_writes,
)
from mesh.api.limits import LIMITS_KEY, ApiLimits, body_limits, limit_connections, loads
from mesh.api.metrics import NodeCollector, RequestCounter
from mesh.api.openapi import openapi_document
from mesh.api.runs import add_run_routes
from mesh.api.schema import (
    BadRequest,
    parse_job_body,
    parse_member_body,
    parse_pause_body,
    parse_schedule_body,
    schedule_to_json,
)
from mesh.contracts import (
    ImageSource,
    LeaderLink,
    MembershipRefused,
    MessageBus,
    NodeView,
    NoLeader,
    ProposalFailed,
    ProposalTooLarge,
    Replica,
)
from mesh.scheduling.state import OUTCOMES

if TYPE_CHECKING:
    from mesh.scheduling.service import SchedulingService

log = logging.getLogger("mesh.api")

__all__ = [
    "COMMIT_HEADER",
    "FORWARDED_HEADER",
    "READ_ONLY_NODE",
    "SERVED_BY_HEADER",
    "HttpServer",
    "create_app",
]

LINGER_SECONDS = 1.0


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    from mesh.dispatch.governors import Backpressure
    from mesh.scheduling.service import NotReady, ScheduleExists, UnknownSchedule

    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 413:
            limit = request.app[LIMITS_KEY].max_body_bytes if LIMITS_KEY in request.app else None
            return json_error(413, f"request body too large (limit {limit} bytes)")
        return json_error(e.status, e.reason or e.text or "error")
    except BadRequest as e:
        return json_error(400, str(e))
    except ProposalTooLarge as e:
        return json_error(413, str(e))
    except MembershipRefused as e:
        return json_error(e.status, str(e))
    except Backpressure as e:
        return json_error(429, str(e))
    except UnknownSchedule as e:
        return json_error(404, f"no schedule with id {e.args[0]!r}")
    except ScheduleExists as e:
        return json_error(409, f"a schedule with id {e.args[0]!r} already exists")
    except (NoLeader, NotReady) as e:
        return json_error(503, f"no leader available: {e}")
    except ProposalFailed as e:
        return json_error(503, f"write not confirmed: {e}; it may or may not have been applied")
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return json_error(500, "internal error (see the node's log)")


# The 403 of a node whose config says ``api.read_only: true`` (a replica has its own message).
READ_ONLY_NODE = "read-only node: send writes to an admin node"


def refuse_writes(message: str) -> Any:
    """A read-only API: every mutation under ``/api/`` answers 403 ``{"error": message}``
    before its body is read, forwarded or looked at (docs/zones.md)."""

    @web.middleware
    async def read_only(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method in WRITE_METHODS and request.path.startswith("/api/"):
            return json_error(403, message)
        return await handler(request)

    return read_only


async def _json_body(request: web.Request) -> Any:
    return loads(await request.read(), request.app[LIMITS_KEY].max_json_depth)


def create_app(
    replica: Replica,
    view: NodeView,
    service: SchedulingService | None = None,
    *,
    tokens: ApiTokens | None = None,
    audit: AuditSink | None = None,
    sensitive_keys: tuple[str, ...] | None = None,
    client_ssl: ssl.SSLContext | None = None,
    limits: ApiLimits | None = None,
    read_only: str | None = None,
    anonymous_reads: bool = False,
    events: EventHub | None = None,
    leadership: Callable[[int], list[dict[str, Any]]] | None = None,
    bus: MessageBus | None = None,
    link: LeaderLink | None = None,
    images: ImageSource | None = None,
) -> web.Application:
    """The API of one node: ``replica`` for writes (forwarded to the leader when this node is
    not it), ``view`` for the health, cluster and metrics reads, ``service`` for scheduling.

    ``tokens`` (the tokens file) makes every ``/api/...`` call but health need a bearer token of
    the right role (mesh.api.auth); ``audit`` records mutations and serves ``GET /api/audit``;
    ``client_ssl`` is how a follower checks the leader's certificate when the API is HTTPS;
    ``limits`` bound what one request may cost (``mesh.api.limits``); ``read_only`` (the
    message) makes every mutation answer 403 with it (``refuse_writes``); ``anonymous_reads``
    serves reads without a token (``mesh.api.auth.auth_middleware``; without ``tokens`` only on
    a read-only API). ``events`` serves ``GET /api/events`` (mesh.api.events); a node with
    ``service`` and no hub gets one fed only by its own diffs (no apply or bus events).
    ``leadership(limit)`` gives the node's recent leadership events, newest first, for the
    dashboard's overview (mesh.api.dashboard). ``link`` (a follower) forwards writes to the
    leader over the mesh, and ``bus`` (a voter) answers the writes other nodes forward that way
    (mesh.api.forward); without them writes are forwarded over HTTP. ``images`` (a voter) serves
    ``GET /api/backup`` (mesh.api.backup).
    """
    if anonymous_reads and tokens is None and read_only is None:
        # Every caller would then be anonymous, and nothing would refuse its writes.
        raise ValueError("anonymous reads without a tokens file need a read-only API")
    limits = limits or ApiLimits()
    forward, close_forwarding = forwarding_middleware(replica, view, client_ssl, link)
    # Authentication is outermost: it sees every final status (for the audit) and refuses a
    # caller before anything else, forwarding included, looks at the request.
    authenticate = auth_middleware(
        tokens,
        node_id=replica.node_id,
        audit=audit,
        sensitive_keys=sensitive_keys,
        anonymous_reads=anonymous_reads,
    )
    # A read-only API refuses a write after authentication (a caller without a valid token
    # still gets 401, and the refusal is audited) and before anything reads its body.
    refusing = [refuse_writes(read_only)] if read_only is not None else []
    requests = RequestCounter(replica.node_id)
    app = web.Application(
        middlewares=[
            requests.middleware,
            authenticate,
            errors_as_json,
            *refusing,
            body_limits(limits),
            forward,
        ],
        client_max_size=limits.max_body_bytes,
    )
    app[LIMITS_KEY] = limits
    app.on_cleanup.append(close_forwarding)
    if bus is not None:
        serve_forwarded_writes(app, bus)
    registry = CollectorRegistry()
    # process_resident_memory_bytes and the other process metrics (the scenario runner reads
    # the voters' memory here: docs/scenarios.md, "memory_usage").
    ProcessCollector(registry=registry)
    registry.register(NodeCollector(replica.node_id, view))
    registry.register(requests)

    async def health(request: web.Request) -> web.Response:
        return web.json_response(view.health())

    async def cluster(request: web.Request) -> web.Response:
        return web.json_response(view.cluster())

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    # The voter set (docs/api.md). Writes go through the Raft log on the leader (a follower
    # forwards them, like every write); with a tokens file they need an admin token.
    async def members(request: web.Request) -> web.Response:
        return web.json_response(view.cluster_members())

    async def add_member(request: web.Request) -> web.Response:
        node_id = parse_member_body(await _json_body(request))
        return web.json_response(await replica.add_voter(node_id))

    async def remove_member(request: web.Request) -> web.Response:
        return web.json_response(await replica.remove_voter(request.match_info["node_id"]))

    app.router.add_get("/api/health", health)
    app.router.add_get("/api/cluster", cluster)
    app.router.add_get("/api/cluster/members", members)
    app.router.add_post("/api/cluster/members", add_member)
    app.router.add_delete("/api/cluster/members/{node_id}", remove_member)
    app.router.add_get("/metrics", metrics)

    document = openapi_document(
        scheduling=service is not None, audit=audit is not None, backup=images is not None
    )

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/api/openapi.json", openapi)
    if audit is not None:
        add_audit_route(app, audit)
    if images is not None:
        add_backup_route(app, replica, view, images)
    add_dashboard_routes(
        app,
        view,
        service.state if service is not None else None,
        handlers=service.handlers if service is not None else list,
        leadership=leadership,
        read_only=read_only is not None,
    )
    if service is not None:
        _add_scheduling_routes(app, service)
        if events is None:
            events = EventHub(
                replica,
                view,
                service.state,
                handlers=service.handlers,
                sensitive_keys=sensitive_keys,
                diff_leader=True,
            )
    if events is not None:
        app.router.add_get("/api/events", events.handle)
        app.on_shutdown.append(events.close)  # before the server waits for open streams
    return app


def _add_scheduling_routes(app: web.Application, service: SchedulingService) -> None:
    state = service.state

    def schedule_or_404(schedule_id: str) -> Any:
        s = state.schedules.get(schedule_id)
        if s is None:
            raise web.HTTPNotFound(reason=f"no schedule with id {schedule_id!r}")
        return s

    async def list_schedules(request: web.Request) -> web.Response:
        limit, after, extra = _page_query(request, default_limit=MAX_PAGE, extra=("q", "paused"))
        match = _schedule_filter(extra.get("q"), extra.get("paused"))
        ids = sorted(
            i
            for i, s in state.schedules.items()
            if (after is None or i > after) and (match is None or match(s))
        )
        page, nxt = _page(ids, limit, key=str)
        items = [schedule_to_json(state.schedules[i]) for i in page]
        return web.json_response({"schedules": items, "next": nxt})

    async def get_schedule(request: web.Request) -> web.Response:
        return web.json_response(schedule_to_json(schedule_or_404(request.match_info["id"])))

    async def create_schedule(request: web.Request) -> web.Response:
        spec = parse_schedule_body(await _json_body(request))
        s = await service.put_schedule(spec, replace=False)
        warnings = service.task_warnings(spec.task) or None
        return web.json_response(schedule_to_json(s, warnings=warnings), status=201)

    async def replace_schedule(request: web.Request) -> web.Response:
        spec = parse_schedule_body(await _json_body(request), schedule_id=request.match_info["id"])
        s = await service.put_schedule(spec, replace=True)
        warnings = service.task_warnings(spec.task) or None
        return web.json_response(schedule_to_json(s, warnings=warnings))

    async def delete_schedule(request: web.Request) -> web.Response:
        await service.remove_schedule(request.match_info["id"])
        return web.Response(status=204)

    async def pause(request: web.Request) -> web.Response:
        raw = await request.read()  # the body is optional: {"note"}
        note = None
        if raw.strip():
            note = parse_pause_body(loads(raw, request.app[LIMITS_KEY].max_json_depth))
        s = await service.set_paused(request.match_info["id"], True, note=note)
        return web.json_response(schedule_to_json(s))

    async def resume(request: web.Request) -> web.Response:
        s = await service.set_paused(request.match_info["id"], False)
        return web.json_response(schedule_to_json(s))

    async def run_job(request: web.Request) -> web.Response:
        task, args, kwargs = parse_job_body(await _json_body(request))
        job_id = await service.run_now(task, args, kwargs)
        body: dict[str, Any] = {"job_id": str(job_id)}
        if warnings := service.task_warnings(task):
            body["warnings"] = warnings
        return web.json_response(body, status=202)

    async def job_status(request: web.Request) -> web.Response:
        raw = request.match_info["job_id"]
        try:
            job_id = UUID(raw)
        except ValueError:
            raise BadRequest(f"job id {raw!r} is not a UUID") from None
        status = state.job_status(job_id)
        if status is None:
            raise web.HTTPNotFound(reason=f"no job with id {raw!r}")
        return web.json_response(status)

    async def executions(request: web.Request) -> web.Response:
        limit, after, extra = _page_query(
            request,
            default_limit=100,
            max_limit=MAX_EXECUTIONS_PAGE,
            extra=("schedule_id", "outcome", "since"),
        )
        schedule_id = extra.get("schedule_id") or None
        outcome = extra.get("outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise BadRequest(f"outcome: {outcome[:40]!r} is not one of {', '.join(OUTCOMES)}")
        since = _since_query(extra["since"]) if "since" in extra else None
        try:
            items = state.execution_history(
                schedule_id, limit + 1, after=after, outcome=outcome, since=since
            )
        except LookupError:
            raise BadRequest(
                f"after: no execution of job {after!r} in the history (it may have expired)"
            ) from None
        page, nxt = _page(items, limit, key=lambda ex: ex["job_id"])
        return web.json_response({"executions": page, "next": nxt})

    async def handlers(request: web.Request) -> web.Response:
        limit, after, _ = _page_query(request, default_limit=MAX_PAGE)
        listed = sorted(service.handlers(), key=lambda h: str(h.get("handler_id")))
        listed = [h for h in listed if after is None or str(h.get("handler_id")) > after]
        page, nxt = _page(listed, limit, key=lambda h: str(h.get("handler_id")))
        return web.json_response({"handlers": page, "next": nxt})

    r = app.router
    r.add_get("/api/handlers", handlers)
    r.add_get("/api/schedules", list_schedules)
    r.add_post("/api/schedules", create_schedule)
    add_bulk_route(app, service)  # before /api/schedules/{id}: "bulk" is not an id here
    r.add_get("/api/schedules/{id}", get_schedule)
    r.add_put("/api/schedules/{id}", replace_schedule)
    r.add_delete("/api/schedules/{id}", delete_schedule)
    r.add_post("/api/schedules/{id}/pause", pause)
    r.add_post("/api/schedules/{id}/resume", resume)
    add_run_routes(app, service)  # /trigger, /backfill
    r.add_post("/api/jobs", run_job)
    r.add_get("/api/jobs/{job_id}", job_status)
    r.add_get("/api/executions", executions)


def _schedule_filter(q: str | None, paused: str | None) -> Callable[[Any], bool] | None:
    """The ``q`` (a case-insensitive part of the id or the task) and ``paused`` (true/false)
    filters of ``GET /api/schedules``, as one predicate; None when neither is given."""
    if paused not in (None, "true", "false"):
        raise BadRequest(f"paused: must be true or false, got {paused[:40]!r}")
    if not q and paused is None:
        return None
    text = q.casefold() if q else None
    want = None if paused is None else paused == "true"

    def match(s: Any) -> bool:
        if want is not None and s.paused != want:
            return False
        return text is None or text in s.id.casefold() or text in s.task_id.casefold()

    return match


# --- pagination (docs/api.md "Pages") ---------------------------------------------------------

MAX_PAGE = 1000  # items per page of /api/schedules and /api/handlers (also their default)
MAX_EXECUTIONS_PAGE = 10_000  # /api/executions: the whole history fits in one page
MAX_CURSOR = 200  # characters of an ``after`` cursor (ids are at most 128, UUIDs 36)
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() also takes "²"


def _page_query(
    request: web.Request,
    *,
    default_limit: int,
    max_limit: int = MAX_PAGE,
    extra: tuple[str, ...] = (),
) -> tuple[int, str | None, dict[str, str]]:
    """``(limit, after, {other allowed parameter: value})`` of a list request, or BadRequest:
    an unknown or repeated parameter, a ``limit`` that is not an integer from 1 to
    ``max_limit``, a cursor or value longer than ``MAX_CURSOR`` characters."""
    q = request.query
    allowed = {"limit", "after", *extra}
    for name in q:
        if name not in allowed:
            raise BadRequest(
                f"unknown query parameter {name[:40]!r} (allowed: {', '.join(sorted(allowed))})"
            )
        if len(q.getall(name)) > 1:
            raise BadRequest(f"query parameter {name!r} given more than once")
        if len(q[name]) > MAX_CURSOR:
            raise BadRequest(f"{name}: at most {MAX_CURSOR} characters")
    raw = q.get("limit")
    limit = default_limit
    if raw is not None:
        if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= max_limit:
            raise BadRequest(f"limit must be an integer from 1 to {max_limit}, got {raw[:40]!r}")
        limit = int(raw)
    after = q.get("after")
    if after == "":
        raise BadRequest("after: must not be empty (the 'next' of the previous page)")
    return limit, after, {name: q[name] for name in extra if name in q}


# RFC 3339's date-time, the offset optional (then UTC). ASCII digits only, like _DIGITS.
_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)


def _since_query(raw: str) -> datetime:
    """The aware datetime of a ``since`` parameter, or BadRequest saying what is wrong."""
    if not _DATE_TIME.fullmatch(raw):
        hint = ""
        if " " in raw.strip():
            hint = " (a '+' in a URL query reads as a space: write it %2B, or use Z)"
        raise BadRequest(
            f"since: not an ISO-8601 date-time such as 2024-05-01T12:00:00Z, got {raw[:40]!r}"
            + hint
        )
    try:  # the shape is right; the values may not be (month 13, hour 24, offset 25:00)
        at = datetime.fromisoformat(raw.upper())
    except ValueError as e:
        raise BadRequest(f"since: {raw[:40]!r} is not a valid date-time ({e})") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


_I = TypeVar("_I")


def _page(items: list[_I], limit: int, *, key: Callable[[_I], str]) -> tuple[list[_I], str | None]:
    """The first ``limit`` items and the cursor of the next page (None: this is the last)."""
    if len(items) <= limit:
        return items, None
    page = items[:limit]
    return page, key(page[-1])


class HttpServer:
    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: ApiLimits | None = None,
    ) -> None:
        self.app = app
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.limits = limits or app.get(LIMITS_KEY) or ApiLimits()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, port = self.host, self.port
        # The keep-alive timer runs from the moment a connection opens and partial data does not
        # reset it: it is the header timeout (mesh.api.limits). After an answer to a request
        # whose body did not all arrive (408, 413), the rest is drained for at most LINGER_SECONDS.
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            keepalive_timeout=self.limits.header_timeout,
            lingering_time=LINGER_SECONDS,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        limit_connections(self._runner.server, self.limits.max_connections)
        site = web.TCPSite(
            self._runner, host, port, reuse_address=True, ssl_context=self.ssl_context
        )
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise OSError(f"cannot bind HTTP on {host}:{port}: {e.strerror or e}") from e

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
