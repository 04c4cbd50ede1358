"""The baselines: APScheduler 4 alone, in one process, with the trivial task.

Run as a child of the benchmark (``python -m bench.baseline SPEC_JSON``) so that it gets a
fresh interpreter and its own CPU accounting; it prints one JSON object as its last line.
``SPEC_JSON`` names the store (``memory`` = ``MemoryDataStore``, ``sqlalchemy`` =
``SQLAlchemyDataStore`` on an aiosqlite file in ``db``, ``postgres`` = ``SQLAlchemyDataStore``
on asyncpg at ``dsn``) and the phase with its sizes.

With ``postgres`` the baseline is the high-availability deployment: ``schedulers`` (3)
``AsyncScheduler`` processes share the database, with APScheduler's ``PsycopgEventBroker``
(LISTEN/NOTIFY on ``conninfo``) between them. This process is the first of them and runs the
phase (it adds the schedules); it starts the others (``phase: member``) once its own scheduler
has created the tables. Every scheduler acquires schedules and runs jobs. Each member appends
the jobs *it* released to a JSON-lines file that this process reads after each step.

Jobs run on APScheduler's ``AsyncJobExecutor`` (the default for coroutine functions). Fires and
lateness are read from ``JobReleased`` events: ``started_at - scheduled_start`` is the same
"start minus scheduled fire time" the mesh records in its execution history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler import AsyncScheduler, JobReleased
from apscheduler.abc import DataStore, EventBroker
from apscheduler.datastores.memory import MemoryDataStore
from apscheduler.triggers.interval import IntervalTrigger

from bench.stats import cpu_seconds, rss_mb, summary
from bench.tasks import noop

MAX_CONCURRENT_JOBS = 1000  # as on the mesh's leader (mesh/scheduling/service.py)


def _store(spec: dict[str, Any]) -> DataStore:
    if spec["store"] == "memory":
        return MemoryDataStore()
    from apscheduler.datastores.sqlalchemy import SQLAlchemyDataStore

    if spec["store"] == "postgres":
        return SQLAlchemyDataStore(spec["dsn"])
    return SQLAlchemyDataStore(f"sqlite+aiosqlite:///{spec['db']}")


def _broker(spec: dict[str, Any]) -> EventBroker | None:
    if spec["store"] != "postgres" or spec.get("broker") == "none":
        return None  # LocalEventBroker
    # psycopg's broker, not AsyncpgEventBroker: the latter's notify callback fails with
    # anyio >= 4.5 (NoEventLoopError); psycopg's iterates notifications in the event loop.
    from apscheduler.eventbrokers.psycopg import PsycopgEventBroker

    return PsycopgEventBroker(spec["conninfo"])


def _scheduler(spec: dict[str, Any]) -> AsyncScheduler:
    kwargs: dict[str, Any] = {}
    broker = _broker(spec)
    if broker is not None:
        kwargs["event_broker"] = broker
    return AsyncScheduler(
        data_store=_store(spec), max_concurrent_jobs=MAX_CONCURRENT_JOBS, **kwargs
    )


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def far_future_trigger(i: int) -> IntervalTrigger:
    """A schedule that will not fire during the benchmark (as the mesh's scale schedules)."""
    return IntervalTrigger(weeks=52, start_time=datetime.now(UTC) + timedelta(days=300 + i % 7))


class Releases:
    """Collects ``JobReleased`` events of one scheduler: release time (the event's timestamp),
    lateness, schedule id. With an event broker a scheduler also hears the other schedulers'
    releases; only its own are kept (the others' come from their files, see :meth:`merged`)."""

    def __init__(self, identity: str | None = None, sink: Any = None) -> None:
        self.identity = identity
        self.sink = sink  # a member's JSON-lines file
        self.own: list[tuple[float, float | None, str | None]] = []
        self.files: list[Path] = []

    def __call__(self, event: JobReleased) -> None:
        if self.identity is not None and event.scheduler_id != self.identity:
            return
        late = None
        if event.started_at is not None and event.scheduled_start is not None:
            late = (event.started_at - event.scheduled_start).total_seconds()
        item = (event.timestamp.timestamp(), late, event.schedule_id)
        self.own.append(item)
        if self.sink is not None:
            self.sink.write(json.dumps(item) + "\n")

    @property
    def items(self) -> list[tuple[float, float | None, str | None]]:
        """Every scheduler's releases: this one's and what the members wrote so far."""
        out = list(self.own)
        for path in self.files:
            with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        t, late, sid = json.loads(line)
                        out.append((t, late, sid))
        return out


MEMBER_READY_S = 60.0
FLUSH_S = 0.1  # a member flushes its releases file this often


@contextlib.asynccontextmanager
async def _schedulers(spec: dict[str, Any], releases: Releases) -> AsyncIterator[AsyncScheduler]:
    """This process's scheduler, started, with ``releases`` subscribed; with ``postgres`` also
    the other ``schedulers - 1`` member processes, ready, and stopped on the way out."""
    async with _scheduler(spec) as sched:
        releases.identity = sched.identity
        sched.subscribe(releases, {JobReleased})
        await sched.start_in_background()
        members: list[subprocess.Popen[bytes]] = []
        try:
            if spec["store"] == "postgres":
                members = await _start_members(spec, releases)
            yield sched
        finally:
            _stop_members(members)


async def _start_members(spec: dict[str, Any], releases: Releases) -> list[subprocess.Popen[bytes]]:
    from mesh.supervise import spawn

    work = Path(spec["work"])
    members = []
    for k in range(1, spec.get("schedulers", 3)):
        path = work / f"member-{k}.jsonl"
        ready = work / f"member-{k}.ready"
        member = {**spec, "phase": "member", "out": str(path), "ready": str(ready)}
        proc = spawn(
            [sys.executable, "-m", "bench.baseline", json.dumps(member)],
            stdout=work / f"member-{k}.log",
            stderr=work / f"member-{k}.log",
            cwd=Path.cwd(),
            own_session=False,
        )
        members.append(proc)
        releases.files.append(path)
    deadline = time.monotonic() + MEMBER_READY_S
    for k, proc in enumerate(members, start=1):
        while not (work / f"member-{k}.ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop_members(members)
                log = (work / f"member-{k}.log").read_text(errors="replace")
                raise RuntimeError(f"scheduler member {k} did not start: {log[-600:]}")
            await asyncio.sleep(0.05)
    return members


def _stop_members(members: list[subprocess.Popen[bytes]]) -> None:
    from mesh.supervise import stop_all

    stop_all(members, 20.0)


async def run_member(spec: dict[str, Any]) -> dict[str, Any]:
    """One more scheduler on the shared database until SIGTERM; writes its releases."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with open(spec["out"], "w", encoding="utf-8") as sink:  # noqa: ASYNC230 - small, local
        releases = Releases(sink=sink)
        async with _scheduler(spec) as sched:
            releases.identity = sched.identity
            sched.subscribe(releases, {JobReleased})
            await sched.start_in_background()
            Path(spec["ready"]).write_text(sched.identity, encoding="utf-8")  # noqa: ASYNC240
            while not stop.is_set():
                sink.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), FLUSH_S)
        sink.flush()
    return {"released": len(releases.own)}


async def _add_interval_schedules(
    sched: AsyncScheduler, prefix: str, n: int, interval: float, t0: float, end: float | None
) -> float:
    """Add ``n`` schedules firing every ``interval`` from ``t0`` with offsets spread evenly."""
    started = time.perf_counter()
    for i in range(n):
        trigger = IntervalTrigger(
            seconds=interval,
            start_time=_at(t0 + interval * i / n),
            end_time=_at(end) if end is not None else None,
        )
        await sched.add_schedule(noop, trigger, id=f"{prefix}{i}")
    return time.perf_counter() - started


async def _fire_step(
    sched: AsyncScheduler, releases: Releases, k: int, step: dict[str, Any], create_rate: float
) -> dict[str, Any]:
    n, interval = step["schedules"], step["interval"]
    warmup, window = step["warmup"], step["window"]
    # Creation takes time too; start firing once every schedule exists.
    t0 = time.time() + 0.3 + 1.3 * n / create_rate
    ws, we = t0 + warmup, t0 + warmup + window
    created = await _add_interval_schedules(sched, f"f{k}-", n, interval, t0, we + 0.01)
    created_late = time.time() > ws
    await asyncio.sleep(max(0.0, we - time.time()) + 0.3 + 2 * FLUSH_S)
    mine = [r for r in releases.items if r[2] and r[2].startswith(f"f{k}-")]
    inside = [r for r in mine if ws <= r[0] <= we]
    late = [r[1] for r in inside if r[1] is not None]
    s = summary(late, 1000.0)
    return {
        "offered": n / interval,
        "schedules": n,
        "interval": interval,
        "window_s": window,
        "count": len(inside),
        "achieved": len(inside) / window,
        "lateness_p50_ms": s["p50"],
        "lateness_p99_ms": s["p99"],
        "create_s": created,
        "created_late": created_late,
    }


async def run_fires(spec: dict[str, Any]) -> dict[str, Any]:
    """The same ramp as the mesh's: stop when the achieved rate stops growing or lateness
    explodes, but always measure the target step (``target_schedules``)."""
    from bench.stats import step_should_stop

    results: list[dict[str, Any]] = []
    releases = Releases()
    plan = list(spec["steps"])
    target = spec.get("target_schedules")
    create_rate = {"memory": 2000.0, "postgres": 150.0}.get(spec["store"], 80.0)
    async with _schedulers(spec, releases) as sched:
        k = 0
        while k < len(plan):
            r = await _fire_step(sched, releases, k, plan[k], create_rate)
            create_rate = max(20.0, r["schedules"] / max(r["create_s"], 1e-6))
            results.append(r)
            k += 1
            if k < len(plan) and step_should_stop(results):
                rest = [s for s in plan[k:] if s["schedules"] == target]
                if any(x["schedules"] == target for x in results) or not rest:
                    break
                plan = plan[:k] + rest[:1]
            await asyncio.sleep(0.5)
    return {"steps": results}


async def run_write(spec: dict[str, Any]) -> dict[str, Any]:
    lat: list[float] = []
    async with _scheduler(spec) as sched:
        await sched.start_in_background()
        for i in range(spec["count"]):
            trigger = far_future_trigger(i)
            t = time.perf_counter()
            await sched.add_schedule(noop, trigger, id=f"w{i}")
            lat.append(time.perf_counter() - t)
    return {"latency_ms": summary(lat, 1000.0), "samples_ms": [x * 1000 for x in lat]}


async def run_lateness(spec: dict[str, Any]) -> dict[str, Any]:
    n, interval = spec["schedules"], spec["interval"]
    releases = Releases()
    async with _schedulers(spec, releases) as sched:
        per_schedule = {"memory": 0.0005, "postgres": 0.008}.get(spec["store"], 0.015)
        t0 = time.time() + 0.3 + n * per_schedule
        ws, we = t0 + spec["warmup"], t0 + spec["warmup"] + spec["window"]
        created = await _add_interval_schedules(sched, "l", n, interval, t0, we + 0.01)
        created_late = time.time() > ws
        await asyncio.sleep(max(0.0, we - time.time()) + 0.3 + 2 * FLUSH_S)
        items = releases.items
    late = [r[1] for r in items if ws <= r[0] <= we and r[1] is not None]
    return {
        "lateness_ms": summary(late, 1000.0),
        "samples_ms": [x * 1000 for x in late],
        "create_s": created,
        "created_late": created_late,
        "released_in_window": len(late),
        "expected": n / interval * spec["window"],
    }


async def run_scale(spec: dict[str, Any]) -> dict[str, Any]:
    n, measure = spec["schedules"], spec["measure"]
    pid = os.getpid()
    rss0 = rss_mb(pid)
    async with _scheduler(spec) as sched:
        await sched.start_in_background()
        t = time.perf_counter()
        for i in range(n):
            await sched.add_schedule(noop, far_future_trigger(i), id=f"s{i}")
        create_s = time.perf_counter() - t
        await asyncio.sleep(1.0)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(measure)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        out: dict[str, Any] = {
            "schedules": n,
            "create_s": create_s,
            "create_per_s": n / create_s if create_s else None,
            "rss_mb": rss_mb(pid),
            "rss_before_mb": rss0,
            "idle_cpu_percent": 100.0 * ((cpu1 or 0) - (cpu0 or 0)) / (t1 - t0),
        }
    if spec["store"] != "memory":
        # Restart: a new scheduler on the same database file, until it answers a query.
        t = time.perf_counter()
        async with _scheduler(spec) as sched:
            await sched.start_in_background()
            await sched.get_schedule("s0")
            out["restart_s"] = time.perf_counter() - t
    return out


async def run_idle(spec: dict[str, Any]) -> dict[str, Any]:
    pid = os.getpid()
    async with _scheduler(spec) as sched:
        await sched.start_in_background()
        await asyncio.sleep(0.5)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(spec["duration"])
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return {"cpu_percent": 100.0 * ((cpu1 or 0) - (cpu0 or 0)) / (t1 - t0)}


PHASES = {
    "fires": run_fires,
    "write": run_write,
    "lateness": run_lateness,
    "scale": run_scale,
    "idle": run_idle,
    "member": run_member,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    result = asyncio.run(PHASES[spec["phase"]](spec))
    if spec.get("db") and os.path.exists(spec["db"]):
        result["db_mb"] = os.path.getsize(spec["db"]) / 1024 / 1024
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
