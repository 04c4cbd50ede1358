"""The leader's alert sender (mesh.dispatch.alerts) against a real aiohttp receiver on 127.0.0.1:
headers and body, the idempotency key, retries with backoff, no redirect followed, the SSRF
guard, and the outbox confirmed through the log (a second leader sends what the first did not
confirm, with the same key)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import attrs
import msgspec
import pytest
from aiohttp import web

from mesh.config import NotifyConfig
from mesh.consensus.messages import COMMAND, Entry
from mesh.dispatch.alerts import AlertSender, redacted_url
from mesh.dispatch.webhook import WebhookError, WebhookRefused, WebhookServerError
from mesh.scheduling.state import SchedulerState

FAST = NotifyConfig(allow_private=True, timeout=2.0, max_attempts=4, backoff_initial=0.05,
                    backoff_max=0.2)  # fmt: skip
BODY = {"event": "failure", "schedule_id": "s", "idempotency_key": "k-1", "node": "n", "term": 3}


@attrs.define
class Receiver:
    url: str
    seen: list[dict[str, Any]]
    plan: list[int]  # statuses to answer, in order; then 200
    redirected: list[str]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver("", [], [], [])

    async def hook(request: web.Request) -> web.Response:
        rx.seen.append(
            {"headers": dict(request.headers), "body": await request.json(), "at": time.monotonic()}
        )
        status = rx.plan.pop(0) if rx.plan else 200
        if status == 307:
            raise web.HTTPTemporaryRedirect("/elsewhere")
        return web.Response(status=status, text=f"status {status}")

    async def elsewhere(request: web.Request) -> web.Response:
        rx.redirected.append(request.path)
        return web.Response(text="followed")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/elsewhere", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rx.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
    yield rx
    await runner.cleanup()


async def deliver(settings: NotifyConfig, url: str) -> int:
    async with aiohttp.ClientSession() as http:
        return await AlertSender(settings).deliver(http, url, dict(BODY))


async def test_an_alert_carries_its_idempotency_key_as_header_and_in_the_body(
    receiver: Receiver,
) -> None:
    assert await deliver(FAST, receiver.url) == 200
    [got] = receiver.seen
    assert got["headers"]["Idempotency-Key"] == "k-1"
    assert got["headers"]["Content-Type"].startswith("application/json")
    assert got["body"] == BODY


async def test_a_server_error_is_retried_with_backoff_under_the_same_key(
    receiver: Receiver,
) -> None:
    receiver.plan += [500, 503]
    assert await deliver(FAST, receiver.url) == 200
    assert [s["headers"]["Idempotency-Key"] for s in receiver.seen] == ["k-1"] * 3
    first, second, third = (s["at"] for s in receiver.seen)
    # tenacity's exponential wait: at least backoff_initial, then twice that (minus slack).
    assert second - first >= 0.04
    assert third - second >= 0.09


async def test_retries_are_bounded(receiver: Receiver) -> None:
    receiver.plan += [500] * 10
    with pytest.raises(WebhookServerError):
        await deliver(FAST, receiver.url)
    assert len(receiver.seen) == FAST.max_attempts


async def test_a_client_error_is_final(receiver: Receiver) -> None:
    receiver.plan.append(410)
    with pytest.raises(WebhookError):
        await deliver(FAST, receiver.url)
    assert len(receiver.seen) == 1


async def test_a_redirect_is_never_followed(receiver: Receiver) -> None:
    receiver.plan.append(307)
    with pytest.raises(WebhookRefused):
        await deliver(FAST, receiver.url)
    assert receiver.redirected == []
    assert len(receiver.seen) == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "[::1]"])
async def test_a_private_address_is_refused_unless_allowed(receiver: Receiver, host: str) -> None:
    url = receiver.url.replace("127.0.0.1", host)
    with pytest.raises(WebhookRefused):
        await deliver(NotifyConfig(allow_private=False, max_attempts=1), url)
    assert receiver.seen == []


def test_logs_show_a_webhook_url_without_credentials_or_query() -> None:
    url = "https://alice:s3cret@ops.example:8443/hooks/x?token=abc#frag"
    assert redacted_url(url) == "https://ops.example:8443/hooks/x"


# --------------------------------------------------------------------------- the sender loop


@attrs.define
class FakeSession:
    """A leader session whose proposals apply at once to ``state`` (a one-node log)."""

    state: SchedulerState
    term: int
    node_id: str = "n1"
    refuse: set[str] = attrs.Factory(set)  # ops whose commit fails (leadership lost)
    index: int = 1000

    async def propose(self, command: dict[str, Any]) -> Any:
        if command["op"] in self.refuse:
            raise RuntimeError("leadership lost while the write was pending")
        self.index += 1
        return self.state.apply(Entry(self.term, self.index, COMMAND, command))


def failing_run(state: SchedulerState, n: int) -> None:
    """``n`` failure records of schedule ``s`` (no notify of its own: the default applies)."""
    at = datetime(2026, 3, 1, tzinfo=UTC)
    for i in range(n):
        fire_time = (at + timedelta(seconds=i)).isoformat()
        ex = {"job_id": f"j{i}", "schedule_id": "s", "outcome": "error",
              "scheduled_fire_time": fire_time, "error": None}  # fmt: skip
        state._record(ex, Entry(1, 1, COMMAND, {}))


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_the_sender_commits_its_default_sends_the_outbox_and_confirms(
    receiver: Receiver,
) -> None:
    state = SchedulerState()
    settings = msgspec.structs.replace(FAST, webhook=receiver.url, on=("failure",))
    session = FakeSession(state, term=2)
    task = asyncio.create_task(AlertSender(settings).run(session))
    try:
        await wait_until(lambda: state.outbox.default is not None)
        failing_run(state, 3)
        await wait_until(lambda: not state.outbox.events)
    finally:
        task.cancel()
    assert state.outbox.sent == 3
    bodies = [s["body"] for s in receiver.seen]
    assert {(b["event"], b["node"], b["term"]) for b in bodies} == {("failure", "n1", 2)}
    assert len({b["idempotency_key"] for b in bodies}) == 3


async def test_a_new_leader_resends_what_was_not_confirmed_with_the_same_key(
    receiver: Receiver,
) -> None:
    state = SchedulerState()
    settings = msgspec.structs.replace(FAST, webhook=receiver.url, on=("failure",))
    old = FakeSession(state, term=2, refuse={"alerts_done"})  # delivers, cannot confirm
    await old.propose({"op": "notify_default", "notify": AlertSender(settings).default_json()})
    failing_run(state, 1)
    task = asyncio.create_task(AlertSender(settings).run(old))
    await wait_until(lambda: len(receiver.seen) == 1)
    task.cancel()
    assert len(state.outbox.events) == 1  # delivered, but not confirmed in the log
    task = asyncio.create_task(AlertSender(settings).run(FakeSession(state, term=3)))
    try:
        await wait_until(lambda: not state.outbox.events)
    finally:
        task.cancel()
    first, again = (s["headers"]["Idempotency-Key"] for s in receiver.seen)
    assert first == again
    assert [s["body"]["term"] for s in receiver.seen] == [2, 3]


async def test_an_alert_given_up_on_is_confirmed_as_failed(receiver: Receiver) -> None:
    state = SchedulerState()
    settings = msgspec.structs.replace(FAST, webhook=receiver.url, on=("failure",), max_attempts=2)
    receiver.plan += [500, 500]
    task = asyncio.create_task(AlertSender(settings).run(FakeSession(state, term=2)))
    try:
        await wait_until(lambda: state.outbox.default is not None)
        failing_run(state, 1)
        await wait_until(lambda: not state.outbox.events)
    finally:
        task.cancel()
    assert (state.outbox.sent, state.outbox.failed) == (0, 1)
