"""FeedServer in-process, against the contract doubles (tests/fakes.py): flow control, ack
timeout, snapshot parts, the window's edges. The process tests (test_feed_server_processes.py)
cover the same protocol over real CURVE sockets; these pin what is slow or rare there."""

from __future__ import annotations

import asyncio
import base64
import zlib
from typing import Any

import pytest
from apscheduler import Schedule
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, NOOP, Entry
from mesh.contracts import Incoming
from mesh.scheduling.state import SchedulerState, dump_schedule
from mesh.security.keys import Certificate
from mesh.zones.feed import FeedServer, FeedSettings
from mesh.zones.filter import ZoneFilter
from tests.fakes import FakeBus, FakeReplica, ManualClock

SECRET = "unit-S3CRET"
ID = b"r1"


class Voter:
    """A FeedServer fed by the test: entries applied to a real SchedulerState, in order."""

    def __init__(self, **settings: Any) -> None:
        self.bus = FakeBus()
        self.state = SchedulerState()
        self.applied = 0
        self.clock = ManualClock()
        certs = {
            "r1": Certificate("r1", "replica", b"k" * 32, "dmz"),
            "h1": Certificate("h1", "handler", b"h" * 32),
        }
        self.feed = FeedServer(
            self.bus,
            FakeReplica(),
            applied_index=lambda: self.applied,
            snapshot=self.state.snapshot,
            certificate=certs.get,
            filters={"dmz": ZoneFilter(drop=["kwargs"])},
            settings=FeedSettings(**settings),
            clock=self.clock,
        )

    def apply(self, n: int = 1, *, kind: str = COMMAND) -> None:
        for _ in range(n):
            self.applied += 1
            sid = f"s{self.applied}"
            s = Schedule(
                id=sid,
                task_id="t",
                trigger=IntervalTrigger(hours=1),
                kwargs={"message": SECRET},
                job_executor="async",
            )
            data = {"op": "add_schedule", "schedule": dump_schedule(s)} if kind == COMMAND else None
            entry = Entry(term=1, index=self.applied, kind=kind, data=data)
            self.state.apply(entry)
            self.feed.on_apply(entry, None)

    def subscribe(self, after: int, *, sender: str = "r1", zone: str = "dmz") -> dict[str, Any]:
        payload = {"replica_id": sender, "zone": zone, "after": after}
        msg = Incoming("feed_subscribe", payload, b"1", sender.encode(), "", sender, "replica")
        if sender == "h1":
            msg = Incoming("feed_subscribe", payload, b"1", b"h1", "", "h1", "handler")
        return self.bus.handlers["feed_subscribe"](msg)

    def ack(self, seq: int) -> None:
        msg = Incoming("feed_ack", {"seq": seq}, b"", ID, "", "r1", "replica")
        self.bus.handlers["feed_ack"](msg)

    def changes(self) -> list[int]:
        return [m.payload["seq"] for m in self.bus.sent_of("feed_change", ID)]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_pushing_stops_at_max_unacked_and_resumes_on_ack() -> None:
    v = Voter(max_unacked=5)
    v.apply(3)
    assert v.subscribe(3)["mode"] == "resume"
    v.apply(20)
    await settle()
    assert v.changes() == [4, 5, 6, 7, 8]
    v.ack(6)  # 7 and 8 still in flight: room for three more
    await settle()
    assert v.changes() == list(range(4, 12))


async def test_the_replicas_following_a_voter_are_listed_with_their_lag() -> None:
    v = Voter(max_unacked=5)
    assert v.feed.replicas() == []
    v.apply(3)
    v.subscribe(3)
    v.apply(10)
    await settle()
    v.ack(6)
    v.clock.advance(1.5)
    assert v.feed.replicas() == [
        {"replica_id": "r1", "zone": "dmz", "acked": 6, "lag_changes": 7, "last_ack_seconds": 1.5}
    ]


async def test_a_subscription_not_acked_for_ack_timeout_is_dropped() -> None:
    v = Voter(ack_timeout=10.0)
    v.apply(2)
    v.subscribe(2)
    v.clock.advance(9.0)
    v.feed.heartbeat()
    assert len(v.bus.sent_of("feed_heartbeat", ID)) == 1
    v.ack(2)  # an ack restarts the clock
    v.clock.advance(9.0)
    v.feed.heartbeat()
    assert len(v.bus.sent_of("feed_heartbeat", ID)) == 2
    v.clock.advance(1.5)
    v.feed.heartbeat()
    assert "r1" not in v.feed.subscriptions
    assert len(v.bus.sent_of("feed_heartbeat", ID)) == 2  # no more heartbeats: it fails over


async def test_the_snapshot_goes_in_contiguous_parts_with_the_crc_on_the_last() -> None:
    v = Voter(part_bytes=100)
    v.apply(5)
    reply = v.subscribe(0)
    assert (reply["mode"], reply["seq"]) == ("snapshot", 5)
    await settle()
    parts = [m.payload for m in v.bus.sent_of("feed_snapshot", ID)]
    assert len(parts) > 3
    image = b""
    for p in parts:
        assert p["offset"] == len(image) and p["seq"] == 5
        image += base64.b64decode(p["data"])
        assert len(base64.b64decode(p["data"])) <= 100
    assert all("crc" not in p for p in parts[:-1])
    assert parts[-1]["crc"] == zlib.crc32(image) and parts[-1]["size"] == len(image)
    assert SECRET.encode() not in image  # dmz drops kwargs
    replica = SchedulerState()
    replica.restore(image)
    assert sorted(replica.schedules) == [f"s{i}" for i in range(1, 6)]
    v.apply(2)
    await settle()
    assert v.changes() == [6, 7]  # after the snapshot: the changes from its seq on


