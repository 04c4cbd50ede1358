"""The API's OpenAPI 3.1 document (``GET /api/openapi.json``).

Why this file is long: most of it is one declarative table, an entry per operation of the API,
with the response shapes it names; kept in one place so a route and its documentation are
reviewed together (tests/test_openapi.py checks they cover each other).

Request bodies are the very ``msgspec.Struct`` classes the handlers parse with
(:mod:`mesh.api.schema`), turned into JSON Schema by ``msgspec.json.schema_components``: a field
added to a body appears here without anyone editing this file. Response shapes are the Structs
below; nothing parses with them, so the fuzz test (tests/test_fuzz_api.py) checks every answer
of a live mesh against them. The route list, :data:`OPERATIONS`, is checked against the aiohttp
router by tests/test_openapi.py, so an endpoint cannot be added without being described here.

OpenAPI 3.1 because its schemas are JSON Schema 2020-12, which is what msgspec emits (``null``
as a type, ``anyOf`` with a discriminator), so no conversion is needed but one: regular
expressions, written for Python's ``re`` in schema.py, are rewritten to ECMA-262 (the dialect
JSON Schema names) by :func:`ecma_pattern`.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Annotated, Any, Literal

import attrs
import msgspec
from msgspec import UNSET, Meta, UnsetType

from mesh.api.schema import (
    BackfillBody,
    BulkBody,
    CalendarIntervalTriggerBody,
    CronTriggerBody,
    DateText,
    DateTimeText,
    DateTriggerBody,
    Id,
    IntervalTriggerBody,
    JobBody,
    MemberBody,
    PauseBody,
    ScheduleBody,
)
from mesh.scheduling import controls
from mesh.scheduling.state import OUTCOMES

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"
REF = "#/components/schemas/{name}"
Role = Literal["read", "operate", "admin"]

# --- response shapes (documentation only; checked against live answers by the fuzz test) ----

Timestamp = Annotated[str, Meta(description="ISO-8601 date-time with offset")]


class Error(msgspec.Struct):
    """Every 4xx/5xx answer."""

    error: Annotated[str, Meta(description="one sentence saying what went wrong")]


class NotTheLeader(msgspec.Struct):
    """A follower's answer to ``GET /api/backup``: ask the leader."""

    error: str
    leader_id: str | None
    leader_http: Annotated[str | None, Meta(description="the leader's HOST:PORT, if known")]


class Health(msgspec.Struct):
    node_id: str
    role: Annotated[str, Meta(description="leader, follower, precandidate or candidate")]
    term: int
    leader_id: str | None
    commit_index: int


class ClusterMember(msgspec.Struct):
    node_id: str | None
    mesh_address: str
    http_address: str | None
    state: str
    role: str | None
    last_seen: Timestamp | None
    voter: bool


class FollowingReplica(msgspec.Struct):
    replica_id: str
    zone: str
    acked: Annotated[int, Meta(description="the last change it acknowledged (a log index)")]
    lag_changes: Annotated[int, Meta(description="changes it is behind this voter")]
    last_ack_seconds: float


class Cluster(msgspec.Struct):
    leader_id: str | None
    term: int
    members: list[ClusterMember]
    replicas: Annotated[
        list[FollowingReplica] | UnsetType,
        Meta(description="the read-only replicas following this voter (voters only)"),
    ] = UNSET


class KnownNode(msgspec.Struct):
    node_id: str | None
    mesh_address: str
    http_address: str | None
    state: str
    voter: bool
    removed: bool


class Members(msgspec.Struct):
    """The voter set and every node this one knows."""

    leader_id: str | None
    term: int
    voters: list[str]
    removed: list[str]
    members: list[KnownNode]


class Schedule(msgspec.Struct):
    """A schedule as the API shows it (docs/api.md, "A schedule in responses")."""

    id: str
    task: str
    trigger: Annotated[
        dict[str, Any], Meta(description="the trigger's configuration, with its 'type'")
    ]
    args: list[Any]
    kwargs: dict[str, Any]
    coalesce: str
    misfire_grace_time: float | None
    max_jitter: float | None
    paused: bool
    metadata: dict[str, Any]
    overlap: str
    retry: controls.Retry | None
    timeout: float | None
    target: controls.Target | None
    history: controls.History | None
    remaining_runs: int | None
    notify: controls.Notify | None
    note: str
    next_fire_time: Timestamp | None
    last_fire_time: Timestamp | None
    warnings: list[str] | UnsetType = UNSET


