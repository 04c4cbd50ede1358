"""Who may call the HTTP API of real ``schedulezero node`` processes: tokens and roles on every
node, forwarded writes audited as their caller on the leader, tokens created while the cluster
runs, HTTPS, and the loopback-only rule for an API without tokens.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mesh.api.auth import create_token
from tests.cluster import Cluster, NodeProcess
from tests.netutil import free_port_pair

ROLES = ("read", "operate", "admin")
WAIT = 15.0


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    *,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[int, Any, dict[str, str]]:
    """One request → (status, decoded JSON or text, headers); OSError when unreachable."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            status, raw, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        status, raw, headers = e.code, e.read(), dict(e.headers)
    text = raw.decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        return status, json.loads(text), headers
    return status, text, headers


def schedule(schedule_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": schedule_id,
        "task": "no_such_task_yet",
        "trigger": {"type": "interval", "hours": 1},
        "paused": True,
        **extra,
    }


@pytest.fixture
def tokens_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens.json"
    return path, {role: create_token(path, f"{role}-user", role) for role in ROLES}


def follower_of(cluster: Cluster, leader: NodeProcess) -> NodeProcess:
    return next(n for n in cluster.nodes if n is not leader)


# --------------------------------------------------------------------------- tokens and roles


def test_every_node_answers_401_and_403_by_role_and_audits_forwarded_writes_on_the_leader(
    cluster_factory: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    cluster = cluster_factory(3, ("--api-tokens", str(path)))
    leader = cluster.wait_for_leader()
    follower = follower_of(cluster, leader)
    for node in (leader, follower):
        status, body, headers = call(node.http + "/api/schedules")
        assert status == 401 and "error" in body
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert call(node.http + "/api/schedules", token="szt_wrong")[0] == 401
        assert call(node.http + "/api/schedules", token=tokens["read"])[0] == 200
        assert call(node.http + "/api/audit", token=tokens["operate"])[0] == 403
        status, body, _ = call(
            node.http + "/api/cluster/members", "POST", {"node_id": "x"}, token=tokens["operate"]
        )
        assert status == 403 and "needs 'admin'" in body["error"]
        status, _, _ = call(
            node.http + "/api/schedules", "POST", schedule("nope"), token=tokens["read"]
        )
        assert status == 403
        assert call(node.http + "/api/health")[0] == 200
        assert call(node.http + "/metrics")[0] == 200

    # A write sent to a follower is forwarded; the leader audits it as the caller.
    status, body, _ = call(
        follower.http + "/api/schedules", "POST", schedule("fw"), token=tokens["operate"]
    )
    assert status == 201, body
    status, body, _ = call(leader.http + "/api/audit", token=tokens["admin"])
    assert status == 200, body
    [row] = [e for e in body["audit"] if e["schedule_id"] == "fw"]
    assert (row["token"], row["role"], row["method"], row["status"]) == (
        "operate-user",
        "operate",
        "POST",
        201,
    )
    assert (row["node_id"], row["received_by"], row["client"]) == (
        leader.node_id,
        follower.node_id,
        "127.0.0.1",
    )
    # The follower's own audit holds what it refused itself, not the forwarded write.
    status, body, _ = call(follower.http + "/api/audit", token=tokens["admin"])
    assert status == 200
    assert {e["status"] for e in body["audit"]} == {403}


def test_a_token_created_while_the_cluster_runs_works_on_every_node(
    cluster_factory: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, _ = tokens_file
    cluster = cluster_factory(2, ("--api-tokens", str(path)))
    late = create_token(path, "late", "admin")
    for node in cluster.nodes:
        cluster.wait_for(
            lambda n=node: call(n.http + "/api/audit", token=late)[0] == 200,
            WAIT,
            f"{node.node_id} to accept a token added to the file",
        )


def test_a_read_caller_of_a_node_process_sees_secrets_masked(
    cluster_factory: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    cluster = cluster_factory(1, ("--api-tokens", str(path)))
    node = cluster.wait_for_leader()
    kwargs = {"message": "hi", "password": "hunter2"}
    status, body, _ = call(
        node.http + "/api/schedules", "POST", schedule("s", kwargs=kwargs), token=tokens["admin"]
    )
    assert status == 201, body
    assert call(node.http + "/api/schedules/s", token=tokens["read"])[1]["kwargs"] == {
        "message": "hi",
        "password": "***",
    }
    assert call(node.http + "/api/schedules/s", token=tokens["operate"])[1]["kwargs"] == kwargs


# --------------------------------------------------------------------------- without tokens


def test_without_tokens_an_http_api_on_a_non_loopback_address_refuses_to_start(
    cluster_factory: Any,
) -> None:
    # With CURVE keys, so that only the HTTP rule can refuse it.
    port = free_port_pair()
    cluster = cluster_factory(1, ("--http", f"0.0.0.0:{port}"), secure=True, start=False)
    node = cluster.nodes[0]
    node.start()
    assert node.wait_exit(WAIT) == 2
    err = node.stderr_path.read_text()
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("schedulezero: error: ")]
    assert f"0.0.0.0:{port}" in line and "--api-tokens FILE" in line and "--insecure" in line


def test_with_tokens_an_http_api_on_a_non_loopback_address_starts(
    cluster_factory: Any, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    cluster = cluster_factory(1, secure=True, start=False)
    node = cluster.nodes[0]
    cluster.node_args[0] = ("--http", f"0.0.0.0:{node.http_port}", "--api-tokens", str(path))
    cluster.start()
    assert call(node.http + "/api/schedules")[0] == 401
    assert call(node.http + "/api/schedules", token=tokens["read"])[0] == 200


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the openssl CLI), shared by every node."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    argv += ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"]
    argv += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        argv,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_with_a_certificate_every_node_serves_https_and_forwards_writes_over_it(
    cluster_factory: Any,
    tokens_file: tuple[Path, dict[str, str]],
    certificate: tuple[Path, Path],
) -> None:
    path, tokens = tokens_file
    cert, key = certificate
    tls = ("--tls-cert", str(cert), "--tls-key", str(key), "--api-tokens", str(path))
    cluster = cluster_factory(3, tls, start=False)
    cluster.start(wait=False)
    trusted = ssl.create_default_context(cafile=str(cert))
    urls = {n.node_id: f"https://127.0.0.1:{n.http_port}" for n in cluster.nodes}

    def health(node_id: str) -> Any:
        with contextlib.suppress(OSError):
            status, body, _ = call(urls[node_id] + "/api/health", context=trusted, timeout=1.0)
            return body if status == 200 else None
        return None

    def leader_id() -> str | None:
        hs = [health(n.node_id) for n in cluster.nodes]
        ids = {h["leader_id"] for h in hs if h}
        if len(ids) == 1 and None not in ids and all(hs):
            return ids.pop()
        return None

    leader = cluster.wait_for(leader_id, WAIT, "a leader every node agrees on, over HTTPS")
    follower = next(n.node_id for n in cluster.nodes if n.node_id != leader)
    # Plain HTTP on the HTTPS port gets no answer that looks like the API.
    plain = f"http://127.0.0.1:{cluster.by_id(follower).http_port}/api/health"
    with contextlib.suppress(OSError):
        status, _, _ = call(plain, timeout=2.0)
        assert status != 200
    # An untrusted certificate is refused by a client that checks it.
    with pytest.raises(urllib.error.URLError):
        call(urls[follower] + "/api/health", context=ssl.create_default_context())

    status, body, _ = call(
        urls[follower] + "/api/schedules",
        "POST",
        schedule("over-tls"),
        token=tokens["operate"],
        context=trusted,
    )
    assert status == 201, body
    status, body, _ = call(urls[leader] + "/api/audit", token=tokens["admin"], context=trusted)
    [row] = [e for e in body["audit"] if e["schedule_id"] == "over-tls"]
    assert (row["token"], row["received_by"]) == ("operate-user", follower)
