"""The dashboard's Tests page in a real headless Chromium against a live, secured 3-node mesh.

The mesh, the browser and the pages are those of tests/test_dashboard_browser.py (its fixtures,
one mesh for this module). A scenario is loaded through the page's dialog, run with a changed
parameter, followed live until it passed, and found in the history; the node's error for a bad
scenario is shown as it is; hostile text (a description that is an ``<img onerror>``) stays text;
a ``read`` token gets no action button.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.test_dashboard_browser import (
    CHROMIUM,
    LIVE,
    MISSING,
    Mesh,
    Page,
    browser,
    mesh,
    open_page,
)

__all__ = ["browser", "mesh", "open_page"]  # the fixtures, used by name

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason=MISSING), pytest.mark.timeout(180)]
RUN = 30_000  # ms: how long a tiny scenario may take from "Run" to its end

TINY = """\
test:
  name: {name}
  description: "Create and delete a few schedules"
  parameters:
    count: 5
    pause: 0.2
    verbose: false
  steps:
    - name: create
      type: loop
      iterations: ${{count}}
      action:
        method: create_schedule
        args: {{task_id: noop, trigger: {{type: interval, seconds: 60}}}}
    - name: wait
      type: sleep
      duration: ${{pause}}
    - name: delete
      type: loop
      iterations: ${{count}}
      action: {{method: delete_schedule}}
  metrics:
    - creation_rate: schedules/sec
  assertions:
    - creation_rate > 0
"""

SLOW = """\
test:
  name: slow_sleep
  steps:
    - name: nap
      type: sleep
      duration: 60
"""

HOSTILE_DESCRIPTION = "<img src=x onerror=\"window.__xss = 'description'\">"
HOSTILE = f"""\
test:
  name: hostile
  description: {json.dumps(HOSTILE_DESCRIPTION)}
  parameters:
    label: "<b onmouseover=\\"window.__xss = 'parameter'\\">bold</b>"
  steps:
    - type: sleep
      duration: 0
