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

Guards (docs/handlers.md): every request has a timeout (``timeout`` defaults to 10 s, capped at
``MAX_TIMEOUT``; ``null`` means the default, never "none"); at most ``MAX_RESPONSE_BYTES`` of the
answer are read; redirects are not followed unless ``follow_redirects`` is true (then at most
``MAX_REDIRECTS``, each hop checked again); and a URL whose host is or resolves to a loopback,
private, link-local, multicast or otherwise reserved address is refused unless the handler
process runs with ``SCHEDULEZERO_WEBHOOK_ALLOW_PRIVATE=1``. The check covers every address the
name resolves to, and the connection uses only the checked addresses (no second lookup).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from mesh.tasks import job_context, task

MAX_BODY_CHARS = 2000
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 300.0
MAX_RESPONSE_BYTES = 64 * 1024
MAX_REDIRECTS = 5
ALLOW_PRIVATE_ENV = "SCHEDULEZERO_WEBHOOK_ALLOW_PRIVATE"


class WebhookError(Exception):
    """The endpoint answered with an error status."""


class WebhookServerError(WebhookError):
    """A 5xx answer: retried."""


class WebhookRefused(WebhookError):
    """The target is not allowed (a private address, a bad redirect): never retried."""


def allow_private() -> bool:
    """Whether this process may call loopback, private and link-local targets (the operator's
    choice, in the handler's environment; never the schedule's)."""
    return os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower() in ("1", "true", "yes")


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves as aiohttp would, then refuses the whole name if any address is forbidden: the
    connection can only use addresses that passed the check (no DNS rebinding in between)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        bad = [r["host"] for r in results if _forbidden(r["host"])]
        if bad:
            raise WebhookRefused(f"webhook host {host!r} resolves to a private address {bad[0]}")
        return results

    async def close(self) -> None:
        await self._inner.close()


async def check_target(url: str, *, private_ok: bool | None = None) -> None:
    """Refuse ``url`` before connecting if its host is, or resolves to, a forbidden address
    (``private_ok``: the caller's setting; None: this process's environment, ``allow_private``).
    """
    if not url.startswith(("http://", "https://")):
        raise WebhookRefused(f"webhook url must start with http:// or https://, got {url!r}")
    host = URL(url).host
    if not host:
        raise WebhookRefused(f"webhook url {url!r} has no host")
    if allow_private() if private_ok is None else private_ok:
        return
    try:
        addresses = [host] if _is_ip(host) else await _addresses(host)
    except OSError as e:
        raise WebhookRefused(f"webhook host {host!r} does not resolve: {e}") from None
    bad = [a for a in addresses if _forbidden(a)]
    if bad:
        raise WebhookRefused(
            f"webhook host {host!r} is a loopback, private or link-local address ({bad[0]}); "
            f"set {ALLOW_PRIVATE_ENV}=1 on the handler to allow it"
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


async def _addresses(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _timeout(value: Any) -> float:
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"webhook timeout must be a positive number of seconds, got {value!r}")
    return min(float(value), MAX_TIMEOUT)


@task(name="webhook")
async def webhook(
    url: str,
    payload: Any = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    retries: int = 3,
    follow_redirects: bool = False,
) -> dict[str, Any]:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook url must start with http:// or https://, got {url!r}")
    seconds = _timeout(timeout)
    await check_target(url)
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
    connector = None if allow_private() else aiohttp.TCPConnector(resolver=GuardedResolver())
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=seconds)
    ) as session:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(max(1, retries + 1)),
            wait=wait_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type((WebhookServerError, aiohttp.ClientError, TimeoutError)),
            reraise=True,
        ):
            with attempt:
                return await _deliver(
                    session, method.upper(), url, body, send_headers, follow_redirects
                )
    raise AssertionError("unreachable")  # AsyncRetrying either returns or raises


async def _deliver(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any,
    headers: dict[str, str],
    follow_redirects: bool,
) -> dict[str, Any]:
    for _hop in range(MAX_REDIRECTS + 1):
        async with session.request(
            method, url, json=body, headers=headers, allow_redirects=False
        ) as resp:
            # At most MAX_RESPONSE_BYTES are read; the rest is never downloaded.
            raw = await resp.content.read(MAX_RESPONSE_BYTES)
            text = raw.decode("utf-8", "replace")[:MAX_BODY_CHARS]
            location = resp.headers.get("Location")
            if 300 <= resp.status < 400 and location:
                if not follow_redirects:
                    raise WebhookRefused(
                        f"{url} answered {resp.status} (redirect to {location}); "
                        "set follow_redirects to follow it"
                    )
                url = urljoin(url, location)
                await check_target(url)
                continue
            if resp.status >= 500:
                raise WebhookServerError(f"{url} answered {resp.status}: {text[:200]}")
            if resp.status >= 400:
                raise WebhookError(f"{url} answered {resp.status}: {text[:200]}")
            return {"status": resp.status, "body": text}
    raise WebhookRefused(f"more than {MAX_REDIRECTS} redirects from the webhook url")