class ScheduleList(msgspec.Struct):
    schedules: list[Schedule]
    next: Annotated[str | None, Meta(description="`after` of the next page; null: last page")]


class BulkItem(msgspec.Struct):
    id: str
    outcome: Annotated[str, Meta(description="created, updated, unchanged or conflict")]
    next_fire_time: Timestamp | None


class BulkResult(msgspec.Struct):
    """What POST /api/schedules/bulk did, once committed (docs/api.md, "Many at once")."""

    created: int
    updated: int
    unchanged: Annotated[int, Meta(description="the id exists with the same definition")]
    conflicts: Annotated[list[str], Meta(description="ids left as they were (replace: false)")]
    schedules: Annotated[list[BulkItem], Meta(description="one per item, in order")]
    warnings: list[str] | UnsetType = UNSET


class Triggered(msgspec.Struct):
    job_id: Annotated[str, Meta(description="a UUID")]
    idempotency_key: Annotated[str, Meta(description="<schedule>@<now>#trigger")]
    queued: Annotated[
        bool,
        Meta(description="false: the schedule's overlap policy skipped it (recorded `skipped`)"),
    ]


class Backfilled(msgspec.Struct):
    fire_times: Annotated[int, Meta(description="fire times of the trigger in the range")]
    already_run: Annotated[int, Meta(description="of them: ran, running or queued already")]
    job_ids: Annotated[list[str], Meta(description="the jobs of the others, in fire-time order")]


class JobAccepted(msgspec.Struct):
    job_id: Annotated[str, Meta(description="a UUID")]
    warnings: list[str] | UnsetType = UNSET


class JobStatus(msgspec.Struct):
    job_id: str
    status: Annotated[str, Meta(description="pending, running, or the outcome once finished")]
    task: str
    schedule_id: str | None


class Execution(msgspec.Struct):
    job_id: str
    schedule_id: str | None
    task: str
    scheduled_fire_time: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None
    handler_id: str | None
    outcome: str
    term: int | None
    shard: Annotated[
        list[int] | None, Meta(description="`[index, count]` of a broadcast's run; else absent")
    ] = None


class ExecutionList(msgspec.Struct):
    executions: list[Execution]
    next: Annotated[str | None, Meta(description="`after` of the next page; null: last page")]


class Handler(msgspec.Struct):
    handler_id: str
    tasks: list[str]
    tags: Annotated[dict[str, str], Meta(description="its `--tag KEY=VALUE`s")]
    state: str
    active_jobs: int
    succeeded: int
    failed: int
    avg_ms: float | None
    last_seen: Timestamp


class HandlerList(msgspec.Struct):
    handlers: list[Handler]
    next: Annotated[str | None, Meta(description="`after` of the next page; null: last page")]


class AuditEntry(msgspec.Struct):
    """One recorded mutation: who (token name and role), what, when, from where."""

    id: int
    ts: Timestamp
    node_id: str
    received_by: str
    token: Annotated[str | None, Meta(description="the token's name (null: no tokens)")]
    role: str | None
    method: str
    path: str
    status: int


class AuditPage(msgspec.Struct):
    audit: list[AuditEntry]
    next_after: Annotated[int | None, Meta(description="pass as ?after= for the next page")]


class WhoAmI(msgspec.Struct):
    """The caller, and what it may do on this node (the dashboard hides the rest)."""

    name: Annotated[str | None, Meta(description="the token's name (null: no token)")]
    role: Annotated[str | None, Meta(description="read, operate or admin (null: no tokens)")]
    may_operate: bool
    may_admin: bool
    read_only: Annotated[bool, Meta(description="this node refuses every write (403)")]
    node_id: str
    node_role: str
    zone: str | None


class RunningJob(msgspec.Struct):
    job_id: str
    schedule_id: str | None
    task: str
    scheduled_fire_time: Timestamp | None
    attempt: int
    term: int | None
    handler_id: str | None


class NextFire(msgspec.Struct):
    schedule_id: str
    task: str
    next_fire_time: Timestamp
    trigger: dict[str, Any]


class ActivityBucket(msgspec.Struct):
    start: Timestamp
    fires: int
    succeeded: int
    failed: int
    lateness_p50_ms: float | None
    lateness_max_ms: float | None


