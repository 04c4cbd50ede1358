"""The CLI's client commands: ``schedules``, ``executions``, ``jobs``, ``handlers`` and
``cluster``, calls on a node's HTTP API through :class:`mesh.client.ApiClient` (docs/cli.md).

mesh.cli adds them to its parser (``add_client_commands``) and maps the errors to exit codes:
0 done, 1 the API refused or could not be reached (:class:`ApiError`, its message on stderr,
one line), 2 a usage mistake (:class:`ClientConfigError` here, argparse's errors in mesh.cli).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mesh.client import (
    DEFAULT_URL,
    ApiClient,
    ApiError,
    ClientConfigError,
    describe_trigger,
    format_table,
    short_time,
)
from mesh.scheduling.outcomes import OUTCOMES

__all__ = ["EXIT_API", "add_client_commands", "api_client", "connection_flags"]

PROG = "schedulezero"

EXIT_API = 1
OUTPUTS = ("table", "json")


def connection_flags() -> argparse.ArgumentParser:
    """Which node to call and how: ``--url``, ``--token``, ``--cacert`` (a parent parser)."""
    flags = argparse.ArgumentParser(add_help=False)  # errors are the child parser's
    flags.add_argument(
        "--url",
        metavar="URL",
        help=f"the node's HTTP API ($SCHEDULEZERO_URL, default {DEFAULT_URL})",
    )
    flags.add_argument("--token", metavar="TOKEN", help="API bearer token ($SCHEDULEZERO_TOKEN)")
    flags.add_argument(
        "--cacert", metavar="FILE", help="PEM CA to trust for https ($SCHEDULEZERO_CACERT)"
    )
    return flags


def _client_flags() -> argparse.ArgumentParser:
    """The flags every client command takes, after its own name (``schedules list -o json``)."""
    flags = argparse.ArgumentParser(add_help=False, parents=[connection_flags()])
    flags.add_argument("-o", "--output", choices=OUTPUTS, default="table", help="table or json")
    return flags


def add_client_commands(sub: Any) -> None:
    """Add the client commands to ``sub``, the ``schedulezero`` parser's subparsers."""
    common = _client_flags()

    def leaf(parent: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, parents=[common], allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    schedules = sub.add_parser(
        "schedules",
        help="list, show, create, apply, pause, resume, delete schedules",
        allow_abbrev=False,
    )
    actions = schedules.add_subparsers(dest="schedules_command", metavar="ACTION", required=True)
    leaf(actions, "list", "every schedule (all pages)", _cmd_schedules_list)
    leaf(actions, "get", "one schedule", _cmd_schedules_get).add_argument("id", metavar="ID")
    for name, verb in (("create", "create"), ("apply", "create or replace")):
        p = leaf(
            actions, name, f"{verb} the schedule(s) in FILE (JSON or YAML)", _cmd_schedules_put
        )
        p.add_argument(
            "-f", "--file", required=True, metavar="FILE", help="a schedule or a list; - = stdin"
        )
    pause = leaf(actions, "pause", "pause a schedule", _cmd_schedules_pause)
    pause.add_argument("id", metavar="ID")
    pause.add_argument("--note", metavar="TEXT", help="why it is paused")
    leaf(actions, "resume", "resume a paused schedule", _cmd_schedules_resume).add_argument(
        "id", metavar="ID"
    )
    leaf(actions, "delete", "delete a schedule", _cmd_schedules_delete).add_argument(
        "id", metavar="ID"
    )
    leaf(actions, "trigger", "run one fire now", _cmd_schedules_trigger).add_argument(
        "id", metavar="ID"
    )
    backfill = leaf(actions, "backfill", "run every fire time in [start, end)", _cmd_backfill)
    backfill.add_argument("id", metavar="ID")
    for flag in ("--start", "--end"):
        backfill.add_argument(
            flag, required=True, type=_aware_arg, metavar="T", help="ISO-8601 with an offset"
        )

    executions = leaf(sub, "executions", "the execution history, newest first", _cmd_executions)
    executions.add_argument("--schedule", metavar="ID", help="only this schedule's")
    executions.add_argument(
        "--outcome", type=_outcome_arg, metavar="O", help="only this outcome (e.g. error)"
    )
    executions.add_argument("--since", metavar="T", help="only those since this date-time")
    executions.add_argument("--limit", type=int_arg, metavar="N", help="at most N")

    leaf(sub, "handlers", "the handlers and their state", _cmd_handlers)

    jobs = sub.add_parser("jobs", help="run a task once now, show a job", allow_abbrev=False)
    jactions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    run_job = leaf(jactions, "run", "run TASK once now; prints the job id", _cmd_jobs_run)
    run_job.add_argument("task", metavar="TASK")
    run_job.add_argument("--args", type=_json_arg(list), default=[], metavar="JSON")
    run_job.add_argument("--kwargs", type=_json_arg(dict), default={}, metavar="JSON")
    leaf(jactions, "get", "a job's status and result", _cmd_jobs_get).add_argument(
        "job_id", metavar="JOB_ID"
    )

    cluster = sub.add_parser(
        "cluster", help="the mesh: leader, members, voters", allow_abbrev=False
    )
    cactions = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    leaf(cactions, "status", "leader, term, quorum and members", _cmd_cluster_status)
    leaf(cactions, "members", "the voters and every known node", _cmd_cluster_members)
    leaf(cactions, "add-member", "make a node a voter (admin)", _cmd_add_member).add_argument(
        "node_id", metavar="ID"
    )
    leaf(cactions, "remove-member", "remove a voter (admin)", _cmd_remove_member).add_argument(
        "node_id", metavar="ID"
    )


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _aware_arg(text: str) -> str:
    """A date-time with an offset (as the API wants it for a backfill), passed on as given."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO-8601 date-time such as 2026-11-01T00:00:00Z, got {text!r}"
        ) from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs an offset such as Z or +00:00, got {text!r}")
    return text


def _outcome_arg(text: str) -> str:
    if text not in OUTCOMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(OUTCOMES)}, got {text!r}")
    return text


def _json_arg(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not JSON: {text[:40]!r}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}, got {text[:40]!r}")
        return value

    return parse


def api_client(ns: argparse.Namespace) -> ApiClient:
    """The client the flags of ``connection_flags`` (or their environment variables) name."""
    env = os.environ
    url = ns.url or env.get("SCHEDULEZERO_URL") or DEFAULT_URL
    token = ns.token or env.get("SCHEDULEZERO_TOKEN") or None
    cacert = ns.cacert or env.get("SCHEDULEZERO_CACERT") or None
    try:
        return ApiClient(url, token=token, cacert=cacert)
    except ClientConfigError as e:
        raise ClientConfigError(str(e)) from None


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


_SCHEDULE_COLUMNS = ("id", "task", "trigger", "next fire", "paused")


def _schedule_row(s: dict[str, Any]) -> list[Any]:
    paused: Any = bool(s.get("paused"))
    note = s.get("note") if isinstance(s.get("note"), str) else None
    if paused and note:
        paused = f"yes: {note}"
    return [
        s.get("id"),
        s.get("task"),
        describe_trigger(s.get("trigger")),
        short_time(s.get("next_fire_time")),
        paused,
    ]


def _cmd_schedules_list(ns: argparse.Namespace) -> int:
    items = api_client(ns).schedules()
    if ns.output == "json":
        print_json(items)
    else:
        print(format_table(_SCHEDULE_COLUMNS, [_schedule_row(s) for s in items]))
    return 0


def _cmd_schedules_get(ns: argparse.Namespace) -> int:
    s = api_client(ns).schedule(ns.id)
    if ns.output == "json":
        print_json(s)
        return 0
    rows = [
        ("id", s.get("id")),
        ("task", s.get("task")),
        ("trigger", describe_trigger(s.get("trigger"))),
        ("next fire", short_time(s.get("next_fire_time"))),
        ("last fire", short_time(s.get("last_fire_time"))),
        ("paused", _schedule_row(s)[4]),
        ("coalesce", s.get("coalesce")),
        ("misfire grace", s.get("misfire_grace_time")),
        ("args", json.dumps(s.get("args", []))),
        ("kwargs", json.dumps(s.get("kwargs", {}))),
        ("metadata", json.dumps(s.get("metadata", {}))),
        *_control_rows(s),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if value is None or isinstance(value, bool):
            value = "-" if value is None else "yes" if value else "no"
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


# The added fields (docs/scheduling.md, "Controls"), in the order the API lists them.
_CONTROLS = ("overlap", "retry", "timeout", "target", "history", "remaining_runs", "notify")


def _control_rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    """The schedule's controls for ``schedules get``: objects in one line of JSON."""
    rows: list[tuple[str, Any]] = []
    for name in _CONTROLS:
        value = s.get(name)
        if isinstance(value, dict | list):
            value = json.dumps(value, separators=(", ", ": "))
        rows.append((name.replace("_", " "), value))
    rows.append(("note", s.get("note") or None))
    return rows


def _read_schedules(source: str) -> tuple[list[dict[str, Any]], bool]:
    """The schedule bodies in ``source`` (a path, or ``-`` for stdin): a JSON or YAML object, a
    list of them, or several YAML documents; and whether the file held just one object."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as e:
        raise ClientConfigError(f"-f: cannot read {source}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ClientConfigError(f"-f: {source} is not UTF-8 text") from None
    name = "stdin" if source == "-" else source
    try:
        docs = [json.loads(text)]
    except ValueError:
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise ClientConfigError(f"-f: {name} is neither JSON nor YAML{at}") from None
    items: list[Any] = []
    for doc in docs:
        items.extend(doc if isinstance(doc, list) else [doc])
    if not items:
        raise ClientConfigError(f"-f: {name} holds no schedule")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ClientConfigError(f"-f: {name}: item {i + 1} is not an object (a schedule body)")
    single = len(docs) == 1 and isinstance(docs[0], dict)
    return items, single


def _cmd_schedules_put(ns: argparse.Namespace) -> int:
    bodies, single = _read_schedules(ns.file)
    client = api_client(ns)
    if ns.schedules_command == "apply" and not single:
        try:
            return _apply_in_bulk(ns, client, bodies)
        except ApiError as e:
            if _not_offered(e, "") is e:
                raise
            # A node without POST /api/schedules/bulk (an older version): one by one.
    done: list[dict[str, Any]] = []
    for i, body in enumerate(bodies):
        label = body.get("id") if isinstance(body.get("id"), str) else f"item {i + 1}"
        try:
            if ns.schedules_command == "apply":
                action, s = client.apply_schedule(body)
            else:
                action, s = "created", client.create_schedule(body)
        except ApiError as e:
            if len(bodies) > 1:  # say which one, and that the earlier ones are in
                raise ApiError(
                    f"{label}: {e} ({len(done)} of {len(bodies)} done)", e.status
                ) from None
            raise
        done.append(s)
        for warning in s.get("warnings") or []:
            print(f"{PROG}: warning: {s.get('id')}: {warning}", file=sys.stderr)
        if ns.output == "table":
            print(f"{action} {s.get('id')} (next fire {short_time(s.get('next_fire_time'))})")
    if ns.output == "json":
        print_json(done[0] if single else done)
    return 0


# What apply prints for a bulk outcome (as the one-by-one apply says it).
_APPLIED = {"updated": "replaced"}


def _apply_in_bulk(ns: argparse.Namespace, client: ApiClient, bodies: list[dict[str, Any]]) -> int:
    """apply for a file of several schedules: ``POST /api/schedules/bulk``, a request per
    1,000 of them (docs/cli.md)."""
    total: dict[str, Any] = {"created": 0, "updated": 0, "unchanged": 0, "conflicts": []}
    items: list[dict[str, Any]] = []
    done = 0
    try:
        for _start, answer in client.apply_schedules(bodies):
            for key in ("created", "updated", "unchanged"):
                total[key] += int(answer.get(key) or 0)
            total["conflicts"] += answer.get("conflicts") or []
            got = answer.get("schedules") or []
            done += len(got)
            items += got
            for warning in answer.get("warnings") or []:
                print(f"{PROG}: warning: {warning}", file=sys.stderr)
            if ns.output == "table":
                for s in got:
                    verb = _APPLIED.get(s.get("outcome"), s.get("outcome"))
                    print(f"{verb} {s.get('id')} (next fire {short_time(s.get('next_fire_time'))})")
    except ApiError as e:
        if done:  # say that the earlier requests are in
            raise ApiError(f"{e} ({done} of {len(bodies)} done)", e.status) from None
        raise
    if ns.output == "json":
        print_json({**total, "schedules": items})
    return 0


def _print_schedule_change(ns: argparse.Namespace, s: Any, verb: str) -> None:
    if ns.output == "json":
        print_json(s)
    else:
        print(f"{verb} {ns.id}")


def _cmd_schedules_pause(ns: argparse.Namespace) -> int:
    _print_schedule_change(ns, api_client(ns).pause(ns.id, ns.note), "paused")
    return 0


def _cmd_schedules_resume(ns: argparse.Namespace) -> int:
    s = api_client(ns).resume(ns.id)
    _print_schedule_change(ns, s, f"resumed (next fire {short_time(s.get('next_fire_time'))})")
    return 0


def _cmd_schedules_delete(ns: argparse.Namespace) -> int:
    api_client(ns).delete_schedule(ns.id)
    _print_schedule_change(ns, {"id": ns.id, "deleted": True}, "deleted")
    return 0


def _not_offered(e: ApiError, what: str) -> ApiError:
    # A route this node does not have answers aiohttp's own 404/405, not the API's messages.
    if e.status in (404, 405) and str(e).split(": ", 1)[-1] in ("Not Found", "Method Not Allowed"):
        return ApiError(f"{e}: this node's API does not offer {what} (an older version?)", e.status)
    return e


def _cmd_schedules_trigger(ns: argparse.Namespace) -> int:
    try:
        answer = api_client(ns).trigger(ns.id)
    except ApiError as e:
        raise _not_offered(e, "POST /api/schedules/{id}/trigger") from None
    if ns.output == "json":
        print_json(answer)
    else:
        print(f"triggered {ns.id}: job {answer.get('job_id')}")
    return 0


def _cmd_backfill(ns: argparse.Namespace) -> int:
    try:
        answer = api_client(ns).backfill(ns.id, ns.start, ns.end)
    except ApiError as e:
        raise _not_offered(e, "POST /api/schedules/{id}/backfill") from None
    if ns.output == "json":
        print_json(answer)
    else:
        print(
            f"backfill of {ns.id}: {answer.get('fire_times')} fire times, "
            f"{answer.get('already_run')} already ran, {len(answer.get('job_ids') or [])} "
            "queued to run one after another"
        )
    return 0


def _duration(ex: dict[str, Any]) -> str:
    try:
        started = datetime.fromisoformat(str(ex["started_at"]))
        finished = datetime.fromisoformat(str(ex["finished_at"]))
    except (KeyError, ValueError, TypeError):
        return "-"
    seconds = (finished - started).total_seconds()
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def _cmd_executions(ns: argparse.Namespace) -> int:
    if ns.limit is not None and ns.limit < 1:
        raise ClientConfigError(f"--limit: must be at least 1, got {ns.limit}")
    items = api_client(ns).executions(
        schedule_id=ns.schedule, outcome=ns.outcome, since=ns.since, limit=ns.limit or 0
    )
    if ns.output == "json":
        print_json(items)
        return 0
    columns = ("job", "schedule", "outcome", "fire time", "duration", "handler", "try", "term")
    columns += ("error",)
    rows = [
        [
            ex.get("job_id"),
            ex.get("schedule_id"),
            ex.get("outcome"),
            short_time(ex.get("scheduled_fire_time") or ex.get("started_at")),
            _duration(ex),
            ex.get("handler_id"),
            ex.get("attempt"),
            ex.get("term"),
            ex.get("error"),
        ]
        for ex in items
    ]
    print(format_table(columns, rows))
    return 0


def _cmd_handlers(ns: argparse.Namespace) -> int:
    items = api_client(ns).handlers()
    if ns.output == "json":
        print_json(items)
        return 0
    columns = ("handler", "state", "tasks", "tags", "active", "ok", "failed", "avg ms")
    columns += ("last seen",)
    rows = [
        [
            h.get("handler_id"),
            h.get("state"),
            h.get("tasks"),
            h.get("tags"),
            h.get("active_jobs"),
            h.get("succeeded"),
            h.get("failed"),
            h.get("avg_ms"),
            short_time(h.get("last_seen")) if isinstance(h.get("last_seen"), str) else None,
        ]
        for h in items
    ]
    print(format_table(columns, rows))
    return 0


def _cmd_jobs_run(ns: argparse.Namespace) -> int:
    answer = api_client(ns).run_job(ns.task, ns.args, ns.kwargs)
    for warning in answer.get("warnings") or []:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if ns.output == "json":
        print_json(answer)
    else:
        print(answer.get("job_id"))  # alone, for `JOB=$(schedulezero jobs run ...)`
    return 0


def _cmd_jobs_get(ns: argparse.Namespace) -> int:
    status = api_client(ns).job(ns.job_id)
    if ns.output == "json" or not isinstance(status, dict):
        print_json(status)
        return 0
    width = max((len(k) for k in status), default=0)
    for key, value in status.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        print(f"{key + ':':<{width + 1}} {shown}")
    return 0


def _cmd_cluster_status(ns: argparse.Namespace) -> int:
    client = api_client(ns)
    cluster, health = client.cluster(), client.health()
    if ns.output == "json":
        print_json({**cluster, "node": health})
        return 0
    quorum = cluster.get("has_quorum", health.get("has_quorum"))
    print(
        f"leader: {cluster.get('leader_id') or '(none)'}  term: {cluster.get('term')}  "
        f"quorum: {'-' if quorum is None else 'yes' if quorum else 'no'}  "
        f"answered by: {health.get('node_id')} ({health.get('role')})"
    )
    columns = ("node", "role", "state", "voter", "http", "last seen")
    rows = [
        [
            m.get("node_id"),
            m.get("role"),
            m.get("state"),
            m.get("voter"),
            m.get("http_address"),
            short_time(m.get("last_seen")),
        ]
        for m in cluster.get("members", [])
    ]
    print(format_table(columns, rows))
    return 0


def _print_members(ns: argparse.Namespace, members: Any) -> None:
    if ns.output == "json":
        print_json(members)
        return
    print(
        f"leader: {members.get('leader_id') or '(none)'}  term: {members.get('term')}  "
        f"voters: {', '.join(members.get('voters', [])) or '(none)'}"
    )
    columns = ("node", "voter", "removed", "state", "mesh", "http")
    rows = [
        [
            m.get("node_id"),
            m.get("voter"),
            m.get("removed"),
            m.get("state"),
            m.get("mesh_address"),
            m.get("http_address"),
        ]
        for m in members.get("members", [])
    ]
    print(format_table(columns, rows))


def _cmd_cluster_members(ns: argparse.Namespace) -> int:
    _print_members(ns, api_client(ns).members())
    return 0


def _cmd_add_member(ns: argparse.Namespace) -> int:
    _print_members(ns, api_client(ns).add_member(ns.node_id))
    return 0


def _cmd_remove_member(ns: argparse.Namespace) -> int:
    _print_members(ns, api_client(ns).remove_member(ns.node_id))
    return 0
