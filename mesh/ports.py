"""Free local ports for harnesses (tests, chaos, bench) that start real processes.

Asking the kernel for port 0 returns a port from the *ephemeral* range, the same range outgoing
connections draw from: between choosing a port and the child process binding it, one of the
many connections a mesh opens can take it ("Address already in use"). So ports are chosen at
random *below* the ephemeral range, checked by binding, and never handed out twice per process.
"""

from __future__ import annotations

import random
import socket
import threading

_lock = threading.Lock()
_handed_out: set[int] = set()
_rng = random.Random()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, pair: bool = False, attempts: int = 500) -> int:
    """A free port P (with ``pair``, P+1 is free too) outside the ephemeral range."""
    high = max(12_000, _ephemeral_low()) - 2
    low = 10_000 if high > 20_000 else 1_024
    with _lock:
        for _ in range(attempts):
            port = _rng.randrange(low, high)
            wanted = (port, port + 1) if pair else (port,)
            if any(p in _handed_out for p in wanted):
                continue
            if all(_is_free(host, p) for p in wanted):
                _handed_out.update(wanted)
                return port
    raise RuntimeError(f"no free port found on {host} in {low}-{high}")