class Activity(msgspec.Struct):
    bucket_seconds: int
    buckets: Annotated[list[ActivityBucket], Meta(description="oldest first")]


class LeadershipEvent(msgspec.Struct):
    ts: Timestamp
    node_id: str
    term: int
    event: Annotated[str, Meta(description="elected, stepped_down, transferred or observed")]
    detail: str


class Overview(msgspec.Struct):
    """The dashboard's overview in one answer (its size does not grow with the schedules)."""

    node_id: str
    role: str | None
    leader_id: str | None
    term: int
    commit_index: int
    has_quorum: bool | None
    read_only: bool
    now: Timestamp
    schedules: int
    paused: int
    jobs_pending: int
    jobs_running: int
    handlers: int
    running: Annotated[list[RunningJob], Meta(description="at most 50")]
    next_fires: Annotated[list[NextFire], Meta(description="at most 20, soonest first")]
    activity: Annotated[Activity, Meta(description="the last ten minutes, by finish time")]
    leadership: Annotated[list[LeadershipEvent], Meta(description="newest first, at most 20")]
    members: list[dict[str, Any]]


# --- scenarios (mesh/scenarios/http.py; docs/scenarios.md) ---

# mesh.scenarios.model.NAME_PATTERN (a layer above this one: tests/test_openapi.py compares).
SCENARIO_NAME = r"^[A-Za-z0-9_.-]{1,64}$"

ScenarioStatus = Annotated[
    str, Meta(description="queued, running, passed, failed, error or cancelled")
]


class ScenarioLoaded(msgspec.Struct):
    name: str
    version: Annotated[str, Meta(description="the first 16 hex digits of the text's SHA-256")]


class ScenarioLastRun(msgspec.Struct):
    run_id: str
    status: ScenarioStatus
    started_at: Timestamp | None
    finished_at: Timestamp | None


class ScenarioEntry(msgspec.Struct):
    """A loaded scenario."""

    name: str
    description: str
    version: str
    parameters: Annotated[dict[str, Any], Meta(description="name -> default")]
    depends_on: list[str]
    steps: Annotated[int, Meta(description="how many steps it has")]
    loaded_at: Timestamp
    last_run: ScenarioLastRun | None


class ScenarioDetail(ScenarioEntry):
    """A loaded scenario with its definition (and its text, for operate and admin callers)."""

    definition: Annotated[dict[str, Any], Meta(description="the file's `test` mapping as JSON")]
    source: Annotated[str | UnsetType, Meta(description="the YAML text (not for read)")] = UNSET


class ScenarioList(msgspec.Struct):
    scenarios: Annotated[list[ScenarioEntry], Meta(description="by name")]


class ScenarioRunQueued(msgspec.Struct):
    run_id: Annotated[str, Meta(description="16 hex digits")]


class ScenarioStepProgress(msgspec.Struct):
    index: Annotated[int, Meta(description="the step running (0-based)")]
    name: str | None
    done: Annotated[int, Meta(description="its finished iterations")]
    of: Annotated[int | None, Meta(description="its iterations (1 for an action step)")]


class ScenarioMetric(msgspec.Struct):
    value: Annotated[float | None, Meta(description="null: no data (no fire recorded)")]
    unit: str


class ScenarioAssertion(msgspec.Struct):
    expr: Annotated[str, Meta(description="as written, after substitution")]
    metric: str
    op: Annotated[str, Meta(description="> >= < <= == !=")]
    threshold: float
    value: Annotated[float | None, Meta(description="measured; null fails the assertion")]
    passed: bool


class ScenarioRun(msgspec.Struct):
    """A run: its status, progress, metrics and assertions (docs/scenarios.md, "Results")."""

    run_id: str
    name: str
    version: str
    status: ScenarioStatus
    source: Annotated[str, Meta(description="api, schedule or cli")]
    parameters: dict[str, Any]
    requested_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    leader: Annotated[str | None, Meta(description="the node running it")]
    resumed: Annotated[int, Meta(description="times a new leader resumed it")]
    depends_on: Annotated[list[str], Meta(description="the runs of its dependencies")]
    step: ScenarioStepProgress
    metrics: dict[str, ScenarioMetric]
    assertions: Annotated[list[ScenarioAssertion], Meta(description="empty until it ends")]
    error: str | None
    errors: Annotated[list[str], Meta(description="the first action errors (at most 10)")]
    samples: Annotated[
        list[dict[str, Any]] | UnsetType,
        Meta(description="the time series (`t` in seconds and metric values); results only"),
    ] = UNSET


