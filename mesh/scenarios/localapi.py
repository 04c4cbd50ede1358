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


class _Client:
    """One HTTP client session for the node's lifetime (a connection pool, not a new TCP and
    TLS handshake per call); ``close`` on the app's cleanup."""

    def __init__(self, ssl_context: ssl.SSLContext | None, timeout: float) -> None:
        self.ssl = ssl_context if ssl_context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class LoopbackApi(_Client):
    def __init__(
        self, base_url: str, *, token: str | None, ssl_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(ssl_context, TIMEOUT_SECONDS)
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def get(self, path: str) -> int:
        """The status of ``GET path`` (the body is read and dropped; no redirect followed)."""
        url = self.base_url + path
        async with self.session().get(
            url, headers=self.headers, ssl=self.ssl, allow_redirects=False
        ) as response:
            async for _ in response.content.iter_chunked(64 * 1024):
                pass  # read to its end (a GET's time includes its body), kept nowhere
            return response.status


class VoterMemory(_Client):
    """The resident memory of every voter, read from its ``/metrics``
    (``process_resident_memory_bytes``); a node that does not answer is left out."""

    def __init__(
        self,
        voters: Callable[[], list[tuple[str, str]]],
        *,
        scheme: str,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(ssl_context, MEMORY_TIMEOUT_SECONDS)
        self.voters = voters  # (node id, advertised HTTP host:port)
        self.scheme = scheme

    async def sample(self) -> dict[str, float]:
        """Node id → MB, for the voters that answered within MEMORY_TIMEOUT_SECONDS."""
        voters = self.voters()
        got = await asyncio.gather(
            *(self._one(address) for _, address in voters), return_exceptions=True
        )
        return {
            node_id: mb
            for (node_id, _), mb in zip(voters, got, strict=True)
            if isinstance(mb, float)
        }

    async def _one(self, address: str) -> float | None:
        url = f"{self.scheme}://{address}/metrics"
        async with self.session().get(url, ssl=self.ssl, allow_redirects=False) as response:
            if response.status != 200:
                return None
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk  # read(n) would stop at the first chunk: a page has many
                if len(body) >= MAX_METRICS_BYTES:
                    break
        return rss_mb(bytes(body[:MAX_METRICS_BYTES]))


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
