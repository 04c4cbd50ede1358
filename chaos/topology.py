"""A mesh whose every link goes through its own toxiproxy proxy.

For nodes A and B there are two proxies, ``A>B`` (A's connection to B: A's Raft messages and
pings to B upstream, B's answers downstream) and ``B>A``. A handler H reaches node N through
``H>N``: its hellos upstream, N's dispatches downstream. So any pair can be cut in either
direction, loudly (disable the proxy: connections close, reconnects are refused) or silently (a
``timeout`` toxic with timeout 0: bytes stop, nothing closes).

Nodes are real ``schedulezero node`` processes with ``membership.learn_peers: false`` (each knows
its peers only at their proxy addresses); handlers are real ``schedulezero handler`` processes
given only proxy addresses. HTTP is not proxied: a follower's forwarding of a write to the leader
crosses a partition (see docs/chaos.md; the network-namespace LAN scenarios cut HTTP too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from toxiproxy import Toxiproxy
from toxiproxy.proxy import Proxy

from mesh.ports import free_port as _free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_handed_out: set[int] = set()


def free_port(pair: bool = False) -> int:
    """A free port on 127.0.0.1 (with ``pair``, PORT+1 is free too); see mesh.ports."""
    return _free_port(HOST, pair=pair)


def http(
    url: str, method: str = "GET", body: Any = None, timeout: float = 2.0
) -> tuple[int, Any, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _opener.open(req, timeout=timeout) as r:
            status, raw, headers = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, headers = e.code, e.read(), dict(e.headers)
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text) if text else None, headers
    except ValueError:
        return status, text, headers


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOP'ed

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.stopped = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.proc.wait(10)
            self.stopped = sig == signal.SIGSTOP

    def stop(self, timeout: float = 5.0) -> None:
        if not self.running:
            return
        assert self.proc is not None
        if self.stopped:
            self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class ChaosNode(Proc):
    def __init__(self, cluster: ChaosCluster, node_id: str) -> None:
        self.node_id = node_id
        self.mesh_port = free_port(pair=True)
        self.http_port = free_port(pair=True)
        self.mesh = f"tcp://{HOST}:{self.mesh_port}"
        self.http = f"http://{HOST}:{self.http_port}"
        self.data_dir = cluster.root / node_id
        super().__init__(node_id, [], cluster.root / f"{node_id}.log", cluster.env)
        self.cluster = cluster

    def build_argv(self) -> None:
        c = self.cluster
        self.argv = [
            sys.executable, "-m", "mesh.cli", "node",
            "--node-id", self.node_id, "--data-dir", str(self.data_dir),
            "--mesh", self.mesh, "--http", f"{HOST}:{self.http_port}",
            "--config", str(c.config_path), "--bootstrap-expect", str(len(c.nodes)),
        ]  # fmt: skip
        for other in c.nodes:
            if other is not self:
                self.argv += ["--peer", c.link_address(self.node_id, other.node_id)]
        for module in c.node_tasks:
            self.argv += ["--tasks", module]

    def health(self, timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            status, body, _ = http(self.http + "/api/health", timeout=timeout)
        except OSError:
            return None
        return body if status == 200 and isinstance(body, dict) else None


class ChaosHandler(Proc):
    def __init__(self, cluster: ChaosCluster, handler_id: str, concurrency: int = 16) -> None:
        self.handler_id = handler_id
        argv = [sys.executable, "-m", "mesh.cli", "handler", "--handler-id", handler_id,
                "--concurrency", str(concurrency)]  # fmt: skip
        for node in cluster.nodes:
            argv += ["--mesh", cluster.link_address(handler_id, node.node_id)]
        for module in cluster.handler_tasks:
            argv += ["--tasks", module]
        super().__init__(handler_id, argv, cluster.root / f"{handler_id}.log", cluster.env)


class ClusterView:
    """What the nemeses and the history checker need of a cluster: ``nodes`` (with
    ``node_id``, ``running``, ``stopped``, ``health()``, ``log``) and ``handlers``."""

    nodes: list[Any]
    handlers: list[Any]

    @property
    def ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    def node(self, node_id: str) -> Any:
        return next(n for n in self.nodes if n.node_id == node_id)

    def healths(self) -> dict[str, dict[str, Any] | None]:
        return {n.node_id: n.health() if n.running and not n.stopped else None for n in self.nodes}

    def agrees(self, health: dict[str, Any], leader: str) -> bool:
        """Whether a node's health says it follows ``leader`` (subclasses may ask more)."""
        return health["leader_id"] == leader

    def stable_leader(self) -> str | None:
        """The leader a majority of the reachable running nodes agree on (None if none)."""
        hs = [h for h in self.healths().values() if h]
        leaders = {h["node_id"] for h in hs if h["role"] == "leader"}
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        agree = [h for h in hs if self.agrees(h, leader)]
        return leader if len(agree) > len(self.nodes) // 2 else None

    def tails(self, lines: int = 15) -> str:
        out = []
        for p in [*self.nodes, *self.handlers]:
            try:
                text = p.log.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                text = ["(no log)"]
            out.append(f"--- {p.name}\n" + "\n".join(text))
        return "\n".join(out)


