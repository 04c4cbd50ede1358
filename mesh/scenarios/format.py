"""Scenario files: YAML text → :class:`Scenario`, a scenario + a run's parameters → :class:`Plan`.

Why this file is long: it is the whole grammar of a scenario file (docs/scenarios.md, "Format"):
the YAML reading, ``${name}`` substitution, every key of a test, a step and each action's args,
metrics and assertions. Each part is small; keeping them together keeps one place that says what
a file may contain.

The YAML is read with PyYAML's safe composer only, refusing anchors, aliases and tags before any
value is built (no alias bombs, no Python objects), then walked by hand into plain JSON values
and a map from each path (``test.steps[2].iterations``) to its line, so errors name both.

Everything a run will do is checked here, at load (with the parameters' defaults) and again when a
run's parameters are known (:func:`plan`): create_schedule args exactly as a POST /api/schedules
body (:func:`mesh.api.schema.parse_schedule_body`), the other actions' args by hand. Assertions
are parsed by a regular expression, never evaluated.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import msgspec
import yaml

from mesh.api import schema
from mesh.scenarios.model import (
    ALWAYS_REPORTED,
    DEFAULT_TIMEOUT_SECONDS,
    FIRE_OUTCOMES,
    MAX_CONCURRENCY,
    MAX_DEPENDS_ON,
    MAX_ITERATIONS,
    MAX_PARAMETERS,
    MAX_SLEEP_SECONDS,
    MAX_SOURCE_BYTES,
    MAX_STEPS,
    MAX_TOTAL_ACTIONS,
    METHODS,
    METRICS,
    NAME_PATTERN,
    ON_ERROR,
    ON_LEADER_CHANGE,
    OPERATORS,
    PARAMETER_PATTERN,
    STEP_TYPES,
    Action,
    Assertion,
    Plan,
    Scalar,
    Scenario,
    ScenarioError,
    Step,
)
from mesh.scheduling.codec import NotPlainJSON, plain

__all__ = ["expand", "from_definition", "load", "parse_param", "plan", "schedule_body", "shipped"]

MAX_DEPTH = 32  # nesting of the YAML (and of a stored definition)
MAX_DESCRIPTION = 1000  # characters
MAX_PARAMETER_TEXT = 1000  # characters of a string parameter
MAX_RESOLVED_TEXT = 10_000  # characters of one string after substitution
MAX_ASSERTIONS = 50
MAX_UNIT = 32  # characters of a metric's unit
MAX_TIMEOUT_SECONDS = 86_400
MAX_WAIT_COUNT = 10_000_000
DEFAULT_WAIT_SECONDS = 60.0
MAX_HTTP_PATH = 2000
BUILTINS = ("iteration", "run_id")  # ${...} names every scenario has
PLACEHOLDER_RUN_ID = "0" * 16  # the run id a file is checked with at load

_NAME = re.compile(NAME_PATTERN)
_PARAMETER = re.compile(PARAMETER_PATTERN)
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_ASSERTION = re.compile(
    r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*("
    + "|".join(re.escape(op) for op in sorted(OPERATORS, key=len, reverse=True))
    + r")\s*(\S+)\s*"
)
_INT64 = 2**63 - 1
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")

_TEST_KEYS = (
    "name",
    "description",
    "depends_on",
    "on_leader_change",
    "timeout",
    "parameters",
    "steps",
    "metrics",
    "assertions",
)
_STEP_KEYS = {
    "loop": ("name", "type", "iterations", "concurrency", "on_error", "action"),
    "sleep": ("name", "type", "duration"),
    "action": ("name", "type", "on_error", "action"),
}
_ACTION_KEYS = ("method", "args")


# --- reading YAML ------------------------------------------------------------------------------


class _Where:
    """Turns a path and a message into a ScenarioError, with the path's line when known."""

    def __init__(self, lines: Mapping[str, int] | None = None) -> None:
        self.lines = lines or {}

    def error(self, path: str, message: str) -> ScenarioError:
        line = self._line(path)
        return ScenarioError(f"{path}{f' (line {line})' if line else ''}: {message}")

    def _line(self, path: str) -> int | None:
        # A missing key has no line of its own: the nearest enclosing node's line.
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[: max(path.rfind("."), path.rfind("["), 0)]
        return None


