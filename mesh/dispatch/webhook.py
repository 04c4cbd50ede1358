"""The built-in ``webhook`` task: POST the job to a URL.

Schedule it like any task::

    {"id": "ping-crm", "task": "webhook",
     "trigger": {"type": "interval", "minutes": 5},
     "kwargs": {"url": "https://crm.example/hooks/tick", "payload": {"kind": "tick"},
                "timeout": 10, "retries": 3, "headers": {"Authorization": "Bearer ..."}}}

The request body is ``{"job": {job_id, schedule_id, scheduled_fire_time, idempotency_key,
attempt, fencing_token}, "payload": <payload>}``; the idempotency key is also sent as the
``Idempotency-Key`` header so the receiver can deduplicate a retried delivery. Connection errors,
timeouts and 5xx answers are retried with exponential backoff (tenacity); a 4xx answer is final.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from mesh.tasks import job_context, task

MAX_BODY_CHARS = 2000


class WebhookError(Exception):
    """The endpoint answered with an error status."""


class WebhookServerError(WebhookError):
    """A 5xx answer: retried."""


@task(name="webhook")
async def webhook(
    url: str,
    payload: Any = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    retries: int = 3,
) -> dict[str, Any]:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook url must start with http:// or https://, got {url!r}")
    ctx = job_context()
    body = {
        "job": {
            "job_id": ctx.job_id,
            "schedule_id": ctx.schedule_id,
            "scheduled_fire_time": ctx.scheduled_fire_time.isoformat()
            if ctx.scheduled_fire_time
            else None,
            "idempotency_key": ctx.idempotency_key,
            "attempt": ctx.attempt,
            "fencing_token": ctx.fencing_token,
        },
        "payload": payload,
    }
    send_headers = {"Idempotency-Key": ctx.idempotency_key, **(headers or {})}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(max(1, retries + 1)),
            wait=wait_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type((WebhookServerError, aiohttp.ClientError, TimeoutError)),
            reraise=True,
        ):
            with attempt:
                async with session.request(
                    method.upper(), url, json=body, headers=send_headers
                ) as resp:
                    text = (await resp.text())[:MAX_BODY_CHARS]
                    if resp.status >= 500:
                        raise WebhookServerError(f"{url} answered {resp.status}: {text[:200]}")
                    if resp.status >= 400:
                        raise WebhookError(f"{url} answered {resp.status}: {text[:200]}")
                    return {"status": resp.status, "body": text}
    raise AssertionError("unreachable")  # AsyncRetrying either returns or raises
