"""Free TCP ports for tests that open real sockets (see ``mesh.supervise.free_port``).

A mesh node needs two consecutive ports (ROUTER on PORT, PUB on PORT+1), so the helpers hand out
pairs. Ports handed out once are never handed out again in this process, so two tests (or two
nodes of one test) cannot race each other for the same pair.
"""

from __future__ import annotations

from mesh.supervise import free_port


def free_port_pair(host: str = "127.0.0.1", attempts: int = 500) -> int:
    """Return a port P such that P and P+1 are both free (and not handed out before)."""
    return free_port(host, pair=True, attempts=attempts)


def free_mesh_address(host: str = "127.0.0.1") -> str:
    """A ``tcp://HOST:PORT`` mesh address ready to bind."""
    return f"tcp://{host}:{free_port_pair(host)}"
