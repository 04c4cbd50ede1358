"""What ``GET /metrics`` serves (Prometheus text; the families: docs/observability.md).

Collectors read the parts' own counters at scrape time, through ``NodeView.metrics()``: nothing
is kept for them on the hot path but the API's request count.
"""

from __future__ import annotations

import collections
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from mesh.contracts import NodeView

__all__ = ["NodeCollector", "RequestCounter"]


class NodeCollector:
    """Reads ``view.metrics()`` at scrape time: the Raft gauges, the ``transport`` and
    ``security_rejected`` counters by kind and, when present, ``feed`` (a voter's change feed:
    ``subscribers``, ``events`` by kind), ``scheduling`` (the replicated ``fires_*`` counters)
    and ``extra`` (more gauges: a replica's)."""

    def __init__(self, node_id: str, view: NodeView) -> None:
        self.node_id = node_id
        self.view = view

    def collect(self) -> Any:
        m = self.view.metrics()
        labels = ["node_id"]
        nid = [self.node_id]
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
        # Messages and handshakes refused by the security checks (docs/security.md), by reason.
        rejected = CounterMetricFamily(
            "schedulezero_security_rejected",
            "Messages and connections refused by security checks, by reason",
            labels=[*labels, "reason"],
        )
        for reason, value in sorted(m.get("security_rejected", {}).items()):
            rejected.add_metric([*nid, reason], value)
        yield rejected
        yield from _feed_metrics(m.get("feed"), nid)
        # The replicated scheduling counters: the same on every node that applied the same log.
        for name, value in sorted(m.get("scheduling", {}).items()):
            c = CounterMetricFamily(
                f"schedulezero_{name}", SCHEDULING_COUNTERS.get(name, name), labels=labels
            )
            c.add_metric(nid, value)
            yield c
        yield from _fire_metrics(m.get("fires"), nid)
        if "alerts_pending" in m:
            g = GaugeMetricFamily(
                "schedulezero_alerts_pending",
                "Alert events in the replicated outbox, not yet confirmed sent",
                labels=labels,
            )
            g.add_metric(nid, m["alerts_pending"])
            yield g
        for name, value in sorted(m.get("extra", {}).items()):
            g = GaugeMetricFamily(f"mesh_{name}", name.replace("_", " "), labels=labels)
            g.add_metric(nid, value)
            yield g


def _fire_metrics(fires: dict[str, Any] | None, nid: list[str]) -> Any:
    """Per-schedule fire metrics (mesh.scheduling.firemetrics; docs/observability.md): at most
    ``metrics.max_schedules`` schedule ids have their own series, the rest are ``_other``."""
    if fires is None:
        return
    for name, key, label, help_text in (
        ("schedule_fires", "fires", "outcome", "Fires of a schedule recorded, by outcome"),
        ("schedule_skipped", "skipped", "reason", "Fires of a schedule skipped, by reason"),
        ("schedule_missed", "missed", "reason", "Fire times of a schedule missed, by reason"),
    ):
        c = CounterMetricFamily(
            f"schedulezero_{name}", help_text, labels=["node_id", "schedule_id", label]
        )
        for (sid, value_label), value in sorted(fires[key].items()):
            c.add_metric([*nid, sid, value_label], value)
        yield c
    buckets, total = fires["lateness_all"]
    h = HistogramMetricFamily(
        "schedulezero_fire_lateness_seconds",
        "Seconds from a fire's scheduled time to its start, every schedule",
        labels=["node_id"],
    )
    h.add_metric(nid, buckets, total)
    yield h
    h = HistogramMetricFamily(
        "schedulezero_schedule_fire_lateness_seconds",
        "Seconds from a fire's scheduled time to its start, by schedule",
        labels=["node_id", "schedule_id"],
    )
    for sid, (buckets, total) in sorted(fires["lateness"].items()):
        h.add_metric([*nid, sid], buckets, total)
    yield h


SCHEDULING_COUNTERS = {
    "fires_recorded": "Fire times of schedules recorded as jobs (replicated)",
    "fires_deduplicated": "Fire times proposed again and dropped: their job exists (replicated)",
    "fires_skipped": 'Missed fire times skipped by the coalesce "all" catch-up cap (replicated)',
    "alerts_recorded": "Alert events recorded in the outbox (replicated)",
    "alerts_sent": "Alerts delivered to their webhook and confirmed (replicated)",
    "alerts_failed": "Alerts given up on: refused, 4xx, or retries exhausted (replicated)",
    "alerts_dropped": "Alert events dropped unsent because the outbox was full (replicated)",
}


def _feed_metrics(feed: dict[str, Any] | None, nid: list[str]) -> Any:
    """A voter's change feed (docs/zones.md, "Counters"); nothing on a node without one."""
    if feed is None:
        return
    g = GaugeMetricFamily(
        "schedulezero_feed_subscribers",
        "Replicas currently subscribed to this voter's change feed",
        labels=["node_id"],
    )
    g.add_metric(nid, feed["subscribers"])
    yield g
    c = CounterMetricFamily(
        "schedulezero_feed_events",
        "Change feed events by kind (subscriptions, messages sent, refusals, drops, ...)",
        labels=["node_id", "kind"],
    )
    for kind, value in sorted(feed["events"].items()):
        c.add_metric([*nid, kind], value)
    yield c


class RequestCounter:
    """``schedulezero_http_requests_total{node_id, method, route}``: every request this API
    answered, by its route's template (bounded labels; ``unmatched`` for an unknown path). It
    shows, e.g., that a replica's reads never reach the voters (docs/zones.md)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self.counts[(request.method, route)] += 1
        return await handler(request)

    def collect(self) -> Any:
        c = CounterMetricFamily(
            "schedulezero_http_requests",
            "HTTP requests answered by this node's API, by method and route",
            labels=["node_id", "method", "route"],
        )
        for (method, route), value in sorted(self.counts.items()):
            c.add_metric([self.node_id, method, route], value)
        yield c