async def test_entries_that_are_not_commands_arrive_as_null_to_keep_seqs_contiguous() -> None:
    v = Voter()
    v.apply(1)
    v.subscribe(1)
    v.apply(1, kind=NOOP)
    v.apply(1)
    await settle()
    sent = [m.payload for m in v.bus.sent_of("feed_change", ID)]
    assert [p["seq"] for p in sent] == [2, 3]
    assert sent[0]["command"] is None
    assert sent[1]["command"]["schedule"]["kwargs"] == {}


async def test_a_subscriber_that_falls_out_of_the_window_is_sent_a_gap() -> None:
    v = Voter(window_entries=10, max_unacked=3)
    v.apply(1)
    v.subscribe(1)
    v.apply(3)
    await settle()
    assert v.changes() == [2, 3, 4]
    v.apply(30)  # unacked: nothing goes out while the window (10) moves on to 25..34
    await settle()
    assert v.changes() == [2, 3, 4]
    v.ack(4)
    await settle()
    assert v.changes()[3] == 25  # the oldest change kept: the replica sees the gap, resubscribes
    assert v.subscribe(4)["mode"] == "snapshot"


async def test_after_a_raft_snapshot_install_the_window_restarts_and_old_positions_resync() -> None:
    v = Voter()
    v.apply(5)
    v.applied = 50  # the node installed a Raft snapshot: applied jumps, no entries seen
    assert v.subscribe(5)["mode"] == "snapshot"
    v.applied = 60
    v.apply(1)  # index 61 after a jump: the window starts again there
    assert v.feed.first_seq == 61
    assert v.subscribe(59)["mode"] == "snapshot"
    assert v.subscribe(60)["mode"] == "resume"


async def test_after_zero_always_gets_a_snapshot() -> None:
    v = Voter()
    v.apply(3)  # the window holds 1..3, but 0 means "I have nothing"
    assert v.subscribe(0)["mode"] == "snapshot"


@pytest.mark.parametrize(
    "payload",
    [
        {"replica_id": "r1", "zone": "dmz"},
        {"replica_id": "r1", "zone": "dmz", "after": -1},
        {"replica_id": "r1", "zone": "dmz", "after": True},
        {"replica_id": "r1", "zone": 7, "after": 0},
        {"replica_id": "r1", "zone": "x" * 300, "after": 0},
    ],
)
async def test_malformed_subscribes_are_refused_and_counted(payload: dict[str, Any]) -> None:
    v = Voter()
    msg = Incoming("feed_subscribe", payload, b"1", ID, "", "r1", "replica")
    assert v.bus.handlers["feed_subscribe"](msg)["ok"] is False
    assert [r for _, r in v.bus.rejected] == ["malformed"]
    assert v.feed.subscriptions == {}


async def test_an_ack_from_another_identity_or_malformed_is_ignored() -> None:
    v = Voter(max_unacked=2)
    v.apply(1)
    v.subscribe(1)
    v.apply(5)
    await settle()
    assert v.changes() == [2, 3]
    v.bus.handlers["feed_ack"](Incoming("feed_ack", {"seq": 3}, b"", b"r2", "", "r2", "replica"))
    v.bus.handlers["feed_ack"](Incoming("feed_ack", {"seq": "3"}, b"", ID, "", "r1", "replica"))
    await settle()
    assert v.changes() == [2, 3]
    v.ack(10**9)  # more than was sent counts as what was sent
    await settle()
    assert v.changes() == [2, 3, 4, 5]


async def test_the_window_is_bounded_in_bytes_too() -> None:
    v = Voter(window_entries=10_000, window_bytes=4096)  # a schedule command is ~700 bytes
    v.apply(20)
    assert 1 < v.feed.last_seq - v.feed.first_seq + 1 < 10
    assert v.subscribe(v.feed.first_seq - 1)["mode"] == "resume"
    assert v.subscribe(v.feed.first_seq - 2)["mode"] == "snapshot"


async def test_the_heartbeat_loop_sleeps_while_nobody_subscribes() -> None:
    v = Voter(heartbeat_interval=0.001, ack_timeout=10.0)
    rounds: list[int] = []
    beaten = asyncio.Event()
    beat = v.feed.heartbeat

    def counted() -> None:
        rounds.append(1)
        beaten.set()
        beat()

    v.feed.heartbeat = counted  # type: ignore[method-assign]
    await v.feed.start()
    try:
        await asyncio.sleep(0.05)  # some 50 rounds, were it beating
        assert rounds == []
        v.subscribe(0)
        await asyncio.wait_for(beaten.wait(), 5)
        v.clock.advance(11.0)  # the replica falls silent: the next round drops it
        beaten.clear()
        await asyncio.wait_for(beaten.wait(), 5)
        assert not v.feed.subscriptions
        seen = len(rounds)
        await asyncio.sleep(0.05)
        assert len(rounds) == seen
    finally:
        await v.feed.close()
