"""The dashboard's screenshots for the docs: ``make screenshots`` (``python -m
tests.dashboard_screenshots [DIR]``, default docs/img).

A live, secured 3-node mesh with two handler processes and a dozen schedules is left to fire
for a while (so the charts and the execution history have something to show), and a small
scenario is loaded and run a few times (the Tests page's library, history and trends); then each
page is taken at 1280x800 in headless Chromium, the schedules page also at phone width, and one
page from a ``read`` token (no action buttons). Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.browser import CHROMIUM_ARGS, MISSING, chromium_path
from mesh.api.auth import create_token
from tests.cluster import Cluster, HandlerProc

SCHEDULES: list[dict[str, Any]] = [
    {"id": "heartbeat-2s", "trigger": {"type": "interval", "seconds": 2}},
    {"id": "heartbeat-3s", "trigger": {"type": "interval", "seconds": 3}},
    {"id": "metrics-rollup", "trigger": {"type": "interval", "seconds": 5}},
    {"id": "cache-warmup", "trigger": {"type": "interval", "seconds": 7}},
    {"id": "invoice-run", "trigger": {"type": "cron", "expr": "0 2 * * *", "timezone": "UTC"}},
    {"id": "weekly-report", "trigger": {"type": "cron", "expr": "0 9 * * 1"}},
    {"id": "cleanup-tmp", "trigger": {"type": "interval", "minutes": 15}},
    {"id": "db-backup", "trigger": {"type": "interval", "hours": 6}},
    {"id": "monthly-bill", "trigger": {"type": "calendarinterval", "months": 1, "hour": 4}},
    # A sync task given bad arguments: its runs fail, so the page has errors to show.
    {
        "id": "failing-sync",
        "task": "add",
        "args": ["x", 1],
        "kwargs": {},
        "trigger": {"type": "interval", "seconds": 4},
    },
]
PAUSED = ("db-backup", "paused while the backup volume is replaced")
SCENARIO = """\
test:
  name: schedule_churn
  description: "Create, keep and delete a batch of schedules"
  parameters:
    count: 20
    keep_seconds: 1
  steps:
    - name: create
      type: loop
      iterations: ${count}
      action:
        method: create_schedule
        args: {task_id: noop, trigger: {type: interval, seconds: 60}}
    - name: keep
      type: sleep
      duration: ${keep_seconds}
    - name: delete
      type: loop
      iterations: ${count}
      action: {method: delete_schedule}
  metrics:
    - creation_rate: schedules/sec
    - deletion_rate: schedules/sec
  assertions:
    - creation_rate > 10
"""
SCENARIO_COUNTS = (10, 20, 40, 80)
PAGES = ("overview", "schedules", "executions", "handlers", "cluster", "tests")


def call(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def run_scenarios(base: str, token: str) -> str:
    """Loads SCENARIO and runs it once per SCENARIO_COUNTS, one after the other; returns the
    last run's id (its live view is the tests page's picture)."""
    req = urllib.request.Request(base + "/api/tests/load", data=SCENARIO.encode(), method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "text/yaml")
    with urllib.request.urlopen(req, timeout=10):
        pass
    run_id = ""
    for count in SCENARIO_COUNTS:
        body = {"name": "schedule_churn", "parameters": {"count": count}}
        run_id = call(base, token, "POST", "/api/tests/run", body)["run_id"]
        deadline = time.monotonic() + 60
        while call(base, token, "GET", f"/api/tests/results/{run_id}")["status"] in (
            "queued",
            "running",
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"scenario run {run_id} did not finish in 60 s")
            time.sleep(0.3)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.dashboard_screenshots")
    parser.add_argument("out", nargs="?", default="docs/img", type=Path)
    parser.add_argument("--fire-seconds", type=float, default=45.0)
    args = parser.parse_args(argv)
    chromium = chromium_path()
    if chromium is None:
        print(MISSING, file=sys.stderr)
        return 2
    from playwright.sync_api import expect, sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sz-shots-") as tmp:
        root = Path(tmp)
        tokens_path = root / "tokens.json"
        admin = create_token(tokens_path, "ops", "admin")
        reader = create_token(tokens_path, "viewer", "read")
        cluster = Cluster(root, 3, ("--api-tokens", str(tokens_path)), secure=True)
        handlers = []
        for name in ("worker-a", "worker-b"):
            keys = cluster.add_key(name, "handler")
            handlers.append(
                HandlerProc(
                    name,
                    [n.mesh for n in cluster.nodes],
                    ["mesh.sample_tasks"],
                    root / name,
                    keys=keys,
                )
            )
        try:
            cluster.start()
            for h in handlers:
                h.start()
            leader = cluster.wait_for_leader()
            for spec in SCHEDULES:
                body = {"task": "heartbeat", "kwargs": {"message": spec["id"]}, **spec}
                call(leader.http, admin, "POST", "/api/schedules", body)
            call(
                leader.http, admin, "POST", f"/api/schedules/{PAUSED[0]}/pause", {"note": PAUSED[1]}
            )
            print(f"firing for {args.fire_seconds:.0f}s ...", flush=True)
            time.sleep(args.fire_seconds)
            last_run = run_scenarios(leader.http, admin)
            follower = next(n for n in cluster.nodes if n is not leader)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))

                def page_for(token: str, width: int = 1280, height: int = 800) -> Any:
                    context = browser.new_context(viewport={"width": width, "height": height})
                    context.add_init_script(
                        f"sessionStorage.setItem('schedulezero.token', {json.dumps(token)})"
                    )
                    page = context.new_page()
                    page.goto(follower.http + "/#/overview")
                    expect(page.locator("#live-status")).to_have_attribute(
                        "data-state", "live", timeout=15_000
                    )
                    return page

                page = page_for(admin)
                for route in PAGES:
                    page.locator(f"#nav-{route}").click()
                    page.wait_for_timeout(1500)
                    page.screenshot(path=str(args.out / f"dashboard-{route}.png"))
                    print(f"saved {args.out / f'dashboard-{route}.png'}", flush=True)
                page.goto(follower.http + f"/#/tests?run={last_run}")
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out / "dashboard-tests-run.png"))
                print(f"saved {args.out / 'dashboard-tests-run.png'}", flush=True)
                phone = page_for(admin, width=390, height=844)
                phone.locator("#nav-schedules").click()
                phone.wait_for_timeout(1500)
                phone.screenshot(path=str(args.out / "dashboard-phone.png"))
                read_only = page_for(reader)
                read_only.locator("#nav-schedules").click()
                read_only.wait_for_timeout(1500)
                read_only.screenshot(path=str(args.out / "dashboard-read-token.png"))
                browser.close()
        finally:
            for h in handlers:
                h.stop()
            cluster.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