class ScenarioRunList(msgspec.Struct):
    runs: Annotated[list[ScenarioRun], Meta(description="newest first, without samples")]


class ScenarioCancelled(msgspec.Struct):
    run_id: str
    status: Annotated[str | None, Meta(description="the run's status once the cancel applied")]


class OpenAPIDocument(msgspec.Struct):
    """This document."""

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


Trigger = IntervalTriggerBody | CronTriggerBody | DateTriggerBody | CalendarIntervalTriggerBody


class ScenarioRunBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/tests/run`` (checked by its handler; this is its description)."""

    name: Annotated[str, Meta(pattern=SCENARIO_NAME)]
    parameters: Annotated[
        dict[str, Any] | None,
        Meta(description="name -> value, of the type of the parameter's default"),
    ] = None


class ScenarioScheduleBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/tests/schedule``: a schedule whose fires queue runs of the scenario."""

    name: Annotated[str, Meta(pattern=SCENARIO_NAME)]
    trigger: Annotated[Trigger, Meta(description="as a schedule's trigger")]
    parameters: dict[str, Any] | None = None
    id: Annotated[str | UnsetType, Meta(description="default scenario-NAME")] = UNSET


# --- the operations ------------------------------------------------------------------------------

ERRORS = {
    400: ("BadRequest", "bad input; the message names the field"),
    401: ("Unauthorized", "missing or bad token (with tokens configured)"),
    403: ("Forbidden", "the token's role is too low, or the node is read-only"),
    404: ("NotFound", "no such schedule, job or node"),
    408: ("RequestTimeout", "the request body did not arrive in time"),
    409: ("Conflict", "the id exists already, or a membership change is in progress"),
    413: ("TooLarge", "request body too large"),
    429: ("TooManyRequests", "too many jobs queued; retry later"),
    503: (
        "Unavailable",
        "no leader or quorum, or the write was not confirmed (it may apply), or too many event "
        "streams",
    ),
}


@attrs.frozen
class Operation:
    """One method on one path: what it takes, what it answers, which role it needs."""

    method: str
    path: str
    summary: str
    # status -> a Struct (JSON), a str (another media type), a tuple of them (the query chooses:
    # ?format=csv), None (empty)
    answers: dict[int, Any]
    body: Any = None  # the request body's Struct, or a str: the media type of a text body
    body_required: bool = True
    role: Role | None = "read"  # None: open, even with tokens configured
    errors: tuple[int, ...] = ()
    query: tuple[dict[str, Any], ...] = ()
    scheduling: bool = False  # served only by a node with a scheduling service
    audit: bool = False  # served only by a node with an audit log
    backup: bool = False  # served only by a voter (GET /api/backup)
    scenarios: bool = False  # served only by a voter with the scenario suite (mesh.app)
    path_params: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # over _PATH_PARAMS


def _id_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string"},
    }


WRITE_ERRORS = (400, 408, 413, 503)
# limit/after of the paged lists (docs/api.md "Pages"); /api/executions has its own limit bound.
_PAGE_QUERY: tuple[dict[str, Any], ...] = (
    {
        "name": "limit",
        "in": "query",
        "description": "at most this many (default and maximum 1000)",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
    },
    {
        "name": "after",
        "in": "query",
        "description": "the `next` of the previous page",
        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
    },
)

