"""Who is out there and who is alive: the peer table and its failure detector.

Discovery (static list, mDNS) only says who *might* exist. ``Members`` keeps one ``Peer`` per
mesh address, pings them, and decides alive → suspect → dead from how long ago each was heard
from (a ping reply, a ping, or any Raft message). It knows nothing of Raft beyond what peers say
about themselves; the voter policy (``mesh.membership.voters``) and the node read it.

Every change of a peer's state is reported as an event (``peer_up``, ``peer_suspect``,
``peer_down``, ``quorum_lost``, ``quorum_regained``) to an ``EventSink``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Protocol

import attrs

from mesh.config import MembershipConfig
from mesh.contracts import EventSink

log = logging.getLogger("mesh.membership")

# A peer we exchange Raft traffic with is alive without pings; it is still pinged this many ping
# intervals apart to refresh what only pings carry (its HTTP address, bootstrap flag).
PING_REFRESH_ROUNDS = 4

_STATE_EVENTS = {"alive": "peer_up", "suspect": "peer_suspect", "dead": "peer_down"}


class Dialer(Protocol):
    """What membership needs from the transport."""

    def connect(self, address: str) -> None: ...

    async def request(
        self, address: str, kind: str, payload: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]: ...


@attrs.define
class Peer:
    address: str  # mesh address
    node_id: str | None = None
    http: str | None = None
    state: str = "unknown"  # alive | suspect | dead | unknown
    last_seen: float = -1.0  # monotonic
    last_seen_wall: float | None = None
    role: str | None = None
    term: int = 0
    leader_id: str | None = None
    bootstrapped: bool = False
    ping_inflight: bool = False
    pinged_at: float = float("-inf")  # monotonic


class Members:
    def __init__(
        self,
        node_id: str,
        address: str,
        *,
        dialer: Dialer,
        events: EventSink,
        settings: MembershipConfig,
        local_info: Callable[[], dict[str, Any]],
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.dialer = dialer
        self.events = events
        self.settings = settings
        self.local_info = local_info  # what our pings and ping replies say about us
        self.clock = clock
        self.wall_clock = wall_clock
        self.peers: dict[str, Peer] = {}  # by mesh address
        self._had_quorum: bool | None = None
        self._pings: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lookups

    def by_id(self, node_id: str) -> Peer | None:
        for p in self.peers.values():
            if p.node_id == node_id:
                return p
        return None

    def address_of(self, node_id: str) -> str | None:
        if node_id == self.node_id:
            return self.address
        p = self.by_id(node_id)
        return p.address if p is not None else None

    def alive(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.state == "alive" and p.node_id]

    def has_quorum(self, voters: Collection[str], quorum: int) -> bool:
        """Whether this node sees a majority of ``voters`` alive (itself included)."""
        if not voters:
            return False
        seen = sum(1 for p in self.alive() if p.node_id in voters)
        return seen + (1 if self.node_id in voters else 0) >= quorum

    # ------------------------------------------------------------------ inputs

    def on_discovered(self, addresses: Iterable[str]) -> None:
        """Discovery's listener: every address we did not know becomes a peer."""
        for addr in addresses:
            if addr not in self.peers and addr != self.address:
                self._add(addr)

    def on_ping(self, info: dict[str, Any]) -> None:
        addr = info.get("mesh")
        node_id = info.get("node_id")
        if not isinstance(addr, str) or addr == self.address:
            return
        # A node is known by its id: the address we reach it at (a static entry, a proxy) may
        # differ from the one it advertises, and must not get a second, bypassing connection.
        peer = self.peers.get(addr) or (self.by_id(node_id) if isinstance(node_id, str) else None)
        if peer is None:
            if not self.settings.learn_peers:
                return
            peer = self._add(addr)  # someone knows us that we did not know
        self._update(peer, info)

    def heard_from(self, node_id: str) -> Peer | None:
        """A member spoke (Raft traffic): it is alive. None when no peer has that id."""
        peer = self.by_id(node_id)
        if peer is not None:
            self._seen(peer)
        return peer

    def learn_role(self, peer: Peer, *, term: int, role: str, leader_id: str | None) -> None:
        """What a ping would say, learned from traffic that flows anyway (AppendEntries)."""
        if term >= peer.term:
            peer.term, peer.role, peer.leader_id = term, role, leader_id

    # ------------------------------------------------------------------ the failure detector

    async def run(self, after_round: Callable[[], Awaitable[None] | None]) -> None:
        """Ping, update liveness, then call ``after_round`` every ping interval, until cancelled."""
        interval = self.settings.ping_interval
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock()
            for peer in list(self.peers.values()):
                if peer.ping_inflight:
                    continue
                if (
                    now - peer.last_seen < interval
                    and peer.http is not None
                    and now - peer.pinged_at < PING_REFRESH_ROUNDS * interval
                ):
                    continue  # heard from it through Raft just now: idle CPU is wakeups
                peer.ping_inflight = True
                peer.pinged_at = now
                task = loop.create_task(self._ping(peer))
                self._pings.add(task)
                task.add_done_callback(self._pings.discard)
            self.check_liveness()
            outcome = after_round()
            if outcome is not None:
                await outcome
            await asyncio.sleep(interval)

    async def _ping(self, peer: Peer) -> None:
        try:
            reply = await self.dialer.request(
                peer.address, "ping", self.local_info(), timeout=self.settings.dead_after
            )
            self._update(peer, reply)
        except TimeoutError:
            pass
        except Exception:  # a bad reply must not kill membership
            log.exception("ping to %s failed", peer.address)
        finally:
            peer.ping_inflight = False

    def check_liveness(self) -> None:
        now = self.clock()
        s = self.settings
        for peer in self.peers.values():
            if peer.last_seen < 0:
                continue
            age = now - peer.last_seen
            state = (
                "alive" if age <= s.suspect_after else "suspect" if age <= s.dead_after else "dead"
            )
            if state != peer.state:
                self._set_state(peer, state)

    def check_quorum_visibility(self, voters: Collection[str], quorum: int) -> None:
        """Report when this node stops (or starts again) seeing a majority of the voters."""
        if not voters:
            return
        has = self.has_quorum(voters, quorum)
        if has != self._had_quorum:
            if self._had_quorum is not None or not has:
                self.events.emit(
                    "quorum_regained" if has else "quorum_lost",
                    visible=[self.node_id, *sorted(p.node_id for p in self.alive() if p.node_id)],
                    voters=sorted(voters),
                )
            self._had_quorum = has

    # ------------------------------------------------------------------ views

    def to_json(self, voters: Collection[str], iso: Callable[[float], str]) -> list[dict[str, Any]]:
        return [
            {
                "node_id": p.node_id,
                "mesh_address": p.address,
                "http_address": p.http,
                "state": p.state,
                "role": p.role,
                "last_seen": iso(p.last_seen_wall) if p.last_seen_wall else None,
                "voter": p.node_id in voters,
            }
            for p in sorted(self.peers.values(), key=lambda p: (p.node_id or "~", p.address))
        ]

    # ------------------------------------------------------------------ internals

    def _add(self, addr: str) -> Peer:
        peer = Peer(address=addr)
        self.peers[addr] = peer
        self.dialer.connect(addr)
        return peer

    def _update(self, peer: Peer, info: dict[str, Any]) -> None:
        node_id = info.get("node_id")
        if isinstance(node_id, str) and node_id and node_id != self.node_id:
            peer.node_id = node_id
        if isinstance(info.get("http"), str):
            peer.http = info["http"]
        peer.role = info.get("role") if isinstance(info.get("role"), str) else None
        peer.term = info.get("term") if isinstance(info.get("term"), int) else 0
        peer.leader_id = info.get("leader_id") if isinstance(info.get("leader_id"), str) else None
        peer.bootstrapped = bool(info.get("bootstrapped"))
        self._seen(peer)

    def _seen(self, peer: Peer) -> None:
        peer.last_seen = self.clock()
        peer.last_seen_wall = self.wall_clock()
        if peer.state != "alive":
            self._set_state(peer, "alive")

    def _set_state(self, peer: Peer, state: str) -> None:
        old, peer.state = peer.state, state
        self.events.emit(
            _STATE_EVENTS[state],
            peer=peer.node_id,
            address=peer.address,
            previous=old,
            http=peer.http,
            role=peer.role,
        )
