"""The handler process against a fake node: real ZeroMQ sockets, real handler code.

The fake node is a bound ``MeshTransport`` that plays the node's half of
:mod:`mesh.dispatch.protocol`: it answers ``handler_hello`` requests, sends ``dispatch`` messages
to the handler's routing id and collects ``dispatch_ack`` and ``job_result``. Most tests run
``HandlerProcess`` in the test's event loop; the ones about process behaviour (start-up order,
signals, exit codes) run ``python -m mesh.cli handler`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mesh.dispatch.handler import BAD_REQUEST, HandlerProcess
from mesh.dispatch.protocol import (
    AT_CAPACITY,
    DISPATCH,
    DISPATCH_ACK,
    DISPATCH_START,
    DISPATCHES,
    EXPIRED,
    HELLO,
    JOB_RESULT,
    JOB_RESULTS,
    NOT_STARTED,
    STALE_FENCING_TOKEN,
    UNKNOWN_TASK,
    Batch,
    DispatchAck,
    Hello,
    JobResult,
    decode,
)
from mesh.transport.zmq import Incoming, MeshTransport
from tests.fixtures import handler_tasks  # registers the tasks
from tests.netutil import free_mesh_address
from tests.waiting import wait_until_async

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS_MODULE = "tests.fixtures.handler_tasks"
WAIT = 5.0  # seconds any single expected message may take

pytestmark = pytest.mark.timeout(60)


class FakeNode:
    """The node's side of the handler protocol on a real bound transport."""

    _ids = itertools.count(1)

    def __init__(
        self,
        address: str,
        node_id: str = "fake",
        leader_id: str | None = None,
        leader_mesh: str | None = None,
    ) -> None:
        self.address = address
        self.node_id = node_id
        self.leader_id = leader_id or node_id
        self.leader_mesh = leader_mesh or address
        self.transport = MeshTransport(node_id, address)
        self.hellos: list[dict[str, Any]] = []
        self.acks: dict[str, dict[str, Any]] = {}
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.auto_start = True
        self.abandoned: set[str] = set()  # dispatch ids a late ack gets start=false for
        self.hello_reply: dict[str, Any] | None = None  # overrides the protocol's reply
        self.malformed: list[str] = []  # handler messages a real node would drop
        self.result_batches: list[int] = []  # the size of each ``job_results`` message
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self.transport.set_handler(self._on_message)
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    def _check(self, payload: dict[str, Any], kind: type[msgspec.Struct]) -> None:
        # What the handler sends must pass the checks of a real node's receiving end.
        try:
            decode(payload, kind)
        except msgspec.ValidationError as e:
            self.malformed.append(f"{kind.__name__} {payload}: {e}")

    def _on_message(self, incoming: Incoming) -> dict[str, Any] | None:
        self._changed.set()
        if incoming.kind == HELLO:
            self._check(incoming.payload, Hello)
            self.hellos.append(incoming.payload)
            if self.hello_reply is not None:
                return self.hello_reply
            return {
                "node_id": self.node_id,
                "leader_id": self.leader_id,
                "term": 1,
                "leader_mesh": self.leader_mesh,
            }
        if incoming.kind == DISPATCH_ACK:
            self._check(incoming.payload, DispatchAck)
            ack = incoming.payload
            self.acks[ack["dispatch_id"]] = ack
            # Like the leader: start what it still wants, cancel what it gave up on.
            if ack.get("needs_start") and self.auto_start:
                self.transport.send_to_identity(
                    incoming.identity,
                    DISPATCH_START,
                    {
                        "dispatch_id": ack["dispatch_id"],
                        "start": ack["dispatch_id"] not in self.abandoned,
                    },
                )
        elif incoming.kind == JOB_RESULT:
            self._check(incoming.payload, JobResult)
            self.results.setdefault(incoming.payload["dispatch_id"], []).append(incoming.payload)
        elif incoming.kind == JOB_RESULTS:
            self._check(incoming.payload, Batch)
            self.result_batches.append(len(incoming.payload["items"]))
            for item in incoming.payload["items"]:
                self._check(item, JobResult)
                self.results.setdefault(item["dispatch_id"], []).append(item)
        return None

    async def wait_for(self, what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = check()
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{self.node_id}: no {what} within {timeout}s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass

    async def hello_from(self, handler_id: str, timeout: float = WAIT) -> dict[str, Any]:
        def latest() -> dict[str, Any] | None:
            mine = [h for h in self.hellos if h.get("handler_id") == handler_id]
            return mine[-1] if mine else None

        return await self.wait_for(f"hello from {handler_id}", latest, timeout)

    def dispatch(self, handler_id: str, task: str, *args: Any, **fields: Any) -> str:
        """Send a dispatch (protocol defaults, overridden by ``fields``); returns its id."""
        n = next(self._ids)
        payload: dict[str, Any] = {
            "dispatch_id": f"d{n}",
            "job_id": f"job{n}",
            "task": task,
            "args": list(args),
            "kwargs": {},
            "idempotency_key": f"key{n}",
            "fencing_token": 1,
            "attempt": 1,
            "schedule_id": None,
            "scheduled_fire_time": None,
            "timeout": None,
        }
        payload.update(fields)
        sent = self.transport.send_to_identity(handler_id.encode(), DISPATCH, payload)
        assert sent, f"dispatch to {handler_id} could not be queued"
        return payload["dispatch_id"]

    async def ack(self, dispatch_id: str, timeout: float = WAIT) -> dict[str, Any]:
        return await self.wait_for(
            f"ack of {dispatch_id}", lambda: self.acks.get(dispatch_id), timeout
        )

    async def result(self, dispatch_id: str, timeout: float = WAIT) -> dict[str, Any]:
        results = await self.wait_for(
            f"result of {dispatch_id}", lambda: self.results.get(dispatch_id), timeout
        )
        return results[0]


async def run_to_the_end(node: FakeNode, path: Path, key: str, **fields: Any) -> dict[str, Any]:
    """Dispatch ``count_to_file(path)`` to h1 under ``key``, start it, return its result.

    A dispatch that runs to its end after another one shows that the handler judged the other
    first and had every chance to run it: the tests that check something did *not* run use
    this instead of waiting a while.
    """
    dispatch_id = node.dispatch("h1", "count_to_file", str(path), idempotency_key=key, **fields)
    ack = await node.ack(dispatch_id)
    assert ack["accepted"], ack
    if not node.auto_start:
        node.transport.send_to_identity(
            b"h1", DISPATCH_START, {"dispatch_id": dispatch_id, "start": True}
        )
    return await node.result(dispatch_id)


MakeNode = Callable[..., Awaitable[FakeNode]]
MakeHandler = Callable[..., Awaitable[HandlerProcess]]


@pytest.fixture
async def make_node() -> AsyncIterator[MakeNode]:
    made: list[FakeNode] = []

    async def factory(address: str | None = None, **kwargs: Any) -> FakeNode:
        node = FakeNode(address or free_mesh_address(), **kwargs)
        made.append(node)
        await node.start()
        return node

    yield factory
    for node in made:
        await node.close()
    assert not [m for node in made for m in node.malformed]


@pytest.fixture
async def make_handler() -> AsyncIterator[MakeHandler]:
    made: list[HandlerProcess] = []

    async def factory(*addresses: str, handler_id: str = "h1", **kwargs: Any) -> HandlerProcess:
        handler = HandlerProcess(handler_id, addresses, **kwargs)
        made.append(handler)
        await handler.start()
        return handler

    yield factory
    for handler in made:
        await handler.stop(drain_timeout=0)


@pytest.fixture
async def node_and_handler(
    make_node: MakeNode, make_handler: MakeHandler
) -> tuple[FakeNode, HandlerProcess]:
    """A fake node and an in-process handler (concurrency 2) that has said hello to it."""
    node = await make_node()
    handler = await make_handler(node.address, concurrency=2)
    await node.hello_from(handler.handler_id)
    return node, handler


# ---------------------------------------------------------------------------- in-process


async def test_hello_announces_tasks_and_concurrency(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, handler = node_and_handler
    hello = await node.hello_from("h1")
    assert {"echo", "slow", "boom", "count_to_file", "context_info"} <= set(hello["tasks"])
    assert hello["concurrency"] == 2
    assert hello["pid"] == os.getpid()
    for field in ("host", "active_jobs", "succeeded", "failed", "avg_ms", "max_fencing_token"):
        assert field in hello
    assert hello["started_at"]
    await node.wait_for("node marked reachable", lambda: handler.nodes[node.address].reachable)
    assert handler.nodes[node.address].leader_id == "fake"


async def test_dispatch_runs_and_returns_the_value(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    dispatch_id = node.dispatch("h1", "echo", {"x": [1, 2]})
    ack = await node.ack(dispatch_id)
    assert ack == {
        "dispatch_id": dispatch_id,
        "handler_id": "h1",
        "accepted": True,
        "reason": None,
        "needs_start": True,
    }
    result = await node.result(dispatch_id)
    assert result["outcome"] == "success"
    assert result["return_value"] == {"x": [1, 2]}
    assert result["error"] is None
    assert result["cached"] is False
    assert result["job_id"] and result["idempotency_key"] and result["handler_id"] == "h1"
    assert result["duration_ms"] >= 0


async def test_stats_in_hello_count_finished_jobs(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    ok, bad = node.dispatch("h1", "echo", 1), node.dispatch("h1", "boom")
    await node.result(ok)
    await node.result(bad)
    hello = await node.wait_for(
        "hello with stats",
        lambda: next((h for h in reversed(node.hellos) if h["succeeded"] and h["failed"]), None),
    )
    assert (hello["succeeded"], hello["failed"], hello["active_jobs"]) == (1, 1, 0)
    assert hello["max_fencing_token"] == 1


async def test_exception_gives_error_with_type_and_message(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    dispatch_id = node.dispatch("h1", "boom", "disk on fire")
    result = await node.result(dispatch_id)
    assert result["outcome"] == "error"
    assert result["error"] == {"type": "RuntimeError", "message": "disk on fire"}
    assert result["return_value"] is None


async def test_non_json_return_value_is_an_error(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    result = await node.result(node.dispatch("h1", "not_json"))
    assert result["outcome"] == "error"
    assert result["error"]["message"].startswith("return value is not JSON-serializable")


async def test_stale_fencing_token_is_refused_and_does_not_run(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path
) -> None:
    node, _ = node_and_handler
    await node.result(node.dispatch("h1", "echo", "new leader", fencing_token=5))
    path = tmp_path / "runs.txt"
    stale = node.dispatch("h1", "count_to_file", str(path), fencing_token=4, idempotency_key="old")
    ack = await node.ack(stale)
    assert (ack["accepted"], ack["reason"]) == (False, STALE_FENCING_TOKEN)
    # The same token as the highest seen is fine (one leader sends many dispatches).
    later = await run_to_the_end(node, path, "later", fencing_token=5)
    assert later["outcome"] == "success"
    assert path.read_text().splitlines() == ["later"]
    assert stale not in node.results


async def test_unknown_task_is_refused(node_and_handler: tuple[FakeNode, HandlerProcess]) -> None:
    node, _ = node_and_handler
    ack = await node.ack(node.dispatch("h1", "no_such_task"))
    assert (ack["accepted"], ack["reason"]) == (False, UNKNOWN_TASK)


async def test_malformed_dispatch_is_refused_and_the_handler_carries_on(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, handler = node_and_handler
    bad = node.dispatch("h1", "echo", fencing_token="seven")
    ack = await node.ack(bad)
    assert (ack["accepted"], ack["reason"]) == (False, BAD_REQUEST)
    node.transport.send_to_identity(b"h1", DISPATCH, {"no": "dispatch_id"})
    node.transport.send_to_identity(b"h1", DISPATCH, {"dispatch_id": "x", "args": "nope"})
    await node.ack("x")
    assert handler.counters["bad_requests"] == 3
    assert (await node.result(node.dispatch("h1", "echo", "still here")))["outcome"] == "success"


@pytest.mark.parametrize(
    "fields",
    [
        {"attempt": 0},
        {"fencing_token": True},
        {"fencing_token": -1},
        {"job_id": ""},
        {"kwargs": [1]},
        {"schedule_id": 5},
        {"scheduled_fire_time": "next tuesday"},
        {"timeout": 0},
        {"timeout": "5"},
    ],
)
async def test_a_dispatch_with_a_bad_field_is_refused_as_bad_request(
    node_and_handler: tuple[FakeNode, HandlerProcess], fields: dict[str, Any]
) -> None:
    node, handler = node_and_handler
    ack = await node.ack(node.dispatch("h1", "echo", **fields))
    assert (ack["accepted"], ack["reason"]) == (False, BAD_REQUEST)
    assert handler.counters["bad_requests"] == 1


async def test_null_optional_dispatch_fields_mean_empty_or_none(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    d = node.dispatch("h1", "context_info", args=None, kwargs=None, scheduled_fire_time=None)
    info = (await node.result(d))["return_value"]
    assert (info["schedule_id"], info["scheduled_fire_time"]) == (None, None)


async def test_a_naive_scheduled_fire_time_is_taken_as_utc(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    d = node.dispatch("h1", "context_info", scheduled_fire_time="2026-01-01T00:00:00")
    info = (await node.result(d))["return_value"]
    assert info["scheduled_fire_time"] == "2026-01-01T00:00:00+00:00"


async def test_redispatch_of_a_finished_key_returns_the_cached_result(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path
) -> None:
    node, _ = node_and_handler
    path = tmp_path / "runs.txt"
    first = node.dispatch("h1", "count_to_file", str(path), idempotency_key="fire-1")
    assert (await node.result(first))["cached"] is False
    again = node.dispatch(
        "h1", "count_to_file", str(path), idempotency_key="fire-1", attempt=2, fencing_token=2
    )
    assert (await node.ack(again))["accepted"] is True
    result = await node.result(again)
    assert result["cached"] is True
    assert (result["outcome"], result["return_value"]) == ("success", "fire-1")
    assert path.read_text().splitlines() == ["fire-1"]


async def test_redispatch_while_running_joins_the_running_execution(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path
) -> None:
    node, _ = node_and_handler
    path = tmp_path / "runs.txt"
    first = node.dispatch("h1", "count_to_file", str(path), 0.5, idempotency_key="fire-2")
    assert (await node.ack(first))["accepted"]
    second = node.dispatch("h1", "count_to_file", str(path), 0.5, idempotency_key="fire-2")
    assert (await node.ack(second))["accepted"]
    assert second not in node.results  # answered only when the running execution ends
    r1, r2 = await node.result(first), await node.result(second)
    assert r1["return_value"] == r2["return_value"] == "fire-2"
    assert (r1["cached"], r2["cached"]) == (False, True)
    assert path.read_text().splitlines() == ["fire-2"]


async def test_full_handler_refuses_with_at_capacity(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler  # concurrency 2
    running = [node.dispatch("h1", "slow", 0.5), node.dispatch("h1", "slow", 0.5)]
    for dispatch_id in running:
        assert (await node.ack(dispatch_id))["accepted"]
    ack = await node.ack(node.dispatch("h1", "echo", "one too many"))
    assert (ack["accepted"], ack["reason"]) == (False, AT_CAPACITY)
    for dispatch_id in running:
        await node.result(dispatch_id)
    assert (await node.ack(node.dispatch("h1", "echo", "room again")))["accepted"]


async def test_task_timeout_is_a_timeout_error(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    dispatch_id = node.dispatch("h1", "slow", 30, timeout=0.2)
    result = await node.result(dispatch_id, timeout=3)
    assert result["outcome"] == "error"
    assert result["error"]["type"] == "TimeoutError"


async def test_job_context_carries_the_dispatch_fields(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    dispatch_id = node.dispatch(
        "h1",
        "context_info",
        job_id="job-ctx",
        idempotency_key="nightly@2026-01-01T00:00:00+00:00",
        attempt=3,
        fencing_token=7,
        schedule_id="nightly",
        scheduled_fire_time="2026-01-01T00:00:00+00:00",
    )
    assert (await node.result(dispatch_id))["return_value"] == {
        "job_id": "job-ctx",
        "task": "context_info",
        "schedule_id": "nightly",
        "scheduled_fire_time": "2026-01-01T00:00:00+00:00",
        "idempotency_key": "nightly@2026-01-01T00:00:00+00:00",
        "attempt": 3,
        "fencing_token": 7,
    }


async def test_handler_given_one_node_learns_the_leader_from_its_reply(
    make_node: MakeNode, make_handler: MakeHandler
) -> None:
    leader = await make_node(node_id="leader")
    follower = await make_node(node_id="follower", leader_id="leader", leader_mesh=leader.address)
    await make_handler(follower.address)
    await follower.hello_from("h1")
    await leader.hello_from("h1")


async def test_leader_address_spelled_differently_does_not_open_a_second_dealer(
    make_node: MakeNode, make_handler: MakeHandler
) -> None:
    # Two DEALERs with one routing id on one node would steal the identity from each other.
    leader = await make_node(node_id="leader")
    alias = leader.address.replace("127.0.0.1", "localhost")
    follower = await make_node(node_id="follower", leader_id="leader", leader_mesh=alias)
    handler = await make_handler(leader.address, follower.address)
    await node_hellos(leader, "h1", 3)
    await node_hellos(follower, "h1", 3)
    assert set(handler.nodes) == {leader.address, follower.address}


async def test_a_malformed_hello_reply_is_ignored(
    make_node: MakeNode, make_handler: MakeHandler
) -> None:
    leader = await make_node(node_id="leader")
    node = await make_node()
    node.hello_reply = {
        "node_id": 5,
        "term": "x",
        "leader_id": "leader",
        "leader_mesh": leader.address,
    }
    handler = await make_handler(node.address)
    await node_hellos(node, "h1", 3)  # the handler has handled the replies to the first two
    link = handler.nodes[node.address]
    assert (link.reachable, link.node_id, link.leader_id) == (None, None, None)
    assert set(handler.nodes) == {node.address}


async def node_hellos(node: FakeNode, handler_id: str, count: int) -> None:
    await node.wait_for(
        f"{count} hellos",
        lambda: sum(h["handler_id"] == handler_id for h in node.hellos) >= count,
    )


async def test_handler_reconnects_after_the_node_restarts(
    make_node: MakeNode, make_handler: MakeHandler
) -> None:
    node = await make_node()
    handler = await make_handler(node.address)
    await node.hello_from("h1")
    await node.close()
    await node.wait_for(
        "node marked unreachable", lambda: handler.nodes[node.address].reachable is False
    )
    reborn = await make_node(node.address)
    await reborn.hello_from("h1")
    assert (await reborn.result(reborn.dispatch("h1", "echo", "back")))["outcome"] == "success"


# ---------------------------------------------------------------------------- subprocess


def _spawn_handler(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = tmp_path / "handler.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "handler", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    return proc, log_path


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    await wait_until_async(lambda: proc.poll() is not None, timeout, "the handler process to exit")
    return proc.returncode


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


async def test_handler_started_before_the_node_connects_once_it_appears(
    make_node: MakeNode, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    address = free_mesh_address()
    proc, log_path = _spawn_handler(
        tmp_path, "--mesh", address, "--tasks", TASKS_MODULE, "--handler-id", "early"
    )
    processes.append(proc)
    # Its first hello timed out (it says so in its log): it is up and retrying, nothing listens.
    await wait_until_async(
        lambda: proc.poll() is not None or "not reachable yet" in log_path.read_text(),
        15.0,
        lambda: f"the handler to report the node not reachable yet\n{log_path.read_text()}",
    )
    assert proc.poll() is None, log_path.read_text()
    node = await make_node(address)
    hello = await node.hello_from("early", timeout=6.0)
    assert "echo" in hello["tasks"]
    assert (await node.result(node.dispatch("early", "echo", 42)))["return_value"] == 42


async def test_sigterm_finishes_the_running_job_then_exits_0(
    make_node: MakeNode, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    node = await make_node()
    proc, log_path = _spawn_handler(
        tmp_path, "--mesh", node.address, "--tasks", TASKS_MODULE, "--handler-id", "term"
    )
    processes.append(proc)
    await node.hello_from("term", timeout=10.0)
    dispatch_id = node.dispatch("term", "slow", 1.0)
    assert (await node.ack(dispatch_id))["accepted"]
    proc.send_signal(signal.SIGTERM)
    result = await node.result(dispatch_id, timeout=5.0)
    assert (result["outcome"], result["return_value"]) == ("success", 1.0)
    assert await _wait_exit(proc, 10.0) == 0, log_path.read_text()


def test_bad_tasks_module_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "handler",
            "--mesh",
            free_mesh_address(),
            "--tasks",
            "tests.fixtures.no_such_module",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("schedulezero: error: ")
    assert "tests.fixtures.no_such_module" in lines[0]


# ---------------------------------------------------------------------------- two-phase start


async def test_an_acknowledged_dispatch_runs_nothing_until_the_leader_starts_it(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path
) -> None:
    node, _ = node_and_handler
    node.auto_start = False
    path = tmp_path / "runs.txt"
    d = node.dispatch("h1", "count_to_file", str(path), idempotency_key="held")
    assert (await node.ack(d))["needs_start"] is True
    assert (await run_to_the_end(node, path, "started"))["outcome"] == "success"
    assert path.read_text().splitlines() == ["started"]
    node.transport.send_to_identity(b"h1", DISPATCH_START, {"dispatch_id": d, "start": True})
    assert (await node.result(d))["outcome"] == "success"
    assert path.read_text().splitlines() == ["started", "held"]


async def test_a_malformed_start_is_dropped_and_a_valid_one_still_starts_the_dispatch(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, handler = node_and_handler
    node.auto_start = False
    d = node.dispatch("h1", "echo", "held")
    await node.ack(d)
    for bad in ({"dispatch_id": d, "start": "yes"}, {"dispatch_id": d}, {"start": True}):
        node.transport.send_to_identity(b"h1", DISPATCH_START, bad)
    node.transport.send_to_identity(b"h1", DISPATCH_START, {"dispatch_id": d, "start": True})
    assert (await node.result(d))["outcome"] == "success"
    assert handler.counters["cancelled_starts"] == 0


async def test_a_dispatch_the_leader_gave_up_on_never_runs(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path
) -> None:
    """A late acknowledgement gets start=false: the dispatch is dropped, the slot freed."""
    node, handler = node_and_handler
    path = tmp_path / "runs.txt"
    d = node.dispatch("h1", "count_to_file", str(path), idempotency_key="late")
    node.abandoned.add(d)
    await node.ack(d)
    await node.wait_for("cancel", lambda: handler.counters["cancelled_starts"] == 1)
    assert (await run_to_the_end(node, path, "after"))["outcome"] == "success"
    assert path.read_text().splitlines() == ["after"]
    assert handler.active_jobs == 0


async def test_a_start_after_the_window_is_answered_not_started_and_runs_nothing(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path, monkeypatch
) -> None:
    import mesh.dispatch.handler as handler_module

    monkeypatch.setattr(handler_module, "START_WINDOW", 0.2)
    node, handler = node_and_handler
    node.auto_start = False
    path = tmp_path / "runs.txt"
    d = node.dispatch("h1", "count_to_file", str(path), idempotency_key="expired")
    await node.ack(d)
    await node.wait_for("expiry", lambda: handler.counters["expired_starts"] == 1)
    node.transport.send_to_identity(b"h1", DISPATCH_START, {"dispatch_id": d, "start": True})
    result = await node.result(d)
    assert result["outcome"] == NOT_STARTED
    assert (await run_to_the_end(node, path, "after"))["outcome"] == "success"
    assert path.read_text().splitlines() == ["after"]


# ---------------------------------------------------------------------------- one message


def ahead(handler: HandlerProcess, seconds: float) -> float:
    """A ``start_by`` ``seconds`` ahead on the handler's own clock (what the leader bounds)."""
    return handler._clock() + seconds


async def test_a_dispatch_with_a_start_deadline_runs_at_once_and_sends_only_its_result(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path
) -> None:
    node, handler = node_and_handler
    path = tmp_path / "runs.txt"
    d = node.dispatch("h1", "count_to_file", str(path), start_by=ahead(handler, 5))
    result = await node.result(d)
    assert result["outcome"] == "success"
    assert path.read_text().splitlines() == [result["idempotency_key"]]
    assert d not in node.acks  # no acknowledgement, no start: one message each way


async def test_a_dispatch_arriving_after_its_start_deadline_is_refused_expired_and_never_runs(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path
) -> None:
    node, handler = node_and_handler
    path = tmp_path / "runs.txt"
    late = node.dispatch(
        "h1", "count_to_file", str(path), idempotency_key="late", start_by=ahead(handler, -0.01)
    )
    ack = await node.ack(late)
    assert (ack["accepted"], ack["reason"]) == (False, EXPIRED)
    on_time = node.dispatch(
        "h1", "count_to_file", str(path), idempotency_key="on-time", start_by=ahead(handler, 5)
    )
    assert (await node.result(on_time))["outcome"] == "success"
    assert path.read_text().splitlines() == ["on-time"]
    assert late not in node.results
    assert handler.counters["refused.expired"] == 1


async def test_hellos_carry_the_handlers_clock_and_list_the_keys_it_is_running(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, handler = node_and_handler
    d = node.dispatch("h1", "slow", 1.5, idempotency_key="long", start_by=ahead(handler, 5))
    hello = await node.wait_for(
        "a hello listing the key",
        lambda: next((h for h in reversed(node.hellos) if "long" in h["running"]), None),
    )
    assert 0 < hello["clock"] <= handler._clock()
    await node.result(d)
    after = len(node.hellos)
    hello = await node.wait_for(
        "a later hello", lambda: node.hellos[-1] if len(node.hellos) > after else None
    )
    assert "long" not in hello["running"]


async def test_a_finished_key_is_listed_as_running_until_its_result_is_queued(
    node_and_handler: tuple[FakeNode, HandlerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader that sees neither the key nor its result takes it for "never started": the
    hello must not drop the key before the result is on its way."""
    node, handler = node_and_handler
    sent = asyncio.Event()
    queue_results = asyncio.Event()
    real_send = handler.transport.send

    def send(address: str, kind: str, payload: dict[str, Any]) -> bool:
        if kind == JOB_RESULT and not queue_results.is_set():
            sent.set()
            return False  # the node is reconnecting: the handler retries
        return real_send(address, kind, payload)

    monkeypatch.setattr(handler.transport, "send", send)
    d = node.dispatch("h1", "echo", 1, idempotency_key="unsent", start_by=ahead(handler, 5))
    await asyncio.wait_for(sent.wait(), WAIT)
    assert "unsent" in handler.hello_payload()["running"]
    queue_results.set()
    assert (await node.result(d))["outcome"] == "success"
    assert "unsent" not in handler.hello_payload()["running"]


async def test_a_one_message_redispatch_of_a_finished_key_gets_the_cached_result_without_an_ack(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path
) -> None:
    node, handler = node_and_handler
    path = tmp_path / "runs.txt"
    first = node.dispatch(
        "h1", "count_to_file", str(path), idempotency_key="k", start_by=ahead(handler, 5)
    )
    await node.result(first)
    again = node.dispatch(
        "h1", "count_to_file", str(path), idempotency_key="k", start_by=ahead(handler, 5)
    )
    result = await node.result(again)
    assert result["cached"] is True
    assert path.read_text().splitlines() == ["k"]
    assert again not in node.acks


async def test_a_batch_of_dispatches_runs_each_and_refuses_only_its_bad_items(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, handler = node_and_handler

    def item(n: int, **fields: Any) -> dict[str, Any]:
        return {
            "dispatch_id": f"b{n}",
            "job_id": f"job-b{n}",
            "task": "echo",
            "args": [n],
            "idempotency_key": f"batch-{n}",
            "fencing_token": 1,
            "attempt": 1,
            "start_by": ahead(handler, 5),
            **fields,
        }

    items = [item(1), item(2, fencing_token="high"), item(3, task="no_such_task"), item(4)]
    assert node.transport.send_to_identity(b"h1", DISPATCHES, {"items": items})
    assert (await node.ack("b2"))["reason"] == BAD_REQUEST
    assert (await node.ack("b3"))["reason"] == UNKNOWN_TASK
    assert [(await node.result(d))["return_value"] for d in ("b1", "b4")] == [1, 4]
    assert "b1" not in node.acks and "b4" not in node.acks
    # Async tasks started together finish together: their results travel as one message.
    assert node.result_batches == [2]


@pytest.mark.parametrize(
    "payload",
    [{"items": []}, {"items": "d1"}, {"items": [1, 2]}, {}],
    ids=["empty", "not-a-list", "not-objects", "no-items"],
)
async def test_a_malformed_batch_of_dispatches_is_counted_and_runs_nothing(
    node_and_handler: tuple[FakeNode, HandlerProcess], tmp_path: Path, payload: dict[str, Any]
) -> None:
    node, handler = node_and_handler
    assert node.transport.send_to_identity(b"h1", DISPATCHES, payload)
    path = tmp_path / "runs.txt"
    d = node.dispatch("h1", "count_to_file", str(path), start_by=ahead(handler, 5))
    result = await node.result(d)
    assert path.read_text().splitlines() == [result["idempotency_key"]]
    assert handler.counters["bad_requests"] == 1
    assert node.acks == {}


# ---------------------------------------------------------------------------- timeouts and tries


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """The gate the blocking fixture tasks wait on; set at the end whatever happens."""
    handler_tasks.RELEASE.clear()
    yield handler_tasks.RELEASE
    handler_tasks.RELEASE.set()


async def test_an_async_task_past_its_timeout_is_cancelled_and_reported_timed_out(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, handler = node_and_handler
    result = await node.result(node.dispatch("h1", "slow", 30, timeout=0.2), timeout=3)
    assert result["outcome"] == "error"
    assert result["error"]["timed_out"] is True
    await node.wait_for("the slot freed", lambda: handler.active_jobs == 0)


@pytest.mark.parametrize("task", ["stubborn", "blocking_sync"])
async def test_a_run_that_cannot_be_stopped_is_reported_at_its_timeout_and_keeps_its_slot(
    node_and_handler: tuple[FakeNode, HandlerProcess], release: threading.Event, task: str
) -> None:
    node, handler = node_and_handler  # concurrency 2
    result = await node.result(node.dispatch("h1", task, timeout=0.2), timeout=3)
    # Answered at the timeout, while the run goes on.
    assert result["error"]["timed_out"] is True
    assert not release.is_set()
    assert handler.active_jobs == 1
    hello = await node.hello_from("h1")
    await node.wait_for("a hello counting it", lambda: node.hellos[-1]["active_jobs"] == 1)
    assert hello["handler_id"] == "h1"
    # Its slot is still taken: with one slot left, a second such run fills the handler.
    await node.result(node.dispatch("h1", task, timeout=0.2), timeout=3)
    ack = await node.ack(node.dispatch("h1", "echo", "no room"))
    assert (ack["accepted"], ack["reason"]) == (False, AT_CAPACITY)
    release.set()
    await node.wait_for("the slots freed", lambda: handler.active_jobs == 0)
    assert (await node.ack(node.dispatch("h1", "echo", "room again")))["accepted"]


async def test_a_retry_of_a_failed_try_runs_again_and_a_redelivery_does_not(
    node_and_handler: tuple[FakeNode, HandlerProcess],
) -> None:
    node, _ = node_and_handler
    key = "s@2026-01-01T00:00:00+00:00"
    first = await node.result(node.dispatch("h1", "fail_first_tries", 1, idempotency_key=key))
    assert (first["outcome"], first["cached"]) == ("error", False)
    again = await node.result(node.dispatch("h1", "fail_first_tries", 1, idempotency_key=key))
    assert (again["outcome"], again["cached"]) == ("error", True)  # the same try: deduplicated
    retry = await node.result(
        node.dispatch("h1", "fail_first_tries", 1, idempotency_key=key, try_number=2)
    )
    assert (retry["outcome"], retry["return_value"], retry["cached"]) == ("success", 2, False)


@pytest.mark.parametrize("try_number", [0, -1, 101, "2", None])
async def test_a_dispatch_with_a_bad_try_number_is_refused_as_a_bad_request(
    node_and_handler: tuple[FakeNode, HandlerProcess], try_number: Any
) -> None:
    node, handler = node_and_handler
    ack = await node.ack(node.dispatch("h1", "echo", "x", try_number=try_number))
    assert (ack["accepted"], ack["reason"]) == (False, BAD_REQUEST)
    assert handler.counters["bad_requests"] == 1
