"""The dashboard in a real headless Chromium against a live, secured 3-node mesh.

Debian's ``chromium`` (``.ci/run`` installs it) driven by Playwright. One mesh for the module:
three node processes with CURVE keys and an API tokens file, and one handler process running
``mesh.sample_tasks``. Each test opens a fresh browser context (its own session storage, so its
own token). The page is checked as a user sees it: the leader it names, rows that appear
without a reload, buttons that work, buttons a ``read`` token does not get, the new leader after
the old one is killed, no script or policy error in the console, keyboard navigation and a
phone-width layout.

``SCHEDULEZERO_SCREENSHOTS=DIR`` saves a screenshot of each page the tests visit into DIR, to
see what a failing test saw (the docs' screenshots come from ``make screenshots``:
tests/dashboard_screenshots.py).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.browser import CHROMIUM_ARGS, MISSING, chromium_path
from mesh.api.auth import ROLES, create_token
from tests.cluster import Cluster, HandlerProc

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=MISSING)
LIVE = 10_000  # ms: how long the page may take to show a change that already happened
SHOTS = os.environ.get("SCHEDULEZERO_SCREENSHOTS")


class Mesh:
    def __init__(self, cluster: Cluster, tokens: dict[str, str], handler: HandlerProc) -> None:
        self.cluster = cluster
        self.tokens = tokens
        self.handler = handler

    def api(self, method: str, path: str, body: Any = None, *, token: str = "admin") -> Any:
        """``(status, JSON)`` of a call to the leader's API, retried through an election."""
        deadline = time.monotonic() + 15
        while True:
            leader = self.cluster.wait_for_leader(timeout=15)
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(leader.http + path, data=data, method=method)
            request.add_header("Authorization", f"Bearer {self.tokens[token]}")
            request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    status, raw = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                status, raw = e.code, e.read()
            if status < 500 or time.monotonic() > deadline:
                return status, json.loads(raw) if raw else None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("dashboard")
    tokens_path = root / "tokens.json"
    tokens = {role: create_token(tokens_path, f"{role}-user", role) for role in ROLES}
    cluster = Cluster(root, 3, ("--api-tokens", str(tokens_path)), secure=True)
    keys = cluster.add_key("h1", "handler")
    handler = HandlerProc(
        "h1", [n.mesh for n in cluster.nodes], ["mesh.sample_tasks"], root / "h1", keys=keys
    )
    try:
        cluster.start()
        handler.start()
        yield Mesh(cluster, tokens, handler)
    finally:
        handler.stop()
        cluster.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
        try:
            yield b
        finally:
            b.close()


class Page:
    """A page of the dashboard, with the console errors it logged."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def go(self, route: str) -> None:
        self.page.locator(f"#nav-{route}").click()
        expect(self.page.locator(f"#nav-{route}")).to_have_attribute("aria-current", "page")

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.wait_for_timeout(300)  # let a chart or countdown draw
            self.page.screenshot(path=str(Path(SHOTS) / f"dashboard-{name}.png"))

    def script_errors(self) -> list[str]:
        """Errors but the network's (a 503 while a leader is elected is a network error)."""
        return [e for e in self.errors if "Failed to load resource" not in e]


@pytest.fixture
def open_page(browser: Any, mesh: Mesh) -> Iterator[Any]:
    contexts: list[Any] = []

    def open_(node_index: int = 0, *, token: str | None = "operate", width: int = 1280) -> Page:
        """The dashboard of node ``node_index``, its token (a role of ``mesh.tokens``) typed in
        the token field, once its live stream is up (``token=None``: nothing typed, no wait)."""
        context = browser.new_context(viewport={"width": width, "height": 800})
        contexts.append(context)
        page = Page(context.new_page())
        node = mesh.cluster.node(node_index)
        page.page.goto(node.http + "/#/overview")
        if token is not None:
            page.page.locator("#token-input").fill(mesh.tokens[token])
            page.page.locator("#token-save").click()
            live = page.page.locator("#live-status")
            expect(live).to_have_attribute("data-state", "live", timeout=LIVE)
        return page

    try:
        yield open_
    finally:
        for context in contexts:
            context.close()


def schedule(schedule_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": schedule_id,
        "task": "heartbeat",
        "trigger": {"type": "interval", "hours": 1},
        "kwargs": {"message": f"from {schedule_id}"},
        **extra,
    }


def row(page: Page, schedule_id: str) -> Any:
    return page.page.locator(f'#schedules-table tr[data-schedule-id="{schedule_id}"]')


# --------------------------------------------------------------------------- tests


def test_the_overview_shows_the_real_leader_and_term(open_page: Any, mesh: Mesh) -> None:
    leader = mesh.cluster.wait_for_leader()
    health = leader.health()
    assert health is not None
    page = open_page(1)
    expect(page.page.locator("#leader-id")).to_have_text(leader.node_id, timeout=LIVE)
    expect(page.page.locator("#term")).to_have_text(str(health["term"]), timeout=LIVE)
    page.shot("overview")
    assert page.script_errors() == []


