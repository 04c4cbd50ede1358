"""``schedulezero scenario ...``: check, load, run and follow scenarios (docs/scenarios.md)
through a node's ``/api/tests`` routes (docs/api.md, "Scenarios"); docs/cli.md.

A scenario file is checked here first with mesh.scenarios.format, exactly as a node checks it,
and so are the ``--param`` values: a mistake is exit 2 with its line, before any call. ``run``
then loads the file, queues a run and follows it: the live stream while it lasts, then the
result every POLL_SECONDS, on any node of the mesh (a leader change may end the stream, or the
node that served it), until the run has ended. Exit codes: 0 the run passed, 1 it did not
(failed, error, cancelled), or the API refused or could not be reached, 2 a usage mistake.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from mesh.client import (
    ApiClient,
    ApiError,
    ClientConfigError,
    describe_trigger,
    format_table,
    short_time,
)
from mesh.client_commands import api_client, connection_flags, int_arg, print_json
from mesh.scenarios import format
from mesh.scenarios.model import MAX_SOURCE_BYTES, Plan, Scenario, ScenarioError, Step
from mesh.scheduling.scenariobook import FINISHED

__all__ = ["add_scenario_commands"]

PROG = "schedulezero"
EXIT_PASSED = 0
EXIT_NOT_PASSED = 1
POLL_SECONDS = 0.5
# How long past the scenario's own timeout ``run`` follows it by default (the queue, the end).
FOLLOW_MARGIN_SECONDS = 60.0
STREAM_IDLE_SECONDS = 30.0  # the API sends a keepalive every 15 s
# A node that does not know the run yet (it lags) answers 404: asked again this many times.
MAX_NOT_FOUND = 20
RETRIED_STATUSES = frozenset({404, 421, 502, 503, 504})


def add_scenario_commands(sub: Any) -> None:
    """Add ``scenario`` and its actions to ``sub``, the ``schedulezero`` parser's subparsers."""
    scenario = sub.add_parser(
        "scenario",
        help="check, load, run and follow load-test scenarios (docs/scenarios.md)",
        description="Scenarios are YAML load tests the mesh runs on itself (docs/scenarios.md).",
        allow_abbrev=False,
    )
    actions = scenario.add_subparsers(dest="scenario_command", metavar="ACTION", required=True)
    conn = connection_flags()

    def action(name: str, help_text: str, func: Any, *, remote: bool = True) -> Any:
        parents = [conn] if remote else []
        p = actions.add_parser(name, help=help_text, parents=parents, allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    run = action("run", "check FILE, load it, run it and follow it to its result", _cmd_run)
    _scenario_arg(run)
    _param_flag(run)
    _format_flag(run, ("text", "json"))
    run.add_argument(
        "--timeout",
        type=_seconds_arg,
        metavar="SECONDS",
        help="stop following after SECONDS (default: the scenario's timeout + "
        f"{FOLLOW_MARGIN_SECONDS:g}); the run goes on",
    )

    validate = action("validate", "check FILE here, print its plan", _cmd_validate, remote=False)
    _scenario_arg(validate)
    _param_flag(validate)

    _format_flag(action("list", "the scenarios loaded in the mesh", _cmd_list), ("text", "json"))

    results = action("results", "one run's status, metrics and assertions", _cmd_results)
    results.add_argument("run_id", metavar="RUN_ID")
    _format_flag(results, ("text", "json", "csv"))

    runs = action("runs", "the runs, newest first", _cmd_runs)
    runs.add_argument("--name", metavar="NAME", help="only this scenario's")
    runs.add_argument("--limit", type=int_arg, metavar="N", help="at most N (1 to 1000; 50)")
    _format_flag(runs, ("text", "json", "csv"))

    schedule = action("schedule", "run a loaded scenario on a schedule", _cmd_schedule)
    schedule.add_argument("name", metavar="NAME", help="a loaded scenario")
    when = schedule.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", type=_seconds_arg, metavar="SECONDS", help="an interval")
    when.add_argument("--cron", metavar="EXPR", help='a cron expression, e.g. "0 3 * * *"')
    schedule.add_argument("--id", metavar="ID", help="the schedule's id (scenario-NAME)")
    _param_flag(schedule)
    _format_flag(schedule, ("text", "json"))

    cancel = action("cancel", "stop a queued or running run", _cmd_cancel)
    cancel.add_argument("run_id", metavar="RUN_ID")


def _scenario_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", metavar="FILE", help="a scenario file, or a shipped scenario's name")


def _param_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter's value (repeatable), converted to its default's type",
    )


