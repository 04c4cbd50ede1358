"""The handler registry every node keeps from handler heartbeats (``handler_hello``).

Handlers heartbeat to every node, so every node answers ``GET /api/handlers`` the same way. The
leader adds its own view for routing: jobs in flight per handler, and a circuit breaker that
skips a handler after consecutive failures and probes it back in after a cool-down.

On an authenticated mesh a handler id is the name of the handler's key: the dispatcher records a
hello only after checking that its ``handler_id`` is the key it came with
(:mod:`mesh.dispatch.dispatcher`), so the registry's keys are authenticated ids and no key can
take over another handler's entry.

**The handler's clock.** A hello carries the handler's clock when it was sent (``clock``). For
the one-message dispatch (:mod:`mesh.dispatch.protocol`) the leader needs a *lower bound* of the
handler's clock now: a hello sent at handler time ``H`` and recorded at our time ``L`` says the
handler's clock at our time ``t`` is at least ``H + (t - L)``, whatever the network delay (the
delay only puts it further ahead). The bound is the best such sample of the last
``CLOCK_WINDOW`` seconds, each lowered by ``CLOCK_DRIFT`` per second of age, so a handler clock
running slower than ours (by up to 1,000 ppm) never makes it an over-estimate. A new incarnation
starts with no samples: another process, maybe another machine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import msgspec

from mesh.dispatch.protocol import DEAD_AFTER, SUSPECT_AFTER, Hello, decode
from mesh.tasks import INTERNAL_PREFIX

log = logging.getLogger("mesh.dispatch")

CIRCUIT_FAILURES = 3  # consecutive failures that take a handler out of rotation
CIRCUIT_COOLDOWN = 5.0  # seconds before one probe job may go to it again
CLOCK_WINDOW = 30.0  # seconds of hello clock samples kept per handler
CLOCK_DRIFT = 1e-3  # how much slower than ours a handler's clock may run (s/s)


@attrs.define
class HandlerInfo:
    handler_id: str
    tasks: frozenset[str] = frozenset()
    tags: dict[str, str] = attrs.Factory(dict)  # its ``--tag K=V``s, from its latest hello
    concurrency: int = 1
    pid: int | None = None
    host: str | None = None
    reported: dict[str, Any] = attrs.Factory(dict)
    # Which process answers to this id (pid and start time): a handler restarted under the same
    # id keeps heartbeating, so only this tells its dispatcher the old process's jobs are gone.
    incarnation: str | None = None
    last_seen: float = 0.0
    last_seen_wall: float = 0.0
    # Leader-side routing state.
    in_flight: int = 0
    consecutive_failures: int = 0
    circuit_open_until: float = 0.0
    probing: bool = False
    draining: bool = False  # shutting down: finishes its jobs, takes no new ones
    # Its clock (one-message dispatch): (our time, its clock - our time) per recent hello, the
    # clock of its latest hello, and the idempotency keys that hello listed as running.
    clock_samples: deque[tuple[float, float]] = attrs.Factory(deque)
    # The best sample, as ``offset + CLOCK_DRIFT * at``: every sample loses CLOCK_DRIFT per
    # second alike, so the best one stays the best and is found once per hello, not per dispatch.
    clock_base: float | None = None
    hello_clock: float | None = None
    running: frozenset[str] = frozenset()
    # Where dispatches go (``send_to_identity``): the identity of its latest authenticated hello
    # (on an unencrypted link, where nothing is authenticated, its DEALER's routing id: its id).
    identity: bytes = attrs.field(
        default=attrs.Factory(lambda self: self.handler_id.encode(), takes_self=True)
    )


class HandlerRegistry:
    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, settle: float = SUSPECT_AFTER
    ) -> None:
        self.clock = clock
        self._settled_at = clock() + settle
        self.handlers: dict[str, HandlerInfo] = {}
        # Jobs waiting for a handler, oldest first: (the task they need, their wake-up).
        self._waiters: deque[tuple[str | None, asyncio.Future[None]]] = deque()

    # ------------------------------------------------------------------ heartbeats

    def on_hello(self, payload: Any) -> HandlerInfo | None:
        """Decode and record a ``handler_hello``; a malformed one is dropped (None)."""
        try:
            hello = decode(payload, Hello)
        except msgspec.ValidationError as e:
            log.debug("dropping malformed handler hello: %s", e)
            return None
        return self.record(hello)

    def record(self, hello: Hello, *, identity: bytes | None = None) -> HandlerInfo:
        """Record a decoded hello whose sender the caller has checked; ``identity`` (from an
        authenticated message) becomes where this handler's dispatches go."""
        hid = hello.handler_id
        info = self.handlers.get(hid)
        if info is None:
            info = self.handlers[hid] = HandlerInfo(handler_id=hid)
        was_alive = self.state(info) == "alive"
        # A handler cannot take over the mesh's own tasks (mesh.tasks.INTERNAL_PREFIX).
        info.tasks = frozenset(t for t in hello.tasks if not t.startswith(INTERNAL_PREFIX))
        info.tags = dict(hello.tags)
        info.concurrency = hello.concurrency
        info.pid = hello.pid
        info.host = hello.host
        info.reported = {
            "active_jobs": hello.active_jobs,
            "succeeded": hello.succeeded,
            "failed": hello.failed,
            "avg_ms": hello.avg_ms,
        }
        info.draining = hello.draining
        incarnation = f"{hello.pid}@{hello.started_at}"
        if info.incarnation is not None and incarnation != info.incarnation:
            log.info("handler %s restarted (now %s)", hid, incarnation)
            # A new process: its predecessor's failures say nothing about it.
            info.consecutive_failures = 0
            info.circuit_open_until = 0.0
            info.probing = False
            info.clock_samples.clear()
        info.incarnation = incarnation
        if identity:
            info.identity = identity
        now = info.last_seen = self.clock()
        self._record_clock(info, hello, now)
        info.last_seen_wall = time.time()
        if not was_alive:
            self.notify()
        return info

    @staticmethod
    def _record_clock(info: HandlerInfo, hello: Hello, now: float) -> None:
        info.hello_clock = hello.clock
        info.running = frozenset(hello.running)
        samples = info.clock_samples
        if hello.clock is None:
            samples.clear()  # a handler without a clock gets the two-phase start
            info.clock_base = None
            return
        samples.append((now, hello.clock - now))
        while len(samples) > 1 and now - samples[0][0] > CLOCK_WINDOW:
            samples.popleft()
        info.clock_base = max(offset + CLOCK_DRIFT * at for at, offset in samples)

    def handler_clock(self, info: HandlerInfo) -> float | None:
        """A lower bound of ``info``'s clock now (module docstring), or None when its hellos
        carry no clock."""
        if info.clock_base is None:
            return None
        now = self.clock()
        return now + info.clock_base - CLOCK_DRIFT * now

    def notify(self, freed: HandlerInfo | None = None) -> None:
        """Wake the jobs waiting for a handler: all of them (a handler arrived or recovered), or
        for capacity ``freed`` on one handler, as many as it has free slots, oldest first, of
        those whose task it offers. Waking every waiter for every finished job made a queue of
        n jobs cost n wake-ups per job (each then found the one slot taken)."""
        if freed is None:
            budget = len(self._waiters)
        else:
            budget = max(0, freed.concurrency - freed.in_flight)
        if not budget:
            return
        kept: deque[tuple[str | None, asyncio.Future[None]]] = deque()
        while self._waiters and budget:
            task, fut = self._waiters.popleft()
            if fut.done():
                continue  # timed out
            if freed is not None and task is not None and task not in freed.tasks:
                kept.append((task, fut))
                continue
            fut.set_result(None)
            budget -= 1
        kept.extend(self._waiters)
        self._waiters = kept

    async def changed(self, timeout: float, task: str | None = None) -> None:
        """Until ``notify`` wakes this waiter (for ``task``: capacity on a handler offering it)
        or ``timeout`` seconds pass."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((task, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            if not fut.done():
                fut.cancel()

    # ------------------------------------------------------------------ queries

    def state(self, info: HandlerInfo) -> str:
        age = self.clock() - info.last_seen
        if age <= SUSPECT_AFTER:
            return "alive"
        return "suspect" if age <= DEAD_AFTER else "dead"

    def settled(self) -> bool:
        """Whether every live handler has had time to say hello (module docstring)."""
        return self.clock() >= self._settled_at

    def offers(self, task: str, tags: Mapping[str, str] | None = None) -> bool:
        return bool(self.matching(task, tags))

    def matching(self, task: str, tags: Mapping[str, str] | None = None) -> list[HandlerInfo]:
        """Alive handlers, not draining, offering ``task`` and having all of ``tags``, by id:
        a broadcast's runs, whatever their circuits say (each run goes to its own handler)."""
        return sorted(
            (
                h
                for h in self.handlers.values()
                if task in h.tasks
                and self.state(h) == "alive"
                and not h.draining
                and has_tags(h, tags)
            ),
            key=lambda h: h.handler_id,
        )

    def routable(self, task: str, tags: Mapping[str, str] | None = None) -> list[HandlerInfo]:
        """Alive handlers offering ``task`` with all of ``tags``, whose circuit is closed (or
        due for a probe)."""
        now = self.clock()
        out = []
        for h in self.handlers.values():
            if task not in h.tasks or self.state(h) != "alive" or h.draining:
                continue
            if not has_tags(h, tags):
                continue
            if h.circuit_open_until > now or h.probing:
                continue
            out.append(h)
        return out

    # ------------------------------------------------------------------ outcomes (leader)

    def record_success(self, info: HandlerInfo) -> None:
        info.consecutive_failures = 0
        info.probing = False
        info.circuit_open_until = 0.0

    def record_failure(self, info: HandlerInfo) -> None:
        info.consecutive_failures += 1
        info.probing = False
        if info.consecutive_failures >= CIRCUIT_FAILURES:
            info.circuit_open_until = self.clock() + CIRCUIT_COOLDOWN

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for h in sorted(self.handlers.values(), key=lambda h: h.handler_id):
            state = self.state(h)
            if state == "alive" and h.circuit_open_until > self.clock():
                state = "unhealthy"
            elif state == "alive" and h.draining:
                state = "draining"
            r = h.reported
            out.append(
                {
                    "handler_id": h.handler_id,
                    "tasks": sorted(h.tasks),
                    "tags": dict(sorted(h.tags.items())),
                    "state": state,
                    "concurrency": h.concurrency,
                    "active_jobs": r.get("active_jobs", 0),
                    "succeeded": r.get("succeeded", 0),
                    "failed": r.get("failed", 0),
                    "avg_ms": r.get("avg_ms"),
                    "last_seen": datetime.fromtimestamp(h.last_seen_wall, UTC)
                    .isoformat()
                    .replace("+00:00", "Z"),
                    "pid": h.pid,
                    "host": h.host,
                }
            )
        return out


def has_tags(handler: HandlerInfo, tags: Mapping[str, str] | None) -> bool:
    """Whether ``handler`` was started with every one of ``tags`` (none asked: any handler)."""
    return not tags or all(handler.tags.get(k) == v for k, v in tags.items())