def test_without_a_token_the_page_asks_for_one_and_shows_no_data(
    open_page: Any, mesh: Mesh
) -> None:
    page = open_page(0, token=None)
    expect(page.page.locator("#auth-message")).to_be_visible(timeout=LIVE)
    expect(page.page.locator("#auth-message")).to_contain_text("token")
    expect(page.page.locator("#live-status")).not_to_have_attribute("data-state", "live")
    # Typing a good token brings the page live without a reload.
    page.page.locator("#token-input").fill(mesh.tokens["read"])
    page.page.locator("#token-save").click()
    expect(page.page.locator("#live-status")).to_have_attribute("data-state", "live", timeout=LIVE)
    expect(page.page.locator("#auth-message")).to_be_hidden()


def test_a_schedule_created_through_the_api_appears_without_a_reload(
    open_page: Any, mesh: Mesh
) -> None:
    page = open_page(2)
    page.go("schedules")
    expect(page.page.locator("#schedules-table")).to_be_visible()
    status, body = mesh.api("POST", "/api/schedules", schedule("appears-live"))
    assert status == 201, body
    expect(row(page, "appears-live")).to_be_visible(timeout=LIVE)
    expect(row(page, "appears-live")).to_contain_text("heartbeat")
    expect(row(page, "appears-live")).to_contain_text("every 1h")
    page.shot("schedules")
    assert page.script_errors() == []


def test_run_now_and_pause_with_a_note_work_from_the_page(open_page: Any, mesh: Mesh) -> None:
    status, body = mesh.api("POST", "/api/schedules", schedule("from-the-page"))
    assert status == 201, body
    page = open_page(1)
    page.go("schedules")
    r = row(page, "from-the-page")
    expect(r).to_be_visible(timeout=LIVE)

    r.locator('[data-action="run"]').click()
    expect(page.page.locator("#toast")).to_contain_text(
        re.compile("job|started|triggered"), timeout=LIVE
    )
    # The run's result arrives on the executions page, live.
    page.go("executions")
    done = page.page.locator("#executions-table tr[data-job-id]", has_text="from-the-page")
    expect(done.first).to_contain_text("success", timeout=20_000)
    page.shot("executions")

    page.go("schedules")
    r = row(page, "from-the-page")
    r.locator('[data-action="pause"]').click()
    page.page.locator("#pause-note").fill("database migration")
    page.page.locator("#pause-confirm").click()
    expect(r).to_contain_text("paused", timeout=LIVE)
    expect(r).to_contain_text("database migration")
    status, got = mesh.api("GET", "/api/schedules/from-the-page")
    assert status == 200
    assert got["paused"] is True
    assert got["note"] == "database migration"

    r.locator('[data-action="resume"]').click()
    expect(r).not_to_contain_text("database migration", timeout=LIVE)
    assert mesh.api("GET", "/api/schedules/from-the-page")[1]["paused"] is False
    assert page.script_errors() == []


def test_run_now_triggers_and_the_backfill_form_backfills(open_page: Any, mesh: Mesh) -> None:
    hourly = {"type": "interval", "hours": 1, "start_time": "2024-01-01T00:00:00Z"}
    status, body = mesh.api("POST", "/api/schedules", schedule("runs", trigger=hourly, paused=True))
    assert status == 201, body
    page = open_page(2)
    page.go("schedules")
    r = row(page, "runs")
    expect(r).to_be_visible(timeout=LIVE)

    r.locator('[data-action="run"]').click()
    expect(page.page.locator("#toast")).to_contain_text("triggered runs: job", timeout=LIVE)
    r.locator('[data-action="backfill"]').click()
    page.page.locator("#backfill-start").fill("2024-01-01T00:00:00Z")
    page.page.locator("#backfill-end").fill("2024-01-01T03:00:00Z")
    page.page.locator("#backfill-confirm").click()
    expect(page.page.locator("#toast")).to_contain_text(
        "backfill of runs: 3 fire times, 0 already ran, 3 queued", timeout=LIVE
    )

    def keys() -> list[str]:
        got = mesh.api("GET", "/api/executions?schedule_id=runs")[1]["executions"]
        return sorted(ex["idempotency_key"] for ex in got)

    mesh.cluster.wait_for(lambda: len(keys()) >= 4, 20, "the trigger and three backfilled runs")
    assert keys()[:3] == [f"runs@2024-01-01T0{h}:00:00+00:00" for h in range(3)]
    assert keys()[3].endswith("#trigger")
    assert page.script_errors() == []


