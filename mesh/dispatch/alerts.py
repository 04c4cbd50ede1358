"""The leader's alert sender: POSTs the replicated outbox's events to their webhooks.

The state machine records each ``notify`` event in the outbox (``mesh.scheduling.alerts``); the
leader of the term runs :meth:`AlertSender.run` next to its scheduler. It first commits the
cluster default of its config (``notify_default``) when the replicated one differs, then sends
every event of the outbox it has not sent yet, and commits ``alerts_done`` for each one it
delivered (a 2xx answer) or gave up on. A new leader starts with nothing in flight, so it sends
again every event not yet confirmed: one the old leader delivered but had no time to confirm
arrives twice, with the same ``Idempotency-Key`` (the event's id), for the receiver to
deduplicate; none is lost.

Each POST has a timeout; connection errors, timeouts and 5xx answers are retried with
exponential backoff (tenacity) up to ``max_attempts``; a 4xx answer, a redirect (never followed)
or a refused address (the SSRF guard of ``mesh.dispatch.webhook``: loopback, private and
link-local targets only with ``notify.allow_private``) ends the event as failed. At most
``MAX_RESPONSE_BYTES`` of an answer are read. A webhook URL is user data that may carry
credentials: logs show it without its user info and query (:func:`redacted_url`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)
from yarl import URL

from mesh.dispatch.webhook import (
    MAX_RESPONSE_BYTES,
    GuardedResolver,
    WebhookError,
    WebhookRefused,
    WebhookServerError,
    check_target,
)
from mesh.scheduling.state import SchedulerState

__all__ = ["AlertSender", "NotifySettings", "alert_body", "redacted_url"]

log = logging.getLogger("mesh.dispatch.alerts")

POLL_SECONDS = 0.1  # how often the sender looks at the outbox while alerts are pending
MAX_IN_FLIGHT = 8  # events posted at once: one slow webhook does not hold up the others
USER_AGENT = "schedulezero-alerts"


class NotifySettings(Protocol):
    """The ``notify`` section of the node's config (mesh.config.NotifyConfig)."""

    webhook: str | None
    on: tuple[str, ...]
    allow_private: bool
    timeout: float
    max_attempts: int
    backoff_initial: float
    backoff_max: float


class Session(Protocol):
    """What the sender needs of the leader's session (mesh.scheduling.session)."""

    node_id: str
    term: int
    state: SchedulerState
    propose: Callable[..., Awaitable[Any]]


def redacted_url(url: str) -> str:
    """``url`` as logs may show it: no user info (credentials), no query, no fragment."""
    try:
        u = URL(url)
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<unreadable url>"


def alert_body(event: dict[str, Any], node: str, term: int) -> dict[str, Any]:
    """The JSON an alert POSTs (docs/scheduling.md, "notify")."""
    body = {
        "event": event["event"],
        "schedule_id": event.get("schedule_id"),
        "fire_time": event.get("fire_time"),
        "outcome": event.get("outcome"),
        "job_id": event.get("job_id"),
        "idempotency_key": event["id"],
        "node": node,
        "term": term,
    }
    for extra in ("note", "error", "reason"):
        if extra in event:
            body[extra] = event[extra]
    return body


class AlertSender:
    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings

    def default_json(self) -> dict[str, Any] | None:
        """The cluster default this node's config asks for, as ``notify_default`` carries it."""
        s = self.settings
        return None if s.webhook is None else {"webhook": s.webhook, "on": list(s.on)}

    async def run(self, session: Session) -> None:
        """Send the outbox's events until cancelled (the end of the leader's term)."""
        await self._commit_default(session)
        in_flight: dict[str, asyncio.Task[None]] = {}
        connector = None if self.settings.allow_private else aiohttp.TCPConnector(
            resolver=GuardedResolver()
        )  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        outbox = session.state.outbox
        wake = asyncio.Event()
        unwatch = session.state.watch(wake.set)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            try:
                while True:
                    for key, event in list(session.state.outbox.events.items()):
                        if len(in_flight) >= MAX_IN_FLIGHT:
                            break
                        if key not in in_flight:
                            task = asyncio.create_task(self._handle(http, session, event))
                            in_flight[key] = task
                            task.add_done_callback(lambda _t, k=key: in_flight.pop(k, None))
                    if in_flight or outbox.events:
                        await asyncio.sleep(POLL_SECONDS)
                    else:  # nothing to send: sleep until the state machine records an alert
                        wake.clear()
                        await wake.wait()
            finally:
                unwatch()
                for task in list(in_flight.values()):
                    task.cancel()
                for task in list(in_flight.values()):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _commit_default(self, session: Session) -> None:
        """Make this node's default the cluster's (retried: a new leader may be slow to commit)."""
        wanted = self.default_json()
        while session.state.outbox.default_json() != wanted:
            try:
                await session.propose({"op": "notify_default", "notify": wanted})
            except Exception as e:
                log.info("the notify default is not committed yet (%s); trying again", e)
                await asyncio.sleep(1.0)

    async def _handle(
        self, http: aiohttp.ClientSession, session: Session, event: dict[str, Any]
    ) -> None:
        """Deliver one event, then commit that it is done (sent, or given up on)."""
        url = event["webhook"]
        body = alert_body(event, session.node_id, session.term)
        try:
            await self.deliver(http, url, body)
            done = {"sent": [event["id"]]}
        except (WebhookError, aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning(
                "alert %s (%s of schedule %r) to %s failed, given up: %s",
                event["id"], event["event"], event.get("schedule_id"), redacted_url(url),
                _redact(str(e), url),
            )  # fmt: skip
            done = {"failed": [event["id"]]}
        try:
            await session.propose({"op": "alerts_done", **done})
        except Exception as e:  # leadership lost: the next leader sends it again, same key
            log.info("alert %s: its confirmation was not committed (%s)", event["id"], e)

    async def deliver(self, http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
        """POST ``body`` to ``url`` with retries; the 2xx status, or raise."""
        s = self.settings
        await check_target(url, private_ok=s.allow_private)
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(s.max_attempts),
            wait=wait_exponential(multiplier=s.backoff_initial, max=s.backoff_max),
            retry=retry_if_exception_type((WebhookServerError, aiohttp.ClientError, TimeoutError)),
            reraise=True,
        ):
            with attempt:
                return await _post(http, url, body)
        raise AssertionError("unreachable")  # AsyncRetrying either returns or raises


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    headers = {"Idempotency-Key": body["idempotency_key"], "User-Agent": USER_AGENT}
    async with http.post(url, json=body, headers=headers, allow_redirects=False) as resp:
        raw = await resp.content.read(MAX_RESPONSE_BYTES)  # the rest is never downloaded
        text = raw.decode("utf-8", "replace")[:200]
        if 300 <= resp.status < 400:
            raise WebhookRefused(f"answered {resp.status} (a redirect: alerts never follow one)")
        if resp.status >= 500:
            raise WebhookServerError(f"answered {resp.status}: {text}")
        if resp.status >= 400:
            raise WebhookError(f"answered {resp.status}: {text}")
        return resp.status


def _redact(message: str, url: str) -> str:
    """An error message without the URL's credentials or query, should it quote the URL."""
    return message.replace(url, redacted_url(url))
