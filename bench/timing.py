"""The timing phase: wall-clock bounds that unit tests used to assert, measured instead.

The unit tests keep the behaviour (a token bucket's arithmetic on a virtual clock, a send that
never waits, a toxic that delays by at least its delay, a job that ends with an error naming the
wait that ran out); how fast each is on this machine, under whatever else runs on it, is
reported here next to the bound the test used to assert. Nothing is asserted: a missed bound is
a row marked "NO" in the table. A part that could not be measured is reported under ``failed``.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import Run
from bench.harness import HOST, BenchError, wait_for
from bench.stats import summary
from mesh.dispatch.governors import TokenBucket
from mesh.supervise import free_port
from mesh.transport.zmq import MeshTransport

BUCKET_RATE = 20.0  # tokens per second, default burst 1 (as test_governors used)
BUCKET_WORKERS = 8
SENDS = 1000
NO_HANDLER_WAIT = 1.0  # dispatch.no_handler_wait of the mesh in the no-handler part
JOB_FINISHED = {"success", "error", "missed_start_deadline", "cancelled", "abandoned"}
GIVE_UP_S = 30.0  # a job not ended by then is reported as not ended (target missed)
LATENCY_MS = 100
JITTER_MS = 50
BANDWIDTH_KB_S = 100
BANDWIDTH_PAYLOAD = 50_000  # 0.5 s at 100 KB/s


# -------------------------------------------------------------------------------- token bucket


def max_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` inside any half-open window ``[t, t + window)``."""
    s = sorted(times)
    best = lo = 0
    for hi, t in enumerate(s):
        while s[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def _grant_times(rate: float, workers: int, seconds: float) -> list[float]:
    """Seconds since the start at which ``workers`` competing tasks got a token (real time)."""
    bucket = TokenBucket(rate)
    start = bucket.clock()
    granted: list[float] = []

    async def worker() -> None:
        while bucket.clock() - start < seconds:
            await bucket.acquire()
            granted.append(bucket.clock() - start)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [t for t in granted if t < seconds]


def token_bucket(seconds: float) -> dict[str, Any]:
    granted = asyncio.run(_grant_times(BUCKET_RATE, BUCKET_WORKERS, seconds))
    return {
        "rate": BUCKET_RATE,
        "burst": 1.0,
        "workers": BUCKET_WORKERS,
        "seconds": seconds,
        "grants": len(granted),
        "expected": BUCKET_RATE * seconds,
        "max_in_1s": max_in_window(granted, 1.0),
        "per_second": [
            sum(1 for t in granted if s <= t < s + 1) for s in range(int(seconds + 0.999))
        ],
    }


# ------------------------------------------------------------------------------------- sends


def _timed_sends(sender: MeshTransport, address: str, count: int) -> tuple[float, int]:
    """Seconds for ``count`` sends to ``address``, and how many were queued."""
    started = time.perf_counter()
    accepted = sum(sender.send(address, "bench", {"i": i}) for i in range(count))
    return time.perf_counter() - started, accepted


async def _sends(count: int) -> dict[str, Any]:
    sender = MeshTransport("bench-sender", None)
    live = MeshTransport("bench-live", f"tcp://{HOST}:{free_port(HOST, pair=True)}")
    live.set_handler(lambda incoming: None)
    nobody = f"tcp://{HOST}:{free_port(HOST, pair=True)}"
    try:
        await sender.start()
        await live.start()
        # As the unit test did: the DEALER to nobody is created by the first of the timed sends.
        unreachable_s, unreachable_accepted = _timed_sends(sender, nobody, count)
        dropped = sender.counters["send_dropped"]
        # The live peer's first sends fail until the TCP handshake is done: wait for one that
        # queues, then time the same number of sends.
        deadline = time.monotonic() + 10.0
        while not sender.send(live.bound_address, "bench", {"warm": True}):
            if time.monotonic() > deadline:
                raise BenchError(f"no send to the live peer {live.bound_address} queued in 10 s")
            await asyncio.sleep(0.005)
        live_s, live_accepted = _timed_sends(sender, live.bound_address, count)
    finally:
        await sender.close()
        await live.close()
    return {
        "count": count,
        "unreachable": {
            "seconds": unreachable_s,
            "accepted": unreachable_accepted,
            "send_dropped": dropped,
            "us_per_send": 1e6 * unreachable_s / count,
        },
        "live": {
            "seconds": live_s,
            "accepted": live_accepted,
            "us_per_send": 1e6 * live_s / count,
        },
    }


# --------------------------------------------------------------------------------- toxiproxy


class _EchoServer:
    """A threaded TCP echo server on 127.0.0.1: the proxy's upstream."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.address = f"{HOST}:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="bench-echo").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@contextmanager
def _connected(listen: str) -> Iterator[socket.socket]:
    host, port = listen.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield sock
    finally:
        sock.close()


def _round_trip(sock: socket.socket, payload: bytes) -> float:
    started = time.perf_counter()
    sock.sendall(payload)
    got = 0
    while got < len(payload):
        chunk = sock.recv(len(payload) - got)
        if not chunk:
            raise BenchError(f"the proxy closed the connection after {got} of {len(payload)} B")
        got += len(chunk)
    return time.perf_counter() - started


def _round_trips(listen: str, payload: bytes, n: int) -> dict[str, Any]:
    """``n`` round trips of ``payload`` on one new connection through the proxy, in seconds."""
    with _connected(listen) as sock:
        samples = [_round_trip(sock, payload) for _ in range(n)]
    return {**summary(samples), "samples_s": samples}


def toxiproxy(samples: int, jitter_samples: int, bandwidth_samples: int) -> dict[str, Any]:
    from toxiproxy import Toxiproxy  # the dev extra; a missing client fails this part only

    from chaos.toxiproxy_server import serve_in_thread

    server = serve_in_thread(HOST, 0, seed=7)
    upstream = _EchoServer()
    client = Toxiproxy()
    client.update_api_consumer(server.host, server.port)
    small, large = b"ping", random.Random(7).randbytes(BANDWIDTH_PAYLOAD)
    out: dict[str, Any] = {"server": server.kind}
    try:
        proxy = client.create(upstream=upstream.address, name="bench", listen=f"{HOST}:0")
        out["plain"] = _round_trips(proxy.listen, small, samples)
        out["plain_50kb"] = _round_trips(proxy.listen, large, bandwidth_samples)

        def with_toxic(attributes: dict[str, int], kind: str, payload: bytes, n: int) -> Any:
            proxy.add_toxic(name="bench", type=kind, attributes=attributes)
            try:
                return {"attributes": attributes, **_round_trips(proxy.listen, payload, n)}
            finally:
                proxy.destroy_toxic("bench")

        out["latency"] = with_toxic({"latency": LATENCY_MS}, "latency", small, samples)
        out["jitter"] = with_toxic(
            {"latency": LATENCY_MS, "jitter": JITTER_MS}, "latency", small, jitter_samples
        )
        out["bandwidth"] = with_toxic(
            {"rate": BANDWIDTH_KB_S}, "bandwidth", large, bandwidth_samples
        )
        out["bandwidth"]["bytes"] = BANDWIDTH_PAYLOAD
    finally:
        client.destroy_all()
        upstream.close()
        server.stop()
    return out


# -------------------------------------------------------------------------------- no handler


def no_handler(run: Run) -> dict[str, Any]:
    """A job for a task no handler offers, submitted to a follower: when does it end?"""
    mesh = run.new_mesh(
        "timing",
        handlers=1,
        config={"log_level": "INFO", "dispatch": {"no_handler_wait": NO_HANDLER_WAIT}},
    )
    try:
        leader = run.start_mesh("timing", mesh)
        follower = mesh.followers(leader)[0]
        submitted = time.monotonic()
        status, body = follower.http.request("POST", "/api/jobs", {"task": "no_such_task"})
        if status != 202 or not isinstance(body, dict):
            raise BenchError(f"POST /api/jobs answered {status}: {body}")
        job_path = f"/api/jobs/{body['job_id']}"

        def finished() -> dict[str, Any] | None:
            st, job = follower.http.request("GET", job_path)
            return job if st == 200 and job.get("status") in JOB_FINISHED else None

        try:
            job: dict[str, Any] | None = wait_for(finished, GIVE_UP_S, "the job to end")
            ended_after: float | None = time.monotonic() - submitted
        except BenchError:
            job, ended_after = None, None
    finally:
        mesh.stop()
    return {
        "no_handler_wait_s": NO_HANDLER_WAIT,
        "ended_after_s": ended_after,
        "gave_up_after_s": None if job else GIVE_UP_S,
        "status": job["status"] if job else None,
        "error": job.get("error") if job else None,
        "warnings": body.get("warnings", []),
    }


# ------------------------------------------------------------------------------------- phase


def timing(run: Run) -> dict[str, Any]:
    bucket_s = run.seconds(5.0, 2.0)
    parts: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        (
            "token_bucket",
            f"token bucket {BUCKET_RATE:g}/s, {BUCKET_WORKERS} workers, {bucket_s:g}s",
            lambda: token_bucket(bucket_s),
        ),
        (
            "sends",
            f"{SENDS} sends to an unreachable peer, then to a live one",
            lambda: asyncio.run(_sends(SENDS)),
        ),
        (
            "toxiproxy",
            "round trips through toxiproxy: no toxic, latency, jitter, bandwidth",
            lambda: toxiproxy(
                samples=run.count(10, 10, minimum=3),
                jitter_samples=run.count(10, 10, minimum=3),
                bandwidth_samples=run.count(3, 1),
            ),
        ),
        (
            "no_handler",
            f"a job no handler offers (dispatch.no_handler_wait {NO_HANDLER_WAIT:g}s)",
            lambda: no_handler(run),
        ),
    ]
    out: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name, description, measure in parts:
        run.progress("timing", description)
        try:
            out[name] = measure()
        except Exception as e:  # one part failing still leaves the others' figures
            failed[name] = f"{type(e).__name__}: {e}"
            run.progress("timing", f"{name} FAILED: {str(e).splitlines()[0] if str(e) else ''}")
    if failed:
        out["failed"] = failed
    return out
