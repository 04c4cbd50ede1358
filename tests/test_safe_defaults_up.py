"""``schedulezero up`` runs secured: a CURVE key per child in DATA_DIR/keys, every child with
``--keys``, an admin API token in DATA_DIR (every node with ``--api-tokens``); and ``/metrics``
exports what the security checks refused."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from aiohttp.test_utils import TestClient, TestServer
from zmq.utils import z85

from mesh.api.auth import ApiTokens
from mesh.api.http import create_app
from mesh.config import ConfigError
from mesh.governor import UpOptions, ensure_keys, ensure_token, plan_local_mesh
from mesh.security.keys import KeyRing, load_certificates
from mesh.supervise import child_env, free_port, get_json, http_request, kill, spawn, wait_until
from tests.cluster import Cluster, HandlerProc
from tests.fakes import FakeReplica

REPO = Path(__file__).resolve().parent.parent


def options(tmp_path: Path, **kw: Any) -> UpOptions:
    return UpOptions(data_dir=tmp_path / "up", sample=False, **kw)


def test_every_child_of_up_gets_the_key_directory(tmp_path: Path) -> None:
    opts = options(tmp_path, nodes=2, handlers=1, tasks=("mesh.sample_tasks",))
    specs = plan_local_mesh(opts)
    assert [s.name for s in specs] == ["node-1", "node-2", "handler-1"]
    for spec in specs:
        argv = list(spec.argv)
        assert argv[argv.index("--keys") + 1] == str(tmp_path / "up" / "keys")


def test_up_creates_one_key_per_child_with_its_role_and_reuses_them(tmp_path: Path) -> None:
    opts = options(tmp_path, nodes=2, handlers=1, tasks=("mesh.sample_tasks",))
    specs = plan_local_mesh(opts)
    key_dir = opts.keys_dir
    assert key_dir is not None
    assert ensure_keys(key_dir, specs) == ["node-1", "node-2", "handler-1"]
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    roles = {spec.name: KeyRing(key_dir, spec.name).role for spec in specs}
    assert roles == {"node-1": "node", "node-2": "node", "handler-1": "handler"}
    before = {p.name: p.read_bytes() for p in key_dir.iterdir()}
    assert ensure_keys(key_dir, specs) == []  # second run: the same keys
    assert {p.name: p.read_bytes() for p in key_dir.iterdir()} == before


def test_up_creates_an_admin_token_once_and_every_node_checks_tokens(tmp_path: Path) -> None:
    opts = options(tmp_path, nodes=2)
    token, created = ensure_token(opts)
    assert created
    assert stat.S_IMODE(opts.token_file.stat().st_mode) == 0o600
    assert opts.token_file.read_text().strip() == token
    assert opts.tokens_file is not None
    caller = ApiTokens(opts.tokens_file).authenticate(token)
    assert caller is not None and (caller.name, caller.role) == ("up-admin", "admin")
    assert ensure_token(opts) == (token, False)  # second run: the same token
    for spec in plan_local_mesh(opts):
        argv = list(spec.argv)
        assert argv[argv.index("--api-tokens") + 1] == str(opts.tokens_file)


def test_up_refuses_a_token_file_without_its_tokens_file(tmp_path: Path) -> None:
    opts = options(tmp_path)
    ensure_token(opts)
    assert opts.tokens_file is not None
    opts.tokens_file.unlink()
    with pytest.raises(ConfigError, match="remove both"):
        ensure_token(opts)
    assert opts.token_file.exists()  # nothing was overwritten


def node_argv(data_dir: Path) -> dict[str, list[str]]:
    """Command lines of the node processes started with our data directory, by node id."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [
                a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")
            ]
        except OSError:
            continue
        if "node" in args and "--node-id" in args and any(str(data_dir) in a for a in args):
            found[args[args.index("--node-id") + 1]] = args
    return found


