"""``/api/tests``: load scenarios, run and schedule them, read and export their results.

Writes (load, delete, run, schedule, cancel) are forwarded to the leader like every write, and
committed there; reads (the library, runs, results, the live stream) are answered by any node
from its replica. docs/api.md and docs/scenarios.md list the routes; the contract is the
"Scenarios" section of INTERFACE.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from mesh.api.auth import CALLER_KEY
from mesh.api.limits import LIMITS_KEY, loads
from mesh.api.schema import BadRequest, parse_schedule_body, schedule_to_json
from mesh.scenarios import export, measure
from mesh.scenarios.library import load_command, start_command
from mesh.scenarios.model import METRICS, NAME_PATTERN, ScenarioError
from mesh.scenarios.runner import SCENARIO_TASK, new_run_id
from mesh.scheduling.scenariobook import FINISHED
from mesh.scheduling.service import ScheduleExists
from mesh.security.redact import redact

if TYPE_CHECKING:
    from mesh.scheduling.service import SchedulingService

STREAM_POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
MAX_STREAMS = 32  # live streams one node serves at once
_RUN_ID_CHARS = frozenset("0123456789abcdef")


def add_scenario_routes(app: web.Application, service: SchedulingService) -> None:
    book = service.state.scenarios
    streams: set[asyncio.Task[Any]] = set()

    def caller_name(request: web.Request) -> str | None:
        caller = request.get(CALLER_KEY)
        return caller.name if caller is not None else None

    def masked(request: web.Request) -> bool:
        caller = request.get(CALLER_KEY)
        return caller is None or caller.role == "read"  # unknown caller: mask (fail closed)

    def the_run(request: web.Request) -> dict[str, Any]:
        run_id = request.match_info["run_id"]
        run = book.runs.get(run_id) if set(run_id) <= _RUN_ID_CHARS else None
        if run is None:
            raise web.HTTPNotFound(reason=f"no run {run_id[:40]!r}")
        return run

    async def propose(command: dict[str, Any]) -> Any:
        command["at"] = datetime.now(UTC).isoformat()
        await service.wait_ready(4.0)  # the leader's scheduler runs: so will the runner
        return await service.replica.propose(command)

    # ------------------------------------------------------------------ the library

    async def load(request: web.Request) -> web.Response:
        raw = await request.read()
        if not raw.strip():
            raise BadRequest("request body: expected the scenario's YAML text")
        try:
            command = load_command(raw, by=caller_name(request))
        except ScenarioError as e:
            raise BadRequest(str(e)) from None
        result = await propose(command)
        if "refused" in result:
            return web.json_response({"error": result["refused"]}, status=409)
        return web.json_response(result, status=201)

    async def library(request: web.Request) -> web.Response:
        last = _last_runs(book.runs)
        entries = [_entry_json(e, last.get(n)) for n, e in sorted(book.library.items())]
        return web.json_response({"scenarios": _mask(entries, masked(request))})

    async def one(request: web.Request) -> web.Response:
        entry = _entry(book, request.match_info["name"])
        body = _entry_json(entry, _last_runs(book.runs).get(entry["name"]))
        body["definition"] = entry["definition"]
        if masked(request):  # the text cannot be masked key by key: readers go without
            return web.json_response(_mask(body, True))
        body["source"] = entry["source"]
        return web.json_response(body)

    async def delete(request: web.Request) -> web.Response:
        _entry(book, request.match_info["name"])
        await propose({"op": "scenario_delete", "name": request.match_info["name"]})
        return web.Response(status=204)

    # ------------------------------------------------------------------ runs

    async def run(request: web.Request) -> web.Response:
        body = _object(request, await request.read(), {"name", "parameters"})
        name, parameters = _name(body), _parameters(body)
        try:
            command = start_command(
                book, name, parameters, run_id=new_run_id(), source="api", by=caller_name(request)
            )
        except ScenarioError as e:
            raise BadRequest(str(e)) from None
        result = await propose(command)
        if "refused" in result:
            return web.json_response({"error": result["refused"]}, status=409)
        return web.json_response({"run_id": result["run_id"]}, status=202)

    async def schedule(request: web.Request) -> web.Response:
        body = _object(request, await request.read(), {"name", "trigger", "parameters", "id"})
        name, parameters = _name(body), _parameters(body)
        if "trigger" not in body:
            raise BadRequest("trigger: required (an object with a 'type', as for schedules)")
        try:  # checked now, as a fire would: a scenario that cannot run is not scheduled
            start_command(book, name, parameters, run_id=new_run_id(), source="schedule", by=None)
        except ScenarioError as e:
            raise BadRequest(str(e)) from None
        # The id and the trigger are checked as any schedule's; the task is the mesh's own.
        sid = body.get("id", f"scenario-{name}")
        checked = parse_schedule_body(
            {"id": sid, "task": "placeholder", "trigger": body["trigger"]}
        )
        spec = msgspec.structs.replace(
            checked, task=SCENARIO_TASK, kwargs={"name": name, "parameters": parameters or {}}
        )
        try:
            schedule = await service.put_schedule(spec, replace=False)
        except ScheduleExists:
            return web.json_response({"error": f"schedule {sid!r} already exists"}, status=409)
        return web.json_response(schedule_to_json(schedule), status=201)

    async def runs(request: web.Request) -> web.Response:
        name = request.query.get("name")
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            raise BadRequest("limit: an integer from 1 to 1000") from None
        if not 1 <= limit <= 1000:
            raise BadRequest("limit: an integer from 1 to 1000")
        chosen = [r for r in reversed(book.runs.values()) if name is None or r["name"] == name]
        views = [_run_json(r, samples=False) for r in chosen[:limit]]
        if _format(request) == "csv":
            return _csv(export.runs_csv(views), "scenario-runs.csv")
        return web.json_response({"runs": _mask(views, masked(request))})

    async def results(request: web.Request) -> web.Response:
        view = _run_json(the_run(request), samples=True)
        if _format(request) == "csv":
            return _csv(export.result_csv(view), f"scenario-{view['run_id']}.csv")
        return web.json_response(_mask(view, masked(request)))

    async def cancel(request: web.Request) -> web.Response:
        run_ = the_run(request)
        status = await propose({"op": "scenario_cancel", "run_id": run_["run_id"]})
        return web.json_response({"run_id": run_["run_id"], "status": status}, status=202)

    async def live(request: web.Request) -> web.StreamResponse:
        run_ = the_run(request)
        if len(streams) >= MAX_STREAMS:
            return web.json_response(
                {"error": f"too many live streams on this node (limit {MAX_STREAMS})"},
                status=503,
                headers={"Retry-After": "5"},
            )
        task = asyncio.current_task()
        assert task is not None
        streams.add(task)
        try:
            return await _stream(request, book, run_["run_id"], masked(request))
        finally:
            streams.discard(task)

    app.router.add_post("/api/tests/load", load)
    app.router.add_post("/api/tests/run", run)
    app.router.add_post("/api/tests/schedule", schedule)
    app.router.add_get("/api/tests", library)
    app.router.add_get("/api/tests/library/{name}", one)
    app.router.add_delete("/api/tests/library/{name}", delete)
    app.router.add_get("/api/tests/runs", runs)
    app.router.add_post("/api/tests/runs/{run_id}/cancel", cancel)
    app.router.add_get("/api/tests/results/{run_id}", results)
    app.router.add_get("/api/tests/metrics/{run_id}", live)


async def _stream(request: web.Request, book: Any, run_id: str, masked: bool) -> web.StreamResponse:
    """SSE: ``progress`` whenever the run changed (checked every STREAM_POLL_SECONDS), a
    comment every KEEPALIVE_SECONDS, ``done`` with the final result, then the end."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    last: bytes | None = None
    quiet = 0.0
    with contextlib.suppress(ConnectionError):
        while True:
            run = book.runs.get(run_id)
            if run is None:  # dropped from the history meanwhile
                await response.write(b'event: done\ndata: {"status": "unknown"}\n\n')
                break
            view = _mask(_run_json(run, samples=False), masked)
            data = json.dumps(view, separators=(",", ":")).encode()
            if run["status"] in FINISHED:
                await response.write(b"event: done\ndata: " + data + b"\n\n")
                break
            if data != last:
                await response.write(b"event: progress\ndata: " + data + b"\n\n")
                last, quiet = data, 0.0
            elif quiet >= KEEPALIVE_SECONDS:
                await response.write(b": keepalive\n\n")
                quiet = 0.0
            await asyncio.sleep(STREAM_POLL_SECONDS)
            quiet += STREAM_POLL_SECONDS
    return response


