"""The runner's reads from the network (mesh.scenarios.localapi): the voters' ``/metrics`` pages
are someone else's bytes, parsed to a sane number or left out, read to a bound, never followed
elsewhere; ``http_get`` reaches this node's API with its own token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mesh.scenarios.localapi import MAX_METRICS_BYTES, LoopbackApi, VoterMemory, rss_mb


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"process_resident_memory_bytes 7.5e+07", 75.0),
        (b"process_resident_memory_bytes NaN", None),
        (b"process_resident_memory_bytes +Inf", None),
        (b"process_resident_memory_bytes -1", None),
        (b"process_resident_memory_bytes 1e300", None),
        (b"process_resident_memory_bytes lots", None),
        (b"process_resident_memory_bytes ", None),
        (b"process_virtual_memory_bytes 1e9", None),
    ],
)
def test_a_metrics_page_gives_a_sane_resident_memory_or_none(line: bytes, expected: object) -> None:
    assert rss_mb(b"# HELP x\nx 1\n" + line + b"\n") == expected


@pytest.fixture
async def voter() -> AsyncIterator[Callable[[bytes, int], TestServer]]:
    servers: list[TestServer] = []

    async def make(page: bytes, status: int = 200) -> TestServer:
        async def metrics(request: web.Request) -> web.Response:
            if status == 302:
                raise web.HTTPFound("/elsewhere")
            return web.Response(body=page, status=status)

        async def elsewhere(request: web.Request) -> web.Response:
            return web.Response(body=b"process_resident_memory_bytes 1e6\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/elsewhere", elsewhere)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in servers:
        await server.close()


async def test_the_voters_memory_is_read_from_long_pages_and_bad_ones_are_left_out(voter) -> None:
    filler = b"".join(b"schedulezero_filler_%d 1\n" % i for i in range(20_000))  # ~500 KB
    long_page = await voter(filler + b"process_resident_memory_bytes 9e7\n")
    past_bound = await voter(
        b"x" * (MAX_METRICS_BYTES + 10) + b"\nprocess_resident_memory_bytes 9e7\n"
    )
    insane = await voter(b"process_resident_memory_bytes NaN\n")
    refused = await voter(b"", 500)
    redirect = await voter(b"", 302)
    nodes = {
        "long": long_page,
        "past_bound": past_bound,
        "insane": insane,
        "refused": refused,
        "redirect": redirect,
    }
    voters = [(name, f"{s.host}:{s.port}") for name, s in nodes.items()]
    voters.append(("gone", "127.0.0.1:9"))  # nothing listens
    memory = VoterMemory(lambda: voters, scheme="http", ssl_context=None)
    try:
        assert await memory.sample() == {"long": 90.0}
    finally:
        await memory.close()


async def test_http_get_sends_its_own_token_and_does_not_follow_redirects() -> None:
    seen: list[str | None] = []

    async def health(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        raise web.HTTPFound("/api/elsewhere")

    app = web.Application()
    app.router.add_get("/api/health", health)
    server = TestServer(app)
    await server.start_server()
    api = LoopbackApi(f"http://{server.host}:{server.port}", token="szt_own", ssl_context=None)
    try:
        assert await api.get("/api/health") == 302
        assert await api.get("/api/health") == 302  # the same session, again
        assert seen == ["Bearer szt_own", "Bearer szt_own"]
    finally:
        await api.close()
        await server.close()
