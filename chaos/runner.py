"""Run chaos scenarios against a real mesh and report what the history checker found.

One run: start a ChaosCluster (nodes + handlers behind per-link proxies, each with its own
CURVE key unless ``secure=False``), create the workload schedules, start the recorder (health
poller + writer client), inject the scenario's faults, heal and restart everything, let it
settle, stop the workload, check, stop the cluster.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import msgspec
from toxiproxy import Toxiproxy

from chaos.checker import History, Recorder, check_run
from chaos.nemesis import Nemesis
from chaos.scenarios import SCENARIOS
from chaos.topology import ChaosCluster, http
from mesh.scheduling.controls import Retry

WORKLOAD_INTERVAL = 0.2
OVERLAP_INTERVAL = 0.5  # the overlap schedule's interval...
OVERLAP_RUN = 0.8  # ...and its runs' length: longer, so every other fire is skipped


def connect_toxiproxy(host: str, port: int) -> Toxiproxy:
    t = Toxiproxy()
    t.update_api_consumer(host, port)
    return t


def create_workload(cluster: ChaosCluster, out_dir: Path, count: int = 2) -> dict[str, float]:
    """Interval schedules on handler tasks: every fire time must run exactly once."""
    schedules = {}
    for i in range(count):
        sid = f"fire-{i}"
        body = {
            "id": sid,
            "task": "chaos_record",
            "trigger": {"type": "interval", "seconds": WORKLOAD_INTERVAL},
            "kwargs": {"schedule_id": sid, "out_dir": str(out_dir)},
            "coalesce": "all",
            "misfire_grace_time": 3600,
        }
        _create(cluster, body)
        schedules[sid] = WORKLOAD_INTERVAL
    return schedules


def create_overlap_workload(cluster: ChaosCluster, out_dir: Path) -> dict[str, float]:
    """A schedule with ``overlap: skip`` whose runs last longer than its interval: its runs
    never overlap, and each fire time runs or is recorded skipped (checker.check_overlap)."""
    sid = "overlap-0"
    body = {
        "id": sid,
        "task": "chaos_overlap",
        "trigger": {"type": "interval", "seconds": OVERLAP_INTERVAL},
        "kwargs": {"schedule_id": sid, "out_dir": str(out_dir), "seconds": OVERLAP_RUN},
        "overlap": "skip",
        "coalesce": "all",
        "misfire_grace_time": 3600,
    }
    _create(cluster, body)
    return {sid: OVERLAP_INTERVAL}


RETRY_WORKLOAD = Retry(max_attempts=3, initial_delay=0.3, multiplier=2)


def create_retry_workload(cluster: ChaosCluster, out_dir: Path) -> dict[str, Retry]:
    """A schedule whose fires fail their first tries (``chaos_flaky``), with a retry policy:
    what the checker's retry rule is checked on."""
    sid = "retry-0"
    body = {
        "id": sid,
        "task": "chaos_flaky",
        "trigger": {"type": "interval", "seconds": 0.5},
        "kwargs": {
            "schedule_id": sid,
            "out_dir": str(out_dir),
            "max_attempts": RETRY_WORKLOAD.max_attempts,
        },
        "coalesce": "all",
        "misfire_grace_time": 3600,
        "retry": msgspec.to_builtins(RETRY_WORKLOAD),
    }
    _create(cluster, body)
    return {sid: RETRY_WORKLOAD}


def _create(cluster: ChaosCluster, body: dict[str, Any]) -> None:
    leader = cluster.node(cluster.stable_leader() or cluster.ids[0])
    deadline = time.monotonic() + 10
    while True:
        status, reply, _ = http(leader.http + "/api/schedules", "POST", body, timeout=5)
        if status == 201:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not create workload schedule {body['id']}: {status} {reply}")
        time.sleep(0.2)


@attrs.frozen
class Workloads:
    """The schedules a run fires and checks: the plain ones (id → interval), the overlap
    schedule and the retry schedule."""

    schedules: dict[str, float]
    overlap: dict[str, float]
    retries: dict[str, Retry]


def create_workloads(cluster: ChaosCluster, out_dir: Path) -> Workloads:
    return Workloads(
        create_workload(cluster, out_dir),
        create_overlap_workload(cluster, out_dir),
        create_retry_workload(cluster, out_dir),
    )


def stop_and_check(
    cluster: ChaosCluster,
    nemesis: Any,
    history: Any,
    out_dir: Path,
    w: Workloads,
    heal_at: float,
) -> dict[str, Any]:
    """Delete every workload schedule, let the last runs end, and check the run."""
    stop_at = time.time()
    stop_workload(cluster, {**w.schedules, **w.overlap, **w.retries})
    time.sleep(0.5 + OVERLAP_RUN)
    return check_run(
        cluster, nemesis, history, out_dir, w.schedules, heal_at,
        overlap=w.overlap, retries=w.retries, stop_at=stop_at,
    )  # fmt: skip


