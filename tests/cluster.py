"""A harness for tests that run real ``schedulezero node`` processes on 127.0.0.1.

Each node is a separate OS process (``python -m mesh.cli node ...``) with its own free mesh port
pair (PORT for ROUTER, PORT+1 for PUB), its own HTTP port and its own data directory under the
test's ``tmp_path``. All nodes get the same static ``--peer`` list. A node's stdout and stderr
go to files next to its data directory; every failed wait includes their tails, so a red test
says what the nodes were doing.

Every wait is bounded: helpers raise ``AssertionError`` (with diagnostics) at their timeout and
never hang. Use the ``cluster_factory`` fixture (tests/conftest.py), which stops every process
the test started, whatever happens.

``secure=True`` runs the cluster with CURVE keys: one ``node`` key per node is created in
``tmp_path/keys`` and every node gets ``--keys``; ``Cluster.add_key`` makes keys for handlers
and other clients (``HandlerProc(..., keys=cluster.keys_dir)``). The default stays unsecured.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mesh import supervise
from mesh.security.keys import create_key
from mesh.supervise import (
    Child,
    child_env,
    get_json,
    handler_command,
    node_command,
    wait_for_http,
    wait_until,
)
from tests.netutil import free_port_pair

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
POLL_SECONDS = 0.02
STOP_GRACE_SECONDS = supervise.STOP_TIMEOUT
START_TIMEOUT = 15.0

T = TypeVar("T")


def http_request(
    url: str, method: str = "GET", body: Any = None, *, timeout: float = 2.0
) -> tuple[int, Any]:
    """One HTTP request → ``(status, decoded JSON or text)``; OSError if unreachable."""
    status, decoded, _ = supervise.http_request(url, method, body, timeout=timeout)
    return status, decoded


class _Child(Child):
    """What NodeProcess and HandlerProc add to a supervised child: its stdout and stderr in two
    files under ``root``, a kill that says what it waited for, and the tails of both files."""

    def __init__(self, name: str, root: Path, env: dict[str, str]) -> None:
        # In its own session (Ctrl-C on pytest must not race the harness's cleanup) and SIGKILLed
        # if pytest dies, so that no orphan keeps its ports.
        self.stdout_path = root / "stdout.log"
        self.stderr_path = root / "stderr.log"
        super().__init__(
            name, log=self.stdout_path, stderr_log=self.stderr_path, env=env, cwd=REPO_ROOT
        )
        self.root = root

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send ``sig``; returns the monotonic time it was sent. SIGKILL waits for the exit."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        assert self.proc is not None
        if sig != signal.SIGKILL:
            sent_at = time.monotonic()
            self.proc.send_signal(sig)
            return sent_at
        try:
            return super().kill()
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit after SIGKILL\n{self.output_tail()}"
            ) from None

    def output_tail(self, lines: int = 25) -> str:
        return (
            f"== {self.describe()} pid={self.pid} returncode={self.returncode}\n{self.tail(lines)}"
        )

    def describe(self) -> str:
        return self.name


class NodeProcess(_Child):
    """One ``schedulezero node`` process; survives restarts (same id, ports and data dir)."""

    def __init__(
        self,
        cluster: Cluster,
        index: int,
        *,
        node_id: str,
        mesh_port: int,
        http_port: int,
        root: Path,
    ) -> None:
        super().__init__(node_id, root, cluster.env)
        self.cluster = cluster
        self.index = index
        self.node_id = node_id
        self.mesh_port = mesh_port
        self.http_port = http_port
        self.mesh = f"tcp://{HOST}:{mesh_port}"
        self.http = f"http://{HOST}:{http_port}"
        self.data_dir = root / "data"

    def __repr__(self) -> str:
        return f"<node {self.node_id} {'running' if self.running else 'stopped'}>"

    # ----- paths

    @property
    def state_db(self) -> Path:
        return self.data_dir / "broker_state.db"

    @property
    def events_path(self) -> Path:
        return self.data_dir / "logs" / "events.jsonl"

    # ----- process control

    def command(self) -> list[str]:
        c = self.cluster
        return node_command(
            self.node_id,
            data_dir=self.data_dir,
            mesh=self.mesh,
            http=f"{HOST}:{self.http_port}",
            peers=[n.mesh for n in c.nodes],
            config=c.config_path,
            keys=c.keys_dir,
            extra=[*c.extra_args, *c.node_args.get(self.index, ())],
        )

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit; returns its exit code; AssertionError on timeout."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.node_id} did not exit within {timeout:.1f}s\n{self.cluster.diagnostics()}"
            ) from None

    def restart(self, *, wait: bool = True) -> None:
        """Start again from the same data directory (after ``kill`` or ``stop``)."""
        if self.running:
            raise RuntimeError(f"{self.node_id} is still running")
        self.start()
        if wait:
            self.wait_until_serving()

    # ----- HTTP

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 2.0
    ) -> tuple[int, Any]:
        return http_request(self.http + path, method, body, timeout=timeout)

    def get_json(self, path: str, *, timeout: float = 1.0) -> Any | None:
        """GET ``path`` and decode JSON; None when unreachable or not 200."""
        return get_json(self.http + path, timeout=timeout)

    def health(self, *, timeout: float = 1.0) -> dict[str, Any] | None:
        """GET /api/health as a dict, or None when the node does not answer."""
        if not self.running:
            return None
        body = self.get_json("/api/health", timeout=timeout)
        return body if isinstance(body, dict) else None

    def metrics_text(self, *, timeout: float = 2.0) -> str | None:
        try:
            status, body = self.request("GET", "/metrics", timeout=timeout)
        except OSError:
            return None
        return body if status == 200 and isinstance(body, str) else None

    def wait_until_serving(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Until /api/health answers; AssertionError (with diagnostics) at once if the node
        exits meanwhile, or at ``timeout``."""
        return wait_for_http(
            self.http + "/api/health",
            timeout,
            proc=self.proc,
            what=f"{self.node_id} serving /api/health",
            interval=POLL_SECONDS,
            error=AssertionError,
            diagnostics=self.cluster.diagnostics,
        )

    # ----- files

    def events(self) -> list[dict[str, Any]]:
        """The node's events.jsonl (current file only), oldest first."""
        try:
            lines = self.events_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by SIGKILL
        return out

    def describe(self) -> str:
        return f"{self.node_id} ({self.mesh}, {self.http})"


