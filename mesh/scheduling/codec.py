"""APScheduler objects ⇄ JSON-able values, without a round trip through a JSON string.

The wire form is exactly what APScheduler's ``JSONSerializer`` produces and accepts — dates as
ISO strings, timedeltas as seconds, UUIDs as strings, enums by name, other objects as
``{"_apscheduler_json": [class_ref, state]}`` — so entries written by earlier versions replay
unchanged. The serializer itself can only go to and from ``bytes``; walking the values directly
skips one ``json.dumps`` and one ``json.loads`` per command and caches the class lookups, which
is most of what replicating a schedule used to cost (see docs/performance.md).
"""

from __future__ import annotations

import json
from datetime import date, timedelta, tzinfo
from enum import Enum
from typing import Any
from uuid import UUID

from apscheduler._marshalling import callable_from_ref, marshal_object, marshal_timezone

MAGIC_KEY = "_apscheduler_json"

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
        cls = callable_from_ref(ref)
        if not isinstance(cls, type):
            raise TypeError(f"{ref} is not a class")
        _classes[ref] = cls
    instance = cls.__new__(cls)
    instance.__setstate__(state)
    return instance


def loads(data: bytes | str) -> Any:
    """Parse JSON whose objects are in wire form, rebuilding them in the same pass."""
    return json.loads(data, object_hook=object_hook)
