"""The ``replica`` phase: how far behind a read-only replica runs while the mesh takes writes,
and what its reads cost the voters (docs/zones.md, "Performance").

One secured 3-node mesh (no handlers: nothing fires) whose voters configure zone ``bench``
(args, kwargs, results and errors dropped), a pool of far-future schedules (10,000, quick
2,000), and one ``schedulezero replica`` of that zone. Then:

1. **Lag under writes**, with the replica following a follower voter, then (restarted on its
   copy) the leader. For each offered rate (250, 500, 1,000 changes/s), ``PUT
   /api/schedules/{id}`` to the leader, open loop at that rate with at most 64 in flight, for a
   window; each replaces one schedule of the pool (round robin) with ``metadata.v`` = its
   sequence number, so the replica's state keeps the same size throughout. A *change* is one
   answered write (200): one Raft entry, one ``feed_change``. Meanwhile, on the replica:

   * ``GET /api/health`` every 10 ms: its ``applied_index`` (the feed's seq, the Raft index)
     and ``lag_seconds``. A write is visible on the replica from the first sample whose
     ``applied_index`` reaches the commit index the leader answered it with
     (``X-ScheduleZero-Commit-Index``, the leader's commit once the write was applied there: an
     upper bound of the write's own index): *commit → visible* = that sample's time minus the
     time the writer read the answer (0 when the replica had it first). Every write is
     measured, to the poll's resolution (~10 ms). The longest interval between two answers
     of this poll is the replica's longest *pause* (its event loop busy elsewhere).
   * every 100 ms, the last answered write is looked up directly: ``GET /api/schedules/{id}``
     on the replica every 2 ms until its ``metadata.v`` shows it (the *probe*: what a reader
     sees).

2. **Reads.** ``GET /api/schedules/{id}`` of random ids of the pool, 8 clients on keep-alive
   connections, for a window, on the replica, then the same on a follower voter. Every voter's
   ``/metrics`` (``schedulezero_http_requests_total``) is read before and after each window: the
   voters' request counts (the scrapes themselves left out) must not move while the replica
   serves, and move by the reads when the follower does.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import urllib.request
from collections.abc import Iterable
from typing import Any

from bench.common import CREATE_CONCURRENCY, Run, create_schedules, far_future_body, subsample
from bench.harness import HOST, BenchError, BenchMesh, Node, Replica, wait_for
from bench.stats import cpu_seconds, summary

ZONE = "bench"
ZONES = {ZONE: {"drop": ["args", "kwargs", "results", "errors"]}}
RATES = (250, 500, 1000)  # offered changes/s (full and quick: quick has shorter windows)
HEALTH_POLL_S = 0.010
PROBE_EVERY_S = 0.100
PROBE_POLL_S = 0.002
READ_CLIENTS = 8
COMMIT_HEADER = "X-ScheduleZero-Commit-Index"
METRIC = "schedulezero_http_requests"
SCRAPE_ROUTE = "/metrics"


def replica(run: Run) -> dict[str, Any]:
    window = run.seconds(10.0, 4.0)
    read_window = run.seconds(10.0, 4.0)
    pool = run.count(10_000, 2_000, minimum=10)
    rates = [max(1, round(r * min(1.0, run.scale))) for r in RATES]
    mesh = run.new_mesh(
        "replica", handlers=0, config={"log_level": "INFO", "zones": ZONES}, secure=run.secure
    )
    r1 = mesh.add_replica("r1", ZONE)
    lag: dict[str, list[dict[str, Any]]] = {}
    writes = Writes([f"p{i}" for i in range(pool)])
    try:
        leader = run.start_mesh("replica", mesh)
        follower = mesh.followers(leader)[0]
        created = create_schedules(leader, [writes.body(i, -1) for i in range(pool)])
        if created["created"] != pool:
            raise BenchError(f"creating the pool of {pool} schedules: {created['statuses']}")
        run.progress("replica", f"{pool} schedules created in {created['seconds']:.1f}s")
        # First following a follower (one more hop: the usual case when a replica lists every
        # voter), then, restarted on its copy, the leader.
        for upstream, node in (("follower", follower), ("leader", leader)):
            t = time.monotonic()
            r1.first = node
            r1.stop()
            r1.start()
            commit = (leader.health() or {}).get("commit_index", 0)
            _wait_following(mesh, r1, commit, timeout=60.0)
            run.progress(
                "replica",
                f"replica r1 (zone {ZONE}) following {upstream} {node.name} "
                f"({time.monotonic() - t:.1f}s)",
            )
            lag[upstream] = []
            for rate in rates:
                step = asyncio.run(_lag_step(leader, r1, writes, rate, window))
                lag[upstream].append(step)
                v, h = step["visible_ms"], step["lag_seconds"]
                run.progress(
                    "replica",
                    f"{rate}/s offered → {step['achieved']:.0f} changes/s; commit → visible "
                    f"p50 {_ms(v['p50'])} p99 {_ms(v['p99'])} max {_ms(v['max'])}; longest "
                    f"pause {_ms(step['pause_max_ms'])}; health lag max {_s(h['max'])} "
                    f"(upstream {step['upstream_node']})",
                )
        reads = {}
        for label, target in (("replica", r1), ("follower", follower)):
            reads[label] = _read_window(mesh, target, writes.ids, read_window)
            got = reads[label]
            run.progress(
                "replica",
                f"reads on {label} {target.name}: {got['gets_per_s']:.0f} GET/s "
                f"(p50 {_ms(got['latency_ms']['p50'])}); voters' requests meanwhile "
                f"{got['voter_requests']}",
            )
    finally:
        mesh.stop()
    steps = [s for part in lag.values() for s in part]
    return {
        "zone": ZONE,
        "schedules": pool,
        "changes": "answered PUT /api/schedules/{id} to the leader (one Raft entry each)",
        "health_poll_ms": HEALTH_POLL_S * 1000,
        "window_s": window,
        "steps": lag["follower"],
        "steps_via_leader": lag["leader"],
        "max_achieved": max(s["achieved"] for s in steps),
        "max_visible_ms": max((s["visible_ms"]["max"] or 0.0) for s in steps),
        "max_health_lag_s": max((s["lag_seconds"]["max"] or 0.0) for s in steps),
        "reads": reads,
        "read_ratio": _div(reads["replica"]["gets_per_s"], reads["follower"]["gets_per_s"]),
    }


class Writes:
    """The pool's ids and the sequence number of the next change (``metadata.v``)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.next = 0

    def body(self, i: int, v: int) -> dict[str, Any]:
        return {**far_future_body(self.ids[i % len(self.ids)], i), "metadata": {"v": v}}

    def take(self) -> tuple[str, dict[str, Any]]:
        v = self.next
        self.next += 1
        body = self.body(v, v)
        return body["id"], body


