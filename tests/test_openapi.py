"""GET /api/openapi.json: the document describes exactly the routes the node serves, its
request bodies are the parsers' own Structs, and it is a valid OpenAPI document.

In-process (aiohttp's test server on a FakeReplica); the live mesh is fuzzed from this document
by tests/test_fuzz_api.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from mesh.api import schema as api_schema
from mesh.api.auth import required_role
from mesh.api.http import create_app
from mesh.api.openapi import SCENARIO_NAME, documented_routes, ecma_pattern, openapi_document
from mesh.api.schema import (
    BadRequest,
    parse_bulk_body,
    parse_job_body,
    parse_member_body,
    parse_schedule_body,
)
from mesh.dispatch.dispatcher import HandlerDispatcher
from mesh.dispatch.governors import Governors
from mesh.observability.state_db import AuditLog
from mesh.scenarios.http import add_scenario_routes
from mesh.scenarios.model import NAME_PATTERN
from mesh.scheduling.service import SchedulingService
from tests.fakes import FakeBus, FakeReplica


@pytest.fixture
async def service() -> AsyncIterator[tuple[FakeReplica, SchedulingService]]:
    replica = FakeReplica("n1")
    state = replica.state_machine
    dispatcher = HandlerDispatcher(replica, FakeBus(), replica, state, governors=Governors())
    service = SchedulingService(replica, state, dispatcher=dispatcher)
    try:
        yield replica, service
    finally:
        await service.close()


class NoImages:
    """An ``ImageSource`` for a route table: never asked for an image here."""

    async def state_image(self) -> Any:
        raise AssertionError("not asked in these tests")


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """``(METHOD, path)`` of every route; the HEAD aiohttp adds to each GET is not one."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def test_every_route_is_documented_and_every_documented_route_is_served(
    service: Any, tmp_path: Path
) -> None:
    replica, svc = service
    audit = AuditLog(tmp_path / "state.db")
    try:
        app = create_app(replica, replica, svc, audit=audit, images=NoImages())
        add_scenario_routes(app, svc)  # as mesh.app.add_scenarios does on every voter
        served = served_routes(app)
    finally:
        audit.close()
    assert served == documented_routes(), (
        f"served but not documented: {sorted(served - documented_routes())}; "
        f"documented but not served: {sorted(documented_routes() - served)}"
    )
    document = openapi_document()
    in_document = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert in_document == served


def test_a_node_without_the_scenario_suite_documents_no_scenario_route(service: Any) -> None:
    """A replica (no backup source, no suite) and any app the suite was not added to."""
    replica, svc = service
    served = served_routes(create_app(replica, replica, svc))
    assert served == documented_routes(audit=False, backup=False)
    assert not any(path.startswith("/api/tests") for _, path in served)
    assert documented_routes(scenarios=False) == documented_routes() - {
        r for r in documented_routes() if r[1].startswith("/api/tests")
    }


