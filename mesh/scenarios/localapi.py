"""The runner's ways out: ``http_get`` to this node's own API (real HTTP(S) to its advertised
address, as a ``read`` caller with a token the process made for itself:
``ApiTokens.add_internal``), and the voters' memory for ``memory_usage`` (their ``/metrics``)."""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Callable

import aiohttp

TIMEOUT_SECONDS = 10.0
MEMORY_TIMEOUT_SECONDS = 2.0
MAX_METRICS_BYTES = 8 * 1024 * 1024  # a node's /metrics page, read at most this far
RSS_METRIC = b"process_resident_memory_bytes "


class LoopbackApi:
    def __init__(
        self, base_url: str, *, token: str | None, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.ssl_context = ssl_context

    async def get(self, path: str) -> int:
        """The status of ``GET path`` (the body is read and dropped; no redirect followed)."""
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(
                self.base_url + path,
                headers=self.headers,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                allow_redirects=False,
            ) as response,
        ):
            await response.read()
            return response.status


class VoterMemory:
    """The resident memory of every voter, read from its ``/metrics``
    (``process_resident_memory_bytes``); a node that does not answer is left out."""

    def __init__(
        self,
        voters: Callable[[], list[tuple[str, str]]],
        *,
        scheme: str,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.voters = voters  # (node id, advertised HTTP host:port)
        self.scheme = scheme
        self.ssl_context = ssl_context

    async def sample(self) -> dict[str, float]:
        """Node id → MB, for the voters that answered within MEMORY_TIMEOUT_SECONDS."""
        voters = self.voters()
        timeout = aiohttp.ClientTimeout(total=MEMORY_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            got = await asyncio.gather(
                *(self._one(session, address) for _, address in voters), return_exceptions=True
            )
        return {
            node_id: mb
            for (node_id, _), mb in zip(voters, got, strict=True)
            if isinstance(mb, float)
        }

    async def _one(self, session: aiohttp.ClientSession, address: str) -> float | None:
        url = f"{self.scheme}://{address}/metrics"
        ssl_arg = self.ssl_context if self.ssl_context is not None else True
        async with session.get(url, ssl=ssl_arg, allow_redirects=False) as response:
            if response.status != 200:
                return None
            body = await response.content.read(MAX_METRICS_BYTES)
        return rss_mb(body)


def rss_mb(page: bytes) -> float | None:
    """``process_resident_memory_bytes`` of a Prometheus text page, in MB; None if absent or
    not a sane number (the page comes from the network)."""
    for line in page.splitlines():
        if line.startswith(RSS_METRIC):
            try:
                value = float(line[len(RSS_METRIC) :].split()[0])
            except (ValueError, IndexError):
                return None
            return round(value / 1e6, 1) if math.isfinite(value) and 0 <= value < 1e15 else None
    return None
