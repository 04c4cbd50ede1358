"""A ``msgspec.ValidationError`` turned into what a one-line error message needs.

msgspec says what failed and where (``Expected `int` >= 1 - at `$.raft.snapshot_threshold```),
but not the value it got, and it names a mapping's value only as ``[...]``. :func:`explain` walks
the converted data and its type along that path to put back the key and the value, and says what
was expected in plain words: the type's ``msgspec.Meta(description=...)`` when it has one.

    try:
        msgspec.convert(data, RaftConfig)
    except msgspec.ValidationError as e:
        problem = explain(e, data, RaftConfig)
        print(f"raft.{problem.where}: {problem.reason()}")  # raft.pre_vote: expected true or ...
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import msgspec

__all__ = ["MISSING", "Problem", "dotted", "explain"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # the value of a required field that is absent

_AT = re.compile(r"^(?P<what>.*?)(?: - at `(?P<at>[^`]*)`(?: in `(?P<in>[^`]*)`)?)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_WRONG_TYPE = re.compile(r"Expected `(?P<want>[^`]+)`, got `[^`]+`")
_BOUND = re.compile(r"Expected `[^`]+` (?P<rule>.+)")
_COMPARE = re.compile(r"(?P<length>of length )?(?P<op>>=|<=|>|<) (?P<n>\S+)")
_OP_WORDS = {">": "greater than", ">=": "at least", "<": "less than", "<=": "at most"}
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """Where validation failed, what was found there and what was expected instead.

    ``kind`` says how to read ``expected``:

    - ``"type"``: a noun phrase ("an integer", or the Meta description), also for a broken
      constraint of a described type;
    - ``"bound"``: a constraint of an undescribed type ("at least 1", "greater than 0");
    - ``"choice"``: "one of a, b" (a ``Literal``);
    - ``"key"``: what a mapping's keys must be; ``value`` is the offending key;
    - ``"missing"``: a required field is absent (``expected`` describes it, may be empty);
    - ``"unknown"``: ``value`` is a field name the type does not have; ``allowed`` lists its names;
    - ``"invalid"``: ``expected`` is the whole reason (raised by a ``dec_hook``, ``__post_init__``).
    """

    path: tuple[str | int, ...]  # keys and indexes into the data
    kind: str
    expected: str
    value: Any = MISSING
    allowed: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return dotted(self.path)

    def reason(self, show: Callable[[Any], str] = repr) -> str:
        """The message without the path: ``expected an integer, got 'x'``."""
        if self.kind == "bound":
            return f"must be {self.expected}, got {show(self.value)}"
        if self.kind == "key":
            return f"every key must be {self.expected}, got {show(self.value)}"
        if self.kind == "missing":
            return f"required ({self.expected})" if self.expected else "required"
        if self.kind == "unknown":
            return f"unknown field {self.value!r}"
        if self.kind == "invalid":
            return self.expected
        return f"expected {self.expected}, got {show(self.value)}"


def dotted(path: tuple[str | int, ...] | list[str | int]) -> str:
    """``("peers", 1)`` → ``peers[1]``; ``("raft", "pre_vote")`` → ``raft.pre_vote``."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def explain(err: msgspec.ValidationError, data: Any, type_: Any) -> Problem:
    """What ``msgspec.convert(data, type_)`` objected to, with the key and value filled in."""
    match = _AT.match(str(err))
    assert match is not None  # the pattern accepts any text
    what = match["what"]
    path: list[str | int] = []
    value, tp = data, type_
    for name, index in _STEP.findall(match["in"] or match["at"] or "$"):
        if index == "...":  # a mapping's value: the first one that fails is the one
            pairs = value.items() if isinstance(value, Mapping) else ()
            key, _ = _first_failing(pairs, _value_of(tp))
            path.append(key)
            value = MISSING if key is MISSING else value[key]
            tp = _child(tp, key)
        elif index:
            path.append(int(index))
            value = value[int(index)] if isinstance(value, list | tuple) else MISSING
            tp = _child(tp, int(index))
        else:
            path.append(name)
            value = value.get(name, MISSING) if isinstance(value, Mapping) else MISSING
            tp = _child(tp, name)
    at = tuple(path)

    if match["in"]:  # "at `key` in `$.x`": a key of the mapping at $.x
        key_type = _args(tp)[0] if _args(tp) else Any
        keys = ((k, k) for k in value) if isinstance(value, Mapping) else ()
        key, key_err = _first_failing(keys, key_type)
        expected = explain(key_err, key, key_type).expected if key_err else "a valid key"
        return Problem(path=at, kind="key", expected=expected, value=key)
    if what.startswith("Object contains unknown field `"):
        name = what.split("`")[1]
        return Problem(
            path=(*at, name), kind="unknown", expected="", value=name, allowed=_names(tp)
        )
    if what.startswith("Object missing required field `"):
        name = what.split("`")[1]
        child = _child(tp, name)
        return Problem(path=(*at, name), kind="missing", expected=_description(child) or "")
    if described := _description(tp):
        if _WRONG_TYPE.match(what) or _BOUND.match(what) or what.startswith("Invalid"):
            return Problem(path=at, kind="type", expected=described, value=value)
    if m := _WRONG_TYPE.match(what):
        return Problem(path=at, kind="type", expected=_type_words(m["want"]), value=value)
    if what.startswith("Invalid enum value") and (choices := _choices(tp)):
        return Problem(path=at, kind="choice", expected=choices, value=value)
    if m := _BOUND.match(what):
        return Problem(path=at, kind="bound", expected=_bound_words(m["rule"]), value=value)
    return Problem(path=at, kind="invalid", expected=what, value=value)