_FORMAT_QUERY = {
    "name": "format",
    "in": "query",
    "description": "json (default) or csv",
    "schema": {"type": "string", "enum": ["json", "csv"]},
}
_RUN_ID = {"type": "string", "pattern": "^[0-9a-f]{16}$"}
_SCENARIO_PARAMS = {
    "name": _id_param("name", "a scenario's name", {"type": "string", "pattern": SCENARIO_NAME}),
    "run_id": _id_param("run_id", "a run id (16 hex digits)", _RUN_ID),
}
# /api/tests (mesh/scenarios/http.py): a voter adds them to its app (mesh.app.add_scenarios).
_SCENARIO_OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/api/tests/load",
        "load a scenario from its YAML text (docs/scenarios.md), replacing one of the same name",
        {201: ScenarioLoaded},
        body="text/plain",
        role="operate",
        errors=(*WRITE_ERRORS, 409),
    ),
    Operation(
        "post",
        "/api/tests/run",
        "queue a run of a loaded scenario (its dependencies first, as their own runs)",
        {202: ScenarioRunQueued},
        body=ScenarioRunBody,
        role="operate",
        errors=(*WRITE_ERRORS, 409),
    ),
    Operation(
        "post",
        "/api/tests/schedule",
        "a schedule whose every fire queues a run of a loaded scenario",
        {201: Schedule},
        body=ScenarioScheduleBody,
        role="operate",
        errors=(*WRITE_ERRORS, 409),
    ),
    Operation("get", "/api/tests", "the loaded scenarios", {200: ScenarioList}),
    Operation(
        "get",
        "/api/tests/library/{name}",
        "one loaded scenario with its definition (and its YAML text, but for read callers)",
        {200: ScenarioDetail},
        errors=(404,),
    ),
    Operation(
        "delete",
        "/api/tests/library/{name}",
        "unload a scenario (a run of it still queued ends in error)",
        {204: None},
        role="operate",
        errors=(503, 404),
    ),
    Operation(
        "get",
        "/api/tests/runs",
        "the runs, newest first, without their samples (format=csv: a row per run)",
        {200: (ScenarioRunList, "text/csv")},
        errors=(400,),
        query=(
            {
                "name": "name",
                "in": "query",
                "description": "only this scenario's runs",
                "schema": {"type": "string"},
            },
            {
                "name": "limit",
                "in": "query",
                "description": "at most this many (default 50)",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
            },
            _FORMAT_QUERY,
        ),
    ),
    Operation(
        "post",
        "/api/tests/runs/{run_id}/cancel",
        "stop a queued or running run (it ends cancelled)",
        {202: ScenarioCancelled},
        role="operate",
        errors=(503, 404),
    ),
    Operation(
        "get",
        "/api/tests/results/{run_id}",
        "a run's status, metrics, assertions and samples (format=csv: a row per metric and "
        "assertion)",
        {200: (ScenarioRun, "text/csv")},
        errors=(400, 404),
        query=(_FORMAT_QUERY,),
    ),
    Operation(
        "get",
        "/api/tests/metrics/{run_id}",
        "a run's progress as Server-Sent Events: `progress` with the run (no samples) when it "
        "changes, at most twice a second, then `done` with the final run; then the end",
        {200: "text/event-stream"},
        errors=(404, 503),
    ),
)

OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/api/health", "this node's role, term and leader", {200: Health}, role=None),
    Operation("get", "/api/cluster", "the leader, the term and every node known", {200: Cluster}),
    Operation("get", "/api/cluster/members", "the voters", {200: Members}),
    Operation(
        "post",
        "/api/cluster/members",
        "make a known node a voter (through the Raft log)",
        {200: Members},
        body=MemberBody,
        role="admin",
        errors=(*WRITE_ERRORS, 404, 409),
    ),
    Operation(
        "delete",
        "/api/cluster/members/{node_id}",
        "remove a voter (through the Raft log)",
        {200: Members},
        role="admin",
        errors=(503, 404, 409),
    ),
    Operation(
        "get", "/metrics", "Prometheus metrics", {200: "text/plain; version=0.0.4"}, role=None
    ),
    Operation("get", "/api/openapi.json", "this document", {200: OpenAPIDocument}),
    Operation("get", "/", "the dashboard (docs/dashboard.md)", {200: "text/html"}, role=None),
    Operation(
        "get",
        "/dashboard/{name}",
        "a file of the dashboard (script, style, icon)",
        {200: "application/octet-stream"},
        role=None,
        errors=(404,),
    ),
    Operation("get", "/api/whoami", "the caller's role and what it may do here", {200: WhoAmI}),
    Operation(
        "get",
        "/api/overview",
        "the dashboard's overview: counts, next fires, running jobs, activity, leaders",
        {200: Overview},
        errors=(400,),
        scheduling=True,
    ),
    Operation(
        "get",
        "/api/events",
        "live changes as Server-Sent Events (docs/api.md, Events); a stream that stays open",
        {200: "text/event-stream"},
        errors=(400, 503),
        query=(
            {
                "name": "last_event_id",
                "in": "query",
                "description": "resume after this event id (as the Last-Event-ID header)",
                "schema": {"type": "string", "maxLength": 200},
            },
        ),
        scheduling=True,
    ),
    Operation(
        "get",
        "/api/audit",
        "the mutations recorded on this node, oldest first",
        {200: AuditPage},
        role="admin",
        errors=(400,),
        query=(
            {
                "name": "limit",
                "in": "query",
                "description": "at most this many (default 100)",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
            },
            {
                "name": "after",
                "in": "query",
                "description": "entries with an id above this one",
                "schema": {"type": "integer", "minimum": 0},
            },
        ),
        audit=True,
    ),
    Operation(
        "get",
        "/api/backup",
        "a consistent backup of the replicated state, from the leader (docs/deployment.md)",
        {200: "application/octet-stream", 421: NotTheLeader},
        role="admin",
        errors=(400, 503),
        backup=True,
    ),
    Operation(
        "get",
        "/api/handlers",
        "the handlers, a page at a time",
        {200: HandlerList},
        errors=(400,),
        query=_PAGE_QUERY,
        scheduling=True,
    ),
    Operation(
        "get",
        "/api/schedules",
        "every schedule, a page at a time (by id)",
        {200: ScheduleList},
        errors=(400,),
        query=(
            *_PAGE_QUERY,
            {
                "name": "q",
                "in": "query",
                "description": "only the schedules whose id or task contains this text"
                " (case-insensitive)",
                "schema": {"type": "string", "maxLength": 200},
            },
            {
                "name": "paused",
                "in": "query",
                "description": "only the paused (true) or the active (false) schedules",
                "schema": {"type": "string", "enum": ["true", "false"]},
            },
        ),
        scheduling=True,
    ),
    Operation(
        "post",
        "/api/schedules",
        "create a schedule (an omitted id gets a random UUID)",
        {201: Schedule},
        body=ScheduleBody,
        role="operate",
        errors=(*WRITE_ERRORS, 409),
        scheduling=True,
    ),
    Operation(
        "post",
        "/api/schedules/bulk",
        "create, or create and replace, many schedules in one commit (all items valid, or "
        "nothing written)",
        {200: BulkResult},
        body=BulkBody,
        role="operate",
        errors=WRITE_ERRORS,
        scheduling=True,
    ),
    Operation(
        "get",
        "/api/schedules/{id}",
        "one schedule",
        {200: Schedule},
        errors=(404,),
        scheduling=True,
    ),
    Operation(
        "put",
        "/api/schedules/{id}",
        "replace a schedule (the body's id may be omitted)",
        {200: Schedule},
        body=ScheduleBody,
        role="operate",
        errors=(*WRITE_ERRORS, 404),
        scheduling=True,
    ),
    Operation(
        "delete",
        "/api/schedules/{id}",
        "delete a schedule",
        {204: None},
        role="operate",
        errors=(503, 404),
        scheduling=True,
    ),
    Operation(
        "post",
        "/api/schedules/{id}/pause",
        "pause a schedule; the optional note is shown with it until it is resumed",
        {200: Schedule},
        body=PauseBody,
        body_required=False,
        role="operate",
        errors=(*WRITE_ERRORS, 404),
        scheduling=True,
    ),
    Operation(
        "post",
        "/api/schedules/{id}/resume",
        "resume a schedule",
        {200: Schedule},
        role="operate",
        errors=(503, 404),
        scheduling=True,
    ),
    Operation(
        "post",
        "/api/schedules/{id}/trigger",
        "run the schedule once now, outside its times (also while it is paused); no body",
        {202: Triggered},
        role="operate",
        errors=(*WRITE_ERRORS, 404, 429),
        scheduling=True,
    ),
    Operation(
        "post",
        "/api/schedules/{id}/backfill",
        "run each fire time of the schedule in [start, end) that has not run, once, one after "
        "another in fire-time order (at most 1000 per request)",
        {202: Backfilled},
        body=BackfillBody,
        role="operate",
        errors=(*WRITE_ERRORS, 404, 409),
        scheduling=True,
    ),
    Operation(
        "post",
        "/api/jobs",
        "run a task now",
        {202: JobAccepted},
        body=JobBody,
        role="operate",
        errors=(*WRITE_ERRORS, 429),
        scheduling=True,
    ),
    Operation(
        "get",
        "/api/jobs/{job_id}",
        "a job's status and result",
        {200: JobStatus},
        errors=(400, 404),
        scheduling=True,
    ),
    Operation(
        "get",
        "/api/executions",
        "the latest executions, newest first",
        {200: ExecutionList},
        errors=(400,),
        query=(
            {
                "name": "schedule_id",
                "in": "query",
                "description": "only this schedule's executions",
                "schema": {"type": "string"},
            },
            {
                "name": "outcome",
                "in": "query",
                "description": "only the executions with this outcome",
                "schema": {"type": "string", "enum": list(OUTCOMES)},
            },
            {
                "name": "since",
                "in": "query",
                "description": "only the executions whose scheduled fire time (for a run-now job:"
                " its start, else its finish) is at or after this ISO-8601 date-time (no offset:"
                " UTC)",
                "schema": {"type": "string", "format": "date-time"},
            },
            {
                "name": "limit",
                "in": "query",
                "description": "at most this many (default 100)",
                "schema": {"type": "integer", "minimum": 1, "maximum": 10_000},
            },
            _PAGE_QUERY[1],
        ),
        scheduling=True,
    ),
    *(
        attrs.evolve(op, scenarios=True, path_params=_SCENARIO_PARAMS)
        for op in _SCENARIO_OPERATIONS
    ),
)