@pytest.mark.slow
def test_up_runs_its_nodes_with_keys(tmp_path: Path) -> None:
    base, http = free_port(span=4), free_port(span=2)
    data_dir = tmp_path / "up"
    proc = spawn(
        [
            *(sys.executable, "-m", "mesh.cli", "up", "--nodes", "2"),
            *("--base-port", str(base), "--http-base-port", str(http), "--data-dir", str(data_dir)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        env=child_env(),
    )
    urls = [f"http://127.0.0.1:{http + i}/api/health" for i in range(2)]
    try:
        wait_until(lambda: all(get_json(u) for u in urls), 30, "every node to answer")
        # The nodes talk to each other with their keys: they elect a leader.
        wait_until(lambda: any((get_json(u) or {}).get("leader_id") for u in urls), 20, "a leader")
        argvs = node_argv(tmp_path)
        assert sorted(argvs) == ["node-1", "node-2"]
        for argv in argvs.values():
            assert argv[argv.index("--keys") + 1] == str(data_dir / "keys")
        assert sorted(p.name for p in (data_dir / "keys").iterdir()) == [
            "node-1.key",
            "node-1.key_secret",
            "node-2.key",
            "node-2.key_secret",
        ]
        # The API checks tokens; up's own token created the sample schedule.
        api = f"http://127.0.0.1:{http}/api/schedules/sample-heartbeat"
        token = (data_dir / "admin.token").read_text().strip()
        assert http_request(api)[0] == 401
        wait_until(lambda: http_request(api, token=token)[0] == 200, 20, "the sample schedule")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            kill(proc)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert f"CURVE keys: {data_dir / 'keys'} (created node-1, node-2)" in out
    token_file = data_dir / "admin.token"
    assert f"API token (admin): {token_file} (created)" in out
    assert "sample schedule 'sample-heartbeat' created" in out
    assert f"dashboard: http://127.0.0.1:{http}/ (any node serves it)" in out


class RejectingReplica(FakeReplica):
    """A FakeReplica whose transport has refused some messages."""

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "security_rejected": {"unknown_key": 3, "role": 1}}


async def test_metrics_export_security_rejections_by_reason() -> None:
    replica = RejectingReplica("n1")
    client = TestClient(TestServer(create_app(replica, replica)))
    await client.start_server()
    try:
        text = await (await client.get("/metrics")).text()
    finally:
        await client.close()
    assert 'schedulezero_security_rejected_total{node_id="n1",reason="unknown_key"} 3.0' in text
    assert 'schedulezero_security_rejected_total{node_id="n1",reason="role"} 1.0' in text


def test_a_secured_cluster_elects_and_counts_an_unknown_key_in_metrics(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory(2, secure=True)
    leader = cluster.wait_for_leader(20)
    assert cluster.keys_dir is not None
    server_key = load_certificates(cluster.keys_dir)[leader.node_id].public
    stranger_public, stranger_secret = zmq.curve_keypair()  # a key nobody trusts
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = z85.encode(server_key)
        sock.curve_publickey, sock.curve_secretkey = stranger_public, stranger_secret
        sock.connect(leader.mesh)
        sock.send(b"{}", zmq.NOBLOCK)

        def refused() -> str | None:
            text = leader.metrics_text() or ""
            labels = f'node_id="{leader.node_id}",reason="unknown_key"'
            return text if f"schedulezero_security_rejected_total{{{labels}}}" in text else None

        cluster.wait_for(refused, 10, "the unknown key to be counted in /metrics")
        sock.close()
    finally:
        ctx.term()
    assert cluster.leader_now() is leader  # the stranger changed nothing


def test_a_handler_with_its_key_runs_a_job_of_a_secured_cluster(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = cluster_factory(2, secure=True)
    leader = cluster.wait_for_leader(20)
    key_dir = cluster.add_key("h1", "handler")
    for node in cluster.nodes:
        node.kill(signal.SIGHUP)  # trust the new handler key now, not at the next poll
    handler = HandlerProc(
        "h1", [leader.mesh], ["tests.fixtures.handler_tasks"], tmp_path / "h1", keys=key_dir
    )
    try:
        handler.start()
        status, body = leader.request("POST", "/api/jobs", {"task": "echo", "args": ["hi"]})
        assert status == 202, body

        def finished() -> dict[str, Any] | None:
            job = leader.get_json(f"/api/jobs/{body['job_id']}")
            return job if job and job["status"] not in ("pending", "running") else None

        job = cluster.wait_for(finished, 20, "the job to finish on the handler")
        assert (job["status"], job["return_value"]) == ("success", "hi"), job
        assert "without CURVE keys" not in handler.stderr_path.read_text(errors="replace")
    finally:
        handler.stop()