def _format_flag(p: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    p.add_argument("--format", choices=choices, default=choices[0], help=" or ".join(choices))


def _seconds_arg(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


# --------------------------------------------------------------------------- local checks


def _source(name: str) -> tuple[bytes, str]:
    """The text of the scenario ``name`` names (a file, else a shipped scenario) and how to name
    it in messages. At most one byte over the limit is read: load says it is too large."""
    path = Path(name)
    if not path.is_file():
        shipped = format.shipped()
        if name not in shipped:
            raise ClientConfigError(
                f"{name}: no such file, and no shipped scenario of that name "
                f"(shipped: {', '.join(sorted(shipped))})"
            )
        path = shipped[name]
    try:
        with path.open("rb") as f:
            return f.read(MAX_SOURCE_BYTES + 1), name
    except OSError as e:
        raise ClientConfigError(f"{name}: cannot read: {e.strerror or e}") from None


def _overrides(params: Sequence[str]) -> dict[str, str]:
    """``--param NAME=VALUE`` flags → {name: value text}; a name given twice is a mistake."""
    given: dict[str, str] = {}
    for text in params:
        try:
            name, value = format.parse_param(text)
        except ScenarioError as e:
            raise ClientConfigError(str(e)) from None
        if name in given and given[name] != value:
            raise ClientConfigError(f"--param {name}: given twice ({given[name]!r} and {value!r})")
        given[name] = value
    return given


def _plan(scenario: Scenario, params: Sequence[str]) -> tuple[Plan, dict[str, Any]]:
    """The scenario's plan with the ``--param`` values, as a node will make it, and those
    values converted to their types (what ``POST /api/tests/run`` takes)."""
    given = _overrides(params)
    try:
        plan = format.plan(scenario, given, run_id=format.PLACEHOLDER_RUN_ID, from_strings=True)
    except ScenarioError as e:
        raise ClientConfigError(str(e)) from None
    return plan, {name: plan.parameters[name] for name in given}


def _checked(ns: argparse.Namespace) -> tuple[bytes, Scenario, Plan, dict[str, Any]]:
    raw, label = _source(ns.scenario)
    try:
        scenario = format.load(raw)
    except ScenarioError as e:
        raise ClientConfigError(f"{label}: {e}") from None
    plan, typed = _plan(scenario, ns.params)
    return raw, scenario, plan, typed


def _cmd_validate(ns: argparse.Namespace) -> int:
    _, scenario, plan, _ = _checked(ns)
    total = sum(step.iterations for step in plan.steps if step.action is not None)
    print(f"{scenario.name} (version {scenario.version}): valid")
    if scenario.description:
        print(f"  {scenario.description}")
    for key, value in plan.parameters.items():
        print(f"  parameter {key} = {value!r}")
    print(f"  steps: {len(plan.steps)}, actions in all: {total}, timeout: {plan.timeout:g} s")
    for i, step in enumerate(plan.steps, 1):
        print(f"    {i}. {_describe_step(step)}")
    print(f"  metrics: {', '.join(f'{m} ({u})' for m, u in plan.metrics.items()) or '-'}")
    print(f"  assertions: {'; '.join(a.expr for a in plan.assertions) or '-'}")
    if scenario.depends_on:
        print(f"  depends on: {', '.join(scenario.depends_on)}")
    return 0


def _describe_step(step: Step) -> str:
    if step.type == "sleep":
        return f"{step.name}: sleep {step.duration:g} s"
    method = step.action.method if step.action is not None else "?"
    if step.type == "loop":
        return (
            f"{step.name}: {step.iterations} x {method} "
            f"(concurrency {step.concurrency}, on error {step.on_error})"
        )
    return f"{step.name}: {method} (on error {step.on_error})"


# --------------------------------------------------------------------------- run


def _cmd_run(ns: argparse.Namespace) -> int:
    raw, scenario, plan, typed = _checked(ns)
    client = api_client(ns)
    client.load_scenario(raw.decode("utf-8"))
    run_id = client.run_scenario(scenario.name, typed)
    timeout = ns.timeout if ns.timeout is not None else plan.timeout + FOLLOW_MARGIN_SECONDS
    progress = _Progress(sys.stderr, plan.steps)
    progress.note(f"run {run_id} of {scenario.name} queued")
    try:
        result = _follow(_Nodes(client), run_id, time.monotonic() + timeout, progress)
    except KeyboardInterrupt:
        progress.note(f"stopped following; the run goes on: {PROG} scenario cancel {run_id}")
        raise
    finally:
        progress.end()
    if result is None:
        raise ApiError(
            f"run {run_id} had not ended after {timeout:g} s; it goes on: "
            f"{PROG} scenario results {run_id}"
        )
    _print_result(result, ns.format)
    return EXIT_PASSED if result.get("status") == "passed" else EXIT_NOT_PASSED


class _Nodes:
    """The node the CLI was pointed at, then the others of its mesh, in turn: whom to ask next
    when a node stops answering. The list is read at the start, while the node answers."""

    def __init__(self, client: ApiClient) -> None:
        self.ring = [client, *_other_nodes(client)]
        self.current = client

    def next(self) -> ApiClient:
        self.current = self.ring[(self.ring.index(self.current) + 1) % len(self.ring)]
        return self.current


def _other_nodes(client: ApiClient) -> list[ApiClient]:
    """Clients of the mesh's other nodes (same scheme, token and CA), from ``GET /api/cluster``;
    none if it cannot be read."""
    try:
        members = client.cluster().get("members") or []
    except (ApiError, AttributeError):
        return []
    scheme = urllib.parse.urlsplit(client.url).scheme
    others: list[ApiClient] = []
    for member in members:
        address = member.get("http_address") if isinstance(member, dict) else None
        if not isinstance(address, str) or not address or "/" in address:
            continue
        url = f"{scheme}://{address}"
        if url == client.url or any(o.url == url for o in others):
            continue
        try:
            others.append(ApiClient(url, token=client.token, cacert=client.cacert))
        except ClientConfigError:
            continue
    return others


def _follow(
    nodes: _Nodes, run_id: str, deadline: float, progress: _Progress
) -> dict[str, Any] | None:
    """The run's final result (``GET /api/tests/results``), or None at ``deadline``. The live
    stream shows the progress while it lasts; then the result is polled, node after node."""
    path = f"/api/tests/metrics/{urllib.parse.quote(run_id, safe='')}"
    idle = max(1.0, min(STREAM_IDLE_SECONDS, deadline - time.monotonic()))
    try:
        for event, data in nodes.current.events(path, idle=idle):
            if isinstance(data, dict):
                progress.show(data)
            if event == "done" or time.monotonic() >= deadline:
                break
        else:  # the node closed the stream before the end (it stopped, or was killed)
            progress.note(
                f"live progress lost (the stream from {nodes.current.url} ended); "
                "polling the result"
            )
    except ApiError as e:
        if e.status is not None and e.status not in RETRIED_STATUSES:
            raise
        progress.note(f"live progress lost ({e}); polling the result")
    return _poll(nodes, run_id, deadline, progress)


def _poll(
    nodes: _Nodes, run_id: str, deadline: float, progress: _Progress
) -> dict[str, Any] | None:
    not_found, said = 0, ""
    while True:
        try:
            result = nodes.current.scenario_result(run_id)
        except ApiError as e:
            not_found = not_found + 1 if e.status == 404 else 0
            if e.status is not None and e.status not in RETRIED_STATUSES:
                raise
            if not_found > MAX_NOT_FOUND:
                raise
            message = f"{e}; asking {nodes.next().url}"
            if message != said:  # a node down for long: said once, not every poll
                progress.note(message)
                said = message
        else:
            progress.show(result)
            if result.get("status") in FINISHED:
                return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_SECONDS)


class _Progress:
    """A run's progress on stderr: on a terminal one line rewritten in place (a new line per
    step), otherwise a line per step or status change. Steps are named and sized from the
    local plan (the node's view names a step only once it has started it)."""

    def __init__(self, stream: TextIO, steps: tuple[Step, ...]) -> None:
        self.stream = stream
        self.steps = steps
        self.tty = stream.isatty()
        self.shown: tuple[Any, ...] | None = None
        self.open = False  # a line written without its newline (terminal)

    def show(self, run: Mapping[str, Any]) -> None:
        step = run.get("step")
        index = step.get("index") if isinstance(step, dict) else None
        done = step.get("done") if isinstance(step, dict) else None
        key = (run.get("status"), index)
        line = self._line(run, index, done)
        if self.tty:
            if key != self.shown:
                self.end()
            self.stream.write("\r" + line + "\x1b[K")
            self.open = True
        elif key != self.shown:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = key

    def _line(self, run: Mapping[str, Any], index: Any, done: Any) -> str:
        status = run.get("status")
        if status != "running" or not isinstance(index, int) or not 0 <= index < len(self.steps):
            return f"{run.get('run_id')}: {status}"
        step = self.steps[index]
        line = f"{run.get('run_id')}: step {index + 1}/{len(self.steps)} {step.name}"
        if step.type == "sleep":
            return f"{line} (sleep {step.duration:g} s)"
        return f"{line} {done if isinstance(done, int) else 0}/{step.iterations}"

    def note(self, message: str) -> None:
        self.end()
        self.stream.write(f"{PROG}: {message}\n")
        self.stream.flush()

    def end(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


# --------------------------------------------------------------------------- results


def _print_result(result: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        print_json(result)
        return
    duration = (result.get("metrics") or {}).get("duration_seconds", {}).get("value")
    took = f", {_number(duration)} s" if duration is not None else ""
    resumed = result.get("resumed")
    again = f", resumed {resumed} times by a new leader" if resumed else ""
    print(
        f"run {result.get('run_id')} of {result.get('name')}: {str(result.get('status')).upper()}"
        f" (started {short_time(result.get('started_at'))}{took}, leader "
        f"{result.get('leader') or '-'}{again})"
    )
    metrics = result.get("metrics") or {}
    rows = [[name, _number(m.get("value")), m.get("unit")] for name, m in metrics.items()]
    print(format_table(("metric", "value", "unit"), rows))
    assertions = result.get("assertions") or []
    if assertions:
        rows = [
            [a.get("expr"), _number(a.get("value")), "PASS" if a.get("passed") else "FAIL"]
            for a in assertions
        ]
        print(format_table(("assertion", "measured", "result"), rows))
    if result.get("error"):
        print(f"error: {result['error']}")
    for error in result.get("errors") or []:
        print(f"action error: {error}")


def _number(value: Any) -> str:
    """A measured value to read: 812.3, 12, 1.5e+12; ``no value`` for none."""
    if value is None:
        return "no value"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.4g}"
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _cmd_results(ns: argparse.Namespace) -> int:
    client = api_client(ns)
    path = f"/api/tests/results/{urllib.parse.quote(ns.run_id, safe='')}"
    if ns.format == "csv":
        sys.stdout.write(client.text(path, {"format": "csv"}))
        return 0
    result = client.scenario_result(ns.run_id)
    _print_result(result, ns.format)
    return 0


def _cmd_runs(ns: argparse.Namespace) -> int:
    if ns.limit is not None and not 1 <= ns.limit <= 1000:
        raise ClientConfigError(f"--limit: must be from 1 to 1000, got {ns.limit}")
    client = api_client(ns)
    if ns.format == "csv":
        query = {"name": ns.name, "limit": ns.limit, "format": "csv"}
        sys.stdout.write(client.text("/api/tests/runs", query))
        return 0
    runs = client.scenario_runs(ns.name, ns.limit)
    if ns.format == "json":
        print_json(runs)
        return 0
    columns = ("run id", "name", "status", "source", "started", "finished", "error")
    rows = [
        [
            r.get("run_id"),
            r.get("name"),
            r.get("status"),
            r.get("source"),
            short_time(r.get("started_at")),
            short_time(r.get("finished_at")),
            r.get("error"),
        ]
        for r in runs
    ]
    print(format_table(columns, rows))
    return 0


def _cmd_list(ns: argparse.Namespace) -> int:
    items = api_client(ns).scenarios()
    if ns.format == "json":
        print_json(items)
        return 0
    columns = ("name", "version", "steps", "parameters", "last run", "description")
    rows = [
        [
            s.get("name"),
            s.get("version"),
            s.get("steps"),
            s.get("parameters"),
            (s.get("last_run") or {}).get("status"),
            s.get("description"),
        ]
        for s in items
    ]
    print(format_table(columns, rows))
    return 0


def _cmd_schedule(ns: argparse.Namespace) -> int:
    client = api_client(ns)
    body: dict[str, Any] = {"name": ns.name}
    if ns.params:  # converted as a run's: with the loaded scenario's own defaults
        entry = client.scenario(ns.name)
        try:
            scenario = format.from_definition(entry["definition"], entry["version"])
        except (ScenarioError, KeyError, TypeError) as e:
            raise ApiError(f"scenario {ns.name} as the mesh holds it is not usable: {e}") from None
        body["parameters"] = _plan(scenario, ns.params)[1]
    if ns.every is not None:
        body["trigger"] = {"type": "interval", "seconds": ns.every}
    else:
        body["trigger"] = {"type": "cron", "expr": ns.cron}
    if ns.id is not None:
        body["id"] = ns.id
    schedule = client.schedule_scenario(body)
    if ns.format == "json":
        print_json(schedule)
    else:
        print(
            f"scheduled {ns.name} as {schedule.get('id')}: "
            f"{describe_trigger(schedule.get('trigger'))} "
            f"(next fire {short_time(schedule.get('next_fire_time'))})"
        )
    return 0


def _cmd_cancel(ns: argparse.Namespace) -> int:
    answer = api_client(ns).cancel_scenario(ns.run_id)
    status = answer.get("status") if isinstance(answer, dict) else None
    if status in FINISHED:
        print(f"run {ns.run_id} had already ended: {status}")
    else:
        print(f"run {ns.run_id}: cancel requested (it was {status}); it ends cancelled")
    return 0
