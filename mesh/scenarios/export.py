"""A run's result and the run history as CSV (JSON is the API's own form).

Cells a spreadsheet would read as a formula (text starting with ``= + - @``, a tab or a carriage
return) are prefixed with ``'``: names, errors and parameters are user text.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from mesh.scenarios.model import METRICS

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def result_csv(view: dict[str, Any]) -> str:
    """Rows ``kind,name,value,unit,op,threshold,passed``: every metric, then every assertion."""
    rows: list[list[Any]] = [["kind", "name", "value", "unit", "op", "threshold", "passed"]]
    for name, m in view["metrics"].items():
        rows.append(["metric", name, m["value"], m["unit"], "", "", ""])
    for a in view["assertions"]:
        rows.append(
            ["assertion", a["expr"], a["value"], METRICS[a["metric"]][0], a["op"], a["threshold"],
             str(a["passed"]).lower()]
        )  # fmt: skip
    return _text(rows)


def runs_csv(views: list[dict[str, Any]]) -> str:
    """One row per run (the history, for trends): its status and every metric it reported."""
    names: list[str] = []
    for v in views:
        names.extend(n for n in v["metrics"] if n not in names)
    head = ["run_id", "name", "status", "started_at", "finished_at", *names]
    rows: list[list[Any]] = [head]
    for v in views:
        values = [(v["metrics"].get(n) or {}).get("value") for n in names]
        rows.append(
            [v["run_id"], v["name"], v["status"], v["started_at"], v["finished_at"], *values]
        )
    return _text(rows)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _text(rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()
