"""Peer discovery from DNS: the A records of a name, or its SRV records, re-resolved periodically.

A Kubernetes headless Service answers its name with one A record per pod; every node resolves
the name each ``interval`` seconds, so pods that come and go are seen. With ``srv`` the node asks
for ``_schedulezero._tcp.NAME`` instead and takes each record's host and port (the host is
resolved to its A records through the same resolver).

DNS is unauthenticated: anyone on the path can forge an answer. What it says is only a list of
addresses to dial; who answers there is decided by the mesh's CURVE handshake (a secured mesh
only talks to holders of a trusted key) and by the ping reply (``mesh.membership.members``). So
an answer is bounded (``max_records``), every record is checked, and a malformed or failed
answer is logged and ignored: the last peer set stays and the next interval tries again.

AAAA records are not asked for: mesh addresses are IPv4 (``mesh.config.parse_mesh_address``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from mesh.config import parse_dns_server, parse_mesh_address
from mesh.membership.peerset import DiscoveryError, PeerSet

__all__ = ["SRV_PREFIX", "DnsDiscovery"]

log = logging.getLogger(__name__)

SRV_PREFIX = "_schedulezero._tcp."


class BadAnswer(Exception):
    """An answer that is well-formed DNS but not one we accept (too many records)."""


class DnsDiscovery(PeerSet):
    """Peers are ``tcp://IP:port`` for every A record of ``name`` (or every SRV target)."""

    def __init__(
        self,
        name: str,
        own_addresses: Iterable[str],
        *,
        port: int,
        srv: bool = False,
        server: str | None = None,
        interval: float = 10.0,
        timeout: float = 3.0,
        max_records: int = 64,
    ) -> None:
        super().__init__()
        self.name = name
        self.port = port
        self.srv = srv
        self.server = server
        self.interval = interval
        self.timeout = timeout
        self.max_records = max_records
        self._own = set(own_addresses)
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        self._resolver = self._make_resolver()
        await self._add_own_ips()
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> bool:
        """Resolve once and publish the result; False (peers unchanged) when it failed."""
        what = f"{SRV_PREFIX}{self.name} SRV" if self.srv else f"{self.name} A"
        try:
            found = await (self._srv_peers() if self.srv else self._a_peers())
        except (dns.exception.DNSException, BadAnswer) as e:
            # ValueError/EOFError: dnspython's parser on some malformed wire data.
            if not self._failing:
                log.warning("DNS discovery: %s failed (%s); keeping the last peers", what, e)
            self._failing = True
            return False
        if self._failing:
            log.info("DNS discovery: %s answers again", what)
        self._failing = False
        self._publish(found - self._own)
        return True

    # ----- resolving

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        if self.server is None:
            try:
                resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf, search domains too
            except dns.exception.DNSException as e:
                raise DiscoveryError(f"DNS discovery: no system resolver: {e}") from None
        else:
            ip, port = parse_dns_server(self.server)
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [ip]
            resolver.port = port
        resolver.cache = None  # every interval asks again: that is how changes are seen
        resolver.timeout = resolver.lifetime = self.timeout
        return resolver

    async def _query(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer | None:
        """The answer, or None when the name has no such records (an empty peer set)."""
        assert self._resolver is not None
        try:
            answer = await self._resolver.resolve(name, rdtype, search=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        if answer.rrset is not None and len(answer.rrset) > self.max_records:
            raise BadAnswer(f"{len(answer.rrset)} records, more than max_records")
        return answer

    async def _a_peers(self) -> set[str]:
        answer = await self._query(self.name, dns.rdatatype.A)
        ips = _ipv4s(answer.rrset if answer is not None else ())
        return {f"tcp://{ip}:{self.port}" for ip in ips}

    async def _srv_peers(self) -> set[str]:
        answer = await self._query(SRV_PREFIX + self.name, dns.rdatatype.SRV)
        if answer is None or answer.rrset is None:
            return set()
        glue = _glue(answer)
        targets = [(r.target, r.port) for r in answer.rrset if r.target != dns.name.root]
        found: set[str] = set()
        for target, port in targets:
            ips = glue.get(target)
            if ips is None:
                addresses = await self._query(target.to_text(), dns.rdatatype.A)
                ips = _ipv4s(addresses.rrset if addresses is not None else ())
            for ip in ips:
                address = _mesh_address(ip, port)
                if address is not None:
                    found.add(address)
            if len(found) > self.max_records:
                raise BadAnswer(f"SRV targets give more than max_records ({self.max_records})")
        return found

    async def _add_own_ips(self) -> None:
        """Our advertised host may be a name (a pod's DNS name): its IPs are ours too."""
        for address in list(self._own):
            host, port = parse_mesh_address(address, bind=True)
            try:
                ipaddress.IPv4Address(host)
                continue
            except ValueError:
                pass
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET),
                    self.timeout,
                )
            except (OSError, TimeoutError):
                continue  # then only the address itself is left out
            self._own.update(f"tcp://{info[4][0]}:{port}" for info in infos)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:
                # Discovery must outlive any surprise in a library's parsing of hostile data.
                log.exception("DNS discovery: resolving %s failed unexpectedly", self.name)


def _ipv4s(records: Iterable) -> list[str]:
    """The usable IPv4 addresses among A records: no 0.0.0.0, multicast or broadcast."""
    ips = []
    for record in records:
        try:
            ip = ipaddress.IPv4Address(record.address)
        except (AttributeError, ValueError):
            continue
        if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
            log.warning("DNS discovery: ignoring the address %s", ip)
            continue
        ips.append(str(ip))
    return ips


def _glue(answer: dns.resolver.Answer) -> dict[dns.name.Name, list[str]]:
    """A records the server sent along with the SRV answer (saves a query per target)."""
    return {
        rrset.name: _ipv4s(rrset)
        for rrset in answer.response.additional
        if rrset.rdtype == dns.rdatatype.A
    }


def _mesh_address(ip: str, port: int) -> str | None:
    address = f"tcp://{ip}:{port}"
    try:
        parse_mesh_address(address)
    except ValueError as e:
        log.warning("DNS discovery: ignoring an SRV record: %s", e)
        return None
    return address
