"""Who may read, per zone (seed 000): ``security.anonymous_reads`` on real processes.

A replica or a read-only node may serve reads to anyone, with or without a tokens file; without
one it may then bind a non-loopback address, since nothing can be changed through it. A writable
node with anonymous reads still needs a token for every write, and refuses to start without a
tokens file. Anonymous readers are ``read`` callers: sensitive values are masked for them.

The replicas follow a fake voter (tests/feedfake.py) over real CURVE sockets: what is tested here
is their HTTP API, not the feed. The fake voter sends a schedule with a ``password`` in its
kwargs, as a voter would for a zone whose filter keeps kwargs and masks only ``api_key``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh.api.auth import create_token
from mesh.security.keys import KeyRing, create_key
from mesh.supervise import Child, child_env, free_port, wait_for_http
from tests.conftest import ClusterFactory
from tests.feedfake import FakeFeed, FeedLog, add_schedule_command, add_task_command
from tests.test_api_auth_processes import call

pytestmark = pytest.mark.timeout(120)

SECRET = "PLANTED-anon-S3CRET-7f1e"
KWARGS = {"password": SECRET, "region": "eu"}
MASKED = {"password": "***", "region": "eu"}
READ_ONLY_REPLICA = {"error": "read-only replica: send writes to an admin node"}
READ_ONLY_NODE = {"error": "read-only node: send writes to an admin node"}
SCHEDULE = {"id": "s1", "task": "report", "trigger": {"type": "interval", "seconds": 60}}
WAIT = 15.0


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[FakeFeed, Path]]:
    """A fake voter with key ``n0`` holding schedule ``a``; the key directory holds ``r1``, a
    replica key for zone ``dmz``."""
    keys = tmp_path / "keys"
    create_key(keys, "n0", "node")
    create_key(keys, "r1", "replica", zone="dmz")
    log = FeedLog()
    log.append(None, add_task_command(), add_schedule_command("a", kwargs=KWARGS))
    feed = await FakeFeed("n0", log, keys=KeyRing(keys, "n0")).start()
    try:
        yield feed, keys
    finally:
        await feed.close()


@pytest.fixture
def children() -> Any:
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def replica_argv(feed: FakeFeed, keys: Path, http: str, data: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "mesh.cli", "replica", "--node-id", "r1", "--zone", "dmz"]
    argv += ["--upstream", feed.address, "--keys", str(keys), "--http", http]
    return [*argv, "--data-dir", str(data), *extra]


async def start_replica(
    children: list[Child], tmp_path: Path, feed: FakeFeed, keys: Path, *extra: str
) -> str:
    """A replica binding 0.0.0.0 with ``extra`` flags; its URL on 127.0.0.1 once it holds ``a``."""
    port = free_port("127.0.0.1")
    argv = replica_argv(feed, keys, f"0.0.0.0:{port}", tmp_path / f"r{len(children)}", *extra)
    child = Child("r1", argv, log=tmp_path / f"r1-{len(children)}.log", env=child_env())
    children.append(child.start())
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(
        wait_for_http, url + "/api/health", WAIT, proc=child.proc, what="the replica"
    )
    for _ in range(int(WAIT / 0.05)):
        if (await acall(url + "/api/health"))[1].get("applied_index") == feed.log.seq:
            return url
        await asyncio.sleep(0.05)
    raise AssertionError(f"the replica did not catch up\n{child.tail()}")


async def acall(url: str, *args: Any, **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
    """``call`` off the event loop, where the fake voter must keep sending heartbeats."""
    return await asyncio.to_thread(call, url, *args, **kwargs)


def one_line_error(child: Child) -> str:
    code = child.proc.wait(WAIT) if child.proc is not None else None
    text = child.tail(50)
    assert code == 2, text
    assert "Traceback" not in text, text
    [line] = [ln for ln in text.splitlines() if ln.startswith("schedulezero: error: ")]
    return line


# --------------------------------------------------------------------------- replicas


async def test_a_dmz_replica_with_anonymous_reads_serves_anyone_on_any_address_read_only(
    upstream: tuple[FakeFeed, Path], tmp_path: Path, children: list[Child]
) -> None:
    feed, keys = upstream
    url = await start_replica(children, tmp_path, feed, keys, "--anonymous-reads")
    status, body, _ = await acall(url + "/api/schedules/a")
    assert status == 200 and body["kwargs"] == MASKED  # an anonymous reader is a read caller
    # Without a tokens file no header grants more than reading.
    status, body, _ = await acall(url + "/api/schedules/a", token="szt_" + "x" * 43)
    assert status == 200 and body["kwargs"] == MASKED
    assert (await acall(url + "/api/schedules"))[0] == 200
    assert (await acall(url + "/api/executions"))[0] == 200
    assert (await acall(url + "/api/audit"))[0] == 403  # an admin read is not a public one
    assert (await acall(url + "/api/schedules", "POST", SCHEDULE))[:2] == (403, READ_ONLY_REPLICA)
    assert (await acall(url + "/api/schedules/a", "DELETE"))[:2] == (403, READ_ONLY_REPLICA)
    assert (await acall(url + "/api/jobs", "POST", {"task": "report"}))[:2] == (
        403,
        READ_ONLY_REPLICA,
    )


async def test_a_replica_without_tokens_nor_anonymous_reads_refuses_a_public_address(
    upstream: tuple[FakeFeed, Path], tmp_path: Path, children: list[Child]
) -> None:
    feed, keys = upstream
    port = free_port("127.0.0.1")
    argv = replica_argv(feed, keys, f"0.0.0.0:{port}", tmp_path / "r")
    child = Child("r1", argv, log=tmp_path / "r1.log", env=child_env())
    children.append(child.start())
    line = one_line_error(child)
    assert f"0.0.0.0:{port}" in line and "--api-tokens FILE" in line
    assert "--anonymous-reads" in line


async def test_a_replica_with_tokens_and_anonymous_reads_still_checks_a_token_it_is_sent(
    upstream: tuple[FakeFeed, Path], tmp_path: Path, children: list[Child]
) -> None:
    feed, keys = upstream
    tokens = tmp_path / "tokens.json"
    read = create_token(tokens, "reader", "read")
    operate = create_token(tokens, "ops", "operate")
    url = await start_replica(
        children, tmp_path, feed, keys, "--anonymous-reads", "--api-tokens", str(tokens)
    )
    status, body, _ = await acall(url + "/api/schedules/a")
    assert status == 200 and body["kwargs"] == MASKED
    assert (await acall(url + "/api/schedules/a", token=read))[1]["kwargs"] == MASKED
    assert (await acall(url + "/api/schedules/a", token=operate))[1]["kwargs"] == KWARGS
    assert (await acall(url + "/api/schedules/a", token="szt_" + "x" * 43))[0] == 401
    assert (await acall(url + "/api/schedules", "POST", SCHEDULE))[0] == 401
    assert (await acall(url + "/api/schedules", "POST", SCHEDULE, token=operate))[:2] == (
        403,
        READ_ONLY_REPLICA,
    )


# --------------------------------------------------------------------------- nodes


def test_a_writable_node_with_anonymous_reads_needs_tokens_for_writes(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    operate = create_token(tokens, "ops", "operate")
    cluster = cluster_factory(
        1, ("--api-tokens", str(tokens)), config={"security": {"anonymous_reads": True}}
    )
    node = cluster.wait_for_leader()
    assert call(node.http + "/api/schedules", "POST", SCHEDULE)[0] == 401
    body = {**SCHEDULE, "kwargs": KWARGS}
    status, answer, _ = call(node.http + "/api/schedules", "POST", body, token=operate)
    assert status == 201, answer
    status, answer, _ = call(node.http + "/api/schedules/s1")
    assert status == 200 and answer["kwargs"] == MASKED
    assert call(node.http + "/api/schedules/s1", "DELETE")[0] == 401
    assert call(node.http + "/api/audit")[0] == 401


def test_a_writable_node_with_anonymous_reads_and_no_tokens_refuses_to_start(
    cluster_factory: ClusterFactory,
) -> None:
    # On loopback too: its writes would need no token.
    cluster = cluster_factory(1, config={"security": {"anonymous_reads": True}}, start=False)
    node = cluster.nodes[0]
    node.start()
    assert node.wait_exit(WAIT) == 2
    err = node.stderr_path.read_text()
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("schedulezero: error: ")]
    assert "anonymous reads" in line and "--api-tokens FILE" in line


def test_a_read_only_node_with_anonymous_reads_binds_a_public_address_without_tokens(
    cluster_factory: ClusterFactory,
) -> None:
    config = {"security": {"anonymous_reads": True}, "api": {"read_only": True}}
    cluster = cluster_factory(1, secure=True, config=config, start=False)
    node = cluster.nodes[0]
    cluster.node_args[0] = ("--http", f"0.0.0.0:{node.http_port}")
    cluster.start()
    cluster.wait_for_leader()
    assert call(node.http + "/api/schedules")[:2] == (200, {"schedules": [], "next": None})
    assert call(node.http + "/api/schedules", "POST", SCHEDULE)[:2] == (403, READ_ONLY_NODE)
    assert call(node.http + "/api/cluster/members/n0", "DELETE")[:2] == (403, READ_ONLY_NODE)
    assert call(node.http + "/api/audit")[0] == 403
    assert "anonymous reads" in node.stdout_path.read_text()