class _Loader(yaml.SafeLoader):
    """The safe composer, refusing anchors, aliases, explicit tags and deep nesting as it meets
    them: an alias bomb or a ``!!python/object`` is refused before any value exists."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
            raise _marked(event.start_mark, "anchors and aliases (& and *) are not allowed")
        if event.tag is not None:
            raise _marked(event.start_mark, f"tags are not allowed (found {event.tag!r})")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _marked(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _marked(mark: yaml.Mark | None, problem: str) -> ScenarioError:
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return ScenarioError(f"{where}{' '.join(problem.split())}")


def _compose(text: str) -> yaml.Node:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # its reader checks every character of the text here
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        problem = f"{e.context}: {e.problem}" if e.context else e.problem
        raise _marked(e.problem_mark, problem or str(e)) from None
    except yaml.YAMLError as e:  # the reader: a character YAML does not allow
        raise ScenarioError(" ".join(str(e).split())) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise ScenarioError("the scenario is empty (it needs a 'test' mapping)")
    return node


def _read(text: str | bytes) -> tuple[bytes, dict[str, Any], dict[str, int]]:
    """The source's bytes, its ``test`` mapping as plain JSON and the line of each path in it."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_SOURCE_BYTES:
        raise ScenarioError(
            f"the scenario is {len(raw)} bytes; at most {MAX_SOURCE_BYTES} bytes are allowed"
        )
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError(f"the scenario must be UTF-8 text (byte {e.start} is not)") from None
    node = _compose(source)
    lines: dict[str, int] = {}
    document = _build(node, "", lines)
    if not isinstance(document, dict) or set(document) != {"test"}:
        keys = ", ".join(map(repr, document)) if isinstance(document, dict) else "none"
        raise _marked(node.start_mark, f"the file must be one mapping 'test:' (its keys: {keys})")
    return raw, document["test"], lines