class Cluster:
    """``n`` nodes with static peers; see the module docstring.

    ``extra_args`` go to every node; ``node_args`` maps a node index to more arguments;
    ``config`` (a dict) is written as YAML and passed with ``--config``; ``env`` adds to a copy
    of the environment from which all ``SCHEDULEZERO_*`` variables were removed; ``secure``
    creates a ``node`` key per node in ``tmp_path/keys`` and starts every node with ``--keys``.
    """

    def __init__(
        self,
        tmp_path: Path,
        n: int = 3,
        extra_args: Sequence[str] = (),
        *,
        node_args: dict[int, Sequence[str]] | None = None,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        id_prefix: str = "n",
        secure: bool = False,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.tmp_path = tmp_path
        self.extra_args = tuple(extra_args)
        self.node_args = dict(node_args or {})
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = tmp_path / "mesh.yaml"
            self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.env = child_env(env)
        self.nodes: list[NodeProcess] = [
            NodeProcess(
                self,
                i,
                node_id=f"{id_prefix}{i}",
                mesh_port=free_port_pair(HOST),
                # free_port_pair also keeps the HTTP port away from every mesh pair handed out.
                http_port=free_port_pair(HOST),
                root=tmp_path / f"{id_prefix}{i}",
            )
            for i in range(n)
        ]
        self.keys_dir: Path | None = None
        if secure:
            self.keys_dir = tmp_path / "keys"
            for node in self.nodes:
                self.add_key(node.node_id, "node")

    def __len__(self) -> int:
        return len(self.nodes)

    def add_key(self, name: str, role: str, *, zone: str | None = None) -> Path:
        """Create (or keep) the key ``name`` in this cluster's key directory; returns it. The
        running nodes trust it within their key reload interval (or at once on SIGHUP).
        ``zone``: a replica key's zone (``keys create --zone``)."""
        if self.keys_dir is None:
            raise RuntimeError("this cluster runs without keys (Cluster(..., secure=True))")
        if not (self.keys_dir / f"{name}.key_secret").exists():
            create_key(self.keys_dir, name, role, zone=zone)
        return self.keys_dir

    def node(self, i: int) -> NodeProcess:
        return self.nodes[i]

    def by_id(self, node_id: str) -> NodeProcess:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no node {node_id!r} in this cluster: {[n.node_id for n in self.nodes]}")

    def running(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.running]

    # ----- lifecycle

    def start(self, *, wait: bool = True, timeout: float = START_TIMEOUT) -> Cluster:
        """Start every node; with ``wait``, return when all serve HTTP (maybe before a leader)."""
        for n in self.nodes:
            n.start()
        if wait:
            deadline = time.monotonic() + timeout
            for n in self.nodes:
                n.wait_until_serving(max(0.1, deadline - time.monotonic()))
        return self

    def stop_all(self, timeout: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM every running node at once, SIGKILL whatever still runs after ``timeout``."""
        supervise.stop_all([n.proc for n in self.nodes if n.proc is not None], timeout)

    # ----- observation

    def healths(self, nodes: Iterable[NodeProcess] | None = None) -> dict[str, dict | None]:
        return {n.node_id: n.health() for n in (self.running() if nodes is None else nodes)}

    def wait_for(
        self,
        check: Callable[[], T | None],
        timeout: float,
        what: str,
        *,
        interval: float = POLL_SECONDS,
    ) -> T:
        """Poll ``check`` until it returns something truthy; AssertionError after ``timeout``."""
        return wait_until(
            check,
            timeout,
            what,
            interval=interval,
            error=AssertionError,
            diagnostics=self.diagnostics,
        )

    def leader_now(
        self,
        among: Iterable[NodeProcess] | None = None,
        *,
        newer_than_term: int = 0,
        agree: bool = True,
    ) -> NodeProcess | None:
        """The leader right now, or None.

        A leader is a node among ``among`` (default: the running nodes) that reports role
        ``leader`` in a term above ``newer_than_term``; with ``agree`` every node of ``among``
        must also answer and report that leader and term.
        """
        nodes = self.running() if among is None else list(among)
        hs = {n.node_id: n.health() for n in nodes}
        leaders = [
            (h["term"], n)
            for n in nodes
            if (h := hs[n.node_id]) and h["role"] == "leader" and h["term"] > newer_than_term
        ]
        if not leaders:
            return None
        term, leader = max(leaders, key=lambda t: t[0])
        if agree:
            for h in hs.values():
                if not h or h["leader_id"] != leader.node_id or h["term"] != term:
                    return None
        return leader

    def wait_for_leader(
        self,
        timeout: float = 10.0,
        *,
        among: Iterable[NodeProcess] | None = None,
        newer_than_term: int = 0,
        agree: bool = True,
    ) -> NodeProcess:
        """Wait until ``leader_now`` finds a leader; AssertionError (with diagnostics) if not."""
        nodes = None if among is None else list(among)
        return self.wait_for(
            lambda: self.leader_now(nodes, newer_than_term=newer_than_term, agree=agree),
            timeout,
            f"a leader (term > {newer_than_term}, agreed={agree}) among "
            f"{[n.node_id for n in (nodes if nodes is not None else self.running())]}",
        )

    def wait_caught_up(self, node: NodeProcess, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until ``node`` follows the current leader and has its commit index."""

        def check() -> dict[str, Any] | None:
            leader = self.leader_now(agree=False)
            if leader is None or leader is node:
                return None
            lh, nh = leader.health(), node.health()
            if not lh or not nh:
                return None
            if (
                nh["role"] == "follower"
                and nh["leader_id"] == leader.node_id
                and nh["term"] == lh["term"]
                and nh["commit_index"] >= lh["commit_index"]
            ):
                return {"leader": lh, "node": nh}
            return None

        return self.wait_for(check, timeout, f"{node.node_id} to follow and catch up")

    def diagnostics(self, lines: int = 25) -> str:
        parts = []
        for n in self.nodes:
            h = n.health(timeout=0.5) if n.running else None
            parts.append(f"{n.output_tail(lines)}\n-- health: {h}")
        return "\n".join(parts)


class HandlerProc(_Child):
    """One ``schedulezero handler`` process; survives restarts (same handler id and log files).

    ``mesh`` lists the node mesh addresses it is given (one is enough: it learns the leader's);
    ``tasks`` the modules it imports. Its stdout and stderr go to files under ``root``. Use it
    through a fixture that calls :meth:`stop` after the test, pass or fail.
    """

    def __init__(
        self,
        handler_id: str,
        mesh: Sequence[str],
        tasks: Sequence[str],
        root: Path,
        *,
        concurrency: int = 4,
        env: dict[str, str] | None = None,
        keys: Path | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        super().__init__(handler_id, root, child_env(env))
        self.handler_id = handler_id
        self.mesh = list(mesh)
        self.tasks = list(tasks)
        self.concurrency = concurrency
        self.keys = keys  # --keys DIR (holding HANDLER_ID.key_secret), or None
        self.tags = dict(tags or {})  # --tag KEY=VALUE each

    def __repr__(self) -> str:
        return f"<handler {self.handler_id} {'running' if self.running else 'stopped'}>"

    def command(self) -> list[str]:
        argv = handler_command(
            self.handler_id,
            mesh=self.mesh,
            tasks=self.tasks,
            concurrency=self.concurrency,
            keys=self.keys,
        )
        return argv + [arg for k, v in self.tags.items() for arg in ("--tag", f"{k}={v}")]

    def restart(self) -> HandlerProc:
        """Start again with the same handler id (after ``kill`` or ``stop``)."""
        if self.running:
            raise RuntimeError(f"{self.handler_id} is still running")
        return self.start()

    def describe(self) -> str:
        return f"handler {self.handler_id}"
