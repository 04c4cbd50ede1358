"""mesh.validation: a msgspec ValidationError explained with the field's path, value and words."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import pytest
from msgspec import Meta

from mesh.validation import MISSING, Problem, dotted, explain


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    rate: Annotated[float, Meta(gt=0)] = 1.0
    per_task: dict[Annotated[str, Meta(min_length=1)], Annotated[int, Meta(ge=1)]] = {}
    mode: Literal["fast", "safe"] = "safe"
    name: Annotated[str, Meta(pattern=r"^[a-z]+\Z", description="lower-case letters")] = "x"


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    limits: Limits
    peers: list[str] = []


def problem(data: Any, tp: Any = Outer) -> Problem:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, tp)
    return explain(info.value, data, tp)


def test_wrong_type_names_the_path_and_the_value() -> None:
    p = problem({"limits": {"rate": "x"}})
    assert (p.where, p.reason()) == ("limits.rate", "expected a number, got 'x'")


def test_broken_bound_says_what_it_must_be() -> None:
    p = problem({"limits": {"rate": -2}})
    assert (p.where, p.reason()) == ("limits.rate", "must be greater than 0, got -2")


def test_a_mapping_value_is_named_by_its_key() -> None:
    p = problem({"limits": {"per_task": {"ok": 2, "bad": 0, "worse": 0}}})
    assert (p.where, p.reason()) == ("limits.per_task.bad", "must be at least 1, got 0")


def test_a_bad_mapping_key_is_shown() -> None:
    p = problem({"limits": {"per_task": {"ok": 2, "": 1}}})
    assert p.kind == "key" and p.where == "limits.per_task"
    assert p.reason() == "every key must be at least 1 long, got ''"


def test_a_list_item_is_named_by_its_index() -> None:
    p = problem({"limits": {}, "peers": ["a", 5]})
    assert (p.where, p.reason()) == ("peers[1]", "expected a string, got 5")


def test_a_literal_lists_its_choices() -> None:
    p = problem({"limits": {"mode": "slow"}})
    assert p.reason() == "expected one of fast, safe, got 'slow'"


def test_a_description_is_what_was_expected() -> None:
    p = problem({"limits": {"name": "ABC"}})
    assert p.reason() == "expected lower-case letters, got 'ABC'"


def test_unknown_field_lists_the_allowed_names() -> None:
    p = problem({"limits": {"rat": 1}})
    assert p.kind == "unknown" and p.where == "limits.rat" and p.value == "rat"
    assert set(p.allowed) == {"rate", "per_task", "mode", "name"}


def test_missing_field_is_required() -> None:
    p = problem({})
    assert (p.where, p.reason(), p.value) == ("limits", "required", MISSING)


def test_dotted_paths() -> None:
    assert dotted(("a", "b", 0, "c")) == "a.b[0].c"
    assert dotted(()) == ""
