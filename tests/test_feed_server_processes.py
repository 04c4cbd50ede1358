"""The voters' change feed on a real secured 3-node cluster, followed by a scripted replica.

The replica here is a ``MeshTransport`` with a ``replica`` key (made with ``keys create --zone``)
that speaks the feed protocol step by step (docs/zones.md, "Feed and filters"): it records every
raw frame it receives, so a planted secret can be searched for in every byte that reached it
(and in the decoded snapshot images, which travel as base64).
"""

from __future__ import annotations

import asyncio
import base64
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.contracts import Incoming
from mesh.security.keys import KeyRing
from mesh.transport.zmq import MeshTransport
from tests.cluster import Cluster, NodeProcess

pytestmark = pytest.mark.timeout(180)

SECRET = "PLANTED-S3CRET-feed-9f2c"
META_SECRET = "PLANTED-META-S3CRET-77aa"
REJECTED = "schedulezero_security_rejected_total"
WINDOW = 40  # feed.window_entries of the cluster: small, so that "far behind" is cheap
ZONES = {
    "dmz": {"drop": ["kwargs"], "sensitive_keys": ["api_key"]},
    "open": {"drop": [], "sensitive_keys": []},  # the control: lets the secret through
}
# replica key name -> the zone in its certificate (None: a key without zone metadata)
REPLICAS = {
    "r-dmz": "dmz",
    "r-dmz2": "dmz",
    "r-far": "dmz",
    "r-open": "open",
    "r-x": "nowhere",
    "r-metrics": "dmz",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("feed")
    c = Cluster(
        root,
        3,
        secure=True,
        config={"zones": ZONES, "feed": {"window_entries": WINDOW}},
    )
    # Keys made before the nodes start: trusted from the first handshake, no reload to wait for.
    for name, zone in REPLICAS.items():
        c.add_key(name, "replica", zone=zone)
    c.add_key("r-nozone", "replica")
    c.add_key("h-feed", "handler")
    c.add_key("n-extra", "node")  # a node key held by no running node
    try:
        c.start()
        c.wait_for_leader(20)
        yield c
    finally:
        c.stop_all()


_counter = iter(range(1, 1_000_000))


def create_schedule(cluster: Cluster, sid: str | None = None) -> str:
    sid = sid or f"feed-{next(_counter)}"
    leader = cluster.wait_for_leader(10)
    status, body = leader.request(
        "POST",
        "/api/schedules",
        {
            "id": sid,
            "task": "feed_task",
            "trigger": {"type": "interval", "hours": 1},
            "kwargs": {"password": SECRET, "message": SECRET},
            "metadata": {"api_key": META_SECRET, "label": "visible-label"},
            "paused": True,  # never fires: the log holds only what the test writes
        },
        timeout=10,
    )
    assert status == 201, body
    return sid


def rejected(node: NodeProcess) -> Counter[str]:
    text = node.metrics_text()
    assert text is not None, f"{node.node_id} does not answer /metrics"
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == REJECTED:
                out[s.labels["reason"]] += int(s.value)
    return out


def feed_metrics(node: NodeProcess) -> tuple[float | None, Counter[str]]:
    """``schedulezero_feed_subscribers`` (None if absent) and ``schedulezero_feed_events_total``
    by kind, as ``node``'s ``/metrics`` says now."""
    text = node.metrics_text()
    assert text is not None, f"{node.node_id} does not answer /metrics"
    subscribers = None
    events: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "schedulezero_feed_subscribers":
                subscribers = s.value
            elif s.name == "schedulezero_feed_events_total":
                events[s.labels["kind"]] += int(s.value)
    return subscribers, events


class RecordingTransport(MeshTransport):
    """A client transport that keeps every raw frame its DEALERs receive."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: list[bytes] = []

    def _on_dealer_frames(self, address: str, server: str | None, frames: list[bytes]) -> None:
        self.raw.extend(bytes(f) for f in frames)
        super()._on_dealer_frames(address, server, frames)


class ScriptedReplica:
    """The replica side of the protocol, scripted: subscribe, collect, ack (if ``acking``)."""

    def __init__(self, cluster: Cluster, name: str, node: NodeProcess) -> None:
        assert cluster.keys_dir is not None
        self.name = name
        self.address = node.mesh
        self.transport = RecordingTransport(name, None, keys=KeyRing(cluster.keys_dir, name))
        self.transport.set_handler(self._on_message)
        self.parts: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.acking = True
        self.arrived = asyncio.Event()

    async def __aenter__(self) -> ScriptedReplica:
        await self.transport.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    async def subscribe(self, zone: str, after: int, *, name: str | None = None) -> dict:
        payload = {"replica_id": name or self.name, "zone": zone, "after": after}
        return await self.transport.request(self.address, "feed_subscribe", payload, timeout=10)

    def _on_message(self, msg: Incoming) -> None:
        if msg.kind == "feed_snapshot":
            self.parts.append(msg.payload)
        elif msg.kind == "feed_change":
            self.changes.append(msg.payload)
            if self.acking:
                self.transport.send(self.address, "feed_ack", {"seq": msg.payload["seq"]})
        elif msg.kind == "feed_heartbeat":
            self.heartbeats.append(msg.payload)
        self.arrived.set()

    async def until(self, check: Any, timeout: float, what: str) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), 0.5)
                except TimeoutError:
                    pass
        assert check(), what

    def image(self) -> bytes:
        """The snapshot, reassembled and checked as a replica must (offsets, size, CRC)."""
        assert self.parts, "no snapshot part received"
        data = b""
        for part in self.parts:
            assert part["offset"] == len(data)
            data += base64.b64decode(part["data"])
        assert len(data) == self.parts[-1]["size"]
        assert self.parts[-1]["crc"] == zlib.crc32(data)
        return data

    def has_snapshot(self) -> bool:
        return (
            bool(self.parts)
            and sum(len(base64.b64decode(p["data"])) for p in self.parts) == self.parts[-1]["size"]
        )

    def seen(self) -> bytes:
        """Every byte received, with the snapshot images decoded from their base64."""
        images = self.image() if self.has_snapshot() else b""
        return b"".join(self.transport.raw) + images

    def schedule_ids_in_changes(self) -> set[str]:
        out = set()
        for ch in self.changes:
            c = ch["command"] or {}
            for sub in c.get("commands", [c]):
                if sub.get("op") == "add_schedule":
                    out.add(sub["schedule"]["id"])
        return out


def follower(cluster: Cluster) -> NodeProcess:
    leader = cluster.wait_for_leader(10)
    return next(n for n in cluster.nodes if n is not leader)


def assert_contiguous(changes: list[dict[str, Any]], start: int) -> None:
    seqs = [c["seq"] for c in changes]
    assert seqs == list(range(start, start + len(seqs))), seqs


# ---------------------------------------------------------------------------- the stream


async def test_a_replica_gets_a_snapshot_then_contiguous_changes_as_schedules_are_created(
    cluster: Cluster,
) -> None:
    before = create_schedule(cluster)
    async with ScriptedReplica(cluster, "r-dmz", follower(cluster)) as r:
        reply = await r.subscribe("dmz", 0)
        assert reply["ok"] is True, reply
        assert (reply["mode"], reply["zone"]) == ("snapshot", "dmz")
        assert reply["leader_id"] == cluster.wait_for_leader(10).node_id
        seq = reply["seq"]
        await r.until(r.has_snapshot, 10, "the whole snapshot")
        assert {p["seq"] for p in r.parts} == {seq}
        image = json.loads(r.image())
        by_id = {s["id"]: s for s in image["schedules"]}
        assert by_id[before]["kwargs"] == {}  # dmz drops kwargs
        assert by_id[before]["metadata"] == {"api_key": "***", "label": "visible-label"}

        created = [create_schedule(cluster) for _ in range(3)]
        await r.until(
            lambda: set(created) <= r.schedule_ids_in_changes(), 10, f"changes for {created}"
        )
        assert_contiguous(r.changes, seq + 1)
        await r.until(lambda: len(r.heartbeats) >= 2, 5, "heartbeats")
        beat = r.heartbeats[-1]
        assert beat["seq"] >= r.changes[-1]["seq"] and beat["commit"] >= beat["seq"] - 1
        assert isinstance(beat["time"], float) and beat["term"] >= 1

        assert SECRET.encode() not in r.seen()
        assert META_SECRET.encode() not in r.seen()


async def test_an_unconfigured_zone_gets_the_strictest_filter(cluster: Cluster) -> None:
    create_schedule(cluster)
    async with ScriptedReplica(cluster, "r-x", follower(cluster)) as r:
        reply = await r.subscribe("nowhere", 0)
        assert reply["ok"] is True and reply["mode"] == "snapshot", reply
        await r.until(r.has_snapshot, 10, "the whole snapshot")
        sid = create_schedule(cluster)
        await r.until(lambda: sid in r.schedule_ids_in_changes(), 10, f"the change for {sid}")
        image = json.loads(r.image())
        assert image["schedules"]
        for s in image["schedules"]:
            assert (s["args"], s["kwargs"], s["metadata"]) == ([], {}, {})
        seen = r.seen()
        assert SECRET.encode() not in seen
        assert META_SECRET.encode() not in seen
        assert b"visible-label" not in seen  # metadata dropped whole, not only masked


async def test_a_zone_that_drops_nothing_does_receive_the_planted_secret(cluster: Cluster) -> None:
    # The control for the two tests above: the search would find the secret were it sent.
    async with ScriptedReplica(cluster, "r-open", follower(cluster)) as r:
        assert (await r.subscribe("open", 0))["ok"]
        await r.until(r.has_snapshot, 10, "the whole snapshot")
        sid = create_schedule(cluster)
        await r.until(lambda: sid in r.schedule_ids_in_changes(), 10, f"the change for {sid}")
        assert SECRET.encode() in b"".join(r.transport.raw)
        assert SECRET.encode() in r.image()


async def test_metrics_show_the_subscriber_and_count_what_the_feed_sent_it(
    cluster: Cluster,
) -> None:
    leader = cluster.wait_for_leader(10)
    node = [n for n in cluster.nodes if n is not leader][-1]  # not the other tests' follower()
    # A subscriber left by another test is dropped after the feed's ack timeout (10 s).
    async with asyncio.timeout(20):
        while (subscribers := feed_metrics(node)[0]) != 0:
            assert subscribers is not None, "no schedulezero_feed_subscribers in /metrics"
            await asyncio.sleep(0.2)
    _, before = feed_metrics(node)
    async with ScriptedReplica(cluster, "r-metrics", node) as r:
        reply = await r.subscribe("dmz", 0)
        assert reply["ok"] is True and reply["mode"] == "snapshot", reply
        await r.until(r.has_snapshot, 10, "the whole snapshot")
        created = [create_schedule(cluster) for _ in range(3)]
        await r.until(
            lambda: set(created) <= r.schedule_ids_in_changes(), 10, f"changes for {created}"
        )
        subscribers, after = feed_metrics(node)
    assert subscribers == 1
    assert after["subscribed.snapshot"] == before["subscribed.snapshot"] + 1
    # Counted when sent, so at least what arrived (a heartbeat may be on its way).
    assert after["sent.feed_snapshot"] - before["sent.feed_snapshot"] >= len(r.parts) >= 1
    assert after["sent.feed_change"] - before["sent.feed_change"] >= len(r.changes) >= 3
    assert after["sent.feed_heartbeat"] - before["sent.feed_heartbeat"] >= len(r.heartbeats)


# ---------------------------------------------------------------------------- who may subscribe


@pytest.mark.parametrize("key", ["n-extra", "h-feed"])
async def test_a_node_or_handler_key_is_refused_and_counted(cluster: Cluster, key: str) -> None:
    node = follower(cluster)
    before = rejected(node)
    async with ScriptedReplica(cluster, key, node) as r:
        reply = await r.subscribe("dmz", 0)
        assert reply["ok"] is False and "replica key" in reply["error"], reply
        assert r.parts == r.changes == []
    assert rejected(node)["role"] == before["role"] + 1


async def test_a_replica_claiming_another_zone_than_its_certificate_is_refused(
    cluster: Cluster,
) -> None:
    node = follower(cluster)
    before = rejected(node)
    async with ScriptedReplica(cluster, "r-dmz2", node) as r:
        reply = await r.subscribe("open", 0)
        assert reply["ok"] is False and "zone" in reply["error"], reply
        assert rejected(node)["zone_mismatch"] == before["zone_mismatch"] + 1
        # Subscribing as another replica is refused too: identity is the key.
        reply = await r.subscribe("dmz", 0, name="r-dmz")
        assert reply["ok"] is False, reply
        assert rejected(node)["sender_mismatch"] == before["sender_mismatch"] + 1
        assert r.parts == r.changes == []


async def test_a_replica_key_without_zone_gets_the_strictest_filter(cluster: Cluster) -> None:
    create_schedule(cluster)
    async with ScriptedReplica(cluster, "r-nozone", follower(cluster)) as r:
        reply = await r.subscribe("open", 0)  # it cannot talk itself into a laxer zone
        assert reply["ok"] is True, reply
        await r.until(r.has_snapshot, 10, "the whole snapshot")
        assert SECRET.encode() not in r.seen()
        assert all(s["kwargs"] == {} for s in json.loads(r.image())["schedules"])


# ---------------------------------------------------------------------------- resume / resync


async def test_resume_after_a_short_disconnect_gets_only_the_missed_changes(
    cluster: Cluster,
) -> None:
    node = follower(cluster)
    async with ScriptedReplica(cluster, "r-dmz", node) as r:
        reply = await r.subscribe("dmz", 0)
        assert reply["ok"], reply
        await r.until(r.has_snapshot, 10, "the whole snapshot")
        sid = create_schedule(cluster)
        await r.until(lambda: sid in r.schedule_ids_in_changes(), 10, "a change")
        last = r.changes[-1]["seq"]
    missed = [create_schedule(cluster) for _ in range(3)]  # while it is away
    async with ScriptedReplica(cluster, "r-dmz", node) as r:
        reply = await r.subscribe("dmz", last)
        assert reply["ok"] is True and reply["mode"] == "resume", reply
        await r.until(lambda: set(missed) <= r.schedule_ids_in_changes(), 10, "missed changes")
        assert r.parts == []  # no snapshot
        assert_contiguous(r.changes, last + 1)  # starts right after what it had
        assert SECRET.encode() not in r.seen()


async def test_a_subscriber_far_behind_the_window_gets_a_snapshot(cluster: Cluster) -> None:
    node = follower(cluster)
    async with ScriptedReplica(cluster, "r-far", node) as r:
        reply = await r.subscribe("dmz", 0)
        assert reply["ok"], reply
        await r.until(r.has_snapshot, 10, "the whole snapshot")
        after = reply["seq"]
    for _ in range(WINDOW + 1):  # an entry each: the window (WINDOW entries) loses after + 1
        create_schedule(cluster)
    async with ScriptedReplica(cluster, "r-far", node) as r:
        reply = await r.subscribe("dmz", after)
        assert reply["ok"] is True and reply["mode"] == "snapshot", reply
        assert reply["seq"] >= after + WINDOW + 1
        await r.until(r.has_snapshot, 10, "the fresh snapshot")
        assert {p["seq"] for p in r.parts} == {reply["seq"]}
        assert len(json.loads(r.image())["schedules"]) >= WINDOW
        assert SECRET.encode() not in r.seen()


async def test_a_malformed_subscribe_is_refused_and_counted(cluster: Cluster) -> None:
    node = follower(cluster)
    before = rejected(node)
    async with ScriptedReplica(cluster, "r-dmz2", node) as r:
        payload = {"replica_id": "r-dmz2", "zone": "dmz", "after": "zero"}
        reply = await r.transport.request(r.address, "feed_subscribe", payload, timeout=10)
        assert reply["ok"] is False, reply
    assert rejected(node)["malformed"] == before["malformed"] + 1
    assert node.health() is not None
