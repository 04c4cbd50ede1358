"""A hostile peer for tests: one raw ZeroMQ DEALER speaking the mesh wire format.

It sends exactly the frames a test builds (``mesh.transport.codec.encode``: ``[b"SZ1", kind, rid,
json]``), so the test controls every claim a message makes (a Raft ``src``, a ping's
``node_id``, a hello's ``handler_id``). What it proves with is its socket: no key (plaintext), a
key nobody trusts, or a key taken from the cluster's key directory (a stolen or a legitimate
one). A monitor on the socket tells how the CURVE handshake ended, so a test can wait for a
refusal instead of sleeping.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from mesh.security.keys import KeyRing, load_certificates
from mesh.transport.codec import FrameError, decode, encode

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class RawPeer:
    """A DEALER dialling one node's mesh ROUTER at ``address``.

    ``key``: None (plaintext, no CURVE), ``"unknown"`` (a fresh key pair no directory holds), or
    the name of a key in ``keys_dir`` whose secret the peer uses. With a key, ``server`` names the
    node certificate (in ``keys_dir``) to dial: the node's public key, which anyone may know.
    """

    def __init__(
        self,
        address: str,
        *,
        key: str | None = None,
        keys_dir: Path | None = None,
        server: str | None = None,
    ) -> None:
        self.address = address
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.dropped = 0
        if key is not None:
            if keys_dir is None or server is None:
                raise ValueError("a CURVE peer needs keys_dir and the server's certificate name")
            certs = load_certificates(keys_dir)
            self.sock.curve_serverkey = z85.encode(certs[server].public)
            if key == "unknown":
                self.sock.curve_publickey, self.sock.curve_secretkey = zmq.curve_keypair()
            else:
                ring = KeyRing(keys_dir, key)
                self.sock.curve_publickey = z85.encode(ring.public)
                self.sock.curve_secretkey = z85.encode(ring.secret)
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED
        )
        self._handshake: str | None = None
        self.sock.connect(address)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
        self._ctx.term()

    def handshake(self, timeout: float = 5.0) -> str:
        """How the CURVE (or plaintext) handshake with the node ended: ``"succeeded"`` or
        ``"failed"``; AssertionError when neither happened within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._handshake is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no handshake with {self.address} within {timeout}s")
            if self._monitor.poll(int(left * 1000)):
                event = recv_monitor_message(self._monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._handshake = "succeeded"
                elif event & HANDSHAKE_FAILED:
                    self._handshake = "failed"
        return self._handshake

    def send(self, kind: str, payload: dict[str, Any], rid: bytes = b"") -> None:
        """Queue one message (delivered once, and only if, the handshake succeeds). A handshake
        that already failed leaves no pipe to queue on: the message is dropped (and counted in
        ``dropped``) instead of blocking the test, which happened on a loaded machine."""
        try:
            self.sock.send_multipart(encode(kind, payload, rid), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def received(self, timeout: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        """Every message the node sent us so far (kind, payload), waiting at most ``timeout``
        for the first one."""
        out = []
        while self.sock.poll(int(timeout * 1000) if not out else 0):
            frames = self.sock.recv_multipart()
            try:
                kind, _, payload = decode(frames)
            except FrameError:
                kind, payload = "<garbage>", {"frames": len(frames)}
            out.append((kind, payload))
        return out