def _wait_following(mesh: BenchMesh, r: Replica, index: int, timeout: float) -> None:
    want = r.first.name if r.first is not None else None

    def check() -> bool:
        if not r.running:
            raise BenchError(f"replica {r.name} exited\n{r.tail()}")
        h = r.health()
        return bool(
            h
            and h.get("following")
            and (h.get("applied_index") or 0) >= index
            and (want is None or h.get("upstream_node") == want)
        )

    wait_for(check, timeout, f"{r.name} following, applied {index}", diagnostics=mesh.diagnostics)


# ------------------------------------------------------------------------------ lag under writes


async def _lag_step(
    leader: Node, r: Replica, writes: Writes, rate: int, window: float
) -> dict[str, Any]:
    import aiohttp

    n = max(1, round(rate * window))
    answered: list[tuple[float, int]] = []  # (answered at, commit index) of every 200
    statuses: dict[str, int] = {}
    health: list[tuple[float, int, float | None]] = []  # (at, applied_index, lag_seconds)
    probes: list[float] = []
    last: list[tuple[str, int, float] | None] = [None]
    done = asyncio.Event()
    slots = asyncio.Semaphore(CREATE_CONCURRENCY)
    url = f"http://{HOST}:{leader.http_port}/api/schedules/"
    replica_url = f"http://{HOST}:{r.http_port}"
    timeout = aiohttp.ClientTimeout(total=30)
    h0 = leader.health() or {}
    counters0 = _replica_counters(r)
    cpu0 = {p.name: cpu_seconds(p.pid) for p in (leader, r)}
    client0 = time.process_time()

    async with (
        aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=CREATE_CONCURRENCY)
        ) as writer,
        aiohttp.ClientSession(timeout=timeout) as reader,
    ):

        async def write(sid: str, body: dict[str, Any]) -> None:
            try:
                async with writer.put(url + sid, json=body) as resp:
                    await resp.read()
                    status, commit = resp.status, resp.headers.get(COMMIT_HEADER)
            except (aiohttp.ClientError, TimeoutError):
                status, commit = 0, None
            finally:
                slots.release()
            at = time.monotonic()
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200 and commit is not None:
                answered.append((at, int(commit)))
                last[0] = (sid, body["metadata"]["v"], at)

        async def poll_health() -> None:
            while not done.is_set():
                try:
                    async with reader.get(replica_url + "/api/health") as resp:
                        h = await resp.json()
                    health.append((time.monotonic(), h["applied_index"], h.get("lag_seconds")))
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                    pass
                await asyncio.sleep(HEALTH_POLL_S)

        async def probe() -> None:
            while not done.is_set():
                await asyncio.sleep(PROBE_EVERY_S)
                if last[0] is None:
                    continue
                sid, v, at = last[0]
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline:
                    try:
                        async with reader.get(f"{replica_url}/api/schedules/{sid}") as resp:
                            got = await resp.json() if resp.status == 200 else {}
                        if (got.get("metadata") or {}).get("v", -1) >= v:
                            probes.append(time.monotonic() - at)
                            break
                    except (aiohttp.ClientError, TimeoutError, ValueError):
                        pass
                    await asyncio.sleep(PROBE_POLL_S)

        watchers = [asyncio.create_task(poll_health()), asyncio.create_task(probe())]
        tasks = []
        t0 = time.monotonic()
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()  # open loop, but never more than 64 writes in flight
            tasks.append(asyncio.create_task(write(*writes.take())))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        h1 = leader.health() or {}
        cpu1 = {p.name: cpu_seconds(p.pid) for p in (leader, r)}
        client = time.process_time() - client0
        target = h1.get("commit_index", 0)
        # The replica drains what it has not applied yet; the health poll goes on meanwhile.
        t_end = time.monotonic()
        while time.monotonic() - t_end < 30.0:
            if health and health[-1][1] >= target and health[-1][0] > t_end:
                break
            await asyncio.sleep(HEALTH_POLL_S)
        drain = time.monotonic() - t_end if health and health[-1][1] >= target else None
        done.set()
        await asyncio.gather(*watchers)

    visible = _visibility(answered, health)
    lags = [lag for _, _, lag in health if lag is not None]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(health)]
    counters1 = _replica_counters(r)
    ok = len(answered)
    entries = h1.get("applied_index", 0) - h0.get("applied_index", 0)
    return {
        "offered": rate,
        "writes": n,
        "elapsed_s": elapsed,
        "achieved": ok / elapsed if elapsed > 0 else 0.0,
        "raft_entries_per_s": entries / elapsed if elapsed > 0 else 0.0,
        "statuses": statuses,
        "visible_ms": {**summary(visible, 1000.0), "unseen": ok - len(visible)},
        "visible_samples_ms": subsample(x * 1000 for x in visible),
        "probe_ms": summary(probes, 1000.0),
        "lag_seconds": {**summary(lags), "samples": len(health)},
        "pause_max_ms": 1000.0 * max(gaps) if gaps else None,
        "drain_s": drain,
        "upstream_node": (r.health() or {}).get("upstream_node"),
        "replica_counters": {
            k: v - counters0.get(k, 0.0) for k, v in counters1.items() if v != counters0.get(k)
        },
        "cpu_percent": {
            **{name: _pct(cpu0[name], cpu1[name], elapsed) for name in (leader.name, r.name)},
            "bench_client": 100.0 * client / elapsed if elapsed > 0 else None,
        },
    }


