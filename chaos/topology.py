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

``secure`` (the default) gives every node and handler its own CURVE key in ``ROOT/keys`` and
starts it with ``--keys``: the proxies carry CURVE connections end to end.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

import yaml
from toxiproxy import Toxiproxy
from toxiproxy.proxy import Proxy

from mesh.security import create_key
from mesh.supervise import (
    Child,
    child_env,
    free_port,
    get_json,
    handler_command,
    http_request,
    node_command,
    tail,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
http = http_request  # the name runner.py and checker.py use


class Proc(Child):
    """A child process with its output in a log file; ``stopped`` while SIGSTOP'ed."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        super().__init__(name, argv, log=log, env=env, cwd=REPO_ROOT)
        self.stopped = False

    def start(self) -> Self:
        super().start()
        self.stopped = False
        return self

    def signal(self, sig: int) -> None:
        if not self.running:
            return
        if sig == signal.SIGKILL:
            self.kill()
        else:
            assert self.proc is not None
            self.proc.send_signal(sig)
        self.stopped = sig == signal.SIGSTOP

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.running and self.stopped:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)  # paused, it could not act on SIGTERM
        return super().stop(timeout)


class NodeProc(Proc):
    """A node process serving HTTP at ``self.http``."""

    http: str

    def health(self, timeout: float = 0.5) -> dict[str, Any] | None:
        body = get_json(self.http + "/api/health", timeout=timeout)
        return body if isinstance(body, dict) else None


class ChaosNode(NodeProc):
    def __init__(self, cluster: ChaosCluster, node_id: str) -> None:
        self.node_id = node_id
        self.mesh_port = free_port(HOST, pair=True)
        self.http_port = free_port(HOST, pair=True)
        self.mesh = f"tcp://{HOST}:{self.mesh_port}"
        self.http = f"http://{HOST}:{self.http_port}"
        self.data_dir = cluster.root / node_id
        super().__init__(node_id, [], cluster.root / f"{node_id}.log", cluster.env)
        self.cluster = cluster

    def command(self) -> list[str]:
        c = self.cluster
        return node_command(
            self.node_id,
            data_dir=self.data_dir,
            mesh=self.mesh,
            http=f"{HOST}:{self.http_port}",
            config=c.config_path,
            # Each peer at the address of the proxy for this link.
            peers=[c.link_address(self.node_id, o.node_id) for o in c.nodes if o is not self],
            tasks=c.node_tasks,
            keys=c.keys_dir,
            extra=["--bootstrap-expect", str(len(c.nodes))],
        )


class ChaosHandler(Proc):
    def __init__(self, cluster: ChaosCluster, handler_id: str, concurrency: int = 16) -> None:
        self.handler_id = handler_id
        argv = handler_command(
            handler_id,
            mesh=[cluster.link_address(handler_id, node.node_id) for node in cluster.nodes],
            tasks=cluster.handler_tasks,
            concurrency=concurrency,
            keys=cluster.keys_dir,
        )
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

    def nodes_with_keys(self) -> list[str]:
        """The nodes whose start line (in their log) says they ran with CURVE keys."""
        out = []
        for n in self.nodes:
            try:
                text = n.log.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue
            banner = f"schedulezero node {n.node_id}: "
            if any(x.startswith(banner) and "(CURVE keys in " in x for x in text.splitlines()):
                out.append(n.node_id)
        return out

    def tails(self, lines: int = 15) -> str:
        return "\n".join(
            f"--- {p.name}\n{tail(p.log, lines)}" for p in [*self.nodes, *self.handlers]
        )


class ChaosCluster(ClusterView):
    """N nodes and M handlers, every directed link through its own toxiproxy proxy; ``secure``:
    each with its own CURVE key."""

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
        secure: bool = True,
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
        self.env = child_env()
        handler_ids = [f"h{i + 1}" for i in range(handlers)]
        self.secure = secure
        self.keys_dir: Path | None = root / "keys" if secure else None
        if self.keys_dir is not None:
            for i in range(nodes):
                create_key(self.keys_dir, f"n{i + 1}", "node")
            for h in handler_ids:
                create_key(self.keys_dir, h, "handler")
        self.nodes = [ChaosNode(self, f"n{i + 1}") for i in range(nodes)]
        self.proxies: dict[tuple[str, str], Proxy] = {}
        self._listen: dict[tuple[str, str], str] = {}
        for src in [n.node_id for n in self.nodes] + handler_ids:
            for dst in self.nodes:
                if src == dst.node_id:
                    continue
                port = free_port(HOST)
                proxy = toxiproxy.create(
                    upstream=f"{HOST}:{dst.mesh_port}",
                    name=self.proxy_name(src, dst.node_id),
                    listen=f"{HOST}:{port}",
                    enabled=True,
                )
                self.proxies[(src, dst.node_id)] = proxy
                self._listen[(src, dst.node_id)] = f"tcp://{HOST}:{port}"
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
