"""What every discovery source is: the ``Discovery`` protocol and the peer-set bookkeeping.

The sources themselves live in ``mesh.membership.discovery`` (static, mDNS, union) and
``mesh.membership.dnsdiscovery`` (DNS); both build on this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

__all__ = ["Discovery", "DiscoveryError", "Listener", "PeerSet"]

log = logging.getLogger(__name__)

Listener = Callable[[frozenset[str]], None]


class DiscoveryError(RuntimeError):
    """Discovery cannot run (no multicast sockets, duplicate node id, no DNS resolver); one line."""


@runtime_checkable
class Discovery(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def peers(self) -> frozenset[str]:
        """Mesh addresses of the other nodes known now (never our own)."""
        ...

    def set_listener(self, fn: Listener) -> None:
        """``fn(peers)`` is called with the new set on every change after this call."""
        ...


class PeerSet:
    """The shared bookkeeping: current set, one listener, notify on change only."""

    def __init__(self) -> None:
        self._peers: frozenset[str] = frozenset()
        self._listener: Listener | None = None

    def peers(self) -> frozenset[str]:
        return self._peers

    def set_listener(self, fn: Listener) -> None:
        self._listener = fn

    def _publish(self, peers: Iterable[str]) -> None:
        new = frozenset(peers)
        if new == self._peers:
            return
        self._peers = new
        if self._listener is not None:
            try:
                self._listener(new)
            except Exception:
                # A faulty listener must not break the discovery source that called it.
                log.exception("discovery listener failed on peers=%s", sorted(new))