def stop_workload(cluster: ChaosCluster, schedules: dict[str, Any]) -> None:
    deadline = time.monotonic() + 15
    for sid in schedules:
        while time.monotonic() < deadline:
            node = cluster.node(cluster.stable_leader() or cluster.ids[0])
            try:
                status, _, _ = http(node.http + f"/api/schedules/{sid}", "DELETE", timeout=5)
            except OSError:
                status = None
            if status in (204, 404):
                break
            time.sleep(0.2)


def run_once(
    scenario: str,
    seed: int,
    toxiproxy: Toxiproxy,
    *,
    nodes: int = 3,
    handlers: int = 2,
    duration: float = 4.0,
    settle: float = 4.0,
    keep: Path | None = None,
    snapshot_threshold: int | None = None,
    secure: bool = True,
) -> dict[str, Any]:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix=f"chaos-{scenario}-{seed}-"))
    out_dir = root / "fires"
    out_dir.mkdir()
    # A small threshold makes every node snapshot several times per run, so followers cut off
    # by a fault catch up through chunked snapshot transfers rather than log entries.
    config = {"raft": {"snapshot_threshold": snapshot_threshold}} if snapshot_threshold else None
    cluster = ChaosCluster(
        root, toxiproxy, nodes=nodes, handlers=handlers, config=config, secure=secure
    )
    history = History()
    nemesis = Nemesis(cluster, rng)
    report: dict[str, Any] = {"scenario": scenario, "seed": seed, "nodes": nodes, "keys": secure}
    started = time.time()
    try:
        cluster.start()
        workloads = create_workloads(cluster, out_dir)
        recorder = Recorder(cluster, history, rng)
        recorder.start()
        time.sleep(1.5)  # some fires before the faults
        SCENARIOS[scenario](nemesis, cluster, rng, duration)
        nemesis.heal()
        nemesis.restart_all()
        heal_at = time.time()
        time.sleep(settle)
        recorder.stop()
        report.update(stop_and_check(cluster, nemesis, history, out_dir, workloads, heal_at))
        report["snapshots"] = _snapshot_events(cluster)
    except Exception as e:  # a run that could not even be checked is a failure, not a crash
        report.setdefault("violations", []).append(f"run failed: {type(e).__name__}: {e}")
        report["logs"] = cluster.tails()
    finally:
        cluster.stop()
        report["nodes_with_keys"] = cluster.nodes_with_keys()
        report["seconds"] = round(time.time() - started, 1)
        if report.get("violations") and keep is not None:
            dest = keep / f"{scenario}-{seed}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(root, dest, ignore=shutil.ignore_patterns("*.db-wal", "*.db-shm"))
            report["kept"] = str(dest)
        shutil.rmtree(root, ignore_errors=True)
    return report


def _snapshot_events(cluster: ChaosCluster) -> dict[str, int]:
    """How many snapshots the nodes took, sent and installed (from their event logs)."""
    counts = {"snapshot_taken": 0, "snapshot_sent": 0, "snapshot_installed": 0}
    for node in cluster.nodes:
        path = node.data_dir / "logs" / "events.jsonl"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                kind = json.loads(line).get("type")
            except ValueError:
                continue
            if kind in counts:
                counts[kind] += 1
    return {k.removeprefix("snapshot_"): v for k, v in counts.items()}


COLUMNS = [
    ("scenario", 22), ("seed", 6), ("leader_changes", 8), ("unavailability_s", 8),
    ("fires_checked", 7), ("duplicates", 5), ("gaps", 5), ("writes_acked", 6),
    ("lost_writes", 5), ("minority_acks", 5), ("converge_s", 7), ("violations", 5),
]  # fmt: skip


def format_table(reports: list[dict[str, Any]]) -> str:
    head = " ".join(name[:w].ljust(w) for name, w in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in reports:
        cells = []
        for name, w in COLUMNS:
            v = r.get(name, "")
            if name == "violations":
                v = len(v or [])
            cells.append(str(v)[:w].ljust(w))
        lines.append(" ".join(cells))
    total = sum(len(r.get("violations") or []) for r in reports)
    lines.append(f"{len(reports)} runs, {total} violations")
    return "\n".join(lines)


def save(reports: list[dict[str, Any]], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"chaos-{stamp}.json"
    path.write_text(json.dumps({"runs": reports}, indent=2, default=str))
    (out / f"chaos-{stamp}.txt").write_text(format_table(reports) + "\n")
    return path
