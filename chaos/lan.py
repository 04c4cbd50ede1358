"""A LAN of hosts on one machine: each node in its own network namespace on a bridge.

Layout (names carry this process's id, so parallel runs never collide):

    ns <p>sw   : a bridge <p>br (the switch)
    ns <p>h<i> : host i, eth0 = 10.77.<k>.<i>/24 (a veth whose peer sits on the bridge)
    root ns    : <p>obs = 10.77.<k>.250/24 on the bridge too: the observer (checker, clients)

Nodes run with ``--discovery mdns`` and no peer list: they find each other by multicast DNS
across the bridge, as identical nodes on a LAN would. A partition is made inside the hosts'
namespaces with ``ip route add blackhole <peer>/32``: everything (Raft, pings, handler traffic,
HTTP forwarding) between the two sides stops silently; the observer still sees every host.

Every node and handler has its own CURVE key (``ROOT/keys``) and runs with ``--keys``: on 10.x
addresses a process without keys refuses to start (exit 2). ``secure=False`` runs them without
keys and with ``--insecure`` instead, for comparison.

Needs root and iproute2; ``available()`` says why not otherwise, and callers skip.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from chaos.nemesis import ProcessNemesis
from chaos.topology import ClusterView, NodeProc, Proc
from mesh.security import create_key
from mesh.supervise import child_env, handler_command, node_command

MESH_PORT = 7100
HTTP_PORT = 8100


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def available() -> str | None:
    """None if network namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    probe = f"szp{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"cannot create a network namespace here: {getattr(e, 'stderr', e)}"
    _ip("netns", "del", probe, check=False)
    return None


class LanNode(NodeProc):
    def __init__(self, lan: Lan, index: int) -> None:
        self.lan = lan
        self.index = index
        self.node_id = f"host{index}"
        self.ns = f"{lan.p}h{index}"
        self.ip = f"{lan.subnet}.{index}"
        self.http = f"http://{self.ip}:{HTTP_PORT}"
        self.mesh = f"tcp://{self.ip}:{MESH_PORT}"
        self.data_dir = lan.root / self.node_id
        command = node_command(
            self.node_id,
            data_dir=self.data_dir,
            mesh=self.mesh,
            http=f"{self.ip}:{HTTP_PORT}",
            config=lan.config_path,
            keys=lan.keys_dir,
            extra=["--discovery", "mdns", "--bootstrap-expect", str(lan.n), *lan.insecure],
        )
        argv = ["ip", "netns", "exec", self.ns, *command]
        super().__init__(self.node_id, argv, lan.root / f"{self.node_id}.log", lan.env)


