"""The history checker: what the chaos suite records during a run, and what it asserts after.

Recorded: every leadership observation (polled ``/api/health`` plus each node's event log), every
write a client sent and its answer, every execution handlers performed, every nemesis action.

Asserted (each violation is listed in the report):
- at most one leader per term;
- no acknowledged write is lost after heal (it is on every node);
- the minority side acknowledges no write (no 201 served by a leader cut off in a minority);
- each fire time of each workload schedule executed exactly once: no duplicate, and no gap
  between the first and the last fire (the schedules use ``coalesce: all`` with a large misfire
  grace time, so every missed fire time must run after heal);
- fires resume after heal (liveness);
- overlap: the runs of the ``overlap: skip`` schedule, longer than its interval, never overlap
  in time (two different fire times; a re-run of one fire time after a handler was lost is
  the firing guarantee's at-least-once), and each of its fire times up to the last run either
  ran or has an execution record ``skipped`` (reason ``overlap``);

- the retry rule, on a schedule whose fires fail their first k tries (k fixed by the fire's
  idempotency key, ``chaos.workload_tasks.failing_tries``): no try of a fire runs twice, none
  beyond ``max_attempts``, each try after a failed one starts no earlier than its backoff, and
  the final try (the first that succeeds, or the last allowed) runs: no retry is lost;
- all nodes converge to the same state hash within a bound after heal.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from chaos.topology import http
from chaos.workload_tasks import failing_tries
from mesh.scheduling.controls import Retry

if TYPE_CHECKING:
    from chaos.nemesis import Nemesis
    from chaos.topology import ChaosCluster


@attrs.define
class History:
    observations: list[tuple[float, str, str, int, str | None]] = attrs.Factory(list)
    writes: list[dict[str, Any]] = attrs.Factory(list)
    lock: threading.Lock = attrs.Factory(threading.Lock)


class Recorder:
    """Background threads: a health poller and a writer client. Bounded: they stop on ``stop()``."""

    def __init__(self, cluster: ChaosCluster, history: History, rng: random.Random) -> None:
        self.cluster = cluster
        self.history = history
        self.rng = random.Random(rng.getrandbits(32))
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, daemon=True),
            threading.Thread(target=self._write, daemon=True),
        ]
        self.max_writes = 2000

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for node in self.cluster.nodes:
                if not node.running or node.stopped:
                    continue
                h = node.health(timeout=0.3)
                if h:
                    with self.history.lock:
                        self.history.observations.append(
                            (time.time(), h["node_id"], h["role"], h["term"], h["leader_id"])
                        )

    def _write(self) -> None:
        seq = 0
        while not self._stop.wait(0.25) and seq < self.max_writes:
            nodes = [n for n in self.cluster.nodes if n.running and not n.stopped]
            if not nodes:
                continue
            node = self.rng.choice(nodes)
            seq += 1
            sid = f"w-{seq}"
            body = {
                "id": sid,
                "task": "chaos_record",
                "trigger": {"type": "date", "run_time": "2099-01-01T00:00:00+00:00"},
                "paused": True,
            }
            started = time.time()
            try:
                status, _, headers = http(node.http + "/api/schedules", "POST", body, timeout=8)
            except OSError as e:
                status, headers = None, {"error": type(e).__name__}
            with self.history.lock:
                self.history.writes.append(
                    {
                        "id": sid,
                        "node": node.node_id,
                        "start": started,
                        "end": time.time(),
                        "status": status,
                        "served_by": headers.get("X-ScheduleZero-Served-By"),
                    }
                )


# --------------------------------------------------------------------------- checks


def read_fire_records(out_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(out_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # a torn last line of a killed process
    return records


def leaders_per_term(cluster: ChaosCluster, history: History) -> dict[int, set[str]]:
    terms: dict[int, set[str]] = defaultdict(set)
    for _, node, role, term, _ in history.observations:
        if role == "leader":
            terms[term].add(node)
    for node in cluster.nodes:
        log = node.data_dir / "logs" / "events.jsonl"
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("type") == "leader_elected":
                terms[int(ev["term"])].add(ev.get("node") or node.node_id)
    return dict(terms)


def unavailability(history: History, n_nodes: int) -> float:
    """The longest stretch (seconds) in which no majority agreed on a leader."""
    by_tick: dict[int, list[tuple[str, str | None, int]]] = defaultdict(list)
    for t, node, _role, term, leader in history.observations:
        by_tick[int(t * 10)].append((node, leader, term))
    worst = 0.0
    gap_start = None
    for tick in sorted(by_tick):
        seen = Counter((leader, term) for _, leader, term in by_tick[tick] if leader)
        ok = bool(seen) and seen.most_common(1)[0][1] > n_nodes // 2
        t = tick / 10
        if ok:
            if gap_start is not None:
                worst = max(worst, t - gap_start)
                gap_start = None
        elif gap_start is None:
            gap_start = t
    return round(worst, 2)


def state_hash(node_http: str) -> tuple[str, int] | None:
    try:
        status, body, _ = http(node_http + "/api/schedules", timeout=2)
        hs, health, _ = http(node_http + "/api/health", timeout=2)
    except OSError:
        return None
    if status != 200 or hs != 200:
        return None
    blob = json.dumps(body, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], health["applied_index"]


def wait_converged(cluster: ChaosCluster, bound: float) -> tuple[bool, float, dict[str, Any]]:
    started = time.monotonic()
    last: dict[str, Any] = {}
    while time.monotonic() - started < bound:
        last = {n.node_id: state_hash(n.http) for n in cluster.nodes}
        values = set(last.values())
        if None not in values and len(values) == 1:
            return True, round(time.monotonic() - started, 2), last
        time.sleep(0.2)
    return False, bound, last


def check_fires(
    records: list[dict[str, Any]], schedules: dict[str, float], heal_at: float
) -> dict[str, Any]:
    """Per workload schedule (id → interval seconds): duplicates, gaps, liveness after heal."""
    out: dict[str, Any] = {"fires": 0, "duplicates": [], "gaps": [], "stalled": []}
    for sid, interval in schedules.items():
        mine = [r for r in records if r.get("schedule_id") == sid and r.get("fire")]
        counts = Counter(r["fire"] for r in mine)
        out["fires"] += len(counts)
        for fire, n in counts.items():
            if n > 1:
                attempts = sorted(r["attempt"] for r in mine if r["fire"] == fire)
                out["duplicates"].append({"schedule": sid, "fire": fire, "attempts": attempts})
        times = sorted(datetime.fromisoformat(f) for f in counts)
        step = timedelta(seconds=interval)
        for a, b in itertools.pairwise(times):
            if b - a > step * 1.5:
                out["gaps"].append({"schedule": sid, "after": a.isoformat(), "next": b.isoformat()})
        if not times or times[-1].timestamp() < heal_at:
            out["stalled"].append(sid)
    return out


def read_overlap_runs(out_dir: Path) -> list[dict[str, Any]]:
    """The runs of the overlap workload (chaos.workload_tasks.chaos_overlap)."""
    return [r for r in read_fire_records(out_dir) if "start" in r and "end" in r]


def check_overlap(
    runs: list[dict[str, Any]], skipped: dict[str, set[str]], schedules: dict[str, float]
) -> dict[str, Any]:
    """Per overlap schedule (id → interval): runs of two fire times that overlapped in time,
    and fire times up to the last run that neither ran nor were recorded skipped."""
    out: dict[str, Any] = {"runs": 0, "overlaps": [], "unaccounted": []}
    for sid, interval in schedules.items():
        mine = sorted((r for r in runs if r["schedule_id"] == sid), key=lambda r: r["start"])
        out["runs"] += len(mine)
        latest: dict[str, Any] | None = None  # the run that ends last so far
        for r in mine:
            if latest is not None and latest["fire"] != r["fire"] and r["start"] < latest["end"]:
                out["overlaps"].append({"schedule": sid, "runs": [latest["fire"], r["fire"]]})
            if latest is None or r["end"] > latest["end"]:
                latest = r
        ran = {datetime.fromisoformat(r["fire"]) for r in mine}
        seen = sorted(ran | {datetime.fromisoformat(f) for f in skipped.get(sid, ())})
        step = timedelta(seconds=interval)
        last = max(ran, default=None)
        for a, b in itertools.pairwise(seen):
            if last is not None and b <= last and b - a > step * 1.5:
                out["unaccounted"].append({"schedule": sid, "after": a.isoformat()})
    return out


def skipped_fires(node_http: str, schedules: dict[str, float]) -> dict[str, set[str]]:
    """The fire times the mesh recorded ``skipped`` for each schedule."""
    out: dict[str, set[str]] = {}
    for sid in schedules:
        path = f"/api/executions?schedule_id={sid}&outcome=skipped&limit=10000"
        status, body, _ = http(node_http + path, timeout=5)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")
        out[sid] = {e["scheduled_fire_time"] for e in body["executions"]}
    return out


# Fires this close to the workload's end (seconds) may not have had all their tries yet.
RETRY_MARGIN = 3.0


def check_retries(
    records: list[dict[str, Any]], schedules: dict[str, Retry], stop_at: float
) -> dict[str, Any]:
    """The retry rule per retry workload schedule (id → its policy): twice-run, surplus,
    early and lost tries."""
    out: dict[str, Any] = {"fires": 0, "tries": 0, "violations": []}
    bad = out["violations"]
    for sid, retry in schedules.items():
        by_fire: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            if r.get("schedule_id") == sid and r.get("try"):
                by_fire[r["key"]].append(r)
        for key, runs in sorted(by_fire.items()):
            out["fires"] += 1
            out["tries"] += len(runs)
            runs.sort(key=lambda r: r["try"])
            tries = [r["try"] for r in runs]
            final = min(failing_tries(key, retry.max_attempts) + 1, retry.max_attempts)
            if len(set(tries)) != len(tries):
                bad.append(f"{key}: a try ran twice: {tries}")
            if max(tries) > final:
                bad.append(f"{key}: tries beyond the last one due ({final}): {tries}")
            if sorted(set(tries)) != list(range(1, max(tries) + 1)):
                bad.append(f"{key}: tries missing: {tries}")
            for before, after in itertools.pairwise(runs):
                wait = after["at"] - before["at"]
                if after["try"] == before["try"] + 1 and wait < retry.delay(before["try"]):
                    bad.append(f"{key}: try {after['try']} {wait:.3f}s after the failed one")
            first_at = min(r["at"] for r in runs)
            if max(tries) < final and first_at < stop_at - RETRY_MARGIN:
                bad.append(f"{key}: retry lost: ran tries {tries}, the last due is {final}")
    return out


def check_run(
    cluster: ChaosCluster,
    nemesis: Nemesis,
    history: History,
    out_dir: Path,
    schedules: dict[str, float],
    heal_at: float,
    *,
    retries: dict[str, Retry] | None = None,
    stop_at: float | None = None,
    converge_bound: float = 15.0,
    overlap: dict[str, float] | None = None,
) -> dict[str, Any]:
    violations: list[str] = []
    terms = leaders_per_term(cluster, history)
    multi = {t: sorted(ns) for t, ns in terms.items() if len(ns) > 1}
    if multi:
        violations.append(f"more than one leader in a term: {multi}")

    converged, converge_time, hashes = wait_converged(cluster, converge_bound)
    if not converged:
        violations.append(f"nodes did not converge within {converge_bound}s: {hashes}")

    # Lost writes: every 201 must be on every node.
    acked = [w for w in history.writes if w["status"] == 201]
    present: dict[str, set[str]] = {}
    for node in cluster.nodes:
        try:
            status, body, _ = http(node.http + "/api/schedules", timeout=3)
            present[node.node_id] = {s["id"] for s in body["schedules"]} if status == 200 else set()
        except OSError:
            present[node.node_id] = set()
    lost = sorted(
        {w["id"] for w in acked for ids in present.values() if w["id"] not in ids},
        key=lambda s: int(s.split("-")[1]),
    )
    if lost:
        violations.append(f"acknowledged writes lost: {lost[:10]} ({len(lost)})")

    # Minority acknowledgements: a 201 served by a node cut off in a minority at that time.
    minority_acks = []
    for w in acked:
        served = (w["served_by"] or "@").split("@")[0]
        for p in nemesis.partitions:
            end = p["end"] or time.time()
            in_minority = any(served in g for g in p["minority"])
            # A write is blamed only if it was both sent and answered inside the window (plus an
            # election timeout of slack at the start, while the old leader may still lead).
            if in_minority and p["start"] + 1.0 < w["start"] and w["end"] < end:
                minority_acks.append(w["id"])
    if minority_acks:
        violations.append(f"writes acknowledged by a minority leader: {minority_acks[:10]}")

    fire_records = read_fire_records(out_dir)
    fires = check_fires(fire_records, schedules, heal_at)
    if fires["duplicates"]:
        violations.append(f"fire times executed twice: {fires['duplicates'][:5]}")
    if fires["gaps"]:
        violations.append(f"fire times missing: {fires['gaps'][:5]}")
    if fires["stalled"]:
        violations.append(f"schedules did not fire after heal: {fires['stalled']}")
    retried = check_retries(fire_records, retries or {}, stop_at or time.time())
    violations += [f"retry rule: {v}" for v in retried["violations"][:5]]

    overlap = overlap or {}
    overlaps = check_overlap(
        read_overlap_runs(out_dir), skipped_fires(cluster.nodes[0].http, overlap), overlap
    )
    if overlaps["overlaps"]:
        violations.append(f"overlap skip: runs overlapped: {overlaps['overlaps'][:5]}")
    if overlaps["unaccounted"]:
        violations.append(
            f"overlap skip: fire times neither run nor skipped: {overlaps['unaccounted'][:5]}"
        )

    return {
        "violations": violations,
        "leader_changes": len(terms),
        "max_leaders_per_term": max((len(v) for v in terms.values()), default=0),
        "unavailability_s": unavailability(history, len(cluster.nodes)),
        "fires_checked": fires["fires"],
        "overlap_runs": overlaps["runs"],
        "overlaps": len(overlaps["overlaps"]),
        "retry_fires": retried["fires"],
        "retry_tries": retried["tries"],
        "retry_violations": len(retried["violations"]),
        "duplicates": len(fires["duplicates"]),
        "gaps": len(fires["gaps"]),
        "writes_sent": len(history.writes),
        "writes_acked": len(acked),
        "lost_writes": len(lost),
        "minority_acks": len(minority_acks),
        "converged": converged,
        "converge_s": converge_time,
        "nemesis": nemesis.log,
    }
