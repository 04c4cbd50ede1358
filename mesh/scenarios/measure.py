"""A run's metrics and assertions, from its replicated totals (docs/scenarios.md, "Metrics").

Pure functions of a run as ``mesh.scheduling.scenariobook`` keeps it, so the live view (any
node, during the run) and the final result (the leader, at the end) compute them the same way.
"""

from __future__ import annotations

from typing import Any

from mesh.scenarios.model import FIRE_OUTCOMES, METRICS, Assertion
from mesh.scheduling.scenariobook import quantile

# create_schedule → creation_rate, ...: the rate metrics and the action they count.
RATES = {
    "creation_rate": "create_schedule",
    "deletion_rate": "delete_schedule",
    "pause_rate": "pause_schedule",
    "resume_rate": "resume_schedule",
    "run_job_rate": "run_job",
}


def values(run: dict[str, Any]) -> dict[str, float | None]:
    """Every metric of the catalogue for ``run`` (None where there is nothing to measure)."""
    p = run.get("progress") or {}
    methods: dict[str, list[float]] = p.get("methods", {})
    fires: dict[str, int] = run.get("fires", {})
    lateness = run.get("lateness")
    out: dict[str, float | None] = {}
    for metric, method in RATES.items():
        count, _errors, seconds = methods.get(method, (0, 0, 0.0))
        if p.get("method") == method:  # the step doing it now: its time so far counts too
            seconds += p.get("step_elapsed", 0.0)
        out[metric] = round(count / seconds, 3) if count and seconds > 0 else None
    out["actions_total"] = sum(m[0] for m in methods.values())
    out["action_errors"] = sum(m[1] for m in methods.values())
    out["action_latency"] = _ms(quantile(p.get("latency"), 0.95))
    out["http_latency"] = _ms(quantile(p.get("http"), 0.95))
    out["http_errors"] = p.get("http_errors", 0)
    out["memory_usage"] = p.get("memory_mb")
    out["scheduler_latency"] = _ms(quantile(lateness, 0.95))
    out["scheduler_latency_p50"] = _ms(quantile(lateness, 0.5))
    out["scheduler_latency_max"] = _ms(lateness.get("max") if lateness else None)
    out["fires_total"] = sum(fires.values())
    for outcome in FIRE_OUTCOMES:
        out[f"fires_{outcome}"] = fires.get(outcome, 0)
    out["duration_seconds"] = round(p["elapsed"], 3) if "elapsed" in p else None
    assert set(out) == set(METRICS), "every metric of the catalogue is measured"
    return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def report(
    run: dict[str, Any], metrics: dict[str, str], assertions: tuple[Assertion, ...]
) -> dict[str, Any]:
    """``{"metrics": {name: {"value", "unit"}}, "assertions": [...], "passed": bool}``."""
    measured = values(run)
    checked = [
        {
            "expr": a.expr,
            "metric": a.metric,
            "op": a.op,
            "threshold": a.threshold,
            "value": measured[a.metric],
            "passed": a.holds(measured[a.metric]),
        }
        for a in assertions
    ]
    return {
        "metrics": {
            name: {"value": measured[name], "unit": unit} for name, unit in metrics.items()
        },
        "assertions": checked,
        "passed": all(a["passed"] for a in checked),
    }


def sample(run: dict[str, Any], t: float) -> dict[str, Any]:
    """One point of a run's time series (the dashboard's live graphs and trends)."""
    v = values(run)
    return {
        "t": round(t, 3),
        **{
            k: v[k]
            for k in ("actions_total", "action_errors", "fires_total", "memory_usage")
            if v[k] is not None
        },
        **{k: v[k] for k in RATES if v[k] is not None},
    }