class Lan(ClusterView):
    """N hosts (namespaces) on a bridge, a node and a handler on each, each with its own CURVE
    key unless ``secure=False``. Use as a context manager."""

    def __init__(self, n: int = 3, *, root: Path | None = None, secure: bool = True) -> None:
        self.n = n
        self.p = f"sz{os.getpid() % 10000}{secrets.token_hex(1)}"
        self.subnet = f"10.77.{random.randint(1, 250)}"
        self.root = root or Path(tempfile.mkdtemp(prefix="chaos-lan-"))
        self.config_path = self.root / "mesh.yaml"
        self.env = child_env()
        self.secure = secure
        self.keys_dir: Path | None = self.root / "keys" if secure else None
        # Without keys the mesh on 10.x needs --insecure. With keys the mesh is CURVE, but the
        # nodes' HTTP API on 10.x has no tokens file (the checker reads it without tokens), which
        # needs --insecure too: what is under test here is the mesh, not HTTP authentication.
        self.insecure = ["--insecure"]
        self.nodes: list[LanNode] = []
        self.handlers: list[Proc] = []
        self.blackholes: set[tuple[str, str]] = set()  # (host ns, blocked ip)
        self._made: list[str] = []

    # ------------------------------------------------------------------ network

    def __enter__(self) -> Lan:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.keys_dir is not None:
            for i in range(1, self.n + 1):
                create_key(self.keys_dir, f"host{i}", "node")
                create_key(self.keys_dir, f"h-host{i}", "handler")
        service = f"_sz{secrets.token_hex(4)}._tcp.local."
        self.config_path.write_text(yaml.safe_dump({"mdns_service": service}))
        try:
            self._build_network()
        except BaseException:
            self.close()
            raise
        self.nodes = [LanNode(self, i + 1) for i in range(self.n)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build_network(self) -> None:
        sw, br = f"{self.p}sw", f"{self.p}br"
        _ip("netns", "add", sw)
        self._made.append(sw)
        _ip("-n", sw, "link", "add", br, "type", "bridge")
        _ip("-n", sw, "link", "set", br, "up")
        _ip("-n", sw, "link", "set", "lo", "up")
        for i in range(1, self.n + 1):
            ns = f"{self.p}h{i}"
            _ip("netns", "add", ns)
            self._made.append(ns)
            host_if, sw_if = f"{self.p}e{i}", f"{self.p}s{i}"
            _ip("link", "add", host_if, "type", "veth", "peer", "name", sw_if)
            _ip("link", "set", host_if, "netns", ns)
            _ip("link", "set", sw_if, "netns", sw)
            _ip("-n", sw, "link", "set", sw_if, "master", br)
            _ip("-n", sw, "link", "set", sw_if, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.subnet}.{i}/24", "dev", host_if)
            _ip("-n", ns, "link", "set", host_if, "up")
        # The observer: the root namespace joins the bridge to watch every host.
        obs, obs_sw = f"{self.p}obs", f"{self.p}so"
        _ip("link", "add", obs, "type", "veth", "peer", "name", obs_sw)
        self._made.append(f"link:{obs}")
        _ip("link", "set", obs_sw, "netns", sw)
        _ip("-n", sw, "link", "set", obs_sw, "master", br)
        _ip("-n", sw, "link", "set", obs_sw, "up")
        _ip("addr", "add", f"{self.subnet}.250/24", "dev", obs)
        _ip("link", "set", obs, "up")

    def close(self) -> None:
        for p in [*self.handlers, *self.nodes]:
            try:
                p.stop()
            except Exception:
                pass
        for name in reversed(self._made):
            if name.startswith("link:"):
                _ip("link", "del", name[5:], check=False)
            else:
                _ip("netns", "del", name, check=False)
        self._made.clear()

    # ------------------------------------------------------------------ processes

    def start(self, handlers: bool = True, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        if handlers:
            for node in self.nodes:
                command = handler_command(
                    f"h-{node.node_id}",
                    mesh=[other.mesh for other in self.nodes],
                    tasks=["chaos.workload_tasks"],
                    keys=self.keys_dir,
                )
                argv = ["ip", "netns", "exec", node.ns, *command, *self.insecure]
                h = Proc(f"h-{node.node_id}", argv, self.root / f"h-{node.node_id}.log", self.env)
                h.start()
                self.handlers.append(h)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stable_leader() is not None:
                return
            time.sleep(0.2)
        raise RuntimeError(f"LAN mesh elected no leader within {timeout}s\n{self.tails()}")

    def agrees(self, health: dict[str, Any], leader: str) -> bool:
        # On a LAN the mesh forms by mDNS: it is only stable once every host is a voter.
        return health["leader_id"] == leader and len(health.get("voters", [])) == self.n


class LanNemesis(ProcessNemesis):
    """Partitions by blackhole routes inside the hosts' namespaces; process faults inherited."""

    def partition(self, *groups: Iterable[str]) -> None:
        gs = [sorted(g) for g in groups]
        lan = self.cluster
        for a in gs:
            for b in gs:
                if a is b:
                    continue
                for x in a:
                    for y in b:
                        src, dst = lan.node(x), lan.node(y)
                        if (src.ns, dst.ip) not in lan.blackholes:
                            _ip("-n", src.ns, "route", "add", "blackhole", f"{dst.ip}/32")
                            lan.blackholes.add((src.ns, dst.ip))
        self._open_partition(gs)
        self._note("partition", groups=gs)

    def isolate(self, node_id: str, silent: bool = True) -> None:
        self.partition([node_id], [i for i in self.cluster.ids if i != node_id])

    def heal(self) -> None:
        lan = self.cluster
        for ns, ip in sorted(lan.blackholes):
            _ip("-n", ns, "route", "del", "blackhole", f"{ip}/32", check=False)
        lan.blackholes.clear()
        self._after_heal()


LAN_SCENARIOS = ("leader_partition", "isolate_follower", "majority_minority", "kill_leader",
                 "pause_leader")  # fmt: skip


def run_lan_once(
    scenario: str,
    seed: int,
    *,
    n: int = 3,
    duration: float = 4.0,
    keep: Path | None = None,
    secure: bool = True,
) -> dict[str, Any]:
    from chaos.checker import History, Recorder
    from chaos.runner import create_workloads, stop_and_check
    from chaos.scenarios import SCENARIOS

    rng = random.Random(seed)
    report: dict[str, Any] = {
        "scenario": f"lan:{scenario}",
        "seed": seed,
        "nodes": n,
        "keys": secure,
    }
    started = time.time()
    with Lan(n, secure=secure) as lan:
        out_dir = lan.root / "fires"
        out_dir.mkdir()
        history = History()
        nem = LanNemesis(lan, rng)
        try:
            lan.start()
            workloads = create_workloads(lan, out_dir)  # type: ignore[arg-type]
            recorder = Recorder(lan, history, rng)  # type: ignore[arg-type]
            recorder.start()
            time.sleep(1.5)
            SCENARIOS[scenario](nem, lan, rng, duration)  # type: ignore[arg-type]
            nem.heal()
            nem.restart_all()
            heal_at = time.time()
            time.sleep(5.0)
            recorder.stop()
            report.update(
                stop_and_check(lan, nem, history, out_dir, workloads, heal_at)  # type: ignore[arg-type]
            )
        except Exception as e:
            report.setdefault("violations", []).append(f"run failed: {type(e).__name__}: {e}")
            report["logs"] = lan.tails()
        finally:
            report["seconds"] = round(time.time() - started, 1)
            lan.close()
            report["nodes_with_keys"] = lan.nodes_with_keys()
            if report.get("violations") and keep is not None:
                dest = keep / f"lan-{scenario}-{seed}"
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(lan.root, dest, ignore=shutil.ignore_patterns("*.db-*"))
                report["kept"] = str(dest)
            shutil.rmtree(lan.root, ignore_errors=True)
    return report


def main(args: Any) -> int:
    from chaos.runner import format_table, save

    reason = available()
    if reason:
        print(f"chaos --lan: skipped: {reason}")
        return 0
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    reports = []
    for k in range(args.runs):
        scenario = (
            args.scenario
            if args.scenario in LAN_SCENARIOS
            else LAN_SCENARIOS[k % len(LAN_SCENARIOS)]
        )
        n = args.nodes or 3
        r = run_lan_once(
            scenario, seed + k, n=n, duration=args.duration, keep=args.out, secure=args.keys
        )
        reports.append(r)
        status = "ok" if not r.get("violations") else "VIOLATION"
        print(f"[{k + 1}/{args.runs}] lan:{scenario} seed={seed + k} {status} ({r['seconds']}s)")
        for v in r.get("violations") or []:
            print(f"    ! {v}", flush=True)
    print(format_table(reports))
    print(f"report: {save(reports, args.out)}")
    return 1 if any(r.get("violations") for r in reports) else 0
