"""Schema-driven fuzzing of a live mesh, from the API's own OpenAPI document.

Schemathesis turns ``GET /api/openapi.json`` into Hypothesis strategies: valid requests
(positive) and requests that break the document on purpose (negative: wrong types, missing or
unknown fields, out-of-range values). Each request goes to a node drawn at random, so follower
forwarding is fuzzed too; ids of schedules and jobs created along the way are reused as path
parameters, so requests also reach existing objects. Bounded by a request count, a wall-clock
budget and a per-request timeout: it always stops by itself.

Findings:
- ``server error``: any 5xx (the mesh is healthy throughout, so even a 503 is a bug);
- ``no answer``: no response within the per-request timeout, or the connection failed;
- ``not as documented``: a status, content type or body that the document does not describe.

``make fuzz`` runs the long campaign (``python -m tests.fuzz_api``); tests/test_fuzz_api.py a
short one inside ``make test``. See docs/testing.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.cluster import Cluster, NodeProcess

REQUEST_TIMEOUT = 15.0  # a write may wait 3 s for a leader, then 5 s for its commit
CONFORMANCE_CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SERVER_ERROR_MARK = "unhandled error serving"  # what mesh.api.http logs with each 500
# Node ids the generator will not hit by chance: removing a real voter is a legitimate admin
# request, after which a leader change would be no bug.
VOTER_PREFIX = "fuzz-voter-"


class _OutOfBudget(Exception):
    """The request count or the time is used up."""


@attrs.define
class Finding:
    kind: str  # "server error" | "no answer" | "not as documented"
    method: str
    route: str  # the documented path, e.g. /api/schedules/{id}
    path: str
    status: int | None
    detail: str
    curl: str

    def __str__(self) -> str:
        status = f" -> {self.status}" if self.status is not None else ""
        return f"[{self.kind}] {self.method} {self.path}{status}: {self.detail}\n    {self.curl}"


@attrs.define
class FuzzReport:
    seed: int
    requests: int = 0
    seconds: float = 0.0
    by_status: dict[int, int] = attrs.field(factory=dict)
    by_operation: dict[str, dict[int, int]] = attrs.field(factory=dict)
    findings: list[Finding] = attrs.field(factory=list)
    # From the nodes' stderr: the first and last line of each logged traceback.
    tracebacks: list[str] = attrs.field(factory=list)

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.by_status.items()))
        lines = [
            f"fuzz seed {self.seed}: {self.requests} requests in {self.seconds:.1f}s "
            f"({statuses}); {len(self.findings)} findings"
        ]
        for operation, counts in sorted(self.by_operation.items()):
            lines.append(
                f"  {operation}: " + ", ".join(f"{s}: {n}" for s, n in sorted(counts.items()))
            )
        seen: set[tuple[str, str, str, int | None]] = set()
        for f in self.findings:  # one line per kind of finding on one operation and status
            key = (f.kind, f.method, f.route, f.status)
            if key not in seen:
                seen.add(key)
                lines.append(str(f))
        if self.tracebacks:
            lines.append("node tracebacks:")
            lines.extend(f"  {t}" for t in self.tracebacks)
        return "\n".join(lines)


def load_operations(base_url: str) -> list[Any]:
    """The operations of the document that the node at ``base_url`` serves, but the streams
    (``text/event-stream``: an answer that never ends is no finding; tests/test_events_sse.py)."""
    document = requests.get(f"{base_url}/api/openapi.json", timeout=REQUEST_TIMEOUT).json()
    for ops in document["paths"].values():
        for method in [m for m, op in ops.items() if _streams(op)]:
            del ops[method]
    schema = schemathesis.openapi.from_dict(document)
    return [result.ok() for result in schema.get_all_operations()]


def _streams(operation: dict[str, Any]) -> bool:
    ok = operation.get("responses", {}).get("200", {})
    return "text/event-stream" in ok.get("content", {})


def fuzz(
    urls: Sequence[str],
    *,
    requests_max: int,
    seconds: float,
    fuzz_seed: int,
    headers: dict[str, str] | None = None,
) -> FuzzReport:
    """Send up to ``requests_max`` generated requests (stopping after ``seconds``) to the nodes
    at ``urls``; every answer is checked, nothing raises for a finding."""
    operations = load_operations(urls[0])
    report = FuzzReport(seed=fuzz_seed)
    sessions = {url: requests.Session() for url in urls}
    known: dict[str, list[str]] = {"id": [], "job_id": []}
    rng = random.Random(fuzz_seed)
    started = time.monotonic()
    deadline = started + seconds

    @settings(
        max_examples=requests_max,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @seed(fuzz_seed)
    @given(st.data())
    def one_request(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations))
        mode = data.draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))
        case = data.draw(operation.as_strategy(generation_mode=mode))
        # Stop only after drawing: Hypothesis insists that every run draws alike.
        if report.requests >= requests_max or time.monotonic() >= deadline:
            raise _OutOfBudget
        for name, ids in known.items():
            if ids and name in (case.path_parameters or {}) and rng.random() < 0.5:
                case.path_parameters[name] = rng.choice(ids)
        url = rng.choice(urls)
        _send(case, url, sessions[url], report, known, headers or {})

    try:
        one_request()
    except _OutOfBudget:
        pass
    finally:
        for session in sessions.values():
            session.close()
        report.seconds = time.monotonic() - started
    return report


def _send(
    case: Any,
    url: str,
    session: requests.Session,
    report: FuzzReport,
    known: dict[str, list[str]],
    headers: dict[str, str],
) -> None:
    report.requests += 1
    method, route, path = case.method.upper(), case.operation.path, case.formatted_path
    curl = case.as_curl_command(headers=headers, base_url=url)
    try:
        response = case.call(
            base_url=url, session=session, headers=headers, timeout=REQUEST_TIMEOUT
        )
    except requests.RequestException as e:
        report.findings.append(
            Finding("no answer", method, route, path, None, type(e).__name__, curl)
        )
        return
    status = response.status_code
    report.by_status[status] = report.by_status.get(status, 0) + 1
    counts = report.by_operation.setdefault(f"{method} {route}", {})
    counts[status] = counts.get(status, 0) + 1
    if status >= 500:
        detail = response.text[:300]
        report.findings.append(Finding("server error", method, route, path, status, detail, curl))
        return
    try:
        case.validate_response(response, checks=CONFORMANCE_CHECKS, headers=headers)
    except (AssertionError, FailureGroup) as e:  # one failure, or a group of them
        detail = " ".join(str(e).split())[:400]
        report.findings.append(
            Finding("not as documented", method, route, path, status, detail, curl)
        )
    if status in (201, 202):
        body = response.json()
        if status == 201 and isinstance(body.get("id"), str):
            known["id"].append(body["id"])
        if status == 202 and isinstance(body.get("job_id"), str):
            known["job_id"].append(body["job_id"])


def node_tracebacks(nodes: Sequence[NodeProcess]) -> list[str]:
    """For each 500 a node logged: its node, the request line and the traceback's last line."""
    out = []
    for node in nodes:
        try:
            lines = node.stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            continue
        for i, line in enumerate(lines):
            if SERVER_ERROR_MARK not in line:
                continue
            last = next(
                (
                    lines[j]
                    for j in range(i + 1, len(lines))
                    if lines[j] and not lines[j].startswith((" ", "Traceback", "During", "The "))
                ),
                "?",
            )
            out.append(f"{node.node_id}: {line.split(SERVER_ERROR_MARK)[-1].strip()}: {last}")
    return out


