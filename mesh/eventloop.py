"""How every ScheduleZero process runs its event loop: uvloop when it is installed, else asyncio.

uvloop (libuv under asyncio's API) makes each wake-up of the loop cheaper; the mesh's processes
are event-loop bound (docs/performance.md). ``SCHEDULEZERO_EVENT_LOOP=asyncio`` forces the
standard loop (for an A/B measurement, or if a platform's uvloop misbehaves); ``uvloop`` requires
it. Another value is a configuration error (exit 2, one line).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from mesh.config import ConfigError

T = TypeVar("T")

ENV = "SCHEDULEZERO_EVENT_LOOP"


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop ``run`` uses in this process."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted not in ("", "uvloop", "asyncio"):
        raise ConfigError(f"{ENV}: expected uvloop or asyncio, got {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if wanted == "uvloop":
            raise ConfigError(f"{ENV}=uvloop, but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``loop_name()`` names."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
