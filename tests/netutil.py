"""Free TCP ports for tests that open real sockets.

A mesh node needs two consecutive ports (ROUTER on PORT, PUB on PORT+1), so the helpers find a
pair that is free right now. Ports handed out once are never handed out again in this process,
so two tests (or two nodes of one test) cannot race each other for the same pair.
"""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_lock = threading.Lock()


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port_pair(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """Return a port P such that P and P+1 are both free (and not handed out before)."""
    with _lock:
        for _ in range(attempts):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port >= 65535 or port in _handed_out or port + 1 in _handed_out:
                continue
            if _port_is_free(host, port) and _port_is_free(host, port + 1):
                _handed_out.update((port, port + 1))
                return port
    raise RuntimeError(f"no two consecutive free ports found on {host}")


def free_mesh_port(host: str = "127.0.0.1") -> int:
    """A mesh port whose PUB port (PORT+1) is free too."""
    return free_port_pair(host)


def free_mesh_address(host: str = "127.0.0.1") -> str:
    """A ``tcp://HOST:PORT`` mesh address ready to bind."""
    return f"tcp://{host}:{free_port_pair(host)}"
