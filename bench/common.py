"""What every phase shares: sizes, progress lines, schedule bodies, bulk creation, baselines."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from bench.harness import SOURCE_ROOT, BenchError, BenchMesh, Node, wait_for
from bench.stats import parse_time
from mesh.supervise import kill, spawn

CREATE_CONCURRENCY = 64  # parallel POSTs when creating many schedules (more made it slower)
HISTORY_LIMIT = 10_000  # GET /api/executions answers at most this many records
PG_SCHEDULERS = 3  # APScheduler processes sharing PostgreSQL in that baseline


class Progress:
    """One line per step, with the time since the benchmark started."""

    def __init__(self, stream: Any = None) -> None:
        self.t0 = time.monotonic()
        self.stream = stream or sys.stdout

    def __call__(self, phase: str, message: str) -> None:
        print(
            f"[{time.monotonic() - self.t0:7.1f}s] {phase:<9} {message}",
            file=self.stream,
            flush=True,
        )


@attrs.define
class Run:
    """The benchmark's settings and working directory, handed to every phase."""

    root: Path
    out_dir: Path
    quick: bool = False
    scale: float = 1.0
    baseline: bool = True
    profile: bool = False
    secure: bool = True  # the meshes of every phase but ``curve`` (which runs both) use keys
    event_loop: str | None = None  # SCHEDULEZERO_EVENT_LOOP of the meshes' processes
    stem: str = "bench"  # output files are <out_dir>/<stem>...
    progress: Progress = attrs.Factory(Progress)
    meshes: int = 0
    current_mesh: BenchMesh | None = None

    def count(self, full: int, quick: int, minimum: int = 1) -> int:
        return max(minimum, round((quick if self.quick else full) * self.scale))

    def seconds(self, full: float, quick: float, minimum: float = 1.0) -> float:
        return max(minimum, (quick if self.quick else full) * min(1.0, self.scale))

    def new_mesh(self, name: str, **kwargs: Any) -> BenchMesh:
        self.meshes += 1
        kwargs.setdefault("secure", self.secure)
        if self.event_loop is not None:
            kwargs["env"] = {**kwargs.get("env", {}), "SCHEDULEZERO_EVENT_LOOP": self.event_loop}
        self.current_mesh = BenchMesh(self.root / f"{self.meshes:02d}-{name}", **kwargs)
        return self.current_mesh

    def start_mesh(self, phase: str, mesh: BenchMesh) -> Node:
        t = time.monotonic()
        leader = mesh.start()
        self.progress(
            phase,
            f"mesh up: {len(mesh.nodes)} nodes, {len(mesh.handlers)} handlers, "
            f"{'CURVE' if mesh.secure else 'no keys'}, leader {leader.node_id} "
            f"({time.monotonic() - t:.1f}s)",
        )
        return leader

    def run_baseline(self, phase: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run one baseline in a child process; its result, or ``{"error": ...}``, or with
        ``store: postgres`` ``{"skipped": why}`` when PostgreSQL cannot run here."""
        spec = dict(spec)
        if spec["store"] == "postgres":
            return self._run_postgres_baseline(phase, spec, timeout)
        if spec["store"] == "sqlalchemy":
            self.meshes += 1
            spec["db"] = str(self.root / f"{self.meshes:02d}-apscheduler.sqlite")
        label = "APScheduler+" + ("memory" if spec["store"] == "memory" else "SQLite")
        return self._baseline_child(phase, label, spec, timeout)

    def _run_postgres_baseline(
        self, phase: str, spec: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """3 APScheduler processes sharing a PostgreSQL cluster the benchmark starts for this
        baseline alone (bench/postgres.py) and stops on every way out."""
        from bench import postgres

        label = f"APScheduler+PostgreSQL x{spec.setdefault('schedulers', PG_SCHEDULERS)}"
        why = postgres.drivers_missing()
        if why is None:
            try:
                postgres.binaries()
            except postgres.PostgresMissing as e:
                why = str(e)
        if why is not None:
            self.progress(phase, f"baseline {label} SKIPPED: {why}")
            return {"skipped": why}
        self.meshes += 1
        work = self.root / f"{self.meshes:02d}-apscheduler-pg"
        work.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        try:
            with postgres.cluster() as pg:
                self.progress(
                    phase,
                    f"PostgreSQL {pg.version} up on 127.0.0.1:{pg.port} "
                    f"({time.monotonic() - t:.1f}s; fsync on)",
                )
                spec.update(dsn=pg.dsn, conninfo=pg.conninfo, work=str(work))
                result = self._baseline_child(phase, label, spec, timeout)
                broker = spec.get("broker", "psycopg")
                result["postgres"] = {"version": pg.version, "broker": broker}
                if "error" in result:
                    result["postgres_log"] = pg.log_tail()
                return result
        except postgres.PostgresMissing as e:
            self.progress(phase, f"baseline {label} SKIPPED: {e}")
            return {"skipped": str(e)}

    def _baseline_child(
        self, phase: str, label: str, spec: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        self.progress(phase, f"baseline {label} ...")
        t = time.monotonic()
        # Not in a session of its own: a Ctrl-C on the benchmark ends the baseline with it.
        proc = spawn(
            [sys.executable, "-m", "bench.baseline", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=SOURCE_ROOT,
            own_session=False,
        )
        try:
            raw_out, raw_err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            proc.communicate()
            return {"error": f"{label} baseline did not finish within {timeout:.0f}s"}
        stdout, stderr = raw_out.decode(errors="replace"), raw_err.decode(errors="replace")
        if proc.returncode != 0 or not stdout.strip():
            tail = "\n".join(stderr.splitlines()[-5:])
            return {"error": f"{label} baseline failed (exit {proc.returncode}): {tail}"}
        result = json.loads(stdout.strip().splitlines()[-1])
        self.progress(phase, f"baseline {label} done ({time.monotonic() - t:.1f}s)")
        return result


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def far_future_body(schedule_id: str, i: int) -> dict[str, Any]:
    """A schedule that does not fire during the benchmark (interval: a cron trigger's POST
    answers 500 at the benchmarked commit, see docs/performance.md)."""
    start = iso(time.time() + (300 + i % 7) * 86400)
    return {
        "id": schedule_id,
        "task": "bench_noop",
        "trigger": {"type": "interval", "weeks": 52, "start_time": start},
    }


def interval_bodies(
    prefix: str, n: int, interval: float, t0: float, end: float | None, task: str = "bench_noop"
) -> list[dict[str, Any]]:
    """``n`` schedules firing every ``interval`` s from ``t0``, their offsets spread evenly."""
    out = []
    for i in range(n):
        trigger: dict[str, Any] = {
            "type": "interval",
            "seconds": interval,
            "start_time": iso(t0 + interval * i / n),
        }
        if end is not None:
            trigger["end_time"] = iso(end)
        out.append({"id": f"{prefix}{i}", "task": task, "trigger": trigger})
    return out


def create_schedules(
    node: Node,
    bodies: Sequence[dict[str, Any]],
    *,
    concurrency: int = CREATE_CONCURRENCY,
    deadline_s: float = 1800.0,
) -> dict[str, Any]:
    """POST every body to ``node`` with ``concurrency`` clients; 503s are retried (bounded).

    Returns ``{"created", "seconds", "per_s", "statuses", "retries"}``; stops at ``deadline_s``.
    """
    import aiohttp

    statuses: dict[str, int] = {}
    retries = 0
    created = 0
    url = f"http://127.0.0.1:{node.http_port}/api/schedules"

    async def main() -> None:
        nonlocal retries, created
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for b in bodies:
            queue.put_nowait(b)
        stop_at = time.monotonic() + deadline_s
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def worker() -> None:
                nonlocal retries, created
                while not queue.empty() and time.monotonic() < stop_at:
                    body = queue.get_nowait()
                    for attempt in range(5):
                        try:
                            async with session.post(url, json=body) as resp:
                                await resp.read()
                                status = resp.status
                        except (aiohttp.ClientError, TimeoutError):
                            status = 0
                        if status in (201, 409) or (status not in (0, 503) and status < 500):
                            break
                        retries += 1
                        await asyncio.sleep(0.2 * (attempt + 1))
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if status == 201:
                        created += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    t = time.perf_counter()
    asyncio.run(main())
    seconds = time.perf_counter() - t
    return {
        "created": created,
        "seconds": seconds,
        "per_s": created / seconds if seconds > 0 else None,
        "statuses": statuses,
        "retries": retries,
    }


BULK_PER_REQUEST = 1000  # schedules per POST /api/schedules/bulk (the API takes up to 5,000)
# Bulk requests in flight: two let the leader parse one while the other replicates.
BULK_CONCURRENCY = 2


def create_schedules_bulk(
    node: Node,
    bodies: Sequence[dict[str, Any]],
    *,
    per_request: int = BULK_PER_REQUEST,
    concurrency: int = BULK_CONCURRENCY,
    deadline_s: float = 600.0,
) -> dict[str, Any]:
    """``POST /api/schedules/bulk`` the bodies to ``node``, ``per_request`` at a time,
    ``concurrency`` requests in flight; 503s are retried (bounded; a retry is idempotent).

    Returns ``{"created", "seconds", "per_s", "requests", "request_s_max", "statuses",
    "retries"}`` (``created`` counts created and updated); stops at ``deadline_s``.
    """
    import aiohttp

    statuses: dict[str, int] = {}
    retries = 0
    created = 0
    slowest = 0.0
    url = f"http://127.0.0.1:{node.http_port}/api/schedules/bulk"
    chunks = [bodies[i : i + per_request] for i in range(0, len(bodies), per_request)]

    async def main() -> None:
        stop_at = time.monotonic() + deadline_s
        queue = list(reversed(chunks))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def worker() -> None:
                while queue and time.monotonic() < stop_at:
                    await send(session, queue.pop())

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def send(session: Any, chunk: Sequence[dict[str, Any]]) -> None:
        nonlocal retries, created, slowest
        payload = {"schedules": list(chunk), "replace": True}
        answer: Any = None
        status = 0
        for attempt in range(5):
            t = time.perf_counter()
            try:
                async with session.post(url, json=payload) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status, raw = 0, b""
            slowest = max(slowest, time.perf_counter() - t)
            if status not in (0, 503) and status < 500:
                answer = json.loads(raw) if status == 200 else None
                break
            retries += 1
            await asyncio.sleep(0.2 * (attempt + 1))
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if isinstance(answer, dict):
            created += int(answer.get("created", 0)) + int(answer.get("updated", 0))

    t = time.perf_counter()
    asyncio.run(main())
    seconds = time.perf_counter() - t
    return {
        "created": created,
        "seconds": seconds,
        "per_s": created / seconds if seconds > 0 else None,
        "requests": len(chunks),
        "per_request": per_request,
        "concurrency": concurrency,
        "request_s_max": slowest,
        "statuses": statuses,
        "retries": retries,
    }


def executions(node: Node, limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
    body = node.get(f"/api/executions?limit={limit}", timeout=30.0)
    if not isinstance(body, dict):
        raise BenchError(f"{node.node_id} did not answer GET /api/executions")
    return list(body["executions"])


def wait_drained(node: Node, prefix: str, quiet_s: float = 1.0, timeout: float = 30.0) -> bool:
    """Until no job of ``prefix`` schedules finished for ``quiet_s`` (their backlog ran out)."""
    last_seen: list[float | None] = [None]
    since = [time.monotonic()]

    def check() -> bool:
        recs = [r for r in executions(node, 200) if (r.get("schedule_id") or "").startswith(prefix)]
        newest = max((parse_time(r["finished_at"]) or 0 for r in recs), default=0)
        if newest != last_seen[0]:
            last_seen[0] = newest
            since[0] = time.monotonic()
            return False
        return time.monotonic() - since[0] >= quiet_s

    try:
        wait_for(check, timeout, f"the {prefix}* jobs to drain", interval=0.25)
        return True
    except BenchError:
        return False


def wait_caught_up(mesh: BenchMesh, node: Node, index: int, timeout: float) -> float:
    """Seconds until ``node`` serves /api/health with applied_index >= ``index``."""
    t = time.monotonic()

    def check() -> bool:
        h = node.health()
        return bool(h and h["applied_index"] >= index)

    wait_for(
        check,
        timeout,
        f"{node.node_id} to apply index {index}",
        interval=0.02,
        diagnostics=mesh.diagnostics,
    )
    return time.monotonic() - t


def subsample(values: Iterable[float], limit: int = 2000) -> list[float]:
    """At most ``limit`` values, evenly spaced in sorted order (enough for a CDF)."""
    s = sorted(values)
    if len(s) <= limit:
        return s
    step = (len(s) - 1) / (limit - 1)
    return [s[round(i * step)] for i in range(limit)]
