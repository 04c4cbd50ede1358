"""Counting and logging what security checks refused, without letting an attacker flood the log.

Every refusal is counted by reason (exported as ``schedulezero_security_rejected_total{reason}``)
and logged at most once per peer and reason per :data:`LOG_EVERY_SECONDS`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

log = logging.getLogger("mesh.security")

LOG_EVERY_SECONDS = 60.0
_MAX_TRACKED = 4096  # distinct (peer, reason) pairs remembered for rate limiting


class Rejections:
    """Counter of refused messages and connections by reason, with a rate-limited log."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._logged: dict[tuple[str, str], float] = {}

    def reject(self, reason: str, peer: str, detail: str = "") -> None:
        self.counts[reason] += 1
        now = self._clock()
        key = (peer[:200], reason)
        last = self._logged.get(key)
        if last is not None and now - last < LOG_EVERY_SECONDS:
            return
        if len(self._logged) >= _MAX_TRACKED:
            self._logged.clear()
        self._logged[key] = now
        log.warning(
            "security: refused %s from %s%s (logged once a minute per peer)",
            reason,
            peer[:200] or "?",
            f": {detail[:300]}" if detail else "",
        )