class ChaosCluster(ClusterView):
    """N nodes and M handlers, every directed link through its own toxiproxy proxy."""

    def __init__(
        self,
        root: Path,
        toxiproxy: Toxiproxy,
        *,
        nodes: int = 3,
        handlers: int = 2,
        node_tasks: Iterable[str] = (),
        handler_tasks: Iterable[str] = ("chaos.workload_tasks",),
        config: dict[str, Any] | None = None,
        prefix: str = "",
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.toxiproxy = toxiproxy
        self.prefix = prefix or f"c{os.getpid()}{int(time.time() * 1000) % 100000}"
        self.node_tasks = tuple(node_tasks)
        self.handler_tasks = tuple(handler_tasks)
        self.config_path = root / "mesh.yaml"
        conf = {"membership": {"learn_peers": False}, "log_level": "INFO"}
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(conf.get(key), dict):
                conf[key] = {**conf[key], **value}
            else:
                conf[key] = value
        self.config_path.write_text(yaml.safe_dump(conf))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULEZERO_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH")) if p
        )
        self.nodes = [ChaosNode(self, f"n{i + 1}") for i in range(nodes)]
        self.proxies: dict[tuple[str, str], Proxy] = {}
        self._listen: dict[tuple[str, str], str] = {}
        handler_ids = [f"h{i + 1}" for i in range(handlers)]
        for src in [n.node_id for n in self.nodes] + handler_ids:
            for dst in self.nodes:
                if src == dst.node_id:
                    continue
                port = free_port()
                proxy = toxiproxy.create(
                    upstream=f"{HOST}:{dst.mesh_port}",
                    name=self.proxy_name(src, dst.node_id),
                    listen=f"{HOST}:{port}",
                    enabled=True,
                )
                self.proxies[(src, dst.node_id)] = proxy
                self._listen[(src, dst.node_id)] = f"tcp://{HOST}:{port}"
        for node in self.nodes:
            node.build_argv()
        self.handlers = [ChaosHandler(self, h) for h in handler_ids]

    def proxy_name(self, src: str, dst: str) -> str:
        return f"{self.prefix}-{src}>{dst}"

    def link_address(self, src: str, dst: str) -> str:
        return self._listen[(src, dst)]

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 20.0) -> None:
        for n in self.nodes:
            n.start()
        for h in self.handlers:
            h.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stable_leader() is not None:
                return
            time.sleep(0.1)
        raise RuntimeError(f"no leader within {timeout}s\n{self.tails()}")

    def stop(self) -> None:
        for p in [*self.handlers, *self.nodes]:
            p.stop()
        for proxy in self.proxies.values():
            try:
                proxy.destroy()
            except Exception:  # the toxiproxy server may already be gone
                pass
