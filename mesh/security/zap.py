"""The ZAP handler: which CURVE client keys may connect to which of our sockets.

One :class:`KeyRingAuthenticator` runs per ZeroMQ context (ZAP is per context). It accepts a
client whose public key is in the process's :class:`~mesh.security.keys.KeyRing` with a role the
socket's ZAP domain allows, and tells ZeroMQ the certificate *name* as the connection's User-Id,
so every message received on that connection carries its authenticated sender.

Domains (set on each server socket as ``ZMQ_ZAP_DOMAIN``):

* ``mesh``: a node's ROUTER. Nodes, handlers and replicas all talk to it; what each may say is
  checked per message by role.
* ``pub``: a node's PUB socket (the event broker's broadcasts). Nodes only.

Rejected handshakes are counted by reason (``unknown_key``, ``role``).
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from mesh.security.audit import Rejections
from mesh.security.keys import KeyRing

log = logging.getLogger("mesh.security")

DOMAIN_ROLES: dict[str, frozenset[str]] = {
    "mesh": frozenset({"node", "handler", "replica"}),
    "pub": frozenset({"node"}),
}


class KeyRingAuthenticator(AsyncioAuthenticator):
    """pyzmq's asyncio ZAP authenticator, answering from a live :class:`KeyRing`.

    It keeps pyzmq's own asyncio poller for its one REP socket (a few messages per
    handshake); the transport's sockets are plain and driven by the loop directly.
    """

    def __init__(
        self,
        context: zmq.Context,
        keys: KeyRing,
        rejections: Rejections,
    ) -> None:
        super().__init__(context, log=logging.getLogger("mesh.security.zap"))
        self.keys = keys
        self.rejections = rejections

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        cert = self.keys.by_public(client_key)
        if cert is None:
            self._rejected("unknown_key", f"domain {domain}: {z85.encode(client_key)!r}")
            return False, b"Unknown key"
        if cert.role not in DOMAIN_ROLES.get(domain, frozenset()):
            self._rejected("role", f"{cert.name} ({cert.role}) on domain {domain!r}")
            return False, b"Role not allowed"
        return True, b"OK"

    def curve_user_id(self, client_public_key: bytes) -> str:
        cert = self.keys.by_public(client_public_key)
        # Only called after _authenticate_curve accepted the key, so cert is not None.
        return cert.name if cert is not None else ""

    def _rejected(self, reason: str, detail: str) -> None:
        self.rejections.reject(reason, "handshake", detail)
