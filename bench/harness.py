"""A local mesh for the benchmark: real ``schedulezero node`` and ``schedulezero handler``
processes on 127.0.0.1, each with its own ports, data directory and log file.

``secure`` (the default, as in production) gives every node and handler its own CURVE key in
``ROOT/keys`` and starts it with ``--keys``; ``secure=False`` runs without keys (loopback only).

Every process started here is registered in ``LIVE``; :func:`stop_everything` ends them all
(SIGTERM, then SIGKILL after a grace period) and ``bench.main`` calls it on every way out,
Ctrl-C included. On Linux a child also gets SIGKILL when the benchmark process dies
(see mesh.supervise).
"""

from __future__ import annotations

import http.client
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml

from mesh.security import create_key
from mesh.supervise import (
    Child,
    child_env,
    free_port,
    get_json,
    handler_command,
    node_command,
    stop_all,
    wait_until,
)

HOST = "127.0.0.1"
T = TypeVar("T")
# Children import the same ``mesh`` package as the benchmark: they run in this checkout's root,
# and ``python -m`` puts the working directory first on sys.path. The nodes and handlers also
# import the benchmark's task modules (bench.embedded, bench.tasks) from here.
SOURCE_ROOT = Path(__file__).resolve().parent.parent

LIVE: set[Proc] = set()


class BenchError(Exception):
    """The mesh did not do what the benchmark waited for (with the processes' log tails)."""