"""


def load_yaml(mesh: Mesh, text: str) -> dict[str, Any]:
    """POST /api/tests/load on the leader with the admin token (the page's own way is tested
    through its dialog)."""
    leader = mesh.cluster.wait_for_leader(timeout=15)
    request = urllib.request.Request(
        leader.http + "/api/tests/load", data=text.encode(), method="POST"
    )
    request.add_header("Authorization", f"Bearer {mesh.tokens['admin']}")
    request.add_header("Content-Type", "text/yaml")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 201
        return json.loads(resp.read())


def open_tests_page(open_page: Any, *, token: str = "operate") -> Page:
    page = open_page(0, token=token)
    page.go("tests")
    expect(page.page.locator("#tests-library")).to_be_visible()
    return page


def scenario_row(page: Page, name: str) -> Any:
    return page.page.locator(f'#tests-library tr[data-scenario="{name}"]')


def load_in_dialog(page: Page, text: str) -> None:
    p = page.page
    p.locator("#tests-load").click()
    expect(p.locator("#tests-load-yaml")).to_be_visible()
    p.locator("#tests-load-yaml").fill(text)
    p.locator("#tests-load-submit").click()


# --------------------------------------------------------------------------- tests


def test_a_scenario_loaded_and_run_from_the_page_passes_live_and_is_in_the_history(
    open_page: Any, mesh: Mesh
) -> None:
    page = open_tests_page(open_page)
    p = page.page
    load_in_dialog(page, TINY.format(name="tiny_storm"))
    expect(p.locator("#tests-load-yaml")).to_be_hidden(timeout=LIVE)
    row = scenario_row(page, "tiny_storm")
    expect(row).to_contain_text("Create and delete a few schedules", timeout=LIVE)
    expect(row).to_contain_text("count=5")

    # The run form is prefilled with the defaults, typed; one is changed.
    row.locator('[data-action="run"]').click()
    expect(p.locator("#tests-param-count")).to_have_value("5")
    expect(p.locator("#tests-param-pause")).to_have_value("0.2")
    expect(p.locator("#tests-param-verbose")).not_to_be_checked()
    p.locator("#tests-param-count").fill("3")
    p.locator("#tests-run-submit").click()

    # The live view opens on the new run and follows it to its end.
    live = p.locator("#tests-live")
    expect(live).to_be_visible(timeout=LIVE)
    run_id = live.get_attribute("data-run-id")
    assert run_id and re.fullmatch(r"[0-9a-f]{16}", run_id), run_id
    expect(p.locator("#tests-live-status")).to_have_text("passed", timeout=RUN)
    expect(p.locator("#tests-live-name")).to_have_text("tiny_storm")
    expect(p.locator('#tests-live-metrics tr[data-metric="creation_rate"]')).to_contain_text(
        "schedules/sec"
    )
    expect(p.locator('#tests-live-metrics tr[data-metric="actions_total"]')).to_contain_text("6")
    assertion = p.locator('#tests-live-assertions tr[data-passed="true"]')
    expect(assertion).to_contain_text("creation_rate > 0")
    expect(assertion).to_contain_text("pass")
    expect(p.locator("#tests-live-step")).to_have_text("all 3 steps done")
    expect(p.locator("#tests-cancel")).to_be_hidden()
    status, result = mesh.api("GET", f"/api/tests/results/{run_id}")
    assert status == 200, result
    assert result["parameters"]["count"] == 3  # sent as a number, not "3"
    assert result["parameters"]["verbose"] is False

    # The results export, fetched with the token.
    with p.expect_download() as info:
        p.locator("#tests-export-csv").click()
    csv_text = Path(info.value.path()).read_text()
    assert csv_text.startswith("kind,name,value,unit,op,threshold,passed\n")
    assert "assertion,creation_rate > 0," in csv_text

    # The history has it (and the library its last status), after the run ended, with a trend.
    history_row = p.locator(f'#tests-history tr[data-run-id="{run_id}"]')
    expect(history_row).to_contain_text("passed", timeout=LIVE)
    expect(history_row).to_contain_text("tiny_storm")
    expect(history_row).to_contain_text("1/1 held")
    expect(row).to_contain_text("passed")
    expect(p.locator("#tests-trend-metric")).to_have_value("creation_rate")
    expect(p.locator('#tests-trends [data-scenario="tiny_storm"] circle')).to_have_count(1)
    page.shot("tests")
    assert page.script_errors() == []


def test_the_nodes_error_for_a_bad_scenario_is_shown_as_text_in_the_dialog(
    open_page: Any,
) -> None:
    page = open_tests_page(open_page)
    p = page.page
    load_in_dialog(page, 'test:\n  name: bad\n  "<img src=x onerror=window.__xss=1>": 1\n')
    error = p.locator("#tests-load-error")
    expect(error).to_contain_text("<img src=x onerror=window.__xss=1>", timeout=LIVE)
    assert p.locator("#tests-load img").count() == 0
    expect(p.locator("#tests-load-yaml")).to_be_visible()  # still open, to fix the text
    p.keyboard.press("Escape")
    expect(p.locator("#tests-load-yaml")).to_be_hidden()
    assert p.evaluate("window.__xss") is None
    assert page.script_errors() == []


def test_a_hostile_description_and_parameter_are_rendered_as_text(
    open_page: Any, mesh: Mesh
) -> None:
    load_yaml(mesh, HOSTILE)
    page = open_tests_page(open_page)
    p = page.page
    row = scenario_row(page, "hostile")
    expect(row.locator(".description-cell")).to_have_text(HOSTILE_DESCRIPTION, timeout=LIVE)
    expect(row).to_contain_text("<b onmouseover=")
    assert p.locator("main img, main b").count() == 0
    row.locator('[data-action="run"]').click()
    expect(p.locator("#tests-param-label")).to_have_value(
        "<b onmouseover=\"window.__xss = 'parameter'\">bold</b>"
    )
    assert p.locator("#tests-run b").count() == 0
    p.keyboard.press("Escape")
    assert p.evaluate("window.__xss") is None
    assert page.script_errors() == []


def test_cancel_in_the_live_view_cancels_the_run(open_page: Any, mesh: Mesh) -> None:
    load_yaml(mesh, SLOW)
    page = open_tests_page(open_page)
    p = page.page
    scenario_row(page, "slow_sleep").locator('[data-action="run"]').click()
    p.locator("#tests-run-submit").click()
    expect(p.locator("#tests-live-status")).to_have_text("running", timeout=RUN)
    p.locator("#tests-cancel").click()
    expect(p.locator("#tests-live-status")).to_have_text("cancelled", timeout=RUN)
    expect(p.locator("#tests-cancel")).to_be_hidden()
    assert page.script_errors() == []


def test_the_schedule_dialog_schedules_the_scenario(open_page: Any, mesh: Mesh) -> None:
    load_yaml(mesh, TINY.format(name="nightly_tiny"))
    page = open_tests_page(open_page)
    p = page.page
    scenario_row(page, "nightly_tiny").locator('[data-action="schedule"]').click()
    p.locator("#tests-trigger-type").select_option("cron")
    p.locator("#tests-trigger-cron").fill("0 3 * * *")
    p.locator("#tests-schedule-submit").click()
    expect(p.locator("#toast")).to_contain_text("scenario-nightly_tiny", timeout=LIVE)
    status, got = mesh.api("GET", "/api/schedules/scenario-nightly_tiny")
    assert status == 200, got
    assert got["kwargs"]["name"] == "nightly_tiny"
    assert page.script_errors() == []


def test_a_read_token_sees_the_tests_page_without_actions(open_page: Any, mesh: Mesh) -> None:
    load_yaml(mesh, TINY.format(name="read_only_tiny"))
    status, body = mesh.api("POST", "/api/tests/run", {"name": "read_only_tiny"})
    assert status == 202, body
    page = open_tests_page(open_page, token="read")
    p = page.page
    expect(scenario_row(page, "read_only_tiny")).to_be_visible(timeout=LIVE)
    assert p.locator("[data-action]:visible").count() == 0
    assert p.locator("#tests-load:visible, th.actions:visible").count() == 0
    p.goto(p.url.split("#")[0] + f"#/tests?run={body['run_id']}")
    expect(p.locator("#tests-live")).to_be_visible(timeout=LIVE)
    expect(p.locator("#tests-live-name")).to_have_text("read_only_tiny", timeout=LIVE)
    assert p.locator("#tests-cancel:visible").count() == 0
    expect(p.locator("#tests-export-json")).to_be_visible()
    assert page.script_errors() == []


def test_the_tests_page_and_a_run_fit_a_phone(open_page: Any, mesh: Mesh) -> None:
    load_yaml(mesh, TINY.format(name="phone_tiny"))
    status, body = mesh.api("POST", "/api/tests/run", {"name": "phone_tiny"})
    assert status == 202, body
    page = open_page(0, width=375)
    p = page.page
    p.goto(p.url.split("#")[0] + f"#/tests?run={body['run_id']}")
    expect(p.locator("#tests-live-status")).to_have_text("passed", timeout=RUN)
    expect(p.locator('#tests-library tr[data-scenario="phone_tiny"]')).to_be_visible()
    overflow = p.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"the tests page is {overflow}px wider than a 375px screen"
    page.shot("tests-phone")
    assert page.script_errors() == []
