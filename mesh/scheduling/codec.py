"""APScheduler objects ⇄ JSON-able values, without a round trip through a JSON string.

The wire form is exactly what APScheduler's ``JSONSerializer`` produces and accepts — dates as
ISO strings, timedeltas as seconds, UUIDs as strings, enums by name, other objects as
``{"_apscheduler_json": [class_ref, state]}`` — so entries written by earlier versions replay
unchanged. The serializer itself can only go to and from ``bytes``; walking the values directly
skips one ``json.dumps`` and one ``json.loads`` per command and caches the class lookups, which
is most of what replicating a schedule used to cost (see docs/performance.md).

User data (a schedule's or job's ``args``, ``kwargs`` and ``metadata``, a job's return value)
never goes through ``to_wire``/``from_wire``: it is plain JSON, checked by :func:`plain` and
stored as it is, so a caller's ``{"_apscheduler_json": ...}`` stays a dict and never names a
class to import. Only the fields our own code fills (triggers, dates, enums) are decoded, and
only into classes of APScheduler itself (``ALLOWED_MODULES``).
"""

from __future__ import annotations

import json
from datetime import date, timedelta, tzinfo
from enum import Enum
from typing import Any
from uuid import UUID

from apscheduler._marshalling import callable_from_ref, marshal_object, marshal_timezone

MAGIC_KEY = "_apscheduler_json"
# The objects the log may rebuild: APScheduler's triggers and their parts. Nothing a caller
# writes reaches from_wire, so this is defence in depth, not the rule that keeps user data out.
ALLOWED_MODULES = ("apscheduler.",)
# How deep user data may nest (lists and objects): deep enough for any real payload, shallow
# enough that walking it (here, in json, in msgspec) never approaches the recursion limit.
MAX_USER_DEPTH = 32

_PRIMITIVES = (str, int, float, bool, type(None))
_classes: dict[str, type] = {}


def to_wire(value: Any) -> Any:
    """Return the JSON-able form of ``value`` (equal to ``json.loads(serializer.serialize(v))``)."""
    t = type(value)
    if t is str or t is int or t is float or t is bool or value is None:
        return value
    if t is dict:
        return {_key(k): to_wire(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [to_wire(v) for v in value]
    return _default(value)


def _key(k: Any) -> str:
    if type(k) is str:
        return k
    if isinstance(k, str):
        return str.__str__(k)
    # json.dumps' own key coercion; anything else is an error there too.
    if k is None or isinstance(k, (bool, int, float)):
        return json.dumps(k)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(k).__name__}")


def _default(value: Any) -> Any:
    # Subclasses of the JSON types are encoded as their base type, as json.dumps does.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {_key(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    # JSONSerializer._default_hook, in its order.
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, tzinfo):
        return marshal_timezone(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.name
    if hasattr(value, "__getstate__"):
        cls_ref, state = marshal_object(value)
        return {MAGIC_KEY: [cls_ref, to_wire(state)]}
    raise TypeError(f"Object of type {type(value).__name__!r} is not JSON serializable")


def from_wire(value: Any) -> Any:
    """Rebuild APScheduler objects from their wire form (what ``serializer.deserialize`` does)."""
    t = type(value)
    if t is dict:
        d = {k: from_wire(v) for k, v in value.items()}
        return object_hook(d) if MAGIC_KEY in d else d
    if t is list:
        return [from_wire(v) for v in value]
    return value


def object_hook(d: dict[str, Any]) -> Any:
    """``json.loads`` object hook: a magic-keyed dict becomes the object it describes."""
    if MAGIC_KEY not in d:
        return d
    ref, state = d[MAGIC_KEY]
    cls = _classes.get(ref)
    if cls is None:
        if not isinstance(ref, str) or not ref.startswith(ALLOWED_MODULES):
            raise ValueError(f"refusing to rebuild {ref!r}: not an APScheduler class")
        cls = callable_from_ref(ref)
        if not isinstance(cls, type):
            raise TypeError(f"{ref} is not a class")
        _classes[ref] = cls
    instance = cls.__new__(cls)
    instance.__setstate__(state)
    return instance


class NotPlainJSON(ValueError):
    """User data that is not plain JSON (see :func:`plain`)."""


def plain(value: Any, *, max_depth: int = MAX_USER_DEPTH) -> Any:
    """``value`` as plain JSON (tuples become lists), or :class:`NotPlainJSON`.

    Plain JSON is what ``json.dumps(..., allow_nan=False)`` writes: objects with string keys,
    arrays, strings, finite numbers, booleans and null, nested at most ``max_depth`` levels.
    Walked without recursion, so no input can exhaust the stack.
    """
    out: list[Any] = [None]
    # (container to fill, key or index, value, depth)
    stack: list[tuple[Any, Any, Any, int]] = [(out, 0, value, 0)]
    while stack:
        parent, slot, v, depth = stack.pop()
        t = type(v)
        if t is str or t is bool or v is None:
            parent[slot] = v
        elif t is int:
            parent[slot] = v
        elif t is float:
            if v != v or v in (_INF, -_INF):
                raise NotPlainJSON(f"{v!r} is not a JSON number")
            parent[slot] = v
        elif t is dict or t is list or t is tuple:
            if depth >= max_depth:
                raise NotPlainJSON(f"nested deeper than {max_depth} levels")
            if t is dict:
                new: Any = {}
                for k, item in v.items():
                    if type(k) is not str:
                        raise NotPlainJSON(f"object key {k!r} is not a string")
                    stack.append((new, k, item, depth + 1))
            else:
                new = [None] * len(v)
                stack.extend((new, i, item, depth + 1) for i, item in enumerate(v))
            parent[slot] = new
        else:
            raise NotPlainJSON(f"a {t.__name__} is not a JSON value")
    return out[0]


_INF = float("inf")