# ---------------------------------------------------------------------- views


def _run_json(run: dict[str, Any], *, samples: bool) -> dict[str, Any]:
    """A run as the API shows it (docs/scenarios.md, "Results")."""
    p = run.get("progress") or {}
    result = run.get("result")
    if result is not None:
        metrics, assertions = result["metrics"], result["assertions"]
    else:  # live: whatever has a value so far
        measured = measure.values(run)
        metrics = {
            name: {"value": value, "unit": METRICS[name][0]}
            for name, value in measured.items()
            if value is not None
        }
        assertions = []
    view = {
        "run_id": run["run_id"],
        "name": run["name"],
        "version": run["version"],
        "status": run["status"],
        "source": run["source"],
        "parameters": run["parameters"],
        "requested_at": run["requested_at"],
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "leader": run["leader"],
        "resumed": run["resumed"],
        "depends_on": run["depends_on"],
        "step": _step_json(run, p),
        "metrics": metrics,
        "assertions": assertions,
        "error": run["error"],
        "errors": p.get("errors", []),
        "memory": p.get("memory_nodes", {}),  # node id → peak resident MB during the run
    }
    if samples:
        view["samples"] = run["samples"]
    return view


def _step_json(run: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    """Where the run is: its step (0-based ``index`` of ``steps``) and the iterations ``done``
    ``of`` it; once every step is done, ``index`` is ``steps`` and the rest is null."""
    index, steps = p.get("step", 0), p.get("steps")
    if steps is not None and index >= steps:
        return {"index": index, "steps": steps, "name": None, "done": None, "of": None}
    return {
        "index": index,
        "steps": steps,
        "name": p.get("step_name"),
        "done": p.get("done", 0),
        "of": p.get("of"),
    }


def _entry_json(entry: dict[str, Any], last: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": entry["name"],
        "description": entry["description"],
        "version": entry["version"],
        "parameters": entry["parameters"],
        "depends_on": entry["depends_on"],
        "steps": len(entry["definition"].get("steps", [])),
        "loaded_at": entry["loaded_at"],
        "last_run": (
            None
            if last is None
            else {k: last[k] for k in ("run_id", "status", "started_at", "finished_at")}
        ),
    }


def _last_runs(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for r in runs.values():  # in request order: the latest wins
        last[r["name"]] = r
    return last


def _mask(value: Any, masked: bool) -> Any:
    """Parameters are user data: a reader sees the values of sensitive names as "***"."""
    return redact(value) if masked else value


# ---------------------------------------------------------------------- requests


def _entry(book: Any, name: str) -> dict[str, Any]:
    entry = book.library.get(name)
    if entry is None:
        raise web.HTTPNotFound(reason=f"no scenario {name[:64]!r} is loaded")
    return entry


def _object(request: web.Request, raw: bytes, allowed: set[str]) -> dict[str, Any]:
    body = loads(raw, request.app[LIMITS_KEY].max_json_depth)
    if not isinstance(body, dict):
        raise BadRequest("request body: expected a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(
            f"request body: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )
    return body


def _name(body: dict[str, Any]) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise BadRequest("name: a scenario name (1 to 64 characters from A-Z a-z 0-9 _ . -)")
    return name


def _parameters(body: dict[str, Any]) -> dict[str, Any] | None:
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadRequest("parameters: an object of parameter names to values")
    return parameters


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest("format: json or csv")
    return fmt


def _csv(text: str, filename: str) -> web.Response:
    return web.Response(
        text=text,
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
