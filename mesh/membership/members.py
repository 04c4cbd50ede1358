"""Who is out there and who is alive: the peer table and its failure detector.

Discovery (static list, mDNS) only says who *might* exist. ``Members`` keeps one ``Peer`` per
mesh address, pings them, and decides alive → suspect → dead from how long ago each was heard
from (a ping reply, a ping, or any Raft message). It knows nothing of Raft beyond what peers say
about themselves; the voter policy (``mesh.membership.voters``) and the node read it.

Every change of a peer's state is reported as an event (``peer_up``, ``peer_suspect``,
``peer_down``, ``quorum_lost``, ``quorum_regained``) to an ``EventSink``.

Nobody can rewrite what we know of another node. A node's id, mesh and HTTP addresses are
learned only from the reply to our own ping of an address (what answers there, checked against
the transport's authenticated name for that address when the mesh is secured). An incoming ping
only refreshes the entry of the node that sent it (found by its id, never by the address it
claims) or, when ``learn_peers`` is on, makes an unknown address one we ping. Every field of a
ping or reply is validated; a bad field is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Protocol

import attrs

from mesh.config import MembershipConfig, parse_http_address
from mesh.consensus.messages import MAX_INDEX
from mesh.contracts import EventSink
from mesh.transport.zmq import split_address

log = logging.getLogger("mesh.membership")

# A peer we exchange Raft traffic with is alive without pings; it is still pinged this many ping
# intervals apart to refresh what only pings carry (its HTTP address, bootstrap flag).
PING_REFRESH_ROUNDS = 4

_STATE_EVENTS = {"alive": "peer_up", "suspect": "peer_suspect", "dead": "peer_down"}
ROLES = ("follower", "precandidate", "candidate", "leader")
_NODE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_KIND = re.compile(r"[a-z0-9_.\-]{1,32}")  # a mesh message kind (mesh.transport.codec)
MAX_ACCEPTS = 32  # kinds a peer may say it answers; a longer list is ignored whole


class Dialer(Protocol):
    """What membership needs from the transport."""

    def connect(self, address: str) -> None: ...

    async def request(
        self, address: str, kind: str, payload: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]: ...

    def name_at(self, address: str) -> str | None:
        """The authenticated certificate name of the node at ``address``, once settled."""


def node_id_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and _NODE_ID.fullmatch(value) else None


def clean_info(info: Any) -> dict[str, Any]:
    """The valid fields of a ping or ping reply (a peer's word about itself); the rest dropped.

    ``node_id``: 1-128 of A-Z a-z 0-9 _ . -; ``mesh``: ``tcp://HOST:PORT``; ``http``: HOST:PORT
    (``http://`` tolerated, stored without it); ``term``: an int in [0, 2**48); ``role``: a
    Raft role; ``leader_id``: a node id; ``bootstrapped``: a bool; ``accepts``: at most
    ``MAX_ACCEPTS`` message kinds the node answers (how a follower knows that the leader takes
    a write over the mesh, docs/api.md "Writes, forwarding and availability").
    """
    if not isinstance(info, dict):
        return {}
    out: dict[str, Any] = {}
    if (node_id := node_id_or_none(info.get("node_id"))) is not None:
        out["node_id"] = node_id
    mesh = info.get("mesh")
    if isinstance(mesh, str) and len(mesh) <= 300:
        try:
            split_address(mesh)
            out["mesh"] = mesh
        except ValueError:
            pass
    http = info.get("http")
    if isinstance(http, str) and len(http) <= 300:
        try:
            host, port = parse_http_address(http)
            out["http"] = f"{host}:{port}"
        except ValueError:
            pass
    term = info.get("term")
    if type(term) is int and 0 <= term < MAX_INDEX:
        out["term"] = term
    if info.get("role") in ROLES:
        out["role"] = info["role"]
    if (leader := node_id_or_none(info.get("leader_id"))) is not None:
        out["leader_id"] = leader
    if isinstance(info.get("bootstrapped"), bool):
        out["bootstrapped"] = info["bootstrapped"]
    accepts = info.get("accepts")
    if (
        isinstance(accepts, list)
        and len(accepts) <= MAX_ACCEPTS
        and all(isinstance(k, str) and _KIND.fullmatch(k) for k in accepts)
    ):
        out["accepts"] = frozenset(accepts)
    return out


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
    accepts: frozenset[str] = frozenset()  # request kinds it answers (its latest word)
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
        """A ping from ``info["node_id"]`` (authenticated by the node when the mesh is secured).

        It refreshes only that node's entry (liveness, role, term), never its addresses: those
        come from its replies to our pings. An unknown node's claimed mesh address becomes a peer
        we ping (``learn_peers``); what answers there tells us who it is.
        """
        info = clean_info(info)
        node_id = info.get("node_id")
        if node_id is None or node_id == self.node_id:
            return
        # A node is known by its id: the address we reach it at (a static entry, a proxy) may
        # differ from the one it advertises, and must not get a second, bypassing connection.
        peer = self.by_id(node_id)
        if peer is not None:
            self._learn_state(peer, info)
            self._seen(peer)
            return
        addr = info.get("mesh")
        if addr is None or addr == self.address or addr in self.peers:
            return  # a known address: our own ping of it says who is there
        if self.settings.learn_peers:
            self._add(addr)  # someone knows us that we did not know

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
            self.on_ping_reply(peer, reply)
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

    def on_ping_reply(self, peer: Peer, reply: Any) -> None:
        """What the node at ``peer.address`` says about itself, in answer to our ping: the one
        source of a peer's node id and HTTP address."""
        info = clean_info(reply)
        node_id = info.get("node_id")
        if node_id is None or node_id == self.node_id:
            return
        name_at = getattr(self.dialer, "name_at", None)
        authenticated = name_at(peer.address) if name_at is not None else None
        if authenticated is not None and node_id != authenticated:
            log.warning(
                "ignoring the ping reply from %s: it claims %r, its key is %r",
                peer.address,
                node_id,
                authenticated,
            )
            return
        holder = self.by_id(node_id)
        if holder is not None and holder is not peer:
            log.debug("%s answers as %s, already known at %s", peer.address, node_id, holder)
            return
        if peer.node_id != node_id:
            peer.node_id = node_id
        if "http" in info:
            peer.http = info["http"]
        self._learn_state(peer, info)
        self._seen(peer)

    def _learn_state(self, peer: Peer, info: dict[str, Any]) -> None:
        peer.role = info.get("role")
        peer.term = info.get("term", 0)
        peer.leader_id = info.get("leader_id")
        peer.bootstrapped = info.get("bootstrapped", False)
        peer.accepts = info.get("accepts", frozenset())

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
