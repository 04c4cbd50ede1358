"""Redaction of secrets in user data: what ``read`` callers, logs and the event log see.

A mapping key matching one of the sensitive names (case-insensitive, at any depth, in dicts
nested in lists too) has its value replaced by ``"***"``. Keys match when the key, lowercased
with ``-`` read as ``_``, equals a sensitive name or ends with ``_`` + that name
(``db_password``, ``X-Api-Key``). Everything else is returned as is: user data stays opaque.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

MASK = "***"
DEFAULT_SENSITIVE_KEYS = (
    "password",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "private_key",
    "webhook_url",
)
# Deeper than any valid body (the API refuses deeper nesting): stop there rather than recurse.
_MAX_DEPTH = 64


@lru_cache(maxsize=4096)
def _sensitive(key: str, names: frozenset[str]) -> bool:
    k = key.lower().replace("-", "_")
    return k in names or any(k.endswith("_" + n) for n in names)


def is_sensitive(key: object, names: Iterable[str] = DEFAULT_SENSITIVE_KEYS) -> bool:
    return isinstance(key, str) and _sensitive(key, frozenset(n.lower() for n in names))


def redact(value: Any, names: Iterable[str] = DEFAULT_SENSITIVE_KEYS) -> Any:
    """A copy of ``value`` with the values of sensitive keys masked; never mutates ``value``."""
    frozen = frozenset(n.lower().replace("-", "_") for n in names)
    if not frozen:
        return value
    return _redact(value, frozen, 0)


def _redact(value: Any, names: frozenset[str], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return MASK
    if isinstance(value, dict):
        return {
            k: MASK if isinstance(k, str) and _sensitive(k, names) else _redact(v, names, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redact(v, names, depth + 1) for v in value]
    return value