# --------------------------------------------------------------------------- types


def _strip(tp: Any) -> Any:
    """The type without ``Annotated`` and without ``None``/``UNSET`` in an optional union."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if _is_union(tp):
            rest = [a for a in typing.get_args(tp) if a not in (type(None), msgspec.UnsetType)]
            if len(rest) == 1:
                tp = rest[0]
                continue
        return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(_strip(tp))


def _child(tp: Any, key: str | int) -> Any:
    """The type of ``tp``'s field, item or value ``key`` (``Any`` when it cannot be told)."""
    base = _strip(tp)
    if isinstance(base, type) and issubclass(base, msgspec.Struct):
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(base)}
        return fields.get(str(key), Any)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is None or not args:
        return Any
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return args[-1]
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return args[key] if isinstance(key, int) and key < len(args) else Any
    return args[0]


def _value_of(tp: Any) -> Any:
    args = _args(tp)
    return args[-1] if args else Any


def _names(tp: Any) -> tuple[str, ...]:
    base = _strip(tp)
    if not (isinstance(base, type) and issubclass(base, msgspec.Struct)):
        return ()
    tag = base.__struct_config__.tag_field
    return (*([tag] if tag else []), *(f.encode_name for f in msgspec.structs.fields(base)))


def _description(tp: Any) -> str | None:
    """The ``Meta(description=...)`` of ``tp``, of its optional part, or of a union member."""
    while True:
        if typing.get_origin(tp) is Annotated:
            for meta in reversed(tp.__metadata__):
                if isinstance(meta, msgspec.Meta) and meta.description:
                    return meta.description
            tp = typing.get_args(tp)[0]
        elif _is_union(tp):
            found = (_description(a) for a in typing.get_args(tp))
            return next((d for d in found if d), None)
        else:
            return None


def _choices(tp: Any) -> str | None:
    base = _strip(tp)
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(base)))
    return None


def _first_failing(pairs: Any, tp: Any) -> tuple[Any, msgspec.ValidationError | None]:
    """The first key of ``(key, value)`` pairs whose value does not convert to ``tp``, and why."""
    first = MISSING
    for key, item in pairs:
        if first is MISSING:
            first = key
        try:
            msgspec.convert(item, tp)
        except msgspec.ValidationError as e:
            return key, e
        except Exception:  # a type that needs a dec_hook: cannot tell, keep looking
            continue
    return first, None


# --------------------------------------------------------------------------- words


def _type_words(want: str) -> str:
    """``float | null`` → ``a number or null``."""
    names = [n.strip() for n in want.split("|")]
    if "float" in names and "int" in names:
        names.remove("int")  # an integer is a number
    return " or ".join(_TYPE_WORDS.get(n, n) for n in names)


def _bound_words(rule: str) -> str:
    """``>= 1`` → ``at least 1``; ``> 0.0`` → ``greater than 0``; ``of length >= 1`` → ..."""
    m = _COMPARE.fullmatch(rule)
    if m is None:
        return rule
    n = m["n"]
    try:
        number = float(n)
        n = str(int(number)) if number.is_integer() and abs(number) < 1e15 else n
    except ValueError:
        pass
    words = f"{_OP_WORDS[m['op']]} {n}"
    return f"{words} long" if m["length"] else words
