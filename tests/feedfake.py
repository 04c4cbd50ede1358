"""A small upstream that speaks the feed protocol (docs/zones.md), for the replica's tests.

It is not the voters' FeedServer: it serves a log of real scheduler commands (``FeedLog``, applied
to a real ``SchedulerState``, so snapshots and changes carry real data) from a real
``MeshTransport`` bound with a ``node`` key (or none, on loopback), and the test steers it:
drop a change once (a gap), corrupt a snapshot, hold changes back, go silent, die.
"""

from __future__ import annotations

import asyncio
import base64
import time
import zlib
from datetime import UTC, datetime
from typing import Any

import attrs
from apscheduler import Schedule, Task
from apscheduler.triggers.interval import IntervalTrigger

from mesh.consensus.messages import COMMAND, Entry
from mesh.contracts import Incoming
from mesh.scheduling.state import SchedulerState, dump_schedule, dump_task
from mesh.security.keys import KeyRing
from mesh.transport.zmq import MeshTransport
from tests.netutil import free_mesh_address

TASK = "report"


def add_task_command(task: str = TASK) -> dict[str, Any]:
    return {"op": "add_task", "task": dump_task(Task(id=task, func="x:y", job_executor="mesh"))}


def add_schedule_command(schedule_id: str, task: str = TASK, **fields: Any) -> dict[str, Any]:
    trigger = IntervalTrigger(seconds=60, start_time=datetime(2030, 1, 1, tzinfo=UTC))
    schedule = Schedule(
        id=schedule_id,
        task_id=task,
        trigger=trigger,
        next_fire_time=trigger.next(),
        job_executor="mesh",
        **fields,
    )
    return {"op": "add_schedule", "schedule": dump_schedule(schedule)}


def remove_schedule_command(*ids: str) -> dict[str, Any]:
    return {"op": "remove_schedules", "ids": list(ids)}


class FeedLog:
    """The committed log every fake voter serves (seq = index, from 1); ``None`` entries stand
    for entries that are not for the state machine (a leader's no-op)."""

    def __init__(self) -> None:
        self.commands: list[dict[str, Any] | None] = []
        self.state = SchedulerState()

    @property
    def seq(self) -> int:
        return len(self.commands)

    def append(self, *commands: dict[str, Any] | None) -> int:
        for command in commands:
            self.commands.append(command)
            if command is not None:
                self.state.apply(Entry(1, self.seq, COMMAND, command))
        return self.seq


@attrs.define
class Subscription:
    identity: bytes
    zone: str
    after: int
    mode: str
    next_seq: int
    snapshot: tuple[int, bytes] | None = None


class FakeFeed:
    """One fake voter serving ``log``'s feed; see the module docstring."""

    def __init__(
        self,
        name: str,
        log: FeedLog,
        *,
        keys: KeyRing | None = None,
        address: str | None = None,
        chunk_bytes: int = 1024 * 1024,
        heartbeat_interval: float = 0.2,
    ) -> None:
        self.name = name
        self.log = log
        self.transport = MeshTransport(name, address or free_mesh_address(), keys=keys)
        self.transport.set_handler(self._on_message)
        self.chunk_bytes = chunk_bytes
        self.heartbeat_interval = heartbeat_interval
        self.subscriptions: dict[bytes, Subscription] = {}
        self.subscribes: list[dict[str, Any]] = []  # every feed_subscribe payload, in order
        self.acks: list[int] = []
        self.retained_after = 0  # a resume is possible for after >= this
        self.drop_once: set[int] = set()  # seqs not sent the first time (a gap)
        self.corrupt_snapshots = 0  # the next N snapshots carry a wrong crc
        self.hold = False  # changes are held back (heartbeats still go)
        self.silent = False  # nothing at all is sent (a voter cut off or hung)
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.transport.bound_address

    async def start(self) -> FakeFeed:
        await self.transport.start()
        self._task = asyncio.get_running_loop().create_task(self._pump())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.transport.close()

    # ------------------------------------------------------------------ requests

    def _on_message(self, msg: Incoming) -> dict[str, Any] | None:
        if msg.kind == "feed_ack":
            self.acks.append(msg.payload.get("seq"))
            return None
        if msg.kind != "feed_subscribe":
            return None
        p = msg.payload
        self.subscribes.append(dict(p))
        if msg.sender is not None and (
            msg.sender_role != "replica" or p["replica_id"] != msg.sender
        ):
            return {"ok": False, "error": "not a replica key"}
        after = p["after"]
        seq = self.log.seq
        resume = 0 < after and self.retained_after <= after <= seq
        sub = Subscription(
            identity=msg.identity,
            zone=p["zone"],
            after=after,
            mode="resume" if resume else "snapshot",
            next_seq=after + 1 if resume else seq + 1,
            snapshot=None if resume else (seq, self.log.state.snapshot()),
        )
        self.subscriptions[msg.identity] = sub
        return {
            "ok": True,
            "zone": p["zone"],
            "mode": sub.mode,
            "seq": seq,
            "leader_id": self.name,
            "term": 1,
        }

    # ------------------------------------------------------------------ pushing

    async def _pump(self) -> None:
        next_beat = 0.0
        while True:
            await asyncio.sleep(0.01)
            if self.silent:
                continue
            for sub in list(self.subscriptions.values()):
                self._push(sub)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.heartbeat_interval
                beat = {
                    "seq": self.log.seq,
                    "commit": self.log.seq,
                    "leader_id": self.name,
                    "term": 1,
                    "time": time.time(),
                }
                for identity in list(self.subscriptions):
                    self.transport.send_to_identity(identity, "feed_heartbeat", beat)

    def _push(self, sub: Subscription) -> None:
        send = self.transport.send_to_identity
        if sub.snapshot is not None:
            seq, data = sub.snapshot
            sub.snapshot = None
            crc = zlib.crc32(data)
            if self.corrupt_snapshots:
                self.corrupt_snapshots -= 1
                crc ^= 1
            for offset in range(0, max(len(data), 1), self.chunk_bytes):
                part = data[offset : offset + self.chunk_bytes]
                payload = {
                    "seq": seq,
                    "offset": offset,
                    "size": len(data),
                    "data": base64.b64encode(part).decode(),
                }
                if offset + len(part) >= len(data):
                    payload["crc"] = crc
                send(sub.identity, "feed_snapshot", payload)
        if self.hold:
            return
        while sub.next_seq <= self.log.seq:
            seq = sub.next_seq
            sub.next_seq += 1
            if seq in self.drop_once:
                self.drop_once.discard(seq)
                continue
            send(sub.identity, "feed_change", {"seq": seq, "command": self.log.commands[seq - 1]})