@attrs.define
class Campaign:
    report: FuzzReport
    leader_before: tuple[str, int]
    leader_after: tuple[str, int] | None
    leader_answers: bool
    nodes_exited: list[str]

    def summary(self) -> str:
        after = self.leader_after or "none"
        return (
            f"{self.report.summary()}\nleader before: {self.leader_before}, after: {after}, "
            f"answers: {self.leader_answers}, exited: {self.nodes_exited or 'none'}"
        )


def run_campaign(
    cluster: Cluster, *, requests_max: int, seconds: float, fuzz_seed: int
) -> Campaign:
    """Fuzz a started cluster, then see that its leader is the same and still answers."""
    leader = cluster.wait_for_leader(timeout=20.0)
    health = leader.health()
    assert health is not None
    before = (leader.node_id, health["term"])
    report = fuzz(
        [n.http for n in cluster.nodes],
        requests_max=requests_max,
        seconds=seconds,
        fuzz_seed=fuzz_seed,
    )
    report.tracebacks = node_tracebacks(cluster.nodes)
    now = cluster.leader_now()
    after_health = now.health(timeout=2.0) if now is not None else None
    after = (now.node_id, after_health["term"]) if now and after_health else None
    return Campaign(
        report=report,
        leader_before=before,
        leader_after=after,
        leader_answers=after_health is not None,
        nodes_exited=[n.node_id for n in cluster.nodes if not n.running],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_api", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000, help="at most this many requests")
    parser.add_argument("--seconds", type=float, default=900.0, help="stop after this long")
    parser.add_argument("--seed", type=int, default=None, help="reproduce a campaign")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' directories")
    args = parser.parse_args(argv)
    fuzz_seed = args.seed if args.seed is not None else random.randrange(2**32)
    root = Path(tempfile.mkdtemp(prefix="schedulezero-fuzz-"))
    cluster = Cluster(root, 3, id_prefix=VOTER_PREFIX)
    try:
        cluster.start()
        campaign = run_campaign(
            cluster, requests_max=args.requests, seconds=args.seconds, fuzz_seed=fuzz_seed
        )
    finally:
        cluster.stop_all()
    print(campaign.summary())
    print(f"nodes' logs: {root}" if args.keep else "(--keep keeps the nodes' logs)")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    ok = (
        not campaign.report.findings
        and campaign.leader_after == campaign.leader_before
        and campaign.leader_answers
        and not campaign.nodes_exited
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
