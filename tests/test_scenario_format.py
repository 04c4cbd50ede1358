"""mesh.scenarios.format: what a scenario file may say, and every way it can be wrong or hostile.

Why this file is long: it is the specification of the file format (docs/scenarios.md, "Format"),
one behaviour per test: YAML reading, substitution, parameters, steps, each action's args,
metrics, assertions and the shipped files.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from mesh.scenarios import format as fmt
from mesh.scenarios.model import (
    ALWAYS_REPORTED,
    MAX_SOURCE_BYTES,
    MAX_TOTAL_ACTIONS,
    METRICS,
    Scenario,
    ScenarioError,
)

RUN_ID = "0123456789abcdef"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "scenarios.md"

BASE = """\
test:
  name: base
  parameters:
    count: 3
    seconds: 5
    rate: 1.5
    flag: true
    word: hi
  steps:
    - name: create
      type: loop
      iterations: ${count}
      action:
        method: create_schedule
        args:
          task_id: add
          trigger:
            type: interval
            seconds: ${seconds}
"""


def scenario(steps: str = "", extra: str = "", base: str = BASE) -> str:
    """BASE with more steps (indented as items of ``steps``) and more keys of ``test``."""
    return (
        base
        + textwrap.indent(textwrap.dedent(steps), "    ")
        + textwrap.indent(textwrap.dedent(extra), "  ")
    )


def refused(text: str | bytes) -> str:
    with pytest.raises(ScenarioError) as e:
        fmt.load(text)
    message = str(e.value)
    assert "\n" not in message
    return message


def action_args(method: str, args: str) -> str:
    """A scenario whose second step is one action ``method`` with ``args`` (a flow mapping)."""
    return scenario(
        f"""\
        - name: probe
          type: action
          action: {{method: {method}, args: {args}}}
        """
    )


def planned(text: str, overrides: dict | None = None, **kw) -> object:
    return fmt.plan(fmt.load(text), overrides, run_id=RUN_ID, **kw)


# --- reading YAML ------------------------------------------------------------------------------


def test_a_valid_file_loads_with_its_name_defaults_and_version() -> None:
    s = fmt.load(BASE)
    assert isinstance(s, Scenario)
    assert s.name == "base"
    assert s.parameters == {"count": 3, "seconds": 5, "rate": 1.5, "flag": True, "word": "hi"}
    assert re.fullmatch(r"[0-9a-f]{16}", s.version)
    assert fmt.load(BASE.encode()).version == s.version
    assert fmt.load(BASE + "# edited\n").version != s.version


@pytest.mark.parametrize("text", ["ND\x1f", "test:\n  name: a\x07b\n", "\x00"])
def test_a_character_yaml_does_not_allow_is_a_scenario_error(text: str) -> None:
    with pytest.raises(ScenarioError, match="unacceptable character"):
        fmt.load(text)


def test_a_yaml_syntax_error_names_line_and_column() -> None:
    message = refused("test:\n  name: base\n  steps: [a, b\n")
    assert re.match(r"line \d+, column \d+: ", message)
    message = refused("test:\n  name: base\n   bad: indentation\n")
    assert message == "line 3, column 7: mapping values are not allowed here"


def test_an_alias_bomb_is_refused_before_expansion() -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    message = refused("\n".join(lines) + "\ntest: *a9\n")
    assert message == "line 1, column 5: anchors and aliases (& and *) are not allowed"


def test_an_anchor_alone_is_refused() -> None:
    assert "anchors and aliases" in refused(BASE.replace("count: 3", "count: &c 3"))


def test_a_python_object_tag_is_refused() -> None:
    message = refused('test: !!python/object/apply:os.system ["touch /tmp/pwned"]\n')
    assert "tags are not allowed" in message
    assert message.startswith("line 1, column 7")


@pytest.mark.parametrize("tag", ["!!str 5", "!custom x", "! 5", "!!binary aGk="])
def test_every_explicit_tag_is_refused(tag: str) -> None:
    assert "tags are not allowed" in refused(BASE.replace("word: hi", f"word: {tag}"))


def test_a_source_larger_than_the_bound_is_refused() -> None:
    text = BASE + "#" * (MAX_SOURCE_BYTES - len(BASE) + 1)
    assert f"at most {MAX_SOURCE_BYTES} bytes" in refused(text)
    assert fmt.load(BASE + "#" * (MAX_SOURCE_BYTES - len(BASE) - 1) + "\n").name == "base"


def test_bytes_that_are_not_utf8_are_refused_with_a_reason() -> None:
    assert "UTF-8" in refused(BASE.encode() + b"# \xff\xfe\n")


def test_deep_nesting_is_refused() -> None:
    assert "nested more than" in refused("test: " + "[" * 200 + "]" * 200 + "\n")


def test_duplicate_keys_are_refused() -> None:
    assert "duplicate key 'name'" in refused(
        BASE.replace("  name: base\n", "  name: a\n  name: b\n")
    )


def test_the_file_must_be_one_test_mapping() -> None:
    assert "'test:'" in refused("tests:\n  name: x\n")
    assert "empty" in refused("")
    assert "document" in refused(BASE + "---\n" + BASE)


def test_unknown_keys_are_errors_with_path_line_and_the_allowed_keys() -> None:
    message = refused(BASE.replace("      iterations:", "      iteratons: 3\n      iterations:"))
    assert message.startswith("test.steps[0].iteratons (line 12): unknown key 'iteratons'")
    assert "allowed: name, type, iterations, concurrency, on_error, action" in message
    assert refused(BASE.replace("  name: base", "  name: base\n  colour: red")).startswith(
        "test.colour (line 3): unknown key"
    )
    assert "test.steps[0].action.argz" in refused(BASE.replace("        args:", "        argz:"))


def test_keys_are_read_as_written_not_as_yaml_booleans() -> None:
    # YAML 1.1 reads a bare `on` as true; a key stays its text (notify.on is a real field).
    notify = "{webhook: 'https://example.com/hook', on: [failure]}"
    text = BASE.replace("task_id: add", f"task_id: add\n          notify: {notify}")
    args = planned(text).steps[0].action.args
    assert args["notify"] == {"webhook": "https://example.com/hook", "on": ["failure"]}


def test_infinite_and_nan_numbers_are_refused() -> None:
    assert "NaN" in refused(BASE.replace("rate: 1.5", "rate: .nan"))
    assert "infinite" in refused(BASE.replace("rate: 1.5", "rate: .inf"))


def test_an_unquoted_date_stays_text() -> None:
    text = BASE.replace(
        "type: interval\n            seconds: ${seconds}",
        "type: date\n            run_time: 2030-01-02T03:04:05Z",
    )
    args = planned(text).steps[0].action.args
    assert args["trigger"]["run_time"] == "2030-01-02T03:04:05Z"


# --- steps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["many", "0", "100001", "true", "2.5"])
def test_a_loop_needs_whole_iterations_from_1_to_100000(value: str) -> None:
    message = refused(BASE.replace("${count}", value))
    assert message.startswith("test.steps[0].iterations (line 12): must be an integer from 1 to")


def test_a_loop_without_iterations_says_it_is_required() -> None:
    assert refused(BASE.replace("      iterations: ${count}\n", "")).startswith(
        "test.steps[0].iterations (line 10): required"
    )


def test_an_unknown_step_type_lists_the_types() -> None:
    assert "must be one of loop, sleep, action" in refused(BASE.replace("type: loop", "type: spin"))


def test_sleep_keys_are_only_name_type_duration() -> None:
    message = refused(scenario("- {type: sleep, duration: 1, on_error: continue}\n"))
    assert "test.steps[1].on_error" in message and "allowed: name, type, duration" in message


@pytest.mark.parametrize("duration", ["-1", "86401", "soon"])
def test_a_sleep_duration_is_0_to_86400_seconds(duration: str) -> None:
    assert "test.steps[1].duration" in refused(
        scenario(f"- {{type: sleep, duration: {duration}}}\n")
    )


def test_steps_get_default_names_and_names_are_unique() -> None:
    text = scenario("- {type: sleep, duration: 0.5}\n")
    steps = planned(text.replace("    - name: create\n", "    -\n")).steps
    assert [s.name for s in steps] == ["step-1", "step-2"]
    assert steps[1].duration == 0.5
    assert "another step is also named 'create'" in refused(
        scenario("- {name: create, type: sleep, duration: 1}\n")
    )


def test_concurrency_and_on_error_are_bounded() -> None:
    assert "concurrency" in refused(
        BASE.replace("      iterations:", "      concurrency: 65\n      iterations:")
    )
    assert "on_error" in refused(
        BASE.replace("      iterations:", "      on_error: ignore\n      iterations:")
    )
    step = planned(
        BASE.replace(
            "      iterations:", "      concurrency: 8\n      on_error: continue\n      iterations:"
        )
    ).steps[0]
    assert (step.concurrency, step.on_error) == (8, "continue")


def test_the_total_of_actions_is_bounded() -> None:
    loop = "- {type: loop, iterations: 100000, action: {method: delete_schedule}}\n"
    fits = scenario(loop * 9)  # 9 * 100000 + 3
    assert sum(s.iterations for s in planned(fits).steps) == 900_003
    message = refused(scenario(loop * 10))
    assert f"at most {MAX_TOTAL_ACTIONS} actions" in message and "1000003" in message


# --- ${name} substitution ----------------------------------------------------------------------


def test_an_exact_reference_takes_the_parameter_value_and_type() -> None:
    step = planned(BASE).steps[0]
    assert step.iterations == 3
    assert step.action.args["trigger"]["seconds"] == 5


def test_a_reference_inside_text_is_formatted() -> None:
    text = action_args("pause_schedule", '{note: "n=${count} r=${rate} f=${flag} ${word}"}')
    assert planned(text).steps[1].action.args["note"] == "n=3 r=1.5 f=true hi"


def test_an_unknown_reference_is_an_error_naming_where() -> None:
    text = BASE.replace("seconds: ${seconds}", "seconds: ${secs}")
    message = refused(text)
    assert message.startswith("test.steps[0].action.args.trigger.seconds (line 19): ")
    assert "unknown name ${secs}" in message


def test_double_dollar_is_a_literal() -> None:
    text = action_args("pause_schedule", '{note: "cost $${count} for ${count}"}')
    args = planned(text).steps[1].action.args
    assert fmt.expand(args, iteration=0)["note"] == "cost ${count} for 3"


def test_an_unclosed_reference_is_an_error() -> None:
    assert "without a closing" in refused(action_args("pause_schedule", '{note: "a ${count"}'))


def test_iteration_is_left_for_expand_and_typed_there() -> None:
    text = BASE.replace(
        "task_id: add", 'task_id: add\n          args: ["${iteration}", "i-${iteration}"]'
    )
    args = planned(text).steps[0].action.args
    assert args["args"] == ["${iteration}", "i-${iteration}"]
    assert fmt.expand(args, iteration=2)["args"] == [2, "i-2"]
    assert args["args"] == ["${iteration}", "i-${iteration}"]  # expand does not change the plan


def test_iteration_outside_action_args_is_an_error() -> None:
    assert "only be used in an action's args" in refused(BASE.replace("${count}", "${iteration}"))


def test_run_id_is_resolved_by_plan() -> None:
    text = action_args("pause_schedule", '{note: "run ${run_id}"}')
    assert planned(text).steps[1].action.args["note"] == f"run {RUN_ID}"


def test_a_parameter_value_is_data_not_a_reference() -> None:
    text = action_args("pause_schedule", '{note: "${word}"}')
    args = fmt.plan(fmt.load(text), {"word": "a${count}"}, run_id=RUN_ID).steps[1].action.args
    assert fmt.expand(args, iteration=0)["note"] == "a${count}"


def test_keys_are_not_substituted() -> None:
    assert "unknown field '${word}'" in refused(
        BASE.replace("task_id: add", "task_id: add\n          ${word}: 1")
    )


# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("default", "reason"),
    [("[1, 2]", "not a list"), ("{a: 1}", "not a list"), ("null", "null"), ("", "null")],
)
def test_a_parameter_default_is_a_scalar(default: str, reason: str) -> None:
    assert reason in refused(BASE.replace("word: hi", f"word: {default}"))


def test_parameter_names_are_checked_and_builtins_reserved() -> None:
    assert "test.parameters.9lives" in refused(BASE.replace("word: hi", "9lives: 1"))
    assert "built-in" in refused(BASE.replace("word: hi", "run_id: x"))


def test_parameter_text_and_count_are_bounded() -> None:
    assert "1000 characters" in refused(BASE.replace("word: hi", "word: " + "x" * 1001))
    many = "".join(f"    p{i}: {i}\n" for i in range(48))
    assert "at most 50 parameters" in refused(
        BASE.replace("    word: hi\n", f"    word: hi\n{many}")
    )


def test_json_overrides_must_have_the_default_type() -> None:
    s = fmt.load(BASE)
    assert fmt.plan(s, {"count": 7, "rate": 2, "word": "yo"}, run_id=RUN_ID).parameters == {
        "count": 7,
        "seconds": 5,
        "rate": 2.0,
        "flag": True,
        "word": "yo",
    }
    for name, value in [
        ("count", "7"),
        ("count", True),
        ("count", 1.5),
        ("flag", 1),
        ("rate", True),
    ]:
        with pytest.raises(ScenarioError, match=f"parameter {name}: must be"):
            fmt.plan(s, {name: value}, run_id=RUN_ID)
    with pytest.raises(ScenarioError, match="NaN"):
        fmt.plan(s, {"rate": float("nan")}, run_id=RUN_ID)


def test_an_unknown_override_lists_the_parameters() -> None:
    with pytest.raises(ScenarioError) as e:
        fmt.plan(fmt.load(BASE), {"cuont": 1}, run_id=RUN_ID)
    assert str(e.value) == (
        "scenario 'base' has no parameter 'cuont'; its parameters: count, seconds, rate, flag, word"
    )


def test_cli_overrides_are_converted_to_the_default_type() -> None:
    p = fmt.plan(
        fmt.load(BASE),
        {"count": "7", "rate": "2", "flag": "no", "word": "42"},
        run_id=RUN_ID,
        from_strings=True,
    ).parameters
    assert p == {"count": 7, "seconds": 5, "rate": 2.0, "flag": False, "word": "42"}
    for name, text in [("count", "seven"), ("count", "1.5"), ("flag", "maybe"), ("rate", "inf")]:
        with pytest.raises(ScenarioError, match=f"parameter {name}"):
            fmt.plan(fmt.load(BASE), {name: text}, run_id=RUN_ID, from_strings=True)


def test_an_override_is_validated_where_it_is_used() -> None:
    with pytest.raises(ScenarioError, match=r"test.steps\[0\].iterations: must be an integer"):
        fmt.plan(fmt.load(BASE), {"count": 0}, run_id=RUN_ID)
    with pytest.raises(ScenarioError, match=r"trigger.seconds: must be a number >= 0"):
        fmt.plan(fmt.load(BASE), {"seconds": -5}, run_id=RUN_ID)


def test_parse_param_splits_at_the_first_equals() -> None:
    assert fmt.parse_param("count=5") == ("count", "5")
    assert fmt.parse_param("expr=a=b") == ("expr", "a=b")
    assert fmt.parse_param("word=") == ("word", "")
    with pytest.raises(ScenarioError, match="NAME=VALUE"):
        fmt.parse_param("count")
    with pytest.raises(ScenarioError, match="parameter name"):
        fmt.parse_param("no-dash=1")


# --- the scenario's own keys -------------------------------------------------------------------


def test_depends_on_is_a_name_or_a_bounded_list_not_itself() -> None:
    top = "  name: base\n"
    assert fmt.load(BASE.replace(top, top + "  depends_on: smoke\n")).depends_on == ("smoke",)
    assert fmt.load(BASE.replace(top, top + "  depends_on: [a, b]\n")).depends_on == ("a", "b")
    assert "itself" in refused(BASE.replace(top, top + "  depends_on: [base]\n"))
    assert "twice" in refused(BASE.replace(top, top + "  depends_on: [a, a]\n"))
    eleven = ", ".join(f"d{i}" for i in range(11))
    assert "at most 10" in refused(BASE.replace(top, top + f"  depends_on: [{eleven}]\n"))
    assert "test.depends_on[0]" in refused(BASE.replace(top, top + "  depends_on: ['a b']\n"))


def test_timeout_and_on_leader_change() -> None:
    top = "  name: base\n"
    p = planned(BASE.replace(top, top + "  timeout: 60\n  on_leader_change: fail\n"))
    assert (p.timeout, p.on_leader_change) == (60.0, "fail")
    p = planned(BASE)
    assert (p.timeout, p.on_leader_change) == (3600.0, "resume")
    assert "test.timeout" in refused(BASE.replace(top, top + "  timeout: 0\n"))
    assert "test.timeout" in refused(BASE.replace(top, top + "  timeout: 86401\n"))
    assert "test.on_leader_change" in refused(BASE.replace(top, top + "  on_leader_change: x\n"))


def test_name_is_required_and_checked() -> None:
    assert refused(BASE.replace("  name: base\n", "")).startswith("test.name (line 1): required")
    assert "test.name" in refused(BASE.replace("name: base", "name: 'two words'"))


# --- actions -----------------------------------------------------------------------------------


def test_create_schedule_args_are_checked_by_the_api_validation() -> None:
    message = refused(BASE.replace("type: interval", "type: hourly"))
    assert message.startswith(
        "test.steps[0].action.args.trigger.type (line 18): unknown trigger type"
    )
    message = refused(BASE.replace("seconds: ${seconds}", "seconds: 0"))
    assert "test.steps[0].action.args.trigger" in message and "positive interval" in message
    assert "unknown field 'colour' in the schedule" in refused(
        BASE.replace("task_id: add", "task_id: add\n          colour: red")
    )


def test_create_schedule_refuses_an_id() -> None:
    message = refused(BASE.replace("task_id: add", "task_id: add\n          id: mine"))
    assert message.startswith("test.steps[0].action.args.id (line 17): scenario schedules get")


def test_create_schedule_accepts_task_or_task_id_not_both() -> None:
    assert planned(BASE.replace("task_id: add", "task: add")).steps[0].action.args["task"] == "add"
    assert "not both" in refused(BASE.replace("task_id: add", "task_id: add\n          task: add"))
    assert refused(BASE.replace("task_id: add", "task_id: ' add'")).startswith(
        "test.steps[0].action.args.task_id"
    )


def test_schedule_body_maps_task_id_and_sets_the_id() -> None:
    args = planned(BASE).steps[0].action.args
    body = fmt.schedule_body(fmt.expand(args, iteration=0), "scn-x-create-0")
    assert body == {
        "task": "add",
        "trigger": {"type": "interval", "seconds": 5},
        "id": "scn-x-create-0",
    }


@pytest.mark.parametrize(
    ("method", "args", "where"),
    [
        ("delete_schedule", "{schedule_id: 'a b'}", "args.schedule_id"),
        ("delete_schedule", "{id: x}", "args.id"),
        ("pause_schedule", "{note: 5}", "args.note"),
        ("resume_schedule", "{note: x}", "args.note"),
        ("run_job", "{schedule_id: x, task: add}", "args"),
        ("run_job", "{args: [1]}", "args"),
        ("run_job", "{task: add, args: x}", "args.args"),
        ("wait_for_fires", "{}", "args.count"),
        ("wait_for_fires", "{count: 0}", "args.count"),
        ("wait_for_fires", "{count: true}", "args.count"),
        ("wait_for_fires", "{count: 10000001}", "args.count"),
        ("wait_for_fires", "{count: 1, timeout: 0}", "args.timeout"),
        ("wait_for_fires", "{count: 1, timeout: 86401}", "args.timeout"),
        ("wait_for_fires", "{count: 1, outcome: succeeded}", "args.outcome"),
        ("http_get", "{}", "args.path"),
        ("http_get", "{path: /health}", "args.path"),
        ("http_get", "{path: /api/../secret}", "args.path"),
        ("http_get", "{path: /api/%2e%2e/x}", "args.path"),
        ("http_get", '{path: "/api/x\\ty"}', "args.path"),
        ("http_get", "{path: /api/x, expect_status: 700}", "args.expect_status"),
        ("launch_missiles", "{}", "action.method"),
    ],
)
def test_each_method_checks_its_args(method: str, args: str, where: str) -> None:
    message = refused(action_args(method, args))
    assert message.startswith(
        f"test.steps[1].{'' if where.startswith('action') else 'action.'}{where} (line "
    )


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("delete_schedule", "{}"),
        ("delete_schedule", "{schedule_id: 'job-${iteration}'}"),
        ("pause_schedule", "{note: maintenance}"),
        ("resume_schedule", "{schedule_id: x}"),
        ("run_job", "{}"),
        ("run_job", "{schedule_id: x}"),
        ("run_job", "{task: add, args: [1, 2], kwargs: {}}"),
        ("wait_for_fires", "{count: 10, timeout: 30.5, outcome: success}"),
        ("http_get", "{path: '/api/schedules?limit=5', expect_status: 200}"),
    ],
)
def test_each_method_accepts_its_documented_args(method: str, args: str) -> None:
    assert planned(action_args(method, args)).steps[1].action.method == method


def test_an_iteration_id_is_checked_at_its_longest() -> None:
    long_id = "x" * 125 + "-${iteration}"  # 127 characters at iteration 0, 129 at 999
    text = scenario(
        f"- {{type: loop, iterations: 1000, action: {{method: delete_schedule, "
        f"args: {{schedule_id: '{long_id}'}}}}}}\n"
    )
    assert "test.steps[1].action.args.schedule_id" in refused(text)
    assert planned(text.replace("1000", "10")).steps[1].iterations == 10


# --- metrics and assertions --------------------------------------------------------------------


def test_metrics_keep_the_written_unit_and_default_the_rest() -> None:
    p = planned(scenario(extra="metrics: [{creation_rate: per second}, memory_usage]\n"))
    assert p.metrics == {
        "creation_rate": "per second",
        "memory_usage": "MB",
        **{name: METRICS[name][0] for name in ALWAYS_REPORTED},
    }


def test_plan_metrics_are_listed_then_asserted_then_always_reported() -> None:
    p = planned(
        scenario(
            extra="metrics: [memory_usage, fires_total]\n"
            "assertions: ['scheduler_latency < 50', 'memory_usage < 500']\n"
        )
    )
    assert list(p.metrics) == [
        "memory_usage",
        "fires_total",
        "scheduler_latency",
        "duration_seconds",
        "actions_total",
        "action_errors",
    ]


def test_an_unknown_metric_is_an_error_listing_known_ones() -> None:
    message = refused(scenario(extra="metrics: [creation_speed]\n"))
    assert message.startswith("test.metrics[0] (line 20): unknown metric 'creation_speed'")
    assert "creation_rate" in message
    assert "twice" in refused(scenario(extra="metrics: [memory_usage, {memory_usage: MB}]\n"))


@pytest.mark.parametrize(
    ("expr", "op", "threshold"),
    [
        ("creation_rate > 100", ">", 100.0),
        ("creation_rate>=100", ">=", 100.0),
        ("memory_usage <= 5e2", "<=", 500.0),
        ("fires_failure == 0", "==", 0.0),
        ("action_errors != -1.5", "!=", -1.5),
        ("scheduler_latency < ${rate}", "<", 1.5),
    ],
)
def test_assertions_parse_metric_operator_and_number(expr: str, op: str, threshold: float) -> None:
    (a,) = planned(scenario(extra=f"assertions: ['{expr}']\n")).assertions
    assert (a.op, a.threshold) == (op, threshold)
    assert a.expr == expr.replace("${rate}", "1.5")


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true') > 1",
        "creation_rate > __import__('os')",
        "creation_rate > 1 or True",
        "creation_rate => 5",
        "creation_rate = 5",
        "creation_rate > nan",
        "creation_rate > 1e999",
        "creation_rate > ${word}",
        "creation_rate > ${flag}",
        "speed > 5",
        "creation_rate",
    ],
)
def test_anything_else_is_not_an_assertion(expr: str) -> None:
    assert refused(scenario(extra=f'assertions: ["{expr}"]\n')).startswith("test.assertions[0]")


def test_an_assertion_threshold_follows_an_override() -> None:
    text = scenario(extra="assertions: ['memory_usage < ${count}']\n")
    (a,) = fmt.plan(fmt.load(text), {"count": 7}, run_id=RUN_ID).assertions
    assert a.threshold == 7.0


# --- stored definitions, shipped files, docs ----------------------------------------------------


def test_from_definition_rebuilds_the_same_scenario() -> None:
    s = fmt.load(BASE)
    again = fmt.from_definition(s.definition, s.version)
    assert again == s


def test_from_definition_checks_the_stored_form_again() -> None:
    s = fmt.load(BASE)
    broken = {**s.definition, "steps": [{**s.definition["steps"][0], "iterations": 0}]}
    with pytest.raises(ScenarioError, match=r"^test.steps\[0\].iterations: must be"):
        fmt.from_definition(broken, s.version)
    with pytest.raises(ScenarioError, match="plain JSON"):
        fmt.from_definition({**s.definition, "description": object()}, s.version)


def test_every_shipped_scenario_loads_and_plans() -> None:
    shipped = fmt.shipped()
    assert {"schedule_storm", "handler_burst", "pause_resume_storm"} <= set(shipped)
    for name, path in shipped.items():
        assert path.suffix == ".yaml"
        s = fmt.load(path.read_bytes())
        assert s.name == name
        p = fmt.plan(s, run_id=RUN_ID)
        for step in p.steps:
            if step.action is not None:
                fmt.expand(step.action.args, iteration=step.iterations - 1)


def test_schedule_storm_is_the_seed_example() -> None:
    s = fmt.load(fmt.shipped()["schedule_storm"].read_bytes())
    p = fmt.plan(s, {"schedules_count": 10}, run_id=RUN_ID)
    assert [(st.name, st.type, st.iterations) for st in p.steps] == [
        ("create_schedules", "loop", 10),
        ("wait", "sleep", 1),
        ("delete_schedules", "loop", 10),
    ]
    assert [a.expr for a in p.assertions] == [
        "creation_rate > 100",
        "deletion_rate > 100",
        "memory_usage < 500",
    ]


def test_the_docs_list_every_metric_and_every_shipped_scenario() -> None:
    text = DOCS.read_text()
    for name, (unit, _) in METRICS.items():
        assert re.search(rf"^\| `{name}` \| {re.escape(unit)} \|", text, re.M), name
    for name in fmt.shipped():
        assert f"`{name}`" in text
