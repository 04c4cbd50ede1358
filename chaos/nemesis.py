"""Nemeses: the faults the chaos suite injects, each recorded with its time in the history.

Link faults act on the toxiproxy proxies of a ``ChaosCluster`` (see topology.py); process faults
on its node processes. ``heal()`` undoes every link fault and resumes paused processes; killed
nodes are restarted by ``restart_all()``.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chaos.topology import ChaosCluster


class ProcessNemesis:
    """Process faults (kill -9, restart, SIGSTOP/SIGCONT) and the fault log, shared by the
    toxiproxy nemesis below and the LAN one (chaos/lan.py)."""

    def __init__(self, cluster: Any, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.log: list[dict[str, Any]] = []
        # Partition windows: the groups that could not reach the majority side.
        self.partitions: list[dict[str, Any]] = []

    def _note(self, what: str, **detail: Any) -> None:
        self.log.append({"t": time.time(), "what": what, **detail})

    def _open_partition(self, groups: list[list[str]]) -> None:
        n = len(self.cluster.nodes)
        minority = [g for g in groups if len(g) <= n // 2]
        self.partitions.append({"start": time.time(), "end": None, "minority": minority})

    def _after_heal(self) -> None:
        """Resume paused nodes and close the open partition windows."""
        for node in self.cluster.nodes:
            if node.stopped:
                node.signal(signal.SIGCONT)
                node.stopped = False
        now = time.time()
        for p in self.partitions:
            if p["end"] is None:
                p["end"] = now
        self._note("heal")

    def kill(self, node_id: str) -> None:
        self.cluster.node(node_id).signal(signal.SIGKILL)
        self._note("kill", node=node_id)

    def restart(self, node_id: str) -> None:
        node = self.cluster.node(node_id)
        if not node.running:
            node.start()
            self._note("restart", node=node_id)

    def restart_all(self) -> None:
        for node in self.cluster.nodes:
            self.restart(node.node_id)

    def pause(self, node_id: str) -> None:
        self.cluster.node(node_id).signal(signal.SIGSTOP)
        self._note("pause", node=node_id)

    def resume(self, node_id: str) -> None:
        node = self.cluster.node(node_id)
        if node.stopped:
            node.signal(signal.SIGCONT)
            node.stopped = False
            self._note("resume", node=node_id)


class Nemesis(ProcessNemesis):
    """Link faults through the per-link toxiproxy proxies of a ``ChaosCluster``."""

    def __init__(self, cluster: ChaosCluster, rng: random.Random) -> None:
        super().__init__(cluster, rng)
        self._toxics: set[tuple[tuple[str, str], str]] = set()
        self._disabled: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ link faults

    def _toxic(
        self, link: tuple[str, str], name: str, type_: str, stream: str, **attrs: Any
    ) -> None:
        proxy = self.cluster.proxies.get(link)
        if proxy is None or (link, name) in self._toxics:
            return
        proxy.add_toxic(name=name, type=type_, stream=stream, attributes=attrs)
        self._toxics.add((link, name))

    def cut(self, src: str, dst: str, *, silent: bool = True) -> None:
        """Nothing ``src`` sends reaches ``dst`` (its messages and its answers to dst's pings)."""
        if silent:
            self._toxic((src, dst), "cut_up", "timeout", "upstream", timeout=0)
            self._toxic((dst, src), "cut_down", "timeout", "downstream", timeout=0)
        else:
            for link in ((src, dst), (dst, src)):
                proxy = self.cluster.proxies.get(link)
                if proxy is not None and link not in self._disabled:
                    proxy.disable()
                    self._disabled.add(link)
        self._note("cut", src=src, dst=dst, silent=silent)

    def partition(self, *groups: Iterable[str], silent: bool = True) -> None:
        """Cut every link between different groups, both ways. Handlers keep their links."""
        gs = [sorted(g) for g in groups]
        for a in gs:
            for b in gs:
                if a is not b:
                    for x in a:
                        for y in b:
                            self.cut(x, y, silent=silent)
        self._open_partition(gs)
        self._note("partition", groups=gs, silent=silent)

    def isolate(self, node_id: str, *, silent: bool = True) -> None:
        rest = [i for i in self.cluster.ids if i != node_id]
        self.partition([node_id], rest, silent=silent)

    def latency(self, ms: int, jitter: int) -> None:
        for src, dst in self.cluster.proxies:
            for stream in ("upstream", "downstream"):
                self._toxic(
                    (src, dst), f"lat_{stream}", "latency", stream, latency=ms, jitter=jitter
                )
        self._note("latency", ms=ms, jitter=jitter)

    def reset_connections(self, node_id: str) -> None:
        """Connections to and from ``node_id`` are reset (TCP RST) as soon as they carry data."""
        for link in self.cluster.proxies:
            if node_id in link:
                self._toxic(link, "reset", "reset_peer", "upstream", timeout=0)
        self._note("reset_peer", node=node_id)

    def heal(self) -> None:
        for link, name in sorted(self._toxics):
            proxy = self.cluster.proxies[link]
            try:
                proxy.destroy_toxic(name)
            except Exception:  # already gone
                pass
        self._toxics.clear()
        for link in sorted(self._disabled):
            self.cluster.proxies[link].enable()
        self._disabled.clear()
        self._after_heal()
