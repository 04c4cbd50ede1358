"""``GET /api/events``: the node's live changes as Server-Sent Events (docs/api.md, "Events").

The :class:`EventHub` turns what the node already reports into events and fans them out to the
connected clients:

- cluster changes from the node's event bus (``node_event``, subscribed by the composition
  root): ``leader`` (leader or term changed), ``role`` (this node's role), ``peer`` (a peer
  became alive, suspect or dead), ``voters`` (a configuration entry), ``resync`` (a Raft
  snapshot replaced the local state: refetch the lists);
- schedule, job and execution changes from every applied state-machine command (``on_apply``,
  the node's apply listener): ``schedule``, ``job``, ``execution``;
- handler changes from a cheap diff of the handler registry, once a second while clients are
  connected: ``handler`` (a replica, which follows no leader's events, diffs leader and term the
  same way).

Each frame is ``id: <boot>-<n>`` (``n`` increases by one per event of this node process, ``boot``
names the process), ``event: <kind>`` and ``data: <JSON>``. A client first gets ``hello`` (a
summary to render at once); with a ``Last-Event-ID`` still in the ring buffer it gets the events
it missed instead, else ``reset`` and then ``hello``. A comment line every ``heartbeat`` seconds
keeps proxies from closing an idle stream.

Costs are bounded: at most ``max_clients`` streams (more: 503), at most ``queue_size`` events
waiting per client (a client that falls further behind is dropped: it reconnects and resumes, or
gets ``reset``), a write that does not complete in ``write_timeout`` drops the client too. With
no client connected (nor one that left within ``RESUME_SECONDS``) events are counted, not built.

``read`` callers see sensitive keys masked in every event (``mesh.security.redact``), as in the
JSON answers of the other GETs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from uuid import UUID

import attrs
from aiohttp import web

from mesh.api.auth import CALLER_KEY
from mesh.api.schema import schedule_to_json
from mesh.contracts import NodeView, Replica
from mesh.scheduling.state import SchedulerState
from mesh.security.redact import DEFAULT_SENSITIVE_KEYS, redact

__all__ = ["EventHub"]

log = logging.getLogger("mesh.api.events")

MAX_CLIENTS = 100
QUEUE_SIZE = 1000  # events waiting per client before it is dropped as too slow
RING_SIZE = 1000  # events kept for Last-Event-ID resume
HEARTBEAT_SECONDS = 15.0
WRITE_TIMEOUT = 10.0
POLL_SECONDS = 1.0  # the handler (and replica leader) diff
LEFT_CHECK_SECONDS = 1.0  # how often a quiet stream checks that its client is still there
RESUME_SECONDS = 60.0  # after the last client left, events are still kept this long
_COMMAND = "command"  # mesh.consensus.messages.COMMAND (the api layer does not import it)

# The node's bus events that may change the leader, the term or this node's role.
_LEADERSHIP = frozenset(
    {"term_changed", "election_started", "leader_elected", "stepped_down", "leader_observed"}
)
_PEER_STATES = {"peer_up": "alive", "peer_suspect": "suspect", "peer_down": "dead"}


@attrs.define(eq=False)
class _Event:
    seq: int
    kind: str
    data: dict[str, Any]
    _frames: dict[bool, bytes] = attrs.field(factory=dict)

    def frame(self, boot: str, masked: bool, names: tuple[str, ...]) -> bytes:
        """The SSE frame, built once per form (masked or not) whatever the number of clients."""
        out = self._frames.get(masked)
        if out is None:
            data = redact(self.data, names) if masked else self.data
            out = _frame(f"{boot}-{self.seq}", self.kind, data)
            self._frames[masked] = out
        return out


def _frame(event_id: str | None, kind: str, data: Any) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    # json.dumps escapes newlines inside strings: the data is one line, as SSE needs.
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str)}\n\n".encode()


@attrs.define(eq=False)
class _Client:
    masked: bool
    queue: asyncio.Queue[_Event | None]
    dropped: bool = False


class EventHub:
    """The events of one node (voter or replica) and their SSE clients; see the module doc.

    ``replica`` and ``view`` are the node as the API sees it (role, term, leader, health);
    ``state`` the replicated scheduler state; ``handlers`` lists the handler registry
    (``SchedulingService.handlers``); ``diff_leader``: compare leader and term every poll (a
    replica, whose node has no event bus). :meth:`on_apply` must be the node's apply listener and
    :meth:`node_event` a subscriber of its event bus, both registered before the node starts.
    """

    def __init__(
        self,
        replica: Replica,
        view: NodeView,
        state: SchedulerState,
        *,
        handlers: Callable[[], list[dict[str, Any]]] | None = None,
        sensitive_keys: Iterable[str] | None = None,
        diff_leader: bool = False,
        max_clients: int = MAX_CLIENTS,
        queue_size: int = QUEUE_SIZE,
        ring_size: int = RING_SIZE,
        heartbeat: float = HEARTBEAT_SECONDS,
        write_timeout: float = WRITE_TIMEOUT,
        poll: float = POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replica = replica
        self.view = view
        self.state = state
        self.handlers = handlers
        self.names = tuple(sensitive_keys) if sensitive_keys is not None else DEFAULT_SENSITIVE_KEYS
        self.diff_leader = diff_leader
        self.max_clients = max_clients
        self.queue_size = queue_size
        self.heartbeat = heartbeat
        self.write_timeout = write_timeout
        self.poll = poll
        self.clock = clock
        # Ids of an earlier process of this node must not resume into this one's numbering.
        self.boot = format(time.time_ns() // 1_000_000, "x")
        self.seq = 0
        self._ring: deque[_Event] = deque(maxlen=ring_size)
        self.clients: set[_Client] = set()
        self._left_at: float | None = None  # when the last client left
        self._leader: tuple[str | None, int] | None = None
        self._role: str | None = None
        self._handlers: dict[str, dict[str, Any]] = {}
        self._poller: asyncio.Task[None] | None = None
        self.counters = {"clients_refused": 0, "clients_dropped": 0}

    # ------------------------------------------------------------------ producing events

    def _listening(self) -> bool:
        if self.clients:
            return True
        return self._left_at is not None and self.clock() - self._left_at < RESUME_SECONDS

    def publish(self, kind: str, build: Callable[[], dict[str, Any]]) -> None:
        """Number an event and send it to every client; ``build`` makes its data, called only
        when someone listens (nobody: the ring is cleared, so no resume crosses the gap)."""
        self.seq += 1
        if not self._listening():
            self._ring.clear()
            return
        event = _Event(self.seq, kind, build())
        self._ring.append(event)
        for client in list(self.clients):
            if client.dropped:
                continue
            try:
                client.queue.put_nowait(event)
            except asyncio.QueueFull:
                # Too slow: drop it rather than grow; its stream ends, it may resume.
                client.dropped = True
                self.counters["clients_dropped"] += 1
                with contextlib.suppress(asyncio.QueueEmpty):
                    client.queue.get_nowait()
                client.queue.put_nowait(None)

    def node_event(self, event: str, fields: dict[str, Any]) -> None:
        """A subscriber of the node's event bus (``EventBus.subscribe``)."""
        if event in _LEADERSHIP:
            self._check_leadership()
        elif event in _PEER_STATES:
            self.publish(
                "peer",
                lambda: {
                    "peer": fields.get("peer"),
                    "state": _PEER_STATES[event],
                    "address": fields.get("address"),
                },
            )
        elif event == "config_changed":
            self.publish(
                "voters", lambda: {"voters": fields.get("voters"), "index": fields.get("index")}
            )
        elif event == "snapshot_installed":
            self.resync("snapshot installed", fields.get("index"))

    def resync(self, reason: str, index: Any = None) -> None:
        """The local state was replaced whole: clients refetch what they show."""
        self.publish("resync", lambda: {"reason": reason, "index": index})

    def _check_leadership(self) -> None:
        r = self.replica
        leader = (r.leader_id, r.term)
        if leader != self._leader:
            self._leader = leader
            self.publish("leader", lambda: {"leader_id": leader[0], "term": leader[1]})
        role = r.role
        if role != self._role:
            self._role = role
            self.publish("role", lambda: {"node_id": r.node_id, "role": role, "term": leader[1]})

    def on_apply(self, entry: Any, result: Any) -> None:
        """The node's apply listener: events for the command just applied (state is current)."""
        if entry.kind != _COMMAND or not isinstance(entry.data, dict):
            return
        try:
            self._command(entry.data, result)
        except Exception:  # a malformed command must not stop the apply loop
            log.exception("no event for the command at index %s", entry.index)

    def _command(self, c: dict[str, Any], result: Any) -> None:
        op = c.get("op")
        state = self.state
        if op == "batch" and isinstance(result, list):
            for sub, (ok, res) in zip(c.get("commands", ()), result, strict=False):
                if ok and isinstance(sub, dict):
                    self._command(sub, res)
        elif op == "add_schedule" and result in ("added", "updated"):
            sid = c["schedule"]["id"]
            self._schedule(result, sid)
        elif op == "remove_schedules":
            for sid in result or ():
                self.publish("schedule", lambda sid=sid: {"action": "removed", "id": sid})
        elif op == "release_schedules":
            for sid in result or ():
                self._schedule("fired", sid, whole=False)
        elif op == "fire_round" and isinstance(result, dict):
            for sid in result.get("schedules", ()):
                self._schedule("fired", sid, whole=False)
            for jid in result.get("jobs", ()):
                self._job("queued", jid)
        elif op == "add_job" and result is True:
            self._job("queued", c["job"]["id"])
        elif op == "acquire_jobs":
            for jid in result or ():
                self._job("running", jid)
        elif op == "release_job" and result is True and state.last_record is not None:
            record = state.last_record  # written by this very command (maybe trimmed since)
            self.publish("execution", lambda: dict(record))
        elif op in ("trigger_schedule", "backfill_schedule") and isinstance(result, dict):
            for jid in [result.get("job_id"), *result.get("job_ids", ())]:
                if jid is not None:
                    self._job("queued", jid)

    def _schedule(self, action: str, sid: str, *, whole: bool = True) -> None:
        s = self.state.schedules.get(sid)
        if s is None:
            return
        if whole:  # created or replaced (pause and resume replace): the schedule as GET shows it
            self.publish("schedule", lambda: {"action": action, "id": sid, "schedule": _json(s)})
            return
        self.publish(
            "schedule",
            lambda: {
                "action": action,
                "id": sid,
                "last_fire_time": _iso(s.last_fire_time),
                "next_fire_time": _iso(s.next_fire_time),
            },
        )

    def _job(self, action: str, job_id: Any) -> None:
        try:
            js = self.state.jobs.get(UUID(str(job_id)))
        except ValueError:
            return
        if js is None:
            return
        job = js.job
        self.publish(
            "job",
            lambda: {
                "action": action,
                "job_id": str(job.id),
                "schedule_id": job.schedule_id,
                "task": job.task_id,
                "scheduled_fire_time": _iso(job.scheduled_fire_time),
                "attempt": js.attempts,
                "term": js.term,
            },
        )

    def _diff_handlers(self) -> None:
        if self.handlers is None:
            return
        now = {str(h.get("handler_id")): h for h in self.handlers()}
        for hid, h in now.items():
            seen = {k: v for k, v in h.items() if k != "last_seen"}
            if self._handlers.get(hid) != seen:
                self._handlers[hid] = seen
                self.publish("handler", lambda h=h: {"action": "changed", **h})
        for hid in set(self._handlers) - set(now):
            del self._handlers[hid]
            self.publish("handler", lambda hid=hid: {"action": "gone", "handler_id": hid})

    async def _poll_loop(self) -> None:
        while True:
            try:
                self._diff_handlers()
                if self.diff_leader:
                    self._check_leadership()
            except Exception:
                log.exception("event diff failed")
            await asyncio.sleep(self.poll)

    # ------------------------------------------------------------------ the stream

    def hello(self) -> dict[str, Any]:
        """What a client needs to render at once: leader, term, role and counts."""
        state = self.state
        health = self.view.health()
        running = sum(1 for js in state.jobs.values() if js.job.acquired_by is not None)
        return {
            "node_id": self.replica.node_id,
            "role": health.get("role"),
            "leader_id": health.get("leader_id"),
            "term": health.get("term"),
            "commit_index": health.get("commit_index"),
            "schedules": len(state.schedules),
            "paused": sum(1 for s in state.schedules.values() if s.paused),
            "jobs_pending": len(state.jobs) - running,
            "jobs_running": running,
            "executions": len(state.executions),
            "handlers": len(self.handlers()) if self.handlers is not None else 0,
        }

    def _missed(self, last_event_id: str | None) -> list[_Event] | None:
        """The events after ``last_event_id`` if the ring still has them all, else None."""
        if not last_event_id:
            return None
        boot, _, n = last_event_id.strip().partition("-")
        if boot != self.boot or not n.isascii() or not n.isdigit() or len(n) > 18:
            return None
        after = int(n)
        if after > self.seq:
            return None
        if after == self.seq:
            return []
        if not self._ring or self._ring[0].seq > after + 1:
            return None
        return [e for e in self._ring if e.seq > after]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if set(request.query) - {"last_event_id"}:
            raise web.HTTPBadRequest(reason="the only query parameter is last_event_id")
        if len(self.clients) >= self.max_clients:
            self.counters["clients_refused"] += 1
            return web.json_response(
                {"error": f"too many event streams on this node (limit {self.max_clients})"},
                status=503,
                headers={"Retry-After": "5"},
            )
        caller = request.get(CALLER_KEY)
        # No caller known means no authentication ran: mask (fail closed), as for a reader.
        masked = caller is None or caller.role == "read"
        last_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        missed = self._missed(last_id)
        client = _Client(masked, asyncio.Queue(self.queue_size))
        self.clients.add(client)
        self._start_polling()
        # The first frames are taken now, so nothing published meanwhile is lost or doubled.
        if missed is not None:
            first = [e.frame(self.boot, masked, self.names) for e in missed]
        else:
            first = []
            if last_id:
                reason = "the events after Last-Event-ID are no longer kept"
                first.append(_frame(None, "reset", {"reason": reason}))
            hello = redact(self.hello(), self.names) if masked else self.hello()
            first.append(_frame(f"{self.boot}-{self.seq}", "hello", hello))
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            }
        )
        try:
            await response.prepare(request)
            async with asyncio.timeout(self.write_timeout):
                await response.write(b"retry: 2000\n\n" + b"".join(first))
            await self._stream(client, request, response)
        except (ConnectionError, TimeoutError):
            pass  # the client left, or stopped reading: its stream ends here
        finally:
            self.clients.discard(client)
            if not self.clients:
                self._left_at = self.clock()
                self._stop_polling()
        return response

    async def _stream(
        self, client: _Client, request: web.Request, response: web.StreamResponse
    ) -> None:
        last_write = self.clock()
        while True:
            # Wake at least every LEFT_CHECK_SECONDS: a client that hung up frees its slot then,
            # not only at the next heartbeat's failed write.
            wait = min(self.heartbeat - (self.clock() - last_write), LEFT_CHECK_SECONDS)
            try:
                event = await asyncio.wait_for(client.queue.get(), max(wait, 0.0))
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    return
                if self.clock() - last_write < self.heartbeat:
                    continue
                chunk = b": keep-alive\n\n"
            else:
                if event is None:  # dropped as too slow, or the node shuts down
                    return
                chunk = event.frame(self.boot, client.masked, self.names)
            async with asyncio.timeout(self.write_timeout):
                await response.write(chunk)
            last_write = self.clock()

    def _start_polling(self) -> None:
        if self._poller is None:
            self._leader = self._leader or (self.replica.leader_id, self.replica.term)
            self._role = self._role or self.replica.role
            self._handlers = {}
            if self.handlers is not None:  # the registry as it is now is in hello, not news
                for h in self.handlers():
                    self._handlers[str(h.get("handler_id"))] = {
                        k: v for k, v in h.items() if k != "last_seen"
                    }
            self._poller = asyncio.get_running_loop().create_task(
                self._poll_loop(), name="events-poll"
            )

    def _stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None

    async def close(self, _app: web.Application | None = None) -> None:
        """End every stream (the server is shutting down: it must not wait for them)."""
        self._stop_polling()
        for client in list(self.clients):
            client.dropped = True
            with contextlib.suppress(asyncio.QueueEmpty):
                client.queue.get_nowait()
            client.queue.put_nowait(None)


def _json(s: Any) -> dict[str, Any]:
    return schedule_to_json(s)


def _iso(dt: Any) -> str | None:
    return dt.isoformat() if dt is not None else None
