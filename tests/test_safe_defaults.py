"""Safe defaults of a node process, run as a real ``schedulezero node``.

Without keys a node runs only on loopback (with one warning) or with ``--insecure``; with
``--keys DIR`` it needs its own ``node`` key in DIR, from a flag, the environment or the config
file. Every refusal is exit 2 and one line on stderr, before any socket is opened.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.security.keys import create_key
from mesh.supervise import child_env, node_command, spawn, stop, wait_for_http
from tests.clierrors import process_error
from tests.netutil import free_port_pair

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
NO_KEYS_WARNING = "runs without CURVE keys"
INSECURE_WARNING = "WITHOUT authentication or encryption"


class Node:
    """One node process on free ports; ``argv`` is its command line."""

    def __init__(self, tmp_path: Path, *extra: str, mesh_host: str = "127.0.0.1") -> None:
        self.mesh_port, self.http_port = free_port_pair(), free_port_pair()
        self.root = tmp_path / "n1"
        self.argv = node_command(
            "n1",
            data_dir=self.root / "data",
            mesh=f"tcp://{mesh_host}:{self.mesh_port}",
            http=f"127.0.0.1:{self.http_port}",
            extra=extra,
        )
        self.stdout, self.stderr = self.root / "stdout.log", self.root / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def run_to_exit(self, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv, capture_output=True, text=True, cwd=REPO, env=child_env(env), timeout=60
        )

    def start(self, env: dict[str, str] | None = None) -> None:
        self.proc = spawn(
            self.argv, stdout=self.stdout, stderr=self.stderr, env=child_env(env), cwd=REPO
        )

    def wait_serving(self) -> None:
        assert self.proc is not None
        wait_for_http(
            f"http://127.0.0.1:{self.http_port}/api/health",
            START_TIMEOUT,
            proc=self.proc,
            error=AssertionError,
            diagnostics=lambda: self.stderr.read_text(errors="replace")[-3000:],
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.stop()


def warnings_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line]


# --------------------------------------------------------------------------- no keys


@pytest.mark.parametrize(
    ("mesh_host", "extra", "address"),
    [
        ("0.0.0.0", (), "tcp://0.0.0.0:"),
        ("127.0.0.1", ("--http", "0.0.0.0:18999"), "0.0.0.0:18999"),
        ("127.0.0.1", ("--advertise-mesh", "tcp://192.0.2.7:7100"), "tcp://192.0.2.7:7100"),
        ("127.0.0.1", ("--peer", "tcp://192.0.2.8:7100"), "tcp://192.0.2.8:7100"),
    ],
)
def test_without_keys_a_non_loopback_address_refuses_to_start(
    tmp_path: Path, mesh_host: str, extra: tuple[str, ...], address: str
) -> None:
    node = Node(tmp_path, *extra, mesh_host=mesh_host)
    line = process_error(node.run_to_exit())
    assert f"non-loopback address {address}" in line
    assert "--keys DIR" in line and "--insecure" in line
    assert not (node.root / "data" / "broker_state.db").exists()  # refused before starting


def test_without_keys_insecure_starts_on_a_non_loopback_address(
    tmp_path: Path, nodes: list[Node]
) -> None:
    node = Node(tmp_path, "--insecure", mesh_host="0.0.0.0")
    nodes.append(node)
    node.start()
    node.wait_serving()
    [warning] = [w for w in warnings_in(node.log()) if INSECURE_WARNING in w]
    assert "tcp://0.0.0.0:" in warning


def test_without_keys_insecure_from_the_environment_starts(
    tmp_path: Path, nodes: list[Node]
) -> None:
    node = Node(tmp_path, mesh_host="0.0.0.0")
    nodes.append(node)
    node.start(env={"SCHEDULEZERO_INSECURE": "true"})
    node.wait_serving()
    assert any(INSECURE_WARNING in w for w in warnings_in(node.log()))


def test_without_keys_on_loopback_a_node_starts_with_exactly_one_warning(
    tmp_path: Path, nodes: list[Node]
) -> None:
    node = Node(tmp_path)
    nodes.append(node)
    node.start()
    node.wait_serving()
    node.stop()
    assert node.proc is not None and node.proc.returncode == 0, node.log()
    warnings = warnings_in(node.log())
    assert len(warnings) == 1, warnings
    assert NO_KEYS_WARNING in warnings[0]
    assert "(no keys)" in node.out()
    # The Raft log keeps schedules' secrets as given: the data directory it made is private.
    assert (node.root / "data").stat().st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------- with keys


def test_keys_dir_without_the_nodes_secret_key_refuses_to_start(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    create_key(key_dir, "someone-else", "node")
    line = process_error(Node(tmp_path, "--keys", str(key_dir)).run_to_exit())
    assert "no secret key for 'n1'" in line
    assert "schedulezero keys create n1" in line


def test_keys_dir_that_does_not_exist_refuses_to_start(tmp_path: Path) -> None:
    line = process_error(Node(tmp_path, "--keys", str(tmp_path / "nope")).run_to_exit())
    assert "does not exist" in line


def test_a_node_with_a_handler_key_refuses_to_start(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    create_key(key_dir, "n1", "handler")
    line = process_error(Node(tmp_path, "--keys", str(key_dir)).run_to_exit())
    assert "'handler' key" in line and "--role node" in line


def test_a_secret_key_readable_by_others_refuses_to_start(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    _, secret = create_key(key_dir, "n1", "node")
    os.chmod(secret, 0o644)
    line = process_error(Node(tmp_path, "--keys", str(key_dir)).run_to_exit())
    assert "readable by others" in line


def test_keys_from_the_config_file_run_the_node_secured(tmp_path: Path, nodes: list[Node]) -> None:
    key_dir = tmp_path / "keys"
    create_key(key_dir, "n1", "node")
    config = tmp_path / "node.yaml"
    config.write_text(f"security:\n  keys: {key_dir}\n", encoding="utf-8")
    # A bind-all mesh address is fine with keys: no refusal, no warning about keys.
    node = Node(tmp_path, "--config", str(config), mesh_host="0.0.0.0")
    nodes.append(node)
    node.start()
    node.wait_serving()
    assert f"(CURVE keys in {key_dir})" in node.out()
    assert not [w for w in warnings_in(node.log()) if "keys" in w or "encryption" in w]


def test_keys_from_the_environment_are_used(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    # The variable is read: the node looks for its key there and says it is missing.
    line = process_error(Node(tmp_path).run_to_exit(env={"SCHEDULEZERO_KEYS": str(key_dir)}))
    assert f"{key_dir}/n1.key_secret" in line


def handler(*args: str) -> subprocess.CompletedProcess[str]:
    """``schedulezero handler`` with one loopback node address, a task module and ``args``."""
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", "handler", "--mesh", "tcp://127.0.0.1:7100", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=60,
    )


def test_handler_with_keys_needs_a_handler_id(tmp_path: Path) -> None:
    result = handler("--tasks", "mesh.sample_tasks", "--keys", str(tmp_path))
    assert "--keys: needs --handler-id" in process_error(result)


def test_handler_with_a_node_key_refuses_to_start(tmp_path: Path) -> None:
    create_key(tmp_path, "h1", "node")
    result = handler("--tasks", "mesh.sample_tasks", "--handler-id", "h1", "--keys", str(tmp_path))
    assert "a handler needs a 'handler' key" in process_error(result)
