"""The built-in webhook task against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiohttp import web

from mesh.dispatch.webhook import ALLOW_PRIVATE_ENV, WebhookError, WebhookServerError
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
async def server(monkeypatch):
    # The test server is on loopback, which the webhook refuses unless the handler allows it.
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")
    seen: list[dict] = []
    plan: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "body": await request.json()})
        status = plan.pop(0) if plan else 200
        return web.Response(status=status, text=f"status {status}")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/hook", seen, plan
    await runner.cleanup()


async def run(**kwargs):
    return await REGISTRY["webhook"].run(CTX, (), kwargs)


async def test_webhook_posts_the_job_and_payload_with_an_idempotency_key(server) -> None:
    url, seen, _ = server
    result = await run(url=url, payload={"k": 1})
    assert result["status"] == 200
    assert seen[0]["body"]["payload"] == {"k": 1}
    assert seen[0]["body"]["job"]["fencing_token"] == 7
    assert seen[0]["headers"]["Idempotency-Key"] == CTX.idempotency_key


async def test_webhook_retries_server_errors_then_succeeds(server) -> None:
    url, seen, plan = server
    plan.extend([500, 503])
    result = await run(url=url, retries=3)
    assert result["status"] == 200 and len(seen) == 3


async def test_webhook_gives_up_after_its_retries(server) -> None:
    url, seen, plan = server
    plan.extend([500] * 5)
    with pytest.raises(WebhookServerError):
        await run(url=url, retries=1)
    assert len(seen) == 2


async def test_webhook_does_not_retry_a_client_error(server) -> None:
    url, seen, plan = server
    plan.append(404)
    with pytest.raises(WebhookError, match="404"):
        await run(url=url, retries=3)
    assert len(seen) == 1


async def test_webhook_rejects_a_non_http_url() -> None:
    with pytest.raises(ValueError, match="http"):
        await run(url="ftp://example/x")