def _visibility(
    writes: Iterable[tuple[float, int]], health: list[tuple[float, int, float | None]]
) -> list[float]:
    """Seconds from each write's answer to the first health sample whose applied index reached
    its commit index (0 when the replica had it before the answer was read)."""
    firsts: list[tuple[int, float]] = []  # (applied index, first seen at), both increasing
    for at, applied, _ in sorted(health):
        if not firsts or applied > firsts[-1][0]:
            firsts.append((applied, at))
    out = []
    for answered, commit in writes:
        seen = next((at for applied, at in firsts if applied >= commit), None)
        if seen is not None:
            out.append(max(0.0, seen - answered))
    return out


# ----------------------------------------------------------------------------------------- reads


def _read_window(
    mesh: BenchMesh, target: Node | Replica, ids: list[str], seconds: float
) -> dict[str, Any]:
    voters = {n.name: n for n in mesh.running_nodes()}
    before = {name: _requests(n) for name, n in voters.items()}
    own_before = _requests(target)
    cpu0 = {n.name: cpu_seconds(n.pid) for n in [*voters.values(), target]}
    result = asyncio.run(_reads(target.http_port, ids, seconds))
    cpu1 = {n.name: cpu_seconds(n.pid) for n in [*voters.values(), target]}
    after = {name: _requests(n) for name, n in voters.items()}
    own_after = _requests(target)
    deltas = {name: _delta(before[name], after[name]) for name in voters}
    own = _delta(own_before, own_after)
    return {
        "target": target.name,
        **result,
        "gets_per_s": result["ok"] / result["elapsed_s"],
        # What every voter's API answered meanwhile, /metrics scrapes left out (ours).
        "voter_requests": {name: sum(d.values()) for name, d in deltas.items()},
        "voter_requests_by_route": {name: d for name, d in deltas.items() if d},
        "target_counted": own.get("GET /api/schedules/{id}", 0),
        "cpu_percent": {name: _pct(cpu0[name], cpu1[name], result["elapsed_s"]) for name in cpu0},
    }