def wait_for(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; BenchError after ``timeout``."""
    return wait_until(
        check, timeout, what, interval=interval, error=BenchError, diagnostics=diagnostics
    )


class Proc(Child):
    """A child process whose stdout and stderr go to one log file; in ``LIVE`` while started."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        # Its own session: Ctrl-C reaches only the benchmark, which stops us.
        super().__init__(name, argv, log=log, env=env, cwd=SOURCE_ROOT)

    def start(self) -> Self:
        super().start()
        LIVE.add(self)
        return self

    def kill(self) -> float:
        try:
            return super().kill()
        finally:
            LIVE.discard(self)

    def stop(self, timeout: float = 5.0) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            LIVE.discard(self)


def stop_everything(timeout: float = 5.0) -> None:
    """SIGTERM every live process at once, then SIGKILL what is left after ``timeout``."""
    stop_all([p.proc for p in LIVE if p.proc is not None], timeout)
    LIVE.clear()


class Http:
    """A keep-alive HTTP/1.1 connection to one node (low, steady client overhead)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port, self.timeout = port, timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=data, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        text = raw.decode("utf-8", "replace")
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Served(Proc):
    """A child with an HTTP API on ``HOST:http_port`` (a node or a replica)."""

    http_port: int
    _http: Http | None = None

    @property
    def http(self) -> Http:
        if self._http is None:
            self._http = Http(self.http_port)
        return self._http

    def start(self) -> Self:
        if self._http is not None:
            self._http.close()
        return super().start()

    def close_http(self) -> None:
        if self._http is not None:
            self._http.close()

    def get(self, path: str, timeout: float = 2.0) -> Any | None:
        """GET ``path`` on a fresh connection; the decoded body on 200, else None."""
        return get_json(f"http://{HOST}:{self.http_port}{path}", timeout=timeout)

    def health(self) -> dict[str, Any] | None:
        if not self.running:
            return None
        body = self.get("/api/health", timeout=1.0)
        return body if isinstance(body, dict) else None


class Node(_Served):
    def __init__(self, mesh: BenchMesh, node_id: str) -> None:
        self.node_id = node_id
        self.mesh_port = free_port(HOST, pair=True)
        self.http_port = free_port(HOST, pair=True)
        self.mesh_address = f"tcp://{HOST}:{self.mesh_port}"
        self.data_dir = mesh.root / node_id
        super().__init__(node_id, [], mesh.root / f"{node_id}.log", mesh.env)
        self.bench_mesh = mesh

    def command(self) -> list[str]:
        m = self.bench_mesh
        return node_command(
            self.node_id,
            data_dir=self.data_dir,
            mesh=self.mesh_address,
            http=f"{HOST}:{self.http_port}",
            config=m.config_path,
            peers=[other.mesh_address for other in m.nodes if other is not self],
            tasks=m.node_tasks,
            keys=m.keys_dir,
        )


class Replica(_Served):
    """A ``schedulezero replica`` of ``zone`` with every node of the mesh as ``--upstream``,
    ``first`` (when set) first: it follows the first that answers (docs/zones.md)."""

    def __init__(self, mesh: BenchMesh, replica_id: str, zone: str) -> None:
        self.replica_id, self.zone = replica_id, zone
        self.http_port = free_port(HOST, pair=True)
        self.data_dir = mesh.root / replica_id
        self.bench_mesh = mesh
        self.first: Node | None = None
        super().__init__(replica_id, [], mesh.root / f"{replica_id}.log", mesh.env)

    def command(self) -> list[str]:
        m = self.bench_mesh
        argv = [sys.executable, "-m", "mesh.cli", "replica", "--node-id", self.replica_id]
        argv += ["--zone", self.zone, "--http", f"{HOST}:{self.http_port}"]
        argv += ["--data-dir", str(self.data_dir)]
        if m.keys_dir is not None:
            argv += ["--keys", str(m.keys_dir)]
        upstreams = sorted(m.nodes, key=lambda n: n is not self.first)
        for node in upstreams:
            argv += ["--upstream", node.mesh_address]
        return argv


class Handler(Proc):
    def __init__(self, mesh: BenchMesh, handler_id: str, concurrency: int) -> None:
        argv = handler_command(
            handler_id,
            mesh=[node.mesh_address for node in mesh.nodes],
            tasks=mesh.handler_tasks,
            concurrency=concurrency,
            keys=mesh.keys_dir,
        )
        super().__init__(handler_id, argv, mesh.root / f"{handler_id}.log", mesh.env)
        self.handler_id = handler_id


class BenchMesh:
    """``nodes`` nodes with static peers plus ``handlers`` handler processes; ``secure``: each
    with its own CURVE key (``ROOT/keys``)."""

    def __init__(
        self,
        root: Path,
        *,
        nodes: int = 3,
        handlers: int = 2,
        node_tasks: Sequence[str] = ("bench.embedded",),
        handler_tasks: Sequence[str] = ("bench.tasks",),
        handler_concurrency: int = 64,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        secure: bool = True,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.node_tasks = tuple(node_tasks)
        self.handler_tasks = tuple(handler_tasks)
        self.env = child_env(env)
        self.config_path = root / "mesh.yaml"
        self.config_path.write_text(yaml.safe_dump(config or {"log_level": "INFO"}))
        self.secure = secure
        self.keys_dir: Path | None = root / "keys" if secure else None
        node_ids = [f"n{i + 1}" for i in range(nodes)]
        handler_ids = [f"h{i + 1}" for i in range(handlers)]
        if self.keys_dir is not None:
            for name in node_ids:
                create_key(self.keys_dir, name, "node")
            for name in handler_ids:
                create_key(self.keys_dir, name, "handler")
        self.nodes = [Node(self, n) for n in node_ids]
        self.handlers = [Handler(self, h, handler_concurrency) for h in handler_ids]
        self.replicas: list[Replica] = []

    def add_replica(self, replica_id: str, zone: str) -> Replica:
        """A replica (not started) with its own key of ``zone``: call before :meth:`start`,
        so that the nodes load its key when they start."""
        if self.keys_dir is not None:
            create_key(self.keys_dir, replica_id, "replica", zone=zone)
        replica = Replica(self, replica_id, zone)
        self.replicas.append(replica)
        return replica

    # ----- lifecycle

    def start(self, timeout: float = 30.0) -> Node:
        """Start everything; returns the leader once every node agrees and handlers registered."""
        for n in self.nodes:
            n.start()
        for h in self.handlers:
            h.start()
        leader = self.wait_leader(timeout)
        if self.handlers:
            want = {h.handler_id for h in self.handlers}
            wait_for(
                lambda: want <= self._alive_handlers(leader),
                timeout,
                f"handlers {sorted(want)} registered on the leader",
                interval=0.1,
                diagnostics=self.diagnostics,
            )
        self.wait_writable(leader, timeout)
        self.check_security()
        return leader

    def check_security(self) -> None:
        """BenchError unless every node says (its start line) it runs with keys iff ``secure``:
        a figure labelled secured must come from CURVE links. A handler needs no check: a
        secured node refuses its handshake unless it holds its own key."""
        want = "(CURVE keys in " if self.secure else "(no keys)"
        wrong = [
            n.name
            for n in self.nodes
            if not any(
                line.startswith(f"schedulezero node {n.node_id}: ") and want in line
                for line in n.log.read_text(encoding="utf-8", errors="replace").splitlines()
            )
        ]
        if wrong:
            raise BenchError(f"{wrong} did not report {want!r} at start\n{self.diagnostics()}")

    def wait_writable(self, node: Node, timeout: float = 30.0) -> None:
        """Until a schedule write through ``node`` succeeds: the leader's scheduler runs."""
        self._probes = getattr(self, "_probes", 0) + 1
        body = {
            "id": f"bench-probe-{self._probes}",
            "task": "bench_noop",
            "trigger": {"type": "date", "run_time": "2099-01-01T00:00:00Z"},
        }

        def check() -> bool:
            try:
                status, _ = node.http.request("POST", "/api/schedules", body)
            except OSError:
                return False
            return status in (201, 409)

        wait_for(check, timeout, "a successful write", interval=0.1, diagnostics=self.diagnostics)

    def _alive_handlers(self, node: Node) -> set[str]:
        body = node.get("/api/handlers")
        if not isinstance(body, dict):
            return set()
        return {h.get("handler_id") for h in body.get("handlers", []) if h.get("state") == "alive"}

    def stop(self) -> None:
        procs = [*self.replicas, *self.handlers, *self.nodes]
        # Who had already exited on their own (and how), for the report of a failed phase.
        self.exited_before_stop = {
            p.name: p.proc.returncode
            for p in procs
            if p.proc is not None and p.proc.poll() is not None and p in LIVE
        }
        stop_all([p.proc for p in procs if p.proc is not None], 5.0)
        LIVE.difference_update(procs)
        for n in [*self.nodes, *self.replicas]:
            n.close_http()

    # ----- observation

    def running_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.running]

    def leader_now(self, newer_than_term: int = 0) -> Node | None:
        """The leader every running node agrees on, in a term above ``newer_than_term``."""
        nodes = self.running_nodes()
        hs = {n.node_id: n.health() for n in nodes}
        if not all(hs.values()):
            return None
        leaders = [n for n in nodes if hs[n.node_id]["role"] == "leader"]  # type: ignore[index]
        if len(leaders) != 1:
            return None
        leader = leaders[0]
        term = hs[leader.node_id]["term"]  # type: ignore[index]
        if term <= newer_than_term:
            return None
        if all(h["leader_id"] == leader.node_id and h["term"] == term for h in hs.values() if h):
            return leader
        return None

    def wait_leader(self, timeout: float = 30.0, newer_than_term: int = 0) -> Node:
        return wait_for(
            lambda: self.leader_now(newer_than_term),
            timeout,
            "an agreed leader",
            interval=0.05,
            diagnostics=self.diagnostics,
        )

    def followers(self, leader: Node) -> list[Node]:
        return [n for n in self.running_nodes() if n is not leader]

    def diagnostics(self) -> str:
        parts = []
        for p in [*self.nodes, *self.handlers, *self.replicas]:
            code = p.proc.returncode if p.proc is not None else None
            parts.append(f"== {p.name} running={p.running} code={code}\n{p.tail()}")
        return "\n".join(parts)
