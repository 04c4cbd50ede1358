"""The replica follows its zone's feed: snapshot, changes, gaps, failover, its durable copy, lag.

Each test runs a real FeedFollower on a real MeshTransport with a ``replica`` CURVE key, against
fake voters (tests/feedfake.py) bound with ``node`` keys that serve a log of real scheduler
commands. What the replica holds is compared with the voters' own SchedulerState, byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mesh.contracts import Incoming
from mesh.scheduling.state import SchedulerState
from mesh.security.keys import KeyRing, create_key
from mesh.transport.zmq import MeshTransport
from mesh.zones.replica import FeedFollower, ReplicaStore
from tests.feedfake import (
    FakeFeed,
    FeedLog,
    add_schedule_command,
    add_task_command,
    remove_schedule_command,
)
from tests.waiting import wait_until_async

REPLICA = "r1"
ZONE = "dmz"


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    for name, role in [("n0", "node"), ("n1", "node"), (REPLICA, "replica")]:
        create_key(d, name, role)
    return d


@pytest.fixture
def log() -> FeedLog:
    feed_log = FeedLog()
    feed_log.append(None, add_task_command(), add_schedule_command("a"), add_schedule_command("b"))
    return feed_log


MakeFeed = Callable[..., Awaitable[FakeFeed]]
MakeFollower = Callable[..., Awaitable[FeedFollower]]


@pytest.fixture
async def make_feed(keydir: Path, log: FeedLog) -> AsyncIterator[MakeFeed]:
    made: list[FakeFeed] = []

    async def factory(name: str = "n0", **kwargs: Any) -> FakeFeed:
        feed = FakeFeed(name, log, keys=KeyRing(keydir, name), **kwargs)
        made.append(feed)
        return await feed.start()

    yield factory
    for feed in made:
        await feed.close()


@pytest.fixture
async def make_follower(keydir: Path, tmp_path: Path) -> AsyncIterator[MakeFollower]:
    made: list[tuple[FeedFollower, MeshTransport, ReplicaStore]] = []

    async def factory(upstreams: list[str], **kwargs: Any) -> FeedFollower:
        transport = MeshTransport(REPLICA, None, keys=KeyRing(keydir, REPLICA))
        store = ReplicaStore(tmp_path / "replica" / "replica.db")
        follower = FeedFollower(
            REPLICA, ZONE, upstreams, SchedulerState(), transport, store, **kwargs
        )
        transport.set_handler(follower.on_message)
        follower.load()
        await transport.start()
        await follower.start()
        made.append((follower, transport, store))
        return follower

    yield factory
    for follower, transport, store in made:
        await follower.stop()
        await transport.close()
        store.close()


async def caught_up(follower: FeedFollower, log: FeedLog, timeout: float = 5.0) -> None:
    await wait_until_async(
        lambda: follower.applied == log.seq and follower.state.snapshot() == log.state.snapshot(),
        timeout,
        lambda: f"replica at seq {follower.applied} ({dict(follower.counters)}), log at {log.seq}",
    )


async def test_a_replica_installs_the_snapshot_then_applies_every_change(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    feed = await make_feed(chunk_bytes=256)  # a snapshot of several parts
    follower = await make_follower([feed.address])
    await caught_up(follower, log)
    assert feed.subscribes == [{"replica_id": REPLICA, "zone": ZONE, "after": 0}]
    assert follower.counters["snapshots"] == 1
    log.append(add_schedule_command("c"), remove_schedule_command("a"), None)
    await caught_up(follower, log)
    assert sorted(follower.state.schedules) == ["b", "c"]
    assert follower.counters["snapshots"] == 1  # the changes came one by one
    # It acknowledges what it applied.
    await wait_until_async(lambda: log.seq in feed.acks, 2.0, lambda: f"acks {feed.acks[-5:]}")


async def test_a_gap_makes_the_replica_resubscribe_after_what_it_applied(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    feed = await make_feed()
    follower = await make_follower([feed.address])
    await caught_up(follower, log)
    applied = log.seq
    feed.drop_once.add(applied + 2)
    log.append(add_schedule_command("c"), add_schedule_command("d"), add_schedule_command("e"))
    await caught_up(follower, log)
    # Seq applied+3 arrived after applied+1: the replica asked again from applied+1, no further.
    assert feed.subscribes[1:] == [{"replica_id": REPLICA, "zone": ZONE, "after": applied + 1}]
    assert follower.counters["gaps"] >= 1
    assert follower.counters["snapshots"] == 1  # resumed, not resynchronised


async def test_a_snapshot_with_a_wrong_checksum_is_refused_and_fetched_again(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    feed = await make_feed(chunk_bytes=300)
    feed.corrupt_snapshots = 1
    follower = await make_follower([feed.address])
    await caught_up(follower, log)
    assert follower.counters["bad_snapshots"] == 1
    assert follower.counters["snapshots"] == 1
    assert [s["after"] for s in feed.subscribes] == [0, 0]


async def test_the_replica_resynchronises_from_a_snapshot_when_the_voter_cannot_resume(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    feed = await make_feed()
    follower = await make_follower([feed.address])
    await caught_up(follower, log)
    feed.retained_after = log.seq + 1  # the voter no longer holds the change after ours
    feed.drop_once.add(log.seq + 1)
    log.append(add_schedule_command("c"), remove_schedule_command("b"))
    await caught_up(follower, log)
    assert follower.counters["snapshots"] == 2
    assert sorted(follower.state.schedules) == ["a", "c"]


async def test_the_replica_fails_over_when_its_upstream_dies(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    first, second = await make_feed("n0"), await make_feed("n1")
    follower = await make_follower([first.address, second.address])
    await caught_up(follower, log)
    assert follower.upstream == first.address and follower.upstream_name == "n0"
    await first.close()
    died = asyncio.get_running_loop().time()
    log.append(add_schedule_command("c"))
    await caught_up(follower, log, timeout=8.0)
    took = asyncio.get_running_loop().time() - died
    assert follower.upstream == second.address and follower.upstream_name == "n1"
    # The second voter resumed after what the first had delivered: no second snapshot.
    assert second.subscribes == [{"replica_id": REPLICA, "zone": ZONE, "after": log.seq - 1}]
    assert follower.counters["snapshots"] == 1
    assert 2.0 <= took < 6.0, took


async def test_a_silent_upstream_is_left_after_two_seconds_and_a_live_one_is_not(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    first, second = await make_feed("n0"), await make_feed("n1")
    follower = await make_follower([first.address, second.address])
    await caught_up(follower, log)
    # Heartbeats alone keep it there: 3 s without a change is no reason to leave.
    await asyncio.sleep(3.0)
    assert follower.upstream == first.address and len(first.subscribes) == 1
    first.silent = True
    await wait_until_async(lambda: follower.upstream == second.address, 5.0, "a failover")
    await wait_until_async(lambda: follower.following, 3.0, "following the second voter")


async def test_a_restarted_replica_serves_its_copy_and_resumes_after_it(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog, keydir: Path, tmp_path: Path
) -> None:
    feed = await make_feed()
    follower = await make_follower([feed.address])
    await caught_up(follower, log)
    await follower.stop()  # writes the copy
    saved = log.seq
    expected = log.state.snapshot()
    log.append(add_schedule_command("c"))

    # A new process: the copy is there before any voter is asked.
    state = SchedulerState()
    store = ReplicaStore(tmp_path / "replica" / "replica.db")
    try:
        again = FeedFollower(REPLICA, ZONE, [feed.address], state, _unused_transport(), store)
        assert again.load()
        assert again.applied == saved and state.snapshot() == expected
    finally:
        store.close()
    restarted = await make_follower([feed.address])
    await caught_up(restarted, log)
    assert feed.subscribes[-1] == {"replica_id": REPLICA, "zone": ZONE, "after": saved}
    assert restarted.counters["snapshots"] == 0


async def test_a_copy_made_for_another_zone_is_not_used(tmp_path: Path, log: FeedLog) -> None:
    store = ReplicaStore(tmp_path / "replica.db")
    try:
        store.save("internal", log.seq, log.state.snapshot())
        assert store.load("internal") == (log.seq, log.state.snapshot())
        assert store.load(ZONE) is None
    finally:
        store.close()
    assert (tmp_path / "replica.db").stat().st_mode & 0o777 == 0o600


async def test_lag_grows_while_changes_are_held_back_and_is_zero_when_caught_up(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    feed = await make_feed()
    follower = await make_follower([feed.address])
    assert follower.lag_seconds() is None  # no heartbeat yet: unknown
    await caught_up(follower, log)
    await wait_until_async(lambda: follower.lag_seconds() == 0.0, 2.0, "lag 0")
    feed.hold = True
    log.append(add_schedule_command("c"))
    await wait_until_async(
        lambda: (follower.lag_seconds() or 0) > 0.5, 3.0, lambda: f"lag {follower.lag_seconds()}"
    )
    feed.hold = False
    await caught_up(follower, log)
    await wait_until_async(lambda: follower.lag_seconds() == 0.0, 2.0, "lag back to 0")


async def test_malformed_feed_messages_are_counted_and_never_crash_the_replica(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    feed = await make_feed()
    follower = await make_follower([feed.address])
    await caught_up(follower, log)
    me = REPLICA.encode()
    send = feed.transport.send_to_identity
    for kind, payload in [
        ("feed_change", {"seq": "x"}),
        ("feed_change", {"seq": log.seq + 1, "command": "not a dict"}),
        ("feed_snapshot", {"seq": 1, "offset": 0, "size": 10, "data": "!!!not base64"}),
        ("feed_snapshot", {"seq": 1, "offset": 5, "size": 10, "data": ""}),
        ("feed_heartbeat", {"seq": True}),
        ("feed_whatever", {}),
    ]:
        assert send(me, kind, payload)
    log.append(add_schedule_command("c"))
    await caught_up(follower, log)
    c = follower.counters
    assert c["malformed"] >= 1 and c["bad_snapshots"] >= 1 and c["unexpected"] == 1


async def test_a_command_the_state_cannot_apply_is_skipped_like_on_a_voter(
    make_feed: MakeFeed, make_follower: MakeFollower, log: FeedLog
) -> None:
    feed = await make_feed()
    follower = await make_follower([feed.address])
    await caught_up(follower, log)
    log.commands.append({"op": "add_schedule", "schedule": {"id": 1}})  # the voter skipped it too
    log.append(add_schedule_command("c"))
    await caught_up(follower, log)
    assert follower.counters["apply_errors"] == 1


def _unused_transport() -> Any:
    class Unused:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the transport was used ({name}) before start()")

    return Unused()


def test_messages_from_an_upstream_the_replica_left_are_ignored() -> None:
    follower = FeedFollower(
        REPLICA, ZONE, ["tcp://127.0.0.1:1"], SchedulerState(), _unused_transport()
    )
    follower.upstream = "tcp://127.0.0.1:1"
    stale = Incoming("feed_change", {"seq": 1, "command": None}, b"", b"", "tcp://127.0.0.1:2")
    follower.on_message(stale)
    handler = Incoming(
        "feed_change", {"seq": 1, "command": None}, b"", b"", "tcp://127.0.0.1:1", "h", "handler"
    )
    follower.on_message(handler)
    assert follower.applied == 0
    assert follower.counters["stale"] == 1 and follower.counters["not_from_a_voter"] == 1
