"""The voters' change feed: what a read-only replica follows (docs/zones.md, "Feed and filters").

A replica connects a DEALER with its ``replica`` key to a voter's mesh ROUTER and sends
``feed_subscribe`` {"replica_id", "zone", "after"}. The voter answers, then pushes one-way:

- ``feed_snapshot`` parts (mode ``snapshot``): the zone-filtered ``SchedulerState`` snapshot at
  ``seq``, base64 in parts of at most 1 MiB, ``size`` the whole image, ``crc`` (CRC-32 of the
  whole) on the last part — the layout of the Raft snapshot transfer (``mesh.snapshots``);
- ``feed_change`` {"seq", "command"} for every applied log entry after the snapshot (or after
  ``after``, mode ``resume``), in order, ``seq`` the Raft index; ``command`` is the filtered
  state-machine command, or null for an entry that is not one (noop, config) or that the filter
  withholds whole, so that the replica can check that seqs are contiguous;
- ``feed_heartbeat`` {"seq", "commit", "leader_id", "term", "time"} every 0.5 s.

The replica acks (``feed_ack`` {"seq"}) at least every 0.5 s. The voter keeps at most
``max_unacked`` changes in flight per replica (it resumes on the next ack) and drops a
subscription not acked for ``ack_timeout`` seconds (its heartbeats stop: the replica fails over).

Resume needs every change after ``after``: the voter keeps a bounded window of the latest
applied entries (``window_entries``, ``window_bytes``); older than that, or after a Raft
snapshot replaced this voter's state, the replica gets a fresh snapshot. A subscriber that falls
out of the window while subscribed is sent the oldest change the window still has: the gap
makes it subscribe again (and get a snapshot).

Filtering happens here, before anything leaves the voter, with the zone of the replica's
*certificate* (``mesh.zones.filter``); a replica claiming another zone is refused. Only
``replica`` keys may subscribe: any other key's subscribe is refused and counted
(``schedulezero_security_rejected_total``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import msgspec

from mesh.consensus.messages import COMMAND, Entry
from mesh.contracts import Incoming, MessageBus, Replica, refusal
from mesh.zones.filter import STRICTEST, ZoneFilter, filter_command, filter_for, filter_snapshot

if TYPE_CHECKING:
    from mesh.security.keys import Certificate

__all__ = [
    "FEED_ACK",
    "FEED_CHANGE",
    "FEED_HEARTBEAT",
    "FEED_SNAPSHOT",
    "FEED_SUBSCRIBE",
    "FeedServer",
    "FeedSettings",
]

log = logging.getLogger("mesh.zones.feed")

FEED_SUBSCRIBE = "feed_subscribe"
FEED_ACK = "feed_ack"
FEED_SNAPSHOT = "feed_snapshot"
FEED_CHANGE = "feed_change"
FEED_HEARTBEAT = "feed_heartbeat"

MiB = 1024 * 1024
# Raw bytes per snapshot part: 768 KiB is exactly 1 MiB of base64.
SNAPSHOT_PART_BYTES = 768 * 1024
_MAX_ID = 255


@attrs.frozen
class FeedSettings:
    window_entries: int = 10_000  # changes kept for resume
    window_bytes: int = 64 * MiB  # ... and at most this many bytes of them (JSON)
    max_unacked: int = 5_000  # changes in flight per replica before the voter waits for an ack
    ack_timeout: float = 10.0  # seconds without an ack before a subscription is dropped
    heartbeat_interval: float = 0.5
    part_bytes: int = SNAPSHOT_PART_BYTES


@attrs.define(eq=False)
class _Subscription:
    replica_id: str
    identity: bytes
    zone: str
    filter: ZoneFilter
    next_seq: int  # the next change to push
    acked: int  # the highest seq the replica acknowledged
    last_ack: float  # monotonic
    snapshot: bytes | None = None  # the filtered image still being sent, if any
    snapshot_seq: int = 0
    snapshot_offset: int = 0
    snapshot_crc: int = 0

    def unacked(self) -> int:
        return self.next_seq - 1 - self.acked


class FeedServer:
    """The change feed of one voter; see the module docstring.

    ``bus`` routes ``feed_subscribe``/``feed_ack`` here and sends on the node's ROUTER;
    ``replica`` gives term, leader and commit index; ``applied_index`` and ``snapshot`` read the
    state machine (``SchedulerState.snapshot``) consistently, both on the event loop;
    ``certificate`` looks up a sender's certificate (None on a mesh without keys, where every
    subscriber gets the strictest filter); ``filters`` are the configured zones'.
    :meth:`on_apply` must be registered as the node's apply listener.
    """

    def __init__(
        self,
        bus: MessageBus,
        replica: Replica,
        *,
        applied_index: Callable[[], int],
        snapshot: Callable[[], bytes],
        certificate: Callable[[str], Certificate | None] | None,
        filters: Mapping[str, ZoneFilter],
        settings: FeedSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.replica = replica
        self._applied_index = applied_index
        self._snapshot = snapshot
        self._certificate = certificate
        self.filters = dict(filters)
        self.settings = settings or FeedSettings()
        self.clock = clock
        self.wall_clock = wall_clock
        self.counters: collections.Counter[str] = collections.Counter()
        self.subscriptions: dict[str, _Subscription] = {}
        # The window: (seq, command or None, bytes) for seqs first..last, contiguous.
        self._window: collections.deque[tuple[int, Any, int]] = collections.deque()
        self._window_bytes = 0
        self._last = applied_index()
        self._snapshots: dict[ZoneFilter, tuple[int, bytes]] = {}  # one image per filter
        self._pump_scheduled = False
        self._task: asyncio.Task[None] | None = None
        # Set while anyone subscribes: without subscribers the heartbeat loop sleeps (an idle
        # voter's CPU is its wake-ups, docs/performance.md).
        self._subscribed = asyncio.Event()
        bus.handle(FEED_SUBSCRIBE, self._on_subscribe)
        bus.handle(FEED_ACK, self._on_ack)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(), name="feed-heartbeats"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.subscriptions.clear()
        self._subscribed.clear()
        self._window.clear()
        self._snapshots.clear()

    # ------------------------------------------------------------------ the window

    @property
    def first_seq(self) -> int:
        """The oldest change the window holds (``last_seq + 1`` when it is empty)."""
        return self._last - len(self._window) + 1

    @property
    def last_seq(self) -> int:
        return self._last

    def replicas(self) -> list[dict[str, Any]]:
        """The replicas following this voter: zone, the last change each acknowledged, how many
        changes it is behind, and seconds since its last acknowledgement."""
        now = self.clock()
        return [
            {
                "replica_id": sub.replica_id,
                "zone": sub.zone,
                "acked": sub.acked,
                "lag_changes": max(0, self._last - sub.acked),
                "last_ack_seconds": round(max(0.0, now - sub.last_ack), 3),
            }
            for sub in sorted(self.subscriptions.values(), key=lambda s: s.replica_id)
        ]

    def on_apply(self, entry: Entry, _result: Any) -> None:
        """The node's apply listener: every applied entry, in order. Never raises (an error
        here would stop the node's apply loop)."""
        try:
            self._record(entry)
        except Exception:
            self.counters["errors"] += 1
            log.exception("feed: could not record entry %d; the window restarts", entry.index)
            self._restart_window(entry.index)

    def _restart_window(self, last: int) -> None:
        self._window.clear()
        self._window_bytes = 0
        self._last = last

    def _record(self, entry: Entry) -> None:
        if entry.index != self._last + 1:
            # A Raft snapshot replaced the state (or entries were applied before we listened):
            # the changes in between are not ours to give; subscribers behind resynchronise.
            self._restart_window(entry.index - 1)
        command = entry.data if entry.kind == COMMAND else None
        size = 16
        if command is not None:
            try:
                size += len(msgspec.json.encode(command))
            except (TypeError, ValueError, OverflowError):
                size += 1024
        self._window.append((entry.index, command, size))
        self._window_bytes += size
        self._last = entry.index
        s = self.settings
        while len(self._window) > s.window_entries or (
            self._window_bytes > s.window_bytes and len(self._window) > 1
        ):
            self._window_bytes -= self._window.popleft()[2]
        if self.subscriptions:
            self._schedule_pump()

    def _sync_position(self) -> None:
        """After a Raft snapshot install the state is ahead of the window: restart it there."""
        applied = self._applied_index()
        if applied != self._last:
            self._restart_window(applied)

    # ------------------------------------------------------------------ requests

    def _refuse(self, msg: Incoming, reason: str, detail: str, error: str) -> dict[str, Any]:
        self.counters[f"refused.{reason}"] += 1
        self.bus.reject(msg, reason, detail)
        return {"ok": False, "error": error}

    def _on_subscribe(self, msg: Incoming) -> dict[str, Any]:
        p = msg.payload
        replica_id, zone, after = p.get("replica_id"), p.get("zone"), p.get("after")
        reason = refusal(msg, replica_id, "replica")
        if reason is not None:
            return self._refuse(
                msg,
                reason,
                f"feed_subscribe as {str(replica_id)[:130]!r}",
                "only a replica key may subscribe to the feed, as itself",
            )
        if (
            not isinstance(replica_id, str)
            or not 0 < len(replica_id) <= _MAX_ID
            or not isinstance(zone, str)
            or not 0 < len(zone) <= _MAX_ID
            or type(after) is not int
            or after < 0
        ):
            return self._refuse(
                msg,
                "malformed",
                f"feed_subscribe {str(p)[:200]}",
                'feed_subscribe needs {"replica_id": str, "zone": str, "after": int >= 0}',
            )
        zone_filter = STRICTEST  # no certificate (a mesh without keys): nothing is vouched for
        if msg.sender is not None:
            cert = self._certificate(msg.sender) if self._certificate is not None else None
            bound = cert.zone if cert is not None else None
            if bound is not None and zone != bound:
                return self._refuse(
                    msg,
                    "zone_mismatch",
                    f"replica {replica_id!r} claimed zone {zone!r}, its key is for {bound!r}",
                    f"zone {zone!r} is not this replica key's zone",
                )
            zone_filter = filter_for(self.filters, bound)
        try:
            return self._subscribe(msg, replica_id, zone, after, zone_filter)
        except Exception:
            self.counters["errors"] += 1
            log.exception("feed: subscribe of replica %s failed", replica_id)
            return {"ok": False, "error": "the voter could not serve the feed; try another"}

    def _subscribe(
        self, msg: Incoming, replica_id: str, zone: str, after: int, zone_filter: ZoneFilter
    ) -> dict[str, Any]:
        self._sync_position()
        sub = _Subscription(
            replica_id,
            msg.identity,
            zone,
            zone_filter,
            next_seq=after + 1,
            acked=after,
            last_ack=self.clock(),
        )
        if after > 0 and after >= self.first_seq - 1:
            mode = "resume"
        else:
            mode = "snapshot"
            seq = self._last
            image = self._filtered_snapshot(zone_filter, seq)
            sub.snapshot, sub.snapshot_seq, sub.snapshot_crc = image, seq, zlib.crc32(image)
            sub.next_seq, sub.acked = seq + 1, seq
        old = self.subscriptions.pop(replica_id, None)
        self.subscriptions[replica_id] = sub
        self._subscribed.set()
        self.counters[f"subscribed.{mode}"] += 1
        log.info(
            "feed: replica %s (zone %s) subscribed after %d: %s at %d%s",
            replica_id,
            zone,
            after,
            mode,
            self._last,
            " (replacing its previous subscription)" if old is not None else "",
        )
        # Pushed after this reply has gone out (the transport sends it as we return).
        self._schedule_pump()
        return {
            "ok": True,
            "zone": zone,
            "mode": mode,
            "seq": self._last,
            "leader_id": self.replica.leader_id,
            "term": self.replica.term,
        }

    def _filtered_snapshot(self, zone_filter: ZoneFilter, seq: int) -> bytes:
        cached = self._snapshots.get(zone_filter)
        if cached is not None and cached[0] == seq:
            return cached[1]
        image = filter_snapshot(self._snapshot(), zone_filter)
        self._snapshots = {f: v for f, v in self._snapshots.items() if v[0] == seq}
        self._snapshots[zone_filter] = (seq, image)
        return image

    def _on_ack(self, msg: Incoming) -> None:
        sender = msg.sender if msg.sender is not None else msg.identity.decode("utf-8", "replace")
        sub = self.subscriptions.get(sender)
        seq = msg.payload.get("seq")
        if sub is None or sub.identity != msg.identity or type(seq) is not int:
            self.counters["acks_ignored"] += 1
            return None
        sub.acked = max(sub.acked, min(seq, sub.next_seq - 1))
        sub.last_ack = self.clock()
        self._schedule_pump()
        return None

    # ------------------------------------------------------------------ pushing

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        for sub in list(self.subscriptions.values()):
            try:
                self._push(sub)
            except Exception:
                self.counters["errors"] += 1
                log.exception("feed: pushing to replica %s failed; dropped", sub.replica_id)
                self._drop(sub, "error")

    def _send(self, sub: _Subscription, kind: str, payload: dict[str, Any]) -> bool:
        if self.bus.send_to_identity(sub.identity, kind, payload):
            self.counters[f"sent.{kind}"] += 1
            return True
        self.counters["send_blocked"] += 1  # queue full or replica gone: retried on next pump
        return False

    def _push(self, sub: _Subscription) -> None:
        if sub.snapshot is not None and not self._push_snapshot(sub):
            return
        window, first = self._window, self.first_seq
        limit = self.settings.max_unacked
        while sub.next_seq <= self._last and sub.unacked() < limit:
            seq = max(sub.next_seq, first)  # > next_seq: fell out of the window, a gap
            command = window[seq - first][1]
            if command is not None:
                command = filter_command(command, sub.filter)
            if not self._send(sub, FEED_CHANGE, {"seq": seq, "command": command}):
                return
            if seq != sub.next_seq:
                self.counters["gaps_sent"] += 1
                log.info(
                    "feed: replica %s fell behind the window (next %d, oldest kept %d)",
                    sub.replica_id,
                    sub.next_seq,
                    seq,
                )
            sub.next_seq = seq + 1

    def _push_snapshot(self, sub: _Subscription) -> bool:
        image = sub.snapshot
        assert image is not None
        size, step = len(image), self.settings.part_bytes
        while True:
            offset = sub.snapshot_offset
            part = image[offset : offset + step]
            payload: dict[str, Any] = {
                "seq": sub.snapshot_seq,
                "offset": offset,
                "size": size,
                "data": base64.b64encode(part).decode("ascii"),
            }
            last = offset + len(part) >= size
            if last:
                payload["crc"] = sub.snapshot_crc
            if not self._send(sub, FEED_SNAPSHOT, payload):
                return False
            sub.snapshot_offset = offset + len(part)
            if last:
                sub.snapshot = None
                return True

    def _drop(self, sub: _Subscription, why: str) -> None:
        if self.subscriptions.get(sub.replica_id) is sub:
            del self.subscriptions[sub.replica_id]
            if not self.subscriptions:
                self._subscribed.clear()
                self._snapshots.clear()  # no heartbeat round will come to release them
            self.counters[f"dropped.{why}"] += 1
            log.info("feed: dropped the subscription of replica %s (%s)", sub.replica_id, why)

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._subscribed.wait()
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                self.heartbeat()
            except Exception:
                self.counters["errors"] += 1
                log.exception("feed: heartbeat round failed")

    def heartbeat(self) -> None:
        """One round: drop silent subscribers, tell the others where this voter is, push."""
        now = self.clock()
        beat = {
            "seq": self._applied_index(),
            "commit": self.replica.commit_index,
            "leader_id": self.replica.leader_id,
            "term": self.replica.term,
            "time": self.wall_clock(),
        }
        for sub in list(self.subscriptions.values()):
            if now - sub.last_ack > self.settings.ack_timeout:
                self._drop(sub, "ack_timeout")
                continue
            self._send(sub, FEED_HEARTBEAT, beat)
        if not any(s.snapshot is not None for s in self.subscriptions.values()):
            self._snapshots.clear()  # images are only kept while one is being sent
        self._pump()
