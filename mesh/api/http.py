"""The HTTP API every node serves (aiohttp).

Handlers stay thin: they translate HTTP to calls on the node and back. Cross-cutting rules live
in middlewares: every error is JSON ``{"error": "..."}`` with a 4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from mesh.node import MeshNode

log = logging.getLogger("mesh.api")

NODE_KEY = web.AppKey("node", object)
MAX_BODY_BYTES = 1024 * 1024


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return json_error(e.status, e.reason or e.text or "error")
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return json_error(500, "internal error (see the node's log)")


class _NodeCollector:
    """Reads the node's state at scrape time: no bookkeeping on the hot path."""

    def __init__(self, node: MeshNode) -> None:
        self.node = node

    def collect(self) -> Any:
        m = self.node.metrics()
        labels = ["node_id"]
        nid = [self.node.id]
        for name, help_text in (
            ("term", "Current Raft term"),
            ("commit_index", "Highest log index known committed"),
            ("applied_index", "Highest log index applied to the state machine"),
            ("last_index", "Last log index"),
            ("snapshot_index", "Index covered by the latest snapshot"),
            ("is_leader", "1 if this node is the leader"),
            ("has_quorum", "1 if this node sees a majority of voters"),
            ("peers_alive", "Peers currently considered alive"),
        ):
            g = GaugeMetricFamily(f"mesh_{name}", help_text, labels=labels)
            g.add_metric(nid, m[name])
            yield g
        c = CounterMetricFamily(
            "mesh_transport_events", "Transport counters by kind", labels=[*labels, "kind"]
        )
        for kind, value in sorted(m["transport"].items()):
            c.add_metric([*nid, kind], value)
        yield c
        for name, value in sorted(m.get("extra", {}).items()):
            g = GaugeMetricFamily(f"mesh_{name}", name.replace("_", " "), labels=labels)
            g.add_metric(nid, value)
            yield g


def create_app(node: MeshNode) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY_BYTES)
    app[NODE_KEY] = node
    registry = CollectorRegistry()
    registry.register(_NodeCollector(node))

    async def health(request: web.Request) -> web.Response:
        return web.json_response(node.health())

    async def cluster(request: web.Request) -> web.Response:
        return web.json_response(node.cluster())

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    app.router.add_get("/api/health", health)
    app.router.add_get("/api/cluster", cluster)
    app.router.add_get("/metrics", metrics)
    return app


class HttpServer:
    def __init__(self, node: MeshNode, app: web.Application | None = None) -> None:
        self.node = node
        self.app = app or create_app(node)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, port = self.node.config.http_host_port
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise OSError(f"cannot bind HTTP on {host}:{port}: {e.strerror or e}") from e

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
