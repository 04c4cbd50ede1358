"""Peer discovery: a static list, mDNS (zeroconf) or DNS, or a union, feeding one peer set.

A discovery source yields the mesh addresses (``tcp://HOST:PORT``) of the *other* nodes; it never
contains the node's own address. The node sets one listener, called with the whole new set on
every change, and can read ``peers()`` at any time. Discovery only says who might exist — liveness
is decided by heartbeats in ``mesh.membership.members``.

mDNS on loopback: the zeroconf sockets are bound to the interface that carries the node's
advertised mesh address. For ``127.0.0.1`` that is ``interfaces=["127.0.0.1"]``, which works even
though ``lo`` lacks the MULTICAST flag and even in a network namespace with only ``lo``, where
zeroconf's ``InterfaceChoice.Default`` fails with ENODEV (no multicast route). See
docs/configuration.md, "Discovery".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mesh.config import DEFAULT_MDNS_SERVICE, parse_http_address, parse_mesh_address
from mesh.membership.dnsdiscovery import DnsDiscovery
from mesh.membership.peerset import Discovery, DiscoveryError, Listener, PeerSet

if TYPE_CHECKING:
    from zeroconf import InterfaceChoice, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

    from mesh.config import Config

__all__ = [
    "Discovery",
    "DiscoveryError",
    "DnsDiscovery",
    "Listener",
    "MdnsDiscovery",
    "PeerSet",
    "StaticDiscovery",
    "UnionDiscovery",
    "choose_interfaces",
    "make_discovery",
]

log = logging.getLogger(__name__)

# TTL of our SRV/TXT/A records. RFC 6762 suggests 120 s / 75 min, but a crashed node (which sends
# no goodbye) should leave the peer set in about this long, not in an hour. Receivers clamp PTR
# records to at least 1125 s, so expiry of the PTR alone would take ~19 minutes: instead every
# known peer is re-resolved each TTL/3 seconds and dropped when it no longer answers.
MDNS_TTL = 30
RESOLVE_TIMEOUT_MS = 3000
RESOLVE_ATTEMPTS = 3


class StaticDiscovery(PeerSet):
    """A fixed peer list (``--peer``); ``update()`` replaces it at run time."""

    def __init__(self, peers: Iterable[str], own_address: str) -> None:
        super().__init__()
        self._own = own_address
        self._configured = [p for p in peers if p != own_address]
        self._started = False

    async def start(self) -> None:
        self._started = True
        self._publish(self._configured)

    async def close(self) -> None:
        self._started = False

    def update(self, peers: Iterable[str]) -> None:
        """Replace the peer list; the listener hears about it if the set changed."""
        self._configured = [p for p in peers if p != self._own]
        if self._started:
            self._publish(self._configured)

    def info(self, address: str) -> dict[str, str]:
        return {"mesh": address} if address in self._peers else {}


class UnionDiscovery(PeerSet):
    """Several sources (e.g. static seeds plus mDNS) seen as one peer set."""

    def __init__(self, sources: Iterable[Discovery]) -> None:
        super().__init__()
        self._sources = list(sources)
        for s in self._sources:
            s.set_listener(lambda _peers: self._recompute())

    def _recompute(self) -> None:
        self._publish(frozenset().union(*(s.peers() for s in self._sources)))

    async def start(self) -> None:
        for s in self._sources:
            await s.start()
        self._recompute()

    async def close(self) -> None:
        for s in reversed(self._sources):
            await s.close()

    def info(self, address: str) -> dict[str, str]:
        merged: dict[str, str] = {}
        for s in self._sources:
            get = getattr(s, "info", None)
            if get is not None:
                merged.update(get(address))
        return merged


def _host_ip(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise DiscoveryError(f"mDNS: cannot resolve host {host!r}: {e}") from None


def choose_interfaces(mesh_address: str) -> list[str] | InterfaceChoice:
    """The zeroconf interfaces for a node advertising ``mesh_address``.

    Loopback addresses → ``["127.0.0.1"]`` (works without the MULTICAST flag on ``lo``);
    a concrete IP → that interface only; a bind-all host → every interface.
    """
    from zeroconf import InterfaceChoice

    host, _ = parse_mesh_address(mesh_address, bind=True)
    if host == "0.0.0.0":
        return InterfaceChoice.All
    ip = ipaddress.IPv4Address(_host_ip(host))
    return ["127.0.0.1"] if ip.is_loopback else [str(ip)]


def _instance_label(node_id: str) -> str:
    # DNS labels hold at most 63 bytes; node ids may hold 64 characters. Dots would read as
    # label separators, so they are replaced; the exact node id travels in the TXT record.
    return node_id.replace(".", "-")[:63]


class MdnsDiscovery(PeerSet):
    """Registers this node as ``<node_id>.<service_type>`` and browses for the others.

    TXT properties: ``node_id``, ``mesh`` (advertised mesh address), ``http`` (advertised HTTP
    address). A peer's mesh address is taken from its ``mesh`` property (falling back to its
    A record and SRV port).
    """

    def __init__(
        self,
        node_id: str,
        mesh_address: str,
        http_address: str,
        service_type: str = DEFAULT_MDNS_SERVICE,
        interfaces: list[str] | InterfaceChoice | None = None,
        *,
        ttl: int = MDNS_TTL,
    ) -> None:
        super().__init__()
        self.node_id = node_id
        self.mesh_address = mesh_address
        self.http_address = http_address
        self.service_type = service_type
        self.name = f"{_instance_label(node_id)}.{service_type}"
        self._interfaces = interfaces
        self._ttl = ttl
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._services: dict[str, dict[str, str]] = {}  # instance name → info of a peer
        self._generation: dict[str, int] = {}  # bumped on every event, to drop stale resolves
        self._tasks: set[asyncio.Task[None]] = set()
        self._revalidator: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from zeroconf import IPVersion, NonUniqueNameException
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        mesh_host, mesh_port = parse_mesh_address(self.mesh_address)
        parse_http_address(self.http_address)
        interfaces = self._interfaces
        if interfaces is None:
            interfaces = choose_interfaces(self.mesh_address)
        try:
            self._azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except OSError as e:
            raise DiscoveryError(
                f"mDNS: cannot open multicast sockets on {interfaces}: {e.strerror or e}"
            ) from None
        self._browser = AsyncServiceBrowser(
            self._azc.zeroconf, self.service_type, handlers=[self._on_service_state_change]
        )
        info = AsyncServiceInfo(
            self.service_type,
            self.name,
            port=mesh_port,
            addresses=[socket.inet_aton(_host_ip(mesh_host))],
            properties={
                "node_id": self.node_id,
                "mesh": self.mesh_address,
                "http": self.http_address,
            },
            server=f"{_instance_label(self.node_id)}.local.",
            host_ttl=self._ttl,
            other_ttl=self._ttl,
        )
        try:
            await self._azc.async_register_service(info, allow_name_change=False)
        except NonUniqueNameException:
            await self.close()
            raise DiscoveryError(
                f"mDNS: another node already uses node id {self.node_id!r} on {self.service_type}"
            ) from None
        log.info("mDNS: registered %s (%s) on %s", self.name, self.mesh_address, interfaces)
        self._revalidator = asyncio.get_running_loop().create_task(self._revalidate_loop())

    async def close(self) -> None:
        if self._revalidator is not None:
            self._revalidator.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._revalidator
            self._revalidator = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            # Unregistering sends goodbye packets, so the others drop us at once.
            await self._azc.async_close()
            self._azc = None

    def info(self, address: str) -> dict[str, str]:
        """``{"node_id", "mesh", "http", "name"}`` of the peer found at ``address``, or ``{}``."""
        for svc in self._services.values():
            if svc["mesh"] == address:
                return dict(svc)
        return {}

    # ----- zeroconf callbacks (run on the event loop that created AsyncZeroconf)

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        from zeroconf import ServiceStateChange

        if name.lower() == self.name.lower():
            return
        generation = self._generation.get(name, 0) + 1
        self._generation[name] = generation
        if state_change is ServiceStateChange.Removed:
            if self._services.pop(name, None) is not None:
                log.info("mDNS: %s left", name)
                self._republish()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name, generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str, generation: int) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        if self._azc is None:
            return
        info = AsyncServiceInfo(self.service_type, name)
        for _ in range(RESOLVE_ATTEMPTS):
            if self._azc is None:
                return
            if await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
                break
        else:
            log.warning("mDNS: could not resolve %s", name)
            return
        if self._generation.get(name) != generation:
            return  # removed or changed while we were asking
        peer = self._peer_from(name, info)
        if peer is None:
            return
        if peer["node_id"] == self.node_id or peer["mesh"] == self.mesh_address:
            return
        if self._services.get(name) != peer:
            log.info("mDNS: found %s at %s", peer["node_id"], peer["mesh"])
            self._services[name] = peer
            self._republish()

    async def _revalidate_loop(self) -> None:
        """Drop peers whose records expired and who no longer answer (crashed, no goodbye)."""
        from zeroconf.asyncio import AsyncServiceInfo

        interval = max(self._ttl / 3, 1.0)
        while self._azc is not None:
            await asyncio.sleep(interval)
            for name in list(self._services):
                if self._azc is None:
                    return
                generation = self._generation.get(name)
                info = AsyncServiceInfo(self.service_type, name)
                # Answered from the cache while the records live; a query once they expired.
                if await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
                    continue
                if self._generation.get(name) == generation and self._services.pop(name, None):
                    log.info("mDNS: %s stopped answering; dropped", name)
                    self._republish()

    def _peer_from(self, name: str, info: Any) -> dict[str, str] | None:
        props: dict[str, str] = {}
        for k, v in (info.properties or {}).items():
            if isinstance(k, bytes) and isinstance(v, bytes):
                props[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        mesh = props.get("mesh")
        if not mesh:
            addresses = info.parsed_addresses()
            if not addresses or not info.port:
                log.warning("mDNS: %s has no mesh address", name)
                return None
            mesh = f"tcp://{addresses[0]}:{info.port}"
        try:
            parse_mesh_address(mesh)
        except ValueError as e:
            log.warning("mDNS: %s advertises a bad mesh address: %s", name, e)
            return None
        return {
            "node_id": props.get("node_id", name.removesuffix("." + self.service_type)),
            "mesh": mesh,
            "http": props.get("http", ""),
            "name": name,
        }

    def _republish(self) -> None:
        self._publish(svc["mesh"] for svc in self._services.values())


def make_discovery(config: Config) -> Discovery:
    """The discovery source(s) a node's configuration asks for.

    ``static``: the ``peers`` list. ``mdns`` and ``dns``: that source, plus the ``peers`` list
    as extra seeds if any.
    """
    static = StaticDiscovery(config.peers, config.advertise_mesh)
    if config.discovery == "static":
        return static
    found: Discovery
    if config.discovery == "dns":
        settings = config.dns
        assert settings.name is not None  # the config refuses discovery dns without a name
        found = DnsDiscovery(
            settings.name,
            (config.advertise_mesh, config.mesh),
            port=settings.port or parse_mesh_address(config.advertise_mesh)[1],
            srv=settings.srv,
            server=settings.server,
            interval=settings.interval,
            timeout=settings.timeout,
            max_records=settings.max_records,
        )
    else:
        found = MdnsDiscovery(
            config.node_id,
            config.advertise_mesh,
            config.advertise_http,
            service_type=config.mdns_service,
        )
    return UnionDiscovery([static, found]) if config.peers else found
