"""The replicated part of the scenario suite: loaded scenarios and their runs (docs/scenarios.md).

Part of ``SchedulerState`` (its ``scenario_*`` commands, snapshot section ``scenarios``), so that
every voter holds the library and every run's progress and result, and a new leader continues a
run where the last committed progress left it. Plain JSON only, no clock: the leader's runner
(``mesh.scenarios.runner``) decides times and totals and commits them.

A run's fires are counted here, as the records apply (every node counts the same): a schedule a
run created has the id ``scn-{run_id}-...``. Progress and finish carry the term of the leader
that sent them; a run taken over by a newer term ignores an older one's (fencing, as handlers do
with dispatches).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FINISHED", "ScenarioBook", "fire_bucket", "observe", "quantile", "run_of_schedule"]

MAX_SCENARIOS = 100
MAX_QUEUED = 20  # runs waiting or running
MAX_FINISHED = 200  # finished runs kept (oldest dropped)
MAX_SAMPLES = 120  # a run's time series; halved (every other point) when full
MAX_ERRORS = 10
SCHEDULE_PREFIX = "scn-"
RUN_ID_LENGTH = 16
FINISHED = frozenset({"passed", "failed", "error", "cancelled"})
# Execution-record outcomes → the outcome a run counts its fire under (model.FIRE_OUTCOMES).
_FIRE_OUTCOME = {
    "success": "success",
    "error": "failure",
    "abandoned": "failure",
    "cancelled": "failure",
    "deserialization_failed": "failure",
    "timeout": "timeout",
    "skipped": "skipped",
    "missed_start_deadline": "missed",
    "no_handler": "no_handler",
}

# A log-scale histogram as JSON: {"b": {bucket: count}, "n": count, "max": ms}; buckets 5 % wide,
# so a quantile read from it is within 5 % of the true value, whatever the range.
_GROWTH = math.log(1.05)


def observe(h: dict[str, Any], ms: float) -> None:
    ms = max(0.0, ms)
    bucket = str(int(math.log(ms) / _GROWTH) if ms >= 1e-3 else -142)  # -142: ≤ 1 µs
    b = h.setdefault("b", {})
    b[bucket] = b.get(bucket, 0) + 1
    h["n"] = h.get("n", 0) + 1
    h["max"] = max(h.get("max", 0.0), ms)


def quantile(h: dict[str, Any] | None, q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram in ms (a bucket's upper bound), None if empty."""
    if not h or not h.get("n"):
        return None
    rank = max(1, math.ceil(q * h["n"]))
    seen = 0
    for bucket in sorted(h["b"], key=int):
        seen += h["b"][bucket]
        if seen >= rank:
            return min(math.exp((int(bucket) + 1) * _GROWTH), h["max"])
    return float(h["max"])


def fire_bucket(outcome: str) -> str:
    return _FIRE_OUTCOME.get(outcome, "failure")


def run_of_schedule(schedule_id: str | None) -> str | None:
    """The run that created ``schedule_id`` (by its id's form), or None."""
    if not schedule_id or not schedule_id.startswith(SCHEDULE_PREFIX):
        return None
    run_id = schedule_id[len(SCHEDULE_PREFIX) : len(SCHEDULE_PREFIX) + RUN_ID_LENGTH]
    return run_id if len(run_id) == RUN_ID_LENGTH else None


