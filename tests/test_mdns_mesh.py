"""Three real node processes with ``--discovery mdns`` and no peer list form one mesh."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.cluster import REPO_ROOT, http_request
from tests.netutil import free_port_pair
from tests.test_discovery import needs_multicast


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
            log = open(tmp_path / f"m{i}.log", "wb")
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "mesh.cli",
                        "node",
                        "--config",
                        str(config),
                        "--node-id",
                        f"m{i}",
                        "--data-dir",
                        str(tmp_path / f"m{i}"),
                        "--mesh",
                        f"tcp://127.0.0.1:{mesh}",
                        "--http",
                        f"127.0.0.1:{http}",
                    ],
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 20
        healths: list = []
        while time.monotonic() < deadline:
            healths = []
            for url in https:
                try:
                    healths.append(http_request(url + "/api/health", timeout=1)[1])
                except OSError:
                    healths.append(None)
            if all(h and h["leader_id"] and len(h["voters"]) == 3 for h in healths):
                if len({(h["leader_id"], h["term"]) for h in healths}) == 1:
                    break
            time.sleep(0.2)
        logs = "\n".join(
            (tmp_path / f"m{i}.log").read_text(errors="replace")[-800:] for i in range(3)
        )
        assert all(h and h["voters"] == ["m0", "m1", "m2"] for h in healths), (healths, logs)
        assert len({(h["leader_id"], h["term"]) for h in healths}) == 1, (healths, logs)
        assert sum(h["role"] == "leader" for h in healths) == 1
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
