"""``http_get``'s way to this node's own API: real HTTP(S) to its advertised address, as a
``read`` caller with a token the process made for itself (``ApiTokens.add_internal``)."""

from __future__ import annotations

import ssl

import aiohttp

TIMEOUT_SECONDS = 10.0


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
