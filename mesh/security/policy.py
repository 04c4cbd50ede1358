"""The safe-default rule for processes started without keys.

Without ``--keys`` nothing on the mesh is authenticated or encrypted. That is acceptable only when
every address the process binds or dials is loopback (one machine, a developer's laptop, a test):
such a process starts with one warning. Anything that binds or dials another address refuses to
start unless the operator says ``--insecure`` (docs/security.md).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

log = logging.getLogger("mesh.security")


class InsecureStart(ValueError):
    """Refusing to run unencrypted on a non-loopback address; the message says what to do."""


def host_of(address: str) -> str:
    """The host of ``tcp://HOST:PORT``, ``http://HOST:PORT/...`` or ``HOST:PORT`` (brackets off)."""
    text = address.strip()
    if "://" not in text:
        text = "tcp://" + text
    host = urlsplit(text).hostname
    return host or ""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to loopback (``localhost``)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    ips = {info[4][0] for info in infos}
    return bool(ips) and all(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in ips)


def check_unencrypted(addresses: Iterable[str], *, insecure: bool, what: str) -> None:
    """Allow a process without keys only on loopback, or with ``--insecure``; warn once.

    ``addresses`` are every address the process binds or dials (mesh, PUB, HTTP, peers, nodes).
    Raises :class:`InsecureStart` naming the first non-loopback address otherwise.
    """
    outside = [a for a in addresses if a and not is_loopback(host_of(a))]
    if outside and not insecure:
        raise InsecureStart(
            f"{what} has no CURVE keys and would use the non-loopback address {outside[0]}: "
            "pass --keys DIR (see `schedulezero keys create`), or --insecure to run "
            "unauthenticated and unencrypted anyway"
        )
    if outside:
        log.warning(
            "%s runs WITHOUT authentication or encryption on %s (--insecure): anyone who can "
            "reach these ports can join, read and change the mesh",
            what,
            ", ".join(outside),
        )
    else:
        log.warning(
            "%s runs without CURVE keys (unencrypted, unauthenticated): allowed because every "
            "address is loopback; use --keys DIR for anything else",
            what,
        )


def check_open_http(
    address: str,
    *,
    insecure: bool,
    what: str,
    anonymous_reads: bool = False,
    read_only: bool = False,
) -> None:
    """The same rule for an HTTP API without a tokens file: loopback only, or ``--insecure``.

    ``address`` is the HTTP bind address (HOST:PORT). Raises :class:`InsecureStart` otherwise.

    One exception, asked for explicitly: ``anonymous_reads`` on a ``read_only`` API (a replica,
    or ``api.read_only``) may bind any address, because nothing can be changed through it and
    every caller is a ``read`` caller (redacted). ``anonymous_reads`` without tokens on a
    writable API is refused wherever it binds, ``--insecure`` or not: its writes would need no
    token, the opposite of what the setting asks for.
    """
    if anonymous_reads:
        if not read_only:
            raise InsecureStart(
                f"{what}: anonymous reads without API tokens need a read-only API "
                "(api.read_only: true, or a replica): here every write would need no token; "
                "pass --api-tokens FILE so that writes need one"
            )
        log.log(
            logging.INFO if is_loopback(host_of(address)) else logging.WARNING,
            "%s serves its read-only HTTP API on %s to anyone who reaches it, without tokens "
            "(anonymous reads): every read is a 'read' caller's (sensitive values masked), "
            "every write answers 403",
            what,
            address,
        )
        return
    if is_loopback(host_of(address)):
        # INFO, not a second warning: a laptop or test node says "no keys" once (above).
        log.info(
            "%s serves its HTTP API without tokens: allowed because it binds loopback (%s); "
            "anyone on this host can call it. Use --api-tokens FILE for anything else",
            what,
            address,
        )
        return
    if not insecure:
        public = (
            "; or, since this API is read-only, serve anonymous reads explicitly "
            "(security.anonymous_reads, or --anonymous-reads for a replica)"
            if read_only
            else ""
        )
        raise InsecureStart(
            f"{what} would serve its HTTP API on the non-loopback address {address} without "
            "API tokens: pass --api-tokens FILE (see `schedulezero tokens create`), or "
            f"--insecure to let anyone who reaches it call every endpoint{public}"
        )
    log.warning(
        "%s serves its HTTP API on %s WITHOUT tokens (--insecure): anyone who reaches it can "
        "read and change every schedule",
        what,
        address,
    )