_ID = msgspec.json.schema(Id)
_PATH_PARAMS = {
    "node_id": _id_param("node_id", "a voter's node id", _ID),
    "id": _id_param("id", "a schedule id", _ID),
    "name": _id_param("name", "a file name", {"type": "string", "pattern": "^[a-z0-9_.-]+$"}),
    "job_id": _id_param("job_id", "a job id (a UUID)", {"type": "string", "format": "uuid"}),
}


def _served(op: Operation, scheduling: bool, audit: bool, backup: bool, scenarios: bool) -> bool:
    return (
        (scheduling or not op.scheduling)
        and (audit or not op.audit)
        and (backup or not op.backup)
        and (scenarios or not op.scenarios)
    )


@functools.cache
def _document(scheduling: bool, audit: bool, backup: bool, scenarios: bool) -> dict[str, Any]:
    ops = [op for op in OPERATIONS if _served(op, scheduling, audit, backup, scenarios)]
    structs: list[Any] = [Error]
    structs += [op.body for op in ops if isinstance(op.body, type)]
    answers = [a for op in ops for v in op.answers.values() for a in _alternatives(v)]
    structs += [a for a in answers if isinstance(a, type)]
    if ScheduleBody in structs:
        structs.append(Trigger)
    refs, schemas = msgspec.json.schema_components(structs, ref_template=REF)
    ref_of = dict(zip(structs, refs, strict=True))
    if ScheduleBody in structs:
        # The handlers take ``trigger`` as an object and parse it themselves (for clearer
        # errors); what they accept is exactly the tagged union of the trigger bodies.
        schemas["Trigger"] = ref_of[Trigger]
        trigger = schemas["ScheduleBody"]["properties"]["trigger"]
        schemas["ScheduleBody"]["properties"]["trigger"] = {
            "$ref": REF.format(name="Trigger"),
            "description": trigger.get("description", ""),
        }
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method] = _operation(op, ref_of)
    _rewrite_patterns(schemas)
    _rewrite_patterns(paths)
    _add_formats(schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "ScheduleZero Mesh",
            "version": API_VERSION,
            "description": "Every node serves this API; writes are forwarded to the leader "
            "(docs/api.md). Errors are JSON {'error': '...'}. With a tokens file, every "
            "/api/ request but /api/health needs a Bearer token of the role named in "
            "x-required-role (read < operate < admin).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                name: _json_response(description, {"$ref": REF.format(name="Error")})
                | ({"headers": _WWW_AUTHENTICATE} if status == 401 else {})
                for status, (name, description) in ERRORS.items()
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}