def test_the_editor_shows_and_edits_the_added_fields(open_page: Any, mesh: Mesh) -> None:
    body = schedule("limited", paused=True, remaining_runs=5, history={"keep_failed": 7})
    assert mesh.api("POST", "/api/schedules", body)[0] == 201
    page = open_page(0)
    page.go("schedules")
    r = row(page, "limited")
    expect(r).to_contain_text("5 runs left", timeout=LIVE)
    r.locator('[data-action="edit"]').click()
    controls = page.page.locator("#sf-controls")
    expect(controls).to_have_value(re.compile('"remaining_runs":5'))
    controls.fill('{"remaining_runs": 2, "history": {"keep_failed": 7}, "overlap": "skip"}')
    page.page.locator("#schedule-submit").click()
    expect(r).to_contain_text("2 runs left", timeout=LIVE)
    got = mesh.api("GET", "/api/schedules/limited")[1]
    assert (got["remaining_runs"], got["overlap"], got["history"]["keep_failed"]) == (2, "skip", 7)
    assert page.script_errors() == []


def test_the_apis_validation_error_is_shown_next_to_its_field_and_json_creates(
    open_page: Any, mesh: Mesh
) -> None:
    page = open_page(0)
    p = page.page
    page.go("schedules")
    p.locator("#schedule-new").click()
    expect(p.locator("#schedule-form")).to_be_visible()
    p.locator("#sf-id").fill("from-the-form")
    p.locator("#sf-task").fill("heartbeat")
    p.locator("#sf-trigger-type").select_option("cron")
    p.locator("#sf-cron-expr").fill("*/5 * * * *")
    p.locator("#sf-cron-tz").fill("Mars/Olympus")  # only the server knows the zone database
    p.locator("#schedule-submit").click()
    error = p.locator('#schedule-form .field-error[data-field="trigger"]')
    expect(error).to_contain_text("unknown timezone 'Mars/Olympus'", timeout=LIVE)
    assert mesh.api("GET", "/api/schedules/from-the-form")[0] == 404

    # Pasted JSON creates it; the form closes and the row appears.
    p.locator("#schedule-tab-json").click()
    p.locator("#schedule-json").fill(json.dumps(schedule("from-the-form")))
    p.locator("#schedule-submit").click()
    expect(row(page, "from-the-form")).to_be_visible(timeout=LIVE)
    assert mesh.api("GET", "/api/schedules/from-the-form")[0] == 200
    assert page.script_errors() == []


def test_a_read_token_sees_no_action_buttons(open_page: Any, mesh: Mesh) -> None:
    status, body = mesh.api("POST", "/api/schedules", schedule("look-only"))
    assert status in (201, 409), body
    page = open_page(0, token="read")
    page.go("schedules")
    expect(row(page, "look-only")).to_be_visible(timeout=LIVE)
    assert page.page.locator("[data-action]:visible").count() == 0
    for control in ("#schedule-new", "#bulk-pause", "#bulk-resume", ".check-col", "th.actions"):
        assert page.page.locator(f"{control}:visible").count() == 0, control
    assert page.script_errors() == []


def test_handlers_and_cluster_pages_show_the_live_mesh(open_page: Any, mesh: Mesh) -> None:
    page = open_page(0)
    page.go("handlers")
    card = page.page.locator('[data-handler-id="h1"]')
    expect(card).to_be_visible(timeout=LIVE)
    expect(card).to_contain_text("heartbeat")
    page.shot("handlers")
    page.go("cluster")
    for node in mesh.cluster.nodes:
        expect(page.page.locator("main")).to_contain_text(node.node_id)
    expect(page.page.locator("#event-log")).to_be_visible()
    page.shot("cluster")
    assert page.script_errors() == []


def test_the_pages_work_by_keyboard_and_fit_a_phone(open_page: Any) -> None:
    page = open_page(0, width=375)
    p = page.page
    for route in ("overview", "schedules", "executions", "handlers", "cluster"):
        p.locator(f"#nav-{route}").focus()
        p.keyboard.press("Enter")
        expect(p.locator(f"#nav-{route}")).to_have_attribute("aria-current", "page")
        overflow = p.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{route} is {overflow}px wider than a 375px screen"
    page.shot("phone")
    assert page.script_errors() == []


def test_killing_the_leader_updates_the_page_to_the_new_leader(open_page: Any, mesh: Mesh) -> None:
    cluster = mesh.cluster
    old = cluster.wait_for_leader()
    watcher = next(i for i, n in enumerate(cluster.nodes) if n is not old)
    page = open_page(watcher)
    expect(page.page.locator("#leader-id")).to_have_text(old.node_id, timeout=LIVE)
    term = old.health()["term"]
    old.kill()
    try:
        new = cluster.wait_for_leader(timeout=15, newer_than_term=term)
        expect(page.page.locator("#leader-id")).to_have_text(new.node_id, timeout=LIVE)
        expect(page.page.locator("#live-status")).to_have_attribute("data-state", "live")
        assert page.script_errors() == []
    finally:
        old.restart()
