"""Secrets kept out of log lines: a ``logging.Filter`` that masks sensitive keys in the mappings
and lists a record formats (``log.info("job %s", kwargs)``), as the event log does."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from mesh.security.redact import DEFAULT_SENSITIVE_KEYS, redact

__all__ = ["RedactingFilter", "install"]


class RedactingFilter(logging.Filter):
    def __init__(self, sensitive_keys: Iterable[str] = DEFAULT_SENSITIVE_KEYS) -> None:
        super().__init__()
        self.sensitive_keys = tuple(sensitive_keys)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict):
            record.args = redact(args, self.sensitive_keys)
        elif isinstance(args, tuple) and any(isinstance(a, dict | list | tuple) for a in args):
            record.args = tuple(self._one(a) for a in args)
        if isinstance(record.msg, dict | list):
            record.msg = redact(record.msg, self.sensitive_keys)
        return True

    def _one(self, value: Any) -> Any:
        if isinstance(value, dict | list | tuple):
            return redact(value, self.sensitive_keys)
        return value


def install(sensitive_keys: Iterable[str] = DEFAULT_SENSITIVE_KEYS) -> RedactingFilter:
    """Add the filter to every handler of the root logger (where every line is written)."""
    f = RedactingFilter(sensitive_keys)
    for handler in logging.getLogger().handlers:
        handler.addFilter(f)
    return f
