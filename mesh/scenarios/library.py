"""The commands that load scenarios and queue runs, decided on the leader (docs/scenarios.md).

The state machine only stores what these commands carry: a scenario's validated definition, and
for a run every scenario it chains (``depends_on``, recursively) with the definition and the
parameters it runs with. A run is thereby fixed when it is queued: loading a new version of a
scenario later changes no queued or running run.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from mesh.scenarios import format
from mesh.scenarios.model import MAX_DEPENDS_ON, ScenarioError
from mesh.scheduling.scenariobook import ScenarioBook

_DEPENDENCY_NAMESPACE = uuid.UUID("0f6d7f5e-7a42-4d5e-9a41-3b8e51f4c2aa")
MAX_CHAIN = 20  # scenarios one run may chain, itself included


def load_command(text: str | bytes, *, by: str | None) -> dict[str, Any]:
    """``scenario_load`` for a YAML text; ``ScenarioError`` if it is not a valid scenario."""
    scenario = format.load(text)
    source = text.decode("utf-8") if isinstance(text, bytes) else text
    return {
        "op": "scenario_load",
        "name": scenario.name,
        "version": scenario.version,
        "description": scenario.description,
        "parameters": scenario.parameters,
        "depends_on": list(scenario.depends_on),
        "definition": scenario.definition,
        "source": source,
        "by": by,
    }


def start_command(
    book: ScenarioBook,
    name: str,
    parameters: Mapping[str, Any] | None,
    *,
    run_id: str,
    source: str,
    by: str | None,
    from_strings: bool = False,
) -> dict[str, Any]:
    """``scenario_start`` for a run of ``name`` with ``parameters`` (its dependencies run with
    their defaults, each once, before it); ``ScenarioError`` if it cannot run."""
    order = _chain(book, name)
    ids = {n: _dependency_run_id(run_id, n) for n in order[:-1]} | {name: run_id}
    runs = []
    for n in order:
        entry = book.library[n]
        scenario = format.from_definition(entry["definition"], entry["version"])
        given = parameters if n == name else None
        plan = format.plan(scenario, given, run_id=ids[n], from_strings=from_strings and n == name)
        runs.append(
            {
                "run_id": ids[n],
                "name": n,
                "version": entry["version"],
                "definition": entry["definition"],
                "parameters": plan.parameters,
                "depends_on": [ids[d] for d in entry["depends_on"]],
            }
        )
    return {"op": "scenario_start", "runs": runs, "source": source, "by": by}


def _chain(book: ScenarioBook, name: str) -> list[str]:
    """``name`` and every scenario it depends on, dependencies first (each once)."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(n: str, needed_by: str | None) -> None:
        if n in order:
            return
        if n in visiting:
            cycle = " → ".join([*visiting[visiting.index(n) :], n])
            raise ScenarioError(f"depends_on makes a cycle: {cycle}")
        entry = book.library.get(n)
        if entry is None:
            if needed_by is None:
                raise ScenarioError(f"no scenario {n!r} is loaded")
            raise ScenarioError(f"scenario {needed_by!r} depends on {n!r}, which is not loaded")
        visiting.append(n)
        for dep in entry["depends_on"][:MAX_DEPENDS_ON]:
            visit(dep, n)
        visiting.pop()
        order.append(n)
        if len(order) > MAX_CHAIN:
            raise ScenarioError(f"a run may chain at most {MAX_CHAIN} scenarios")

    visit(name, None)
    return order


def _dependency_run_id(run_id: str, name: str) -> str:
    return uuid.uuid5(_DEPENDENCY_NAMESPACE, f"{run_id}/{name}").hex[:16]
