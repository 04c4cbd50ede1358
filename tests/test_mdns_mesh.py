"""Three real node processes with ``--discovery mdns`` and no peer list form one mesh."""

from __future__ import annotations

import secrets
from pathlib import Path

import yaml

from mesh.supervise import (
    REPO_ROOT,
    child_env,
    node_command,
    spawn,
    stop_all,
    tail,
    wait_until,
)
from tests.netutil import free_port_pair
from tests.test_discovery import needs_multicast
from tests.waiting import one_leader_agreed


@needs_multicast
def test_three_mdns_nodes_without_peers_elect_one_leader(tmp_path: Path) -> None:
    service = f"_sz{secrets.token_hex(4)}._tcp.local."  # our own: parallel runs never mix
    config = tmp_path / "mesh.yaml"
    config.write_text(
        yaml.safe_dump({"discovery": "mdns", "mdns_service": service, "bootstrap_expect": 3})
    )
    procs, https = [], []
    try:
        for i in range(3):
            mesh, http = free_port_pair("127.0.0.1"), free_port_pair("127.0.0.1")
            https.append(f"http://127.0.0.1:{http}")
            argv = node_command(
                f"m{i}",
                data_dir=tmp_path / f"m{i}",
                mesh=f"tcp://127.0.0.1:{mesh}",
                http=f"127.0.0.1:{http}",
                config=config,
            )
            procs.append(spawn(argv, stdout=tmp_path / f"m{i}.log", cwd=REPO_ROOT, env=child_env()))

        def agreed() -> list | None:
            return one_leader_agreed(https, 3)

        def logs() -> str:
            return "\n".join(tail(tmp_path / f"m{i}.log", 10) for i in range(3))

        healths = wait_until(agreed, 20, "one leader agreed by three mDNS nodes", diagnostics=logs)
        assert all(h["voters"] == ["m0", "m1", "m2"] for h in healths), (healths, logs())
        assert sum(h["role"] == "leader" for h in healths) == 1
    finally:
        stop_all(procs)