class ScenarioBook:
    def __init__(self) -> None:
        self.library: dict[str, dict[str, Any]] = {}  # name → loaded scenario
        self.runs: dict[str, dict[str, Any]] = {}  # run id → run, in request order
        self.queue: list[str] = []  # unfinished runs, in the order they run

    # ------------------------------------------------------------------ commands

    def load(self, c: dict[str, Any]) -> dict[str, Any]:
        name = c["name"]
        if name not in self.library and len(self.library) >= MAX_SCENARIOS:
            return {"refused": f"{MAX_SCENARIOS} scenarios are loaded; delete one first"}
        self.library[name] = {
            k: c[k]
            for k in ("name", "version", "description", "parameters", "depends_on", "source")
        } | {"definition": c["definition"], "loaded_at": c["at"], "loaded_by": c.get("by")}
        return {"name": name, "version": c["version"]}

    def delete(self, c: dict[str, Any]) -> bool:
        return self.library.pop(c["name"], None) is not None

    def start(self, c: dict[str, Any]) -> dict[str, Any]:
        """Queue a run and its dependencies' runs (``c["runs"]``: dependencies first, the run
        last). A run id already known answers with it: a repeated request queues nothing."""
        runs = c["runs"]
        main = runs[-1]["run_id"]
        if main in self.runs:
            return {"run_id": main, "existing": True}
        if len(self.queue) + len(runs) > MAX_QUEUED:
            return {
                "refused": f"{len(self.queue)} runs are queued or running (at most {MAX_QUEUED})"
            }
        for r in runs:
            self.runs[r["run_id"]] = {
                "run_id": r["run_id"],
                "name": r["name"],
                "version": r["version"],
                "definition": r["definition"],
                "parameters": r["parameters"],
                "depends_on": r["depends_on"],
                "status": "queued",
                "source": c.get("source", "api"),
                "requested_by": c.get("by"),
                "requested_at": c["at"],
                "started_at": None,
                "finished_at": None,
                "leader": None,
                "term": 0,
                "resumed": 0,
                "progress": {},
                "fires": {},
                "lateness": {},
                "samples": [],
                "result": None,
                "error": None,
                "cancel": False,
            }
            self.queue.append(r["run_id"])
        return {"run_id": main}

    def progress(self, c: dict[str, Any]) -> bool:
        """The leader's runner: a run started, resumed or went on (totals, not increments)."""
        run = self._takes(c)
        if run is None:
            return False
        if run["status"] == "queued":
            run["status"], run["started_at"] = "running", c["at"]
        if run["term"] != c["term"] and run["leader"] is not None:
            run["resumed"] += 1
        run["term"], run["leader"] = c["term"], c.get("leader")
        if "progress" in c:
            run["progress"] = c["progress"]
        if (sample := c.get("sample")) is not None:
            samples = run["samples"]
            samples.append(sample)
            if len(samples) >= MAX_SAMPLES:
                run["samples"] = samples[::2]
        return True

    def finish(self, c: dict[str, Any]) -> bool:
        run = self._takes(c)
        if run is None:
            return False
        self._end(run, c["status"], c["at"], c.get("error"))
        if "progress" in c:
            run["progress"] = c["progress"]
        run["result"] = c.get("result")
        return True

    def cancel(self, c: dict[str, Any]) -> str | None:
        """Ask a run to stop: one not started ends now; a running one is ended by the runner."""
        run = self.runs.get(c["run_id"])
        if run is None or run["status"] in FINISHED:
            return None if run is None else run["status"]
        run["cancel"] = True
        if run["status"] == "queued":
            self._end(run, "cancelled", c["at"], "cancelled before it started")
        return run["status"]

    def on_record(self, ex: dict[str, Any], late: float | None) -> None:
        """Count an execution record of a schedule a running run created."""
        run = self.runs.get(run_of_schedule(ex.get("schedule_id")) or "")
        if run is None or run["status"] in FINISHED:
            return
        bucket = fire_bucket(ex.get("outcome") or "")
        run["fires"][bucket] = run["fires"].get(bucket, 0) + 1
        if late is not None:
            observe(run["lateness"], late * 1000.0)

    # ------------------------------------------------------------------ helpers

    def _takes(self, c: dict[str, Any]) -> dict[str, Any] | None:
        """The run ``c`` may change: not finished, and not taken over by a newer term."""
        run = self.runs.get(c["run_id"])
        if run is None or run["status"] in FINISHED or c["term"] < run["term"]:
            return None
        return run

    def _end(self, run: dict[str, Any], status: str, at: str, error: str | None) -> None:
        run["status"], run["finished_at"], run["error"] = status, at, error
        run["definition"] = None  # a finished run needs only its result
        if run["run_id"] in self.queue:
            self.queue.remove(run["run_id"])
        finished = [r for r in self.runs if self.runs[r]["status"] in FINISHED]
        for old in finished[: max(0, len(finished) - MAX_FINISHED)]:
            del self.runs[old]

    def current(self) -> dict[str, Any] | None:
        """The run to execute now: the first of the queue."""
        return self.runs[self.queue[0]] if self.queue else None

    # ------------------------------------------------------------------ image

    def dump(self) -> dict[str, Any] | None:
        if not (self.library or self.runs):
            return None
        return {"library": self.library, "runs": self.runs, "queue": self.queue}

    def restore(self, d: dict[str, Any] | None) -> None:
        d = d or {}
        self.library = dict(d.get("library", {}))
        self.runs = dict(d.get("runs", {}))
        self.queue = list(d.get("queue", []))
