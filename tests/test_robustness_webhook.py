"""The webhook task's guards, against real HTTP servers on 127.0.0.1: private targets refused
unless the handler allows them, redirects not followed unless asked, a response read only up to
its cap, and a timeout always."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from aiohttp import web

import mesh.dispatch.webhook as webhook_module
from mesh.dispatch.webhook import ALLOW_PRIVATE_ENV, MAX_RESPONSE_BYTES, WebhookRefused
from mesh.tasks import REGISTRY, JobContext

CTX = JobContext(
    job_id="j1",
    task="webhook",
    schedule_id="s1",
    scheduled_fire_time=datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
    idempotency_key="s1@2026-11-23T10:00:00+00:00",
    attempt=1,
    fencing_token=7,
)


@pytest.fixture
async def server():
    hits: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="hello")

    async def moved(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPFound("/hook")

    async def endless(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"z" * (2 * MAX_RESPONSE_BYTES))
        await asyncio.sleep(3600)  # never ends its body
        return resp

    async def silent(request: web.Request) -> web.Response:
        hits.append(request.path)
        await asyncio.sleep(3600)
        return web.Response()

    app = web.Application()
    for path, fn in (
        ("/hook", hook),
        ("/moved", moved),
        ("/endless", endless),
        ("/silent", silent),
    ):
        app.router.add_post(path, fn)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", hits
    await runner.cleanup()


async def run(**kwargs):
    return await REGISTRY["webhook"].run(CTX, (), kwargs)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.1.2.3"])
async def test_a_private_target_is_refused_by_default(server, monkeypatch, host) -> None:
    monkeypatch.delenv(ALLOW_PRIVATE_ENV, raising=False)
    base, hits = server
    port = base.rsplit(":", 1)[1]
    with pytest.raises(WebhookRefused, match="private"):
        await run(url=f"http://{host}:{port}/hook", retries=0, timeout=1)
    assert hits == []


async def test_a_private_target_is_called_when_the_handler_allows_it(server, monkeypatch) -> None:
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")
    base, hits = server
    assert (await run(url=f"{base}/hook", retries=0))["body"] == "hello"
    assert hits == ["/hook"]


async def test_a_redirect_is_not_followed_unless_asked(server, monkeypatch) -> None:
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")
    base, hits = server
    with pytest.raises(WebhookRefused, match="follow_redirects"):
        await run(url=f"{base}/moved", retries=0)
    assert hits == ["/moved"]
    result = await run(url=f"{base}/moved", retries=0, follow_redirects=True)
    assert result == {"status": 200, "body": "hello"}
    assert hits == ["/moved", "/moved", "/hook"]


async def test_only_the_first_bytes_of_an_endless_answer_are_read(server, monkeypatch) -> None:
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")
    base, _hits = server
    started = time.monotonic()
    result = await asyncio.wait_for(run(url=f"{base}/endless", retries=0, timeout=5), 10)
    assert time.monotonic() - started < 4  # did not wait for a body that never ends
    assert result["status"] == 200 and result["body"] == "z" * webhook_module.MAX_BODY_CHARS


async def test_a_null_timeout_still_times_out(server, monkeypatch) -> None:
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")
    monkeypatch.setattr(webhook_module, "DEFAULT_TIMEOUT", 0.5)
    base, _hits = server
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run(url=f"{base}/silent", retries=0, timeout=None), 10)
    assert time.monotonic() - started < 5  # the task's own timeout, not the test's bound


async def test_a_timeout_that_is_not_a_positive_number_is_refused() -> None:
    for bad in (0, -1, "10", True, float("nan")):
        with pytest.raises(ValueError, match="positive number"):
            await run(url="http://example.com/hook", timeout=bad)