def test_the_scenario_routes_are_described_as_the_handlers_take_them() -> None:
    paths = openapi_document()["paths"]
    load = paths["/api/tests/load"]["post"]
    assert list(load["requestBody"]["content"]) == ["text/plain"]  # the YAML text itself
    assert load["x-required-role"] == "operate"
    assert paths["/api/tests/results/{run_id}"]["get"]["x-required-role"] == "read"
    csv_or_json = paths["/api/tests/runs"]["get"]["responses"]["200"]["content"]
    assert sorted(csv_or_json) == ["application/json", "text/csv"]
    stream = paths["/api/tests/metrics/{run_id}"]["get"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"]
    name = paths["/api/tests/library/{name}"]["get"]["parameters"][0]["schema"]["pattern"]
    assert name == SCENARIO_NAME == f"^{NAME_PATTERN}$"
    # A dashboard file's name keeps its own description.
    assert paths["/dashboard/{name}"]["get"]["parameters"][0]["description"] == "a file name"


def test_a_node_without_scheduling_documents_only_what_it_serves() -> None:
    replica = FakeReplica("n1")
    served = served_routes(create_app(replica, replica, None))
    assert served == documented_routes(scheduling=False, audit=False, backup=False)
    paths = openapi_document(scheduling=False, audit=False, backup=False)["paths"]
    assert "/api/schedules" not in paths and "/api/audit" not in paths
    assert "/api/backup" not in paths
    assert "/api/health" in paths


async def test_the_node_serves_the_document(service: Any) -> None:
    replica, svc = service
    async with TestClient(TestServer(create_app(replica, replica, svc))) as client:
        resp = await client.get("/api/openapi.json")
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == openapi_document(audit=False, backup=False)


def test_the_document_is_valid_openapi_and_every_operation_loads() -> None:
    schema = schemathesis.openapi.from_dict(openapi_document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == documented_routes()


def test_request_bodies_are_the_parsers_structs() -> None:
    """A field added to a body Struct appears in the document with nobody editing it."""
    schemas = openapi_document()["components"]["schemas"]
    structs = (api_schema.ScheduleBody, api_schema.BulkBody, api_schema.JobBody)
    for struct in (*structs, api_schema.MemberBody):
        fields = {f.encode_name for f in msgspec.structs.fields(struct)}
        assert set(schemas[struct.__name__]["properties"]) == fields
        assert schemas[struct.__name__]["additionalProperties"] is False
    # ``trigger`` is described as the union the trigger parser accepts, one body per type.
    mapping = schemas["Trigger"]["discriminator"]["mapping"]
    assert sorted(mapping) == sorted(api_schema.TRIGGER_TYPES)


def test_errors_roles_and_the_bearer_scheme_are_declared() -> None:
    document = openapi_document()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
    }
    paths = document["paths"]
    # Open, even with tokens: the health check, the metrics and the dashboard's own files.
    open_paths = ("/api/health", "/metrics", "/", "/dashboard/{name}")
    for path in open_paths:
        assert paths[path]["get"]["security"] == []
        assert required_role("GET", path.replace("{name}", "app.js")) is None
    roles = {}
    for path, ops in paths.items():
        for method, op in ops.items():
            if path in open_paths:
                continue
            assert {"401", "403"} <= set(op["responses"]), (method, path)
            roles[method.upper(), path] = op["x-required-role"]
            if "requestBody" in op:
                assert {"400", "408", "413", "503"} <= set(op["responses"]), (method, path)
    assert roles["GET", "/api/schedules"] == "read"
    assert roles["POST", "/api/schedules"] == "operate"
    assert roles["POST", "/api/cluster/members"] == "admin"
    assert roles["DELETE", "/api/cluster/members/{node_id}"] == "admin"
    assert roles["GET", "/api/audit"] == "admin"
    assert roles["POST", "/api/schedules/bulk"] == "operate"
    assert "409" in paths["/api/schedules"]["post"]["responses"]
    assert "404" in paths["/api/schedules/{id}"]["get"]["responses"]


def test_python_patterns_are_rewritten_for_ecma_262() -> None:
    task = ecma_pattern(r"^(?s:\S(?:.*\S)?)\Z")
    assert task == r"^(?:\S(?:[\s\S]*\S)?)$"
    assert ecma_pattern(r"^[A-Za-z0-9_.:-]{1,128}\Z") == r"^[A-Za-z0-9_.:-]{1,128}$"
    # The same strings match (Python's re reads the ECMA form alike, but for a final newline).
    for text, ok in (("a", True), ("a\nb", True), (" a", False), ("a ", False), ("", False)):
        assert bool(re.search(task, text)) is ok
    with pytest.raises(ValueError, match="no ECMA-262 rewrite"):
        ecma_pattern(r"^(?P<name>x)\Z")
    text = str(openapi_document())
    assert r"\Z" not in text and "(?s:" not in text


PARSERS = {
    ("POST", "/api/schedules"): parse_schedule_body,
    ("POST", "/api/schedules/bulk"): parse_bulk_body,
    ("POST", "/api/jobs"): parse_job_body,
    ("POST", "/api/cluster/members"): parse_member_body,
}


@pytest.mark.parametrize("route", sorted(PARSERS), ids=lambda r: f"{r[0]} {r[1]}")
def test_a_body_the_document_refuses_is_refused_by_the_parser(route: tuple[str, str]) -> None:
    """The document is never looser than the parser: schemathesis' negative bodies (wrong
    types, missing or unknown fields, values out of range) all get a BadRequest."""
    method, path = route
    operation = schemathesis.openapi.from_dict(openapi_document())[path][method]
    parse = PARSERS[route]
    strategy = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data: st.DataObject) -> None:
        case = data.draw(strategy)
        if not case.meta or not _body_is_negative(case):
            return  # this case breaks another part (a header, a parameter), not the body
        with pytest.raises(BadRequest):
            parse(case.body)

    check()


@pytest.mark.parametrize("route", sorted(PARSERS), ids=lambda r: f"{r[0]} {r[1]}")
def test_a_body_the_document_accepts_is_parsed_or_refused_clearly(route: tuple[str, str]) -> None:
    """What a type cannot say (cron syntax, time zones, end after start) the parser checks:
    a body valid for the document is parsed or refused with a BadRequest, nothing else."""
    method, path = route
    operation = schemathesis.openapi.from_dict(openapi_document())[path][method]
    parse = PARSERS[route]
    strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data: st.DataObject) -> None:
        case = data.draw(strategy)
        try:
            parse(case.body)
        except BadRequest:
            pass

    check()


def _body_is_negative(case: Any) -> bool:
    components = getattr(case.meta, "components", None) or {}
    for location, info in components.items():
        if "body" in str(location).lower():
            return getattr(info, "mode", None) == GenerationMode.NEGATIVE
    return False


def test_date_texts_carry_their_format() -> None:
    schemas = openapi_document()["components"]["schemas"]
    start = schemas["IntervalTriggerBody"]["properties"]["start_time"]["anyOf"][0]
    assert start["format"] == "date-time"
    assert schemas["DateTriggerBody"]["properties"]["run_time"]["format"] == "date-time"
    end = schemas["CalendarIntervalTriggerBody"]["properties"]["end_date"]["anyOf"][0]
    assert end["format"] == "date"