async def _reads(port: int, ids: list[str], seconds: float) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(13)
    statuses: dict[str, int] = {}
    latency: list[float] = []
    base = f"http://{HOST}:{port}/api/schedules/"
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=READ_CLIENTS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.monotonic()
        stop_at = t0 + seconds

        async def client() -> None:
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                try:
                    async with session.get(base + rng.choice(ids)) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200:
                    latency.append(time.perf_counter() - t)

        await asyncio.gather(*(client() for _ in range(READ_CLIENTS)))
        elapsed = time.monotonic() - t0
    return {
        "clients": READ_CLIENTS,
        "elapsed_s": elapsed,
        "ok": len(latency),
        "statuses": statuses,
        "latency_ms": summary(latency, 1000.0),
    }


def _metrics(node: Node | Replica) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{HOST}:{node.http_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            text = resp.read().decode()
    except OSError as e:
        raise BenchError(f"{node.name} did not answer GET /metrics: {e}") from e
    return list(text_string_to_metric_families(text))


def _replica_counters(r: Replica) -> dict[str, float]:
    """The replica's feed counters (``mesh_replica_*`` but the lag): changes, gaps, ..."""
    return {
        f.name.removeprefix("mesh_replica_"): f.samples[0].value
        for f in _metrics(r)
        if f.name.startswith("mesh_replica_") and f.name != "mesh_replica_lag_seconds"
    }


def _requests(node: Node | Replica) -> dict[str, float]:
    """``schedulezero_http_requests_total`` of ``node`` by "METHOD route"."""
    out: dict[str, float] = {}
    for family in _metrics(node):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            if sample.name == f"{METRIC}_total":
                key = f"{sample.labels['method']} {sample.labels['route']}"
                out[key] = out.get(key, 0.0) + sample.value
    if not out:
        raise BenchError(f"{node.name}'s /metrics has no {METRIC}_total")
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    keys = (set(before) | set(after)) - {f"GET {SCRAPE_ROUTE}"}
    d = {k: round(after.get(k, 0.0) - before.get(k, 0.0)) for k in sorted(keys)}
    return {k: v for k, v in d.items() if v}


def _pct(a: float | None, b: float | None, seconds: float) -> float | None:
    return 100.0 * (b - a) / seconds if a is not None and b is not None and seconds > 0 else None


def _div(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"
