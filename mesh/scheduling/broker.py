"""ZMQEventBroker: APScheduler's event broker over the mesh's own PUB/SUB sockets.

A sibling of APScheduler's Redis and MQTT brokers, with the mesh transport in place of the
external service. What travels, and why losing it is harmless, is in docs/event-broker.md:
events only wake scheduler loops and inform observers; schedule and job state is replicated
through Raft, never through this broker.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Iterable
from contextlib import AsyncExitStack
from logging import Logger
from typing import Any

import attrs
from apscheduler import (
    Event,
    ScheduleAdded,
    ScheduleRemoved,
    SchedulerStarted,
    SchedulerStopped,
    ScheduleUpdated,
    TaskAdded,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler.eventbrokers.base import BaseExternalEventBroker
from attrs.validators import instance_of

from mesh.config import parse_mesh_address
from mesh.contracts import Broadcaster

# The events a node broadcasts to the others: schedule and task changes. Per-job events
# (thousands per second under load) stay on the leader: their outcomes reach every node through
# the replicated log.
LIFECYCLE_EVENTS: frozenset[type[Event]] = frozenset(
    {
        ScheduleAdded,
        ScheduleUpdated,
        ScheduleRemoved,
        TaskAdded,
        TaskUpdated,
        TaskRemoved,
        SchedulerStarted,
        SchedulerStopped,
    }
)

# How much of an undecodable payload goes into the log line that reports it.
_LOGGED_PAYLOAD_CHARS = 200


# Broadcast topics share the wire rule of message kinds (mesh.transport.codec).
_TOPIC = re.compile(r"[a-z0-9_.-]{1,32}")


def _check_transport(_instance: object, _attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, Broadcaster):
        raise TypeError(
            f"transport must be a mesh transport (Broadcaster), got {type(value).__name__}"
        )
    if not value.pub_address:
        raise ValueError(
            "ZMQEventBroker needs a bound transport: a client-only one (bind=None) "
            "has no PUB socket to publish on"
        )


def _check_topic(_instance: object, _attribute: attrs.Attribute, value: str) -> None:
    if not _TOPIC.fullmatch(value):
        raise ValueError(f"topic must be 1..32 chars of [a-z0-9_.-], got {value!r}")


def _peer_set(addresses: Iterable[str]) -> set[str]:
    peers = set(addresses)
    for address in peers:
        parse_mesh_address(address)  # ValueError for anything that is not tcp://HOST:PORT
    return peers


@attrs.define(eq=False, repr=False)
class ZMQEventBroker(BaseExternalEventBroker):
    """
    An event broker that broadcasts events on the mesh transport's PUB socket.

    Every event published here is delivered to this process's subscribers and broadcast as
    ``{"event": "<EventClass> <base64 serialized>", "origin": <node id>}`` on ``topic``;
    broadcasts from the peers' PUB sockets are delivered to this process's subscribers.
    Delivery to peers is best effort and at most once (see docs/event-broker.md).

    :param transport: a started transport with a PUB socket, shared with the node; the broker
        never closes it
    :param topic: broadcast topic of the events (1..32 chars of ``[a-z0-9_.-]``)
    :param peers: mesh addresses of the nodes whose broadcasts to receive from the start;
        change the set later with :meth:`add_peer` and :meth:`remove_peer`
    :param install_handler: make :meth:`handle_broadcast` the transport's broadcast handler
        on start (and remove it on stop); pass ``False`` when the node owns that single slot
        and chains :meth:`handle_broadcast` itself

    ``counters`` holds ``published`` and ``publish_failed`` (events broadcast / not
    broadcast, both still delivered locally), ``received`` (peer events delivered locally),
    ``dropped`` (undecodable broadcasts on our topic), ``echoes`` (our own broadcasts coming
    back, ignored) and ``ignored_stopped`` (broadcasts that came while the broker was stopped).
    """

    transport: Broadcaster = attrs.field(validator=_check_transport)
    topic: str = attrs.field(
        kw_only=True, default="apscheduler", validator=[instance_of(str), _check_topic]
    )
    _peers: set[str] = attrs.field(kw_only=True, factory=set, converter=_peer_set)
    install_handler: bool = attrs.field(kw_only=True, default=True, validator=instance_of(bool))
    # Which events also go to the other nodes (None = all). Local subscribers always get
    # everything; a node may keep high-volume job events local (their outcomes are replicated
    # through the log anyway).
    remote_events: frozenset[type[Event]] | None = attrs.field(kw_only=True, default=None)
    counters: collections.Counter[str] = attrs.field(init=False, factory=collections.Counter)
    _running: bool = attrs.field(init=False, default=False)
    _deliveries: set[asyncio.Task[None]] = attrs.field(init=False, factory=set)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(node_id={self.transport.node_id!r}, topic={self.topic!r})"

    @property
    def peers(self) -> frozenset[str]:
        """Mesh addresses whose broadcasts this broker receives."""
        return frozenset(self._peers)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, exit_stack: AsyncExitStack, logger: Logger) -> None:
        await super().start(exit_stack, logger)
        self._running = True
        # Registered after the task group, so it runs first on exit: no delivery is started
        # on a task group that is shutting down.
        exit_stack.callback(self._stop)
        if self.install_handler:
            self.transport.set_broadcast_handler(self.handle_broadcast)
        for address in sorted(self._peers):
            self._subscribe(address)

    def _delivered(self, delivery: asyncio.Task[None]) -> None:
        self._deliveries.discard(delivery)
        if not delivery.cancelled() and (exc := delivery.exception()) is not None:
            self.counters["delivery_failed"] += 1
            self._logger.warning("%s: delivering a broadcast failed: %r", type(self).__name__, exc)

    def _stop(self) -> None:
        self._running = False
        for delivery in list(self._deliveries):
            delivery.cancel()
        if self.install_handler:
            self.transport.set_broadcast_handler(None)
        # Subscriptions stay: they belong to the transport, which the node keeps using.

    # ------------------------------------------------------------------ peers

    def add_peer(self, address: str) -> None:
        """Receive the broadcasts of the node at mesh ``address`` (idempotent)."""
        parse_mesh_address(address)
        self._peers.add(address)
        if self._running:
            self._subscribe(address)

    def remove_peer(self, address: str) -> None:
        """Stop receiving the broadcasts of the node at ``address`` (idempotent).

        The transport has one subscription per peer for every topic, so this ends them all:
        call it when the peer leaves the mesh.
        """
        self._peers.discard(address)
        if address != self.transport.bound_address:
            self.transport.unsubscribe(address)

    def _subscribe(self, address: str) -> None:
        # Our own PUB never needs a subscription: publish() delivers locally already.
        if address != self.transport.bound_address:
            self.transport.subscribe(address)

    # ------------------------------------------------------------------ events

    async def publish(self, event: Event) -> None:
        if self.remote_events is not None and type(event) not in self.remote_events:
            await self.publish_local(event)
            return
        try:
            notification = self.generate_notification_str(event)
            payload = {"event": notification, "origin": self.transport.node_id}
            self.transport.publish(self.topic, payload)
        except Exception:
            # Peers only miss a wake-up; the local loops below must still get the event.
            self.counters["publish_failed"] += 1
            self._logger.warning(
                "%s: could not broadcast %s; delivered locally only",
                type(self).__name__,
                type(event).__name__,
                exc_info=True,
            )
        else:
            self.counters["published"] += 1

        # ZeroMQ PUB does not deliver to its own process, and this process's loops wait on
        # the events they publish too.
        await self.publish_local(event)

    def handle_broadcast(self, topic: str, payload: dict[str, Any]) -> bool:
        """Deliver a broadcast on our topic to the local subscribers; never raises.

        Returns ``True`` when ``topic`` is the broker's (whether or not the payload was
        usable), ``False`` for any other topic, so the node can try its next handler.
        """
        if topic != self.topic:
            return False
        if not self._running:
            self.counters["ignored_stopped"] += 1
            return True
        try:
            event = self._event_from(payload)
            if event is not None:
                # The transport calls us from an event-loop callback, not from a task, where
                # anyio (the task group's cancel scopes) cannot run: deliver from a task.
                delivery = asyncio.get_running_loop().create_task(self.publish_local(event))
                self._deliveries.add(delivery)
                delivery.add_done_callback(self._delivered)
                self.counters["received"] += 1
        except Exception:  # a broken peer must not take the transport's reader down
            self._drop(payload, "unusable payload", exc_info=True)
        return True

    def _event_from(self, payload: dict[str, Any]) -> Event | None:
        notification = payload.get("event")
        origin = payload.get("origin")
        if not isinstance(notification, str) or not isinstance(origin, str):
            self._drop(payload, "expected string fields 'event' and 'origin'")
            return None
        if origin == self.transport.node_id:
            self.counters["echoes"] += 1
            return None
        try:
            event = self.reconstitute_event_str(notification)
        except ValueError:  # binascii.Error: not base64
            self._drop(payload, "event is not base64")
            return None
        if event is None:  # reconstitute_event_str has logged why
            self._drop(payload, "event could not be reconstituted")
            return None
        return event

    def _drop(self, payload: dict[str, Any], reason: str, *, exc_info: bool = False) -> None:
        self.counters["dropped"] += 1
        self._logger.warning(
            "%s: dropped a broadcast on %r (%s): %.*r",
            type(self).__name__,
            self.topic,
            reason,
            _LOGGED_PAYLOAD_CHARS,
            payload,
            exc_info=exc_info,
        )