def _build(node: yaml.Node, path: str, lines: dict[str, int]) -> Any:
    """The plain JSON value of a composed node; records each path's line in ``lines``."""
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _marked(key_node.start_mark, "a key must be plain text")
            key = key_node.value  # as written: `on:` stays "on", not YAML 1.1's true
            if key in out:
                raise _marked(key_node.start_mark, f"duplicate key {key!r}")
            child = f"{path}.{key}" if path else key
            lines[child] = key_node.start_mark.line + 1
            out[key] = _build(value_node, child, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            lines[child] = item.start_mark.line + 1
            items.append(_build(item, child, lines))
        return items
    return _scalar(node)


_SAFE = yaml.constructor.SafeConstructor()  # its scalar constructors read only the node
_CONSTRUCTORS: dict[str, Callable[[yaml.ScalarNode], Any]] = {
    "tag:yaml.org,2002:null": _SAFE.construct_yaml_null,
    "tag:yaml.org,2002:bool": _SAFE.construct_yaml_bool,
    "tag:yaml.org,2002:int": _SAFE.construct_yaml_int,
    "tag:yaml.org,2002:float": _SAFE.construct_yaml_float,
}


def _scalar(node: yaml.ScalarNode) -> Any:
    """A scalar as JSON: null, bool, int, finite float; anything else (dates too) as its text."""
    construct = _CONSTRUCTORS.get(node.tag)
    if construct is None:
        return node.value
    value = construct(node)
    if isinstance(value, float) and not math.isfinite(value):
        raise _marked(node.start_mark, f"{node.value!r}: infinite and NaN numbers are not allowed")
    return value


# --- public API --------------------------------------------------------------------------------


def load(text: str | bytes) -> Scenario:
    """A scenario file's text → the validated :class:`Scenario` (checked with its defaults)."""
    raw, definition, lines = _read(text)
    version = hashlib.sha256(raw).hexdigest()[:16]
    where = _Where(lines)
    scenario = _scenario(definition, version, where)
    _plan(scenario, dict(scenario.parameters), PLACEHOLDER_RUN_ID, where)
    return scenario


def from_definition(definition: dict[str, Any], version: str) -> Scenario:
    """A stored scenario (``Scenario.definition``, plain JSON) → the :class:`Scenario`, checked
    again as at load: the replicated state is not trusted to hold only what load accepted."""
    try:
        definition = plain(definition, max_depth=MAX_DEPTH)
    except NotPlainJSON as e:
        raise ScenarioError(f"test: must be plain JSON ({e})") from None
    where = _Where()
    scenario = _scenario(definition, version, where)
    _plan(scenario, dict(scenario.parameters), PLACEHOLDER_RUN_ID, where)
    return scenario


def plan(
    scenario: Scenario,
    overrides: Mapping[str, Any] | None = None,
    *,
    run_id: str,
    from_strings: bool = False,
) -> Plan:
    """The scenario resolved with a run's parameters (``overrides`` over the defaults; CLI text
    when ``from_strings``), every ``${name}`` but ``${iteration}`` filled in and checked."""
    values = _parameter_values(scenario, overrides or {}, from_strings)
    return _plan(scenario, values, run_id, _Where())


def expand(args: dict[str, Any], *, iteration: int) -> dict[str, Any]:
    """A planned action's args for one iteration: ``${iteration}`` filled in, ``$${`` → ``${``."""
    return _substitute(args, "args", _Fill({"iteration": iteration}), _Where())


def schedule_body(args: dict[str, Any], schedule_id: str) -> dict[str, Any]:
    """create_schedule args (expanded) → the POST /api/schedules body creating ``schedule_id``."""
    return {**_as_body(args), "id": schedule_id}


def _as_body(args: dict[str, Any]) -> dict[str, Any]:
    return {("task" if key == "task_id" else key): value for key, value in args.items()}


def shipped() -> dict[str, Path]:
    """The scenarios shipped with the package: test name → file."""
    return {load(path.read_bytes()).name: path for path in _shipped_files()}


def parse_param(text: str) -> tuple[str, str]:
    """A CLI ``--param NAME=VALUE`` → (name, value text)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ScenarioError(f"--param must be NAME=VALUE, got {_show(text)}")
    if not _PARAMETER.fullmatch(name):
        raise ScenarioError(
            f"--param {_show(name)}: a parameter name is a letter or _ followed by up to 63 "
            "letters, digits or _"
        )
    return name, value


def _shipped_files() -> list[Path]:
    return sorted(Path(__file__).parent.glob("*.yaml"))


# --- the scenario: what needs no parameter ------------------------------------------------------


def _scenario(definition: Any, version: str, where: _Where) -> Scenario:
    test = _mapping(definition, "test", where, _TEST_KEYS, required=("name", "steps"))
    name = _name(test["name"], "test.name", where)
    description = test.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise where.error(
            "test.description",
            f"must be text of at most {MAX_DESCRIPTION} characters, got {_show(description)}",
        )
    _choice(
        test.get("on_leader_change", "resume"), ON_LEADER_CHANGE, "test.on_leader_change", where
    )
    _number(
        test.get("timeout", DEFAULT_TIMEOUT_SECONDS), 1, MAX_TIMEOUT_SECONDS, "test.timeout", where
    )
    return Scenario(
        name=name,
        description=description,
        parameters=_parameters(test.get("parameters", {}), where),
        depends_on=_depends_on(test.get("depends_on", []), name, where),
        definition=test,
        version=version,
    )


def _depends_on(value: Any, own_name: str, where: _Where) -> tuple[str, ...]:
    path = "test.depends_on"
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or len(names) > MAX_DEPENDS_ON:
        raise where.error(
            path,
            f"must be a scenario name or a list of at most {MAX_DEPENDS_ON}, got {_show(value)}",
        )
    for i, name in enumerate(names):
        item = path if isinstance(value, str) else f"{path}[{i}]"
        _name(name, item, where)
        if name == own_name:
            raise where.error(item, f"a scenario cannot depend on itself ({name!r})")
        if names.index(name) != i:
            raise where.error(item, f"{name!r} is listed twice")
    return tuple(names)


def _parameters(value: Any, where: _Where) -> dict[str, Scalar]:
    path = "test.parameters"
    if not isinstance(value, dict):
        raise where.error(path, f"must be a mapping of name: default value, got {_show(value)}")
    if len(value) > MAX_PARAMETERS:
        raise where.error(path, f"at most {MAX_PARAMETERS} parameters, got {len(value)}")
    for name, default in value.items():
        item = f"{path}.{name}"
        if not _PARAMETER.fullmatch(name):
            raise where.error(
                item, "a parameter name is a letter or _ followed by up to 63 letters, digits or _"
            )
        if name in BUILTINS:
            raise where.error(item, f"{name!r} is a built-in name (${{{name}}}); choose another")
        if isinstance(default, bool | int | float | str):
            _check_scalar(default, item, where)
        else:
            raise where.error(
                item,
                f"a default must be a number, true/false or text (not a list, mapping or null), "
                f"got {_show(default)}",
            )
    return dict(value)


def _check_scalar(value: Scalar, path: str, where: _Where) -> None:
    if isinstance(value, str) and len(value) > MAX_PARAMETER_TEXT:
        raise where.error(
            path, f"text of at most {MAX_PARAMETER_TEXT} characters, got {len(value)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise where.error(path, "infinite and NaN numbers are not allowed")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _INT64:
        raise where.error(path, f"integers must be within ±{_INT64}")


# --- parameters of a run -----------------------------------------------------------------------


def _parameter_values(
    scenario: Scenario, overrides: Mapping[str, Any], from_strings: bool
) -> dict[str, Scalar]:
    values = dict(scenario.parameters)
    for name, given in overrides.items():
        if name not in values:
            known = ", ".join(values) if values else "none"
            raise ScenarioError(
                f"scenario {scenario.name!r} has no parameter {name!r}; its parameters: {known}"
            )
        path = f"parameter {name}"
        value = _from_text(given, values[name], path) if from_strings else given
        values[name] = _typed(value, values[name], path)
    return values


def _from_text(text: Any, default: Scalar, path: str) -> Scalar:
    """A CLI parameter's text → the type of its default."""
    if not isinstance(text, str):
        raise ScenarioError(f"{path}: must be given as text, got {_show(text)}")
    word = text.strip().lower()
    if isinstance(default, bool):
        if word in _TRUE + _FALSE:
            return word in _TRUE
        raise ScenarioError(f"{path}: must be true/false (yes/no, 1/0), got {_show(text)}")
    if isinstance(default, int):
        if re.fullmatch(r"[-+]?\d{1,19}", word):
            return int(word)
        raise ScenarioError(f"{path}: must be an integer, got {_show(text)}")
    if isinstance(default, float):
        if _NUMBER.fullmatch(word):
            return float(word)
        raise ScenarioError(f"{path}: must be a number, got {_show(text)}")
    return text


def _typed(value: Any, default: Scalar, path: str) -> Scalar:
    """A parameter's value, required to have its default's type (an int is a float too)."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    else:
        ok, kind = isinstance(value, str), "text"
    if not ok:
        raise ScenarioError(
            f"{path}: must be {kind} like its default {_show(default)}, got {_show(value)}"
        )
    _check_scalar(value, path, _Where())
    return float(value) if isinstance(default, float) else value


# --- ${name} substitution ----------------------------------------------------------------------


class _Fill:
    """What ``${name}`` means in one place: ``values``; names in ``keep`` (and ``$${``) are left
    as written for :func:`expand`; any other name is an error."""

    def __init__(self, values: Mapping[str, Any], keep: tuple[str, ...] = ()) -> None:
        self.values, self.keep = values, keep

    def text(self, text: str, path: str, where: _Where) -> Any:
        whole = _REFERENCE.fullmatch(text)
        if whole and whole.group(1) is not None and whole.group(1) not in self.keep:
            return self._value(whole.group(1), path, where)  # typed: ${count} → 1000
        out = _REFERENCE.sub(lambda m: self._piece(m, path, where), text)
        if len(out) > MAX_RESOLVED_TEXT:
            raise where.error(path, f"longer than {MAX_RESOLVED_TEXT} characters once filled in")
        return out

    def _piece(self, match: re.Match[str], path: str, where: _Where) -> str:
        name = match.group(1)
        if match.group(0) == "$${":
            return "$${" if self.keep else "${"
        if name is None:
            raise where.error(path, "'${' without a closing '}' (write $${ for a literal ${)")
        if name in self.keep:
            return match.group(0)
        value = self._value(name, path, where)
        return json.dumps(value) if isinstance(value, bool) else str(value)

    def _value(self, name: str, path: str, where: _Where) -> Any:
        if name in self.values:
            value = self.values[name]
            if self.keep and isinstance(value, str):
                return value.replace("${", "$${")  # a value is data, not a reference
            return value
        if name == "iteration":
            raise where.error(path, "${iteration} can only be used in an action's args")
        known = ", ".join(f"${{{n}}}" for n in [*self.values, *self.keep]) or "none"
        raise where.error(path, f"unknown name ${{{name}}} (known here: {known})")


def _substitute(value: Any, path: str, fill: _Fill, where: _Where) -> Any:
    if isinstance(value, str):
        return fill.text(value, path, where)
    if isinstance(value, dict):
        return {k: _substitute(v, f"{path}.{k}", fill, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, f"{path}[{i}]", fill, where) for i, v in enumerate(value)]
    return value


# --- the plan: steps, metrics, assertions ------------------------------------------------------


def _plan(scenario: Scenario, values: dict[str, Scalar], run_id: str, where: _Where) -> Plan:
    test = scenario.definition
    known = {**values, "run_id": run_id}
    steps = _steps(test["steps"], known, where)
    total = sum(step.iterations for step in steps if step.action is not None)
    if total > MAX_TOTAL_ACTIONS:
        raise where.error(
            "test.steps",
            f"a run may do at most {MAX_TOTAL_ACTIONS} actions, these steps do {total}",
        )
    assertions = _assertions(test.get("assertions", []), _Fill(known), where)
    metrics = _metrics(test.get("metrics", []), where)
    for name in [a.metric for a in assertions] + list(ALWAYS_REPORTED):
        metrics.setdefault(name, METRICS[name][0])
    return Plan(
        name=scenario.name,
        parameters=values,
        steps=steps,
        metrics=metrics,
        assertions=assertions,
        timeout=float(test.get("timeout", DEFAULT_TIMEOUT_SECONDS)),
        on_leader_change=test.get("on_leader_change", "resume"),
    )


def _steps(value: Any, known: dict[str, Any], where: _Where) -> tuple[Step, ...]:
    path = "test.steps"
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_STEPS:
        raise where.error(path, f"must be a list of 1 to {MAX_STEPS} steps, got {_show(value)}")
    steps: list[Step] = []
    for i, raw in enumerate(value):
        step = _step(raw, i, known, where)
        if any(s.name == step.name for s in steps):
            raise where.error(f"{path}[{i}].name", f"another step is also named {step.name!r}")
        steps.append(step)
    return tuple(steps)


def _step(raw: Any, index: int, known: dict[str, Any], where: _Where) -> Step:
    path = f"test.steps[{index}]"
    kind = raw.get("type") if isinstance(raw, dict) else None
    if isinstance(raw, dict) and "type" in raw:
        _choice(kind, STEP_TYPES, f"{path}.type", where)
    keys = _STEP_KEYS.get(kind, tuple(sorted({k for ks in _STEP_KEYS.values() for k in ks})))
    raw = _mapping(raw, path, where, keys, required=("type",))
    fill = _Fill(known)
    fields = {
        k: _substitute(v, f"{path}.{k}", fill, where) for k, v in raw.items() if k != "action"
    }
    name = _name(fields.get("name", f"step-{index + 1}"), f"{path}.name", where)
    if kind == "sleep":
        duration = _number(
            _required(fields, "duration", path, where),
            0,
            MAX_SLEEP_SECONDS,
            f"{path}.duration",
            where,
        )
        return Step(name=name, type=kind, duration=float(duration))
    iterations = 1
    if kind == "loop":
        iterations = _integer(
            _required(fields, "iterations", path, where),
            1,
            MAX_ITERATIONS,
            f"{path}.iterations",
            where,
        )
    concurrency = _integer(
        fields.get("concurrency", 1), 1, MAX_CONCURRENCY, f"{path}.concurrency", where
    )
    on_error = _choice(fields.get("on_error", "fail"), ON_ERROR, f"{path}.on_error", where)
    _required(raw, "action", path, where)
    action = _action(raw["action"], f"{path}.action", iterations, known, where)
    return Step(
        name=name,
        type=kind,
        action=action,
        iterations=iterations,
        concurrency=concurrency,
        on_error=on_error,
    )


def _action(raw: Any, path: str, iterations: int, known: dict[str, Any], where: _Where) -> Action:
    raw = _mapping(raw, path, where, _ACTION_KEYS, required=("method",))
    method = _choice(raw["method"], METHODS, f"{path}.method", where)
    args = raw.get("args", {})
    if not isinstance(args, dict):
        raise where.error(f"{path}.args", f"must be a mapping, got {_show(args)}")
    args = _substitute(args, f"{path}.args", _Fill(known, keep=("iteration",)), where)
    # Check what the first and the last iteration will do (the longest ${iteration}).
    for iteration in sorted({0, iterations - 1}):
        _ARGS_CHECKS[method](expand(args, iteration=iteration), f"{path}.args", where)
    return Action(method=method, args=args)


def _metrics(value: Any, where: _Where) -> dict[str, str]:
    path = "test.metrics"
    if not isinstance(value, list):
        raise where.error(
            path, f"must be a list of metric names (or name: unit), got {_show(value)}"
        )
    metrics: dict[str, str] = {}
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if isinstance(item, dict) and len(item) == 1:
            ((name, unit),) = item.items()
            if not isinstance(unit, str) or not 0 < len(unit) <= MAX_UNIT:
                raise where.error(
                    f"{item_path}.{name}",
                    f"a unit is text of 1 to {MAX_UNIT} characters, got {_show(unit)}",
                )
        elif isinstance(item, str):
            name, unit = item, None
        else:
            raise where.error(item_path, f"must be a metric name or name: unit, got {_show(item)}")
        _metric_name(name, item_path, where)
        if name in metrics:
            raise where.error(item_path, f"metric {name!r} is listed twice")
        metrics[name] = unit or METRICS[name][0]
    return metrics


def _metric_name(name: str, path: str, where: _Where) -> None:
    if name not in METRICS:
        some = ", ".join(list(METRICS)[:6])
        raise where.error(
            path, f"unknown metric {_show(name)} (known: {some}, ...; see docs/scenarios.md)"
        )


def _assertions(value: Any, fill: _Fill, where: _Where) -> tuple[Assertion, ...]:
    path = "test.assertions"
    if not isinstance(value, list) or len(value) > MAX_ASSERTIONS:
        raise where.error(
            path, f"must be a list of at most {MAX_ASSERTIONS} assertions, got {_show(value)}"
        )
    return tuple(_assertion(item, f"{path}[{i}]", fill, where) for i, item in enumerate(value))


def _assertion(raw: Any, path: str, fill: _Fill, where: _Where) -> Assertion:
    if not isinstance(raw, str):
        raise where.error(path, f"must be text like 'creation_rate > 100', got {_show(raw)}")
    expr = fill.text(raw, path, where)
    match = _ASSERTION.fullmatch(str(expr))
    if match is None:
        raise where.error(
            path,
            f"must be METRIC OP NUMBER with OP one of {' '.join(OPERATORS)} "
            f"(e.g. 'creation_rate > 100'), got {_show(expr)}",
        )
    metric, op, number = match.groups()
    _metric_name(metric, path, where)
    threshold = float(number) if _NUMBER.fullmatch(number) else math.nan
    if not math.isfinite(threshold):
        raise where.error(path, f"the threshold must be a finite number, got {_show(number)}")
    return Assertion(expr=" ".join(str(expr).split()), metric=metric, op=op, threshold=threshold)


# --- each action's args ------------------------------------------------------------------------


def _check_create(args: dict[str, Any], path: str, where: _Where) -> None:
    if "id" in args:
        raise where.error(
            f"{path}.id",
            "scenario schedules get generated ids (scn-{run_id}-{step}-{iteration}); remove it",
        )
    if "task_id" in args and "task" in args:
        raise where.error(f"{path}.task_id", "give task or task_id (the same), not both")
    try:
        schema.parse_schedule_body(_as_body(args), now=datetime.now(UTC))
    except schema.BadRequest as e:
        message = str(e)
        if "task_id" in args and message.startswith("task: "):
            message = "task_id" + message[len("task") :]
        raise _within(path, message, where) from None


def _within(path: str, message: str, where: _Where) -> ScenarioError:
    """An API error about a body (``trigger.seconds: ...``) as an error about ``path``'s args."""
    head, sep, rest = message.partition(": ")
    if sep and head == "request body":
        return where.error(path, rest)
    if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head):
        return where.error(f"{path}.{head}", rest)
    return where.error(path, message)


def _check_target(
    args: dict[str, Any], path: str, where: _Where, extra: tuple[str, ...] = ()
) -> None:
    """delete/pause/resume_schedule: an optional schedule id (and ``extra`` keys)."""
    _keys(args, path, where, ("schedule_id", *extra))
    if "schedule_id" in args:
        _schedule_id(args["schedule_id"], f"{path}.schedule_id", where)


def _check_pause(args: dict[str, Any], path: str, where: _Where) -> None:
    _check_target(args, path, where, ("note",))
    if "note" in args:
        try:
            schema.parse_pause_body({"note": args["note"]})
        except schema.BadRequest as e:
            raise _within(path, str(e), where) from None


def _check_run_job(args: dict[str, Any], path: str, where: _Where) -> None:
    _keys(args, path, where, ("schedule_id", "task", "args", "kwargs"))
    if "schedule_id" in args:
        if len(args) > 1:
            raise where.error(path, "give schedule_id or task (with args, kwargs), not both")
        _schedule_id(args["schedule_id"], f"{path}.schedule_id", where)
    elif "task" in args:
        try:
            schema.parse_job_body(args)
        except schema.BadRequest as e:
            raise _within(path, str(e), where) from None
    elif args:
        raise where.error(path, "args and kwargs need a task")


def _check_wait(args: dict[str, Any], path: str, where: _Where) -> None:
    _keys(args, path, where, ("count", "timeout", "outcome"))
    _integer(_required(args, "count", path, where), 1, MAX_WAIT_COUNT, f"{path}.count", where)
    timeout = args.get("timeout", DEFAULT_WAIT_SECONDS)
    if _number(timeout, 0, MAX_SLEEP_SECONDS, f"{path}.timeout", where) == 0:
        raise where.error(f"{path}.timeout", "must be more than 0 seconds")
    if "outcome" in args:
        _choice(args["outcome"], FIRE_OUTCOMES, f"{path}.outcome", where)


def _check_http_get(args: dict[str, Any], path: str, where: _Where) -> None:
    _keys(args, path, where, ("path", "expect_status"))
    url = _required(args, "path", path, where)
    bad = (
        not isinstance(url, str)
        or len(url) > MAX_HTTP_PATH
        or not url.startswith("/api/")
        or ".." in unquote(url)
        or any(c.isspace() or not c.isprintable() or c in "\\#" for c in url)
    )
    if bad:
        raise where.error(
            f"{path}.path",
            f"must be a path on this node's API: /api/..., at most {MAX_HTTP_PATH} characters, "
            f"without '..', '#', '\\', spaces or control characters, got {_show(url)}",
        )
    _integer(args.get("expect_status", 200), 100, 599, f"{path}.expect_status", where)


_ARGS_CHECKS: dict[str, Callable[[dict[str, Any], str, _Where], None]] = {
    "create_schedule": _check_create,
    "delete_schedule": _check_target,
    "pause_schedule": _check_pause,
    "resume_schedule": _check_target,
    "run_job": _check_run_job,
    "wait_for_fires": _check_wait,
    "http_get": _check_http_get,
}


# --- small checks ------------------------------------------------------------------------------


def _mapping(
    value: Any, path: str, where: _Where, allowed: tuple[str, ...], *, required: tuple[str, ...]
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise where.error(path, f"must be a mapping, got {_show(value)}")
    _keys(value, path, where, allowed)
    for key in required:
        _required(value, key, path, where)
    return value


def _keys(value: dict[str, Any], path: str, where: _Where, allowed: tuple[str, ...]) -> None:
    for key in value:
        if key not in allowed:
            raise where.error(
                f"{path}.{key}", f"unknown key {key!r} (allowed: {', '.join(allowed) or 'none'})"
            )


def _required(value: dict[str, Any], key: str, path: str, where: _Where) -> Any:
    if key not in value:
        raise where.error(f"{path}.{key}", "required")
    return value[key]


def _name(value: Any, path: str, where: _Where) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise where.error(path, f"must be 1 to 64 of A-Z a-z 0-9 _ . -, got {_show(value)}")
    return value


def _schedule_id(value: Any, path: str, where: _Where) -> str:
    try:
        return msgspec.convert(value, schema.Id)
    except msgspec.ValidationError:
        raise where.error(
            path, f"must be a schedule id (1 to 128 of A-Z a-z 0-9 _ . : -), got {_show(value)}"
        ) from None


def _choice(value: Any, choices: tuple[str, ...], path: str, where: _Where) -> str:
    if value not in choices or not isinstance(value, str):
        raise where.error(path, f"must be one of {', '.join(choices)}, got {_show(value)}")
    return value


def _integer(value: Any, low: int, high: int, path: str, where: _Where) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise where.error(path, f"must be an integer from {low} to {high}, got {_show(value)}")
    return value


def _number(value: Any, low: float, high: float, path: str, where: _Where) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not low <= value <= high:
        raise where.error(path, f"must be a number from {low:g} to {high:g}, got {_show(value)}")
    return value


def _show(value: Any, limit: int = 60) -> str:
    """A short one-line rendering of a user's value for an error message."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."