def _operation(op: Operation, ref_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.method + re.sub(r"[^A-Za-z0-9]+", "_", op.path).rstrip("_"),
        "summary": op.summary,
    }
    params = [
        copy.deepcopy(op.path_params.get(name) or _PATH_PARAMS[name])
        for name in re.findall(r"\{(\w+)\}", op.path)
    ]
    params += op.query
    if params:
        out["parameters"] = params
    if isinstance(op.body, str):
        out["requestBody"] = {
            "required": op.body_required,
            "content": {op.body: {"schema": {"type": "string", "minLength": 1}}},
        }
    elif op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": ref_of[op.body]}},
        }
    responses: dict[str, Any] = {}
    for status, answer in op.answers.items():
        if answer is None:
            responses[str(status)] = {"description": "done"}
            continue
        content: dict[str, Any] = {}
        for shape in _alternatives(answer):
            if isinstance(shape, str):
                content[shape.split(";")[0]] = {"schema": {"type": "string"}}
            else:
                content["application/json"] = {"schema": ref_of[shape]}
        responses[str(status)] = {"description": "OK", "content": content}
    errors = set(op.errors)
    if op.role is None:
        out["security"] = []
    else:
        out["x-required-role"] = op.role
        errors |= {401, 403}
    for status in sorted(errors):
        responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    out["responses"] = responses
    return out


def _alternatives(answer: Any) -> tuple[Any, ...]:
    return answer if isinstance(answer, tuple) else (answer,)


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(
    *,
    scheduling: bool = True,
    audit: bool = True,
    backup: bool = True,
    scenarios: bool | None = None,
) -> dict[str, Any]:
    """The OpenAPI document of a node's API (a fresh copy); ``scheduling=False``,
    ``audit=False``, ``backup=False`` and ``scenarios=False`` leave out the routes served only
    by a node with a scheduling service, an audit log, a backup source (a voter) or the
    scenario suite. The suite's routes are added after the app is made (mesh.app adds them to
    every voter, and only there): by default they are in when both scheduling and backup are."""
    return copy.deepcopy(
        _document(scheduling, audit, backup, _scenarios(scenarios, scheduling, backup))
    )


def documented_routes(
    *,
    scheduling: bool = True,
    audit: bool = True,
    backup: bool = True,
    scenarios: bool | None = None,
) -> set[tuple[str, str]]:
    """``(METHOD, path)`` of every operation the document describes."""
    with_suite = _scenarios(scenarios, scheduling, backup)
    return {
        (op.method.upper(), op.path)
        for op in OPERATIONS
        if _served(op, scheduling, audit, backup, with_suite)
    }


def _scenarios(scenarios: bool | None, scheduling: bool, backup: bool) -> bool:
    return scheduling and backup if scenarios is None else scenarios


# --- regular expressions: Python's re → ECMA-262 --------------------------------------------------


def ecma_pattern(pattern: str) -> str:
    """``pattern`` (Python ``re``) in ECMA-262 with the same meaning, for the constructs
    schema.py uses: ``\\Z`` (end of text: ECMA's ``$`` without the multiline flag) and a
    dot-all group ``(?s:...)`` (its dots become ``[\\s\\S]``). Any other Python-only construct
    raises ValueError, so a new one is noticed (tests/test_openapi.py builds the document)."""
    out = pattern.replace(r"\Z", "$")
    out = re.sub(r"\(\?s:((?:[^()]|\((?!\?)[^()]*\)|\(\?:[^()]*\))*)\)", _dotall, out)
    if "(?" in out.replace("(?:", "").replace("(?!", "").replace("(?=", "") or r"\A" in out:
        raise ValueError(f"no ECMA-262 rewrite for the pattern {pattern!r}")
    return out


def _dotall(m: re.Match[str]) -> str:
    return "(?:" + re.sub(r"(?<!\\)\.", r"[\\s\\S]", m.group(1)) + ")"


def _rewrite_patterns(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                node[key] = ecma_pattern(value)
            else:
                _rewrite_patterns(value)
    elif isinstance(node, list):
        for item in node:
            _rewrite_patterns(item)


# --- formats --------------------------------------------------------------------------------------

# schema.py's date texts are plain strings to msgspec (the trigger builders parse them, for a
# clearer error); the document names their format, so that generators send real dates too.
FORMATS = {"date-time": DateTimeText, "date": DateText}


def _add_formats(node: Any) -> None:
    plain = {fmt: msgspec.json.schema(tp) for fmt, tp in FORMATS.items()}
    if isinstance(node, dict):
        for fmt, schema in plain.items():
            if node == schema:
                node["format"] = fmt
        for value in node.values():
            _add_formats(value)
    elif isinstance(node, list):
        for item in node:
            _add_formats(item)
