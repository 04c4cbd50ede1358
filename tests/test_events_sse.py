"""``GET /api/events``: Server-Sent Events of a node's live changes (docs/api.md, "Events").

Against real ``schedulezero node`` processes: a client gets ``hello`` at once and then a schedule
created through another node; killing the leader shows as a ``leader`` event; a ``read`` token
sees secrets masked where an ``operate`` token sees them; clients beyond the limit get 503.
In-process (a real aiohttp server on the test double of the node): the HTTP limits do not end a
long stream, heartbeats keep it alive, a client that does not read is dropped instead of
buffered, and ``Last-Event-ID`` resumes or resets.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.api.auth import create_token
from mesh.api.events import EventHub
from mesh.api.http import HttpServer, create_app
from mesh.api.limits import ApiLimits
from mesh.zones.replica_app import ReplicaNode
from tests.cluster import Cluster, NodeProcess
from tests.fakes import FakeReplica
from tests.feedfake import FakeFeed, add_schedule_command
from tests.netutil import free_port_pair
from tests.test_replica_api import replica  # noqa: F401  (fixture: a replica in this loop)

WAIT = 15.0
SECRET = "hunter2-do-not-show"

Event = dict[str, Any]


class Stream:
    """A blocking SSE client on one connection (http.client undoes the chunked encoding)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        last_event_id: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        u = urllib.parse.urlsplit(base_url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", "/api/events", headers=headers)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.content_type = self.resp.getheader("Content-Type", "")
        self.seen: list[Event] = []

    def next(self, timeout: float) -> Event | None:
        """The next event, or None if none came within ``timeout`` (or the stream ended)."""
        assert self.conn.sock is not None
        self.conn.sock.settimeout(timeout)
        event: Event = {}
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    return None
                text = line.decode().rstrip("\n")
                if text == "":
                    if "event" in event:
                        self.seen.append(event)
                        return event
                    continue
                if text.startswith(":"):
                    continue
                name, _, value = text.partition(": ")
                event[name] = json.loads(value) if name == "data" else value
        except TimeoutError:
            return None

    def until(self, want: Callable[[Event], bool], timeout: float = WAIT) -> Event:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            event = self.next(left)
            if event is not None and want(event):
                return event
        raise AssertionError(f"no such event within {timeout}s; seen: {self.seen[-20:]}")

    def close(self) -> None:
        self.conn.close()


def post(node: NodeProcess, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def a_schedule(schedule_id: str) -> dict[str, Any]:
    return {
        "id": schedule_id,
        "task": "no_such_task_yet",
        "trigger": {"type": "interval", "hours": 1},
        "kwargs": {"password": SECRET, "message": "hi"},
        "paused": True,
    }


def followers(cluster: Cluster, leader: NodeProcess) -> list[NodeProcess]:
    return [n for n in cluster.nodes if n is not leader]


# --------------------------------------------------------------------------- real processes


def test_hello_then_a_schedule_created_through_another_node_arrives(
    cluster_factory: Any,
) -> None:
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(timeout=WAIT)
    watched, writer = followers(cluster, leader)
    stream = Stream(watched.http)
    try:
        assert stream.status == 200
        assert stream.content_type.startswith("text/event-stream")
        hello = stream.until(lambda e: True, timeout=5)
        assert hello["event"] == "hello"
        assert hello["data"]["node_id"] == watched.node_id
        assert hello["data"]["leader_id"] == leader.node_id
        assert hello["data"]["term"] >= 1
        assert hello["data"]["schedules"] == 0

        status, body = post(writer, "/api/schedules", a_schedule("nightly"))
        assert status == 201, body
        created = stream.until(
            lambda e: e["event"] == "schedule" and e["data"]["id"] == "nightly", timeout=5
        )
        assert created["data"]["action"] == "added"
        assert created["data"]["schedule"]["task"] == "no_such_task_yet"
        # No tokens file (loopback): every caller has every right and sees user data as given.
        assert created["data"]["schedule"]["kwargs"]["password"] == SECRET
        boot, _, n = created["id"].partition("-")
        assert boot == hello["id"].partition("-")[0] and int(n) > int(hello["id"].split("-")[1])
    finally:
        stream.close()


def test_killing_the_leader_shows_as_a_leader_event(cluster_factory: Any) -> None:
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(timeout=WAIT)
    watched = followers(cluster, leader)[0]
    stream = Stream(watched.http)
    try:
        hello = stream.until(lambda e: e["event"] == "hello", timeout=5)
        old_term = hello["data"]["term"]
        leader.kill()
        changed = stream.until(
            lambda e: (
                e["event"] == "leader" and e["data"]["leader_id"] not in (None, leader.node_id)
            ),
            timeout=WAIT,
        )
        assert changed["data"]["term"] > old_term
        new_leader = cluster.wait_for_leader(timeout=WAIT, newer_than_term=old_term)
        assert changed["data"]["leader_id"] == new_leader.node_id
    finally:
        stream.close()


def test_a_read_token_sees_secrets_masked_and_an_operate_token_sees_them(
    cluster_factory: Any, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    read = create_token(tokens, "reader", "read")
    operate = create_token(tokens, "operator", "operate")
    cluster = cluster_factory(3, ("--api-tokens", str(tokens)))
    leader = cluster.wait_for_leader(timeout=WAIT)
    node = followers(cluster, leader)[0]
    assert Stream(node.http).status == 401  # a stream is a read: it needs a token
    as_reader = Stream(node.http, token=read)
    as_operator = Stream(node.http, token=operate)
    try:
        assert as_reader.status == as_operator.status == 200
        for s in (as_reader, as_operator):
            s.until(lambda e: e["event"] == "hello", timeout=5)
        status, body = post(leader, "/api/schedules", a_schedule("with-secret"), token=operate)
        assert status == 201, body

        def created(e: Event) -> bool:
            return e["event"] == "schedule" and e["data"]["id"] == "with-secret"

        masked = as_reader.until(created)["data"]["schedule"]["kwargs"]
        shown = as_operator.until(created)["data"]["schedule"]["kwargs"]
        assert masked == {"password": "***", "message": "hi"}
        assert shown == {"password": SECRET, "message": "hi"}
        assert not any(SECRET in json.dumps(e) for e in as_reader.seen)
    finally:
        as_reader.close()
        as_operator.close()


def test_clients_beyond_the_limit_get_503_and_a_freed_slot_serves_again(
    cluster_factory: Any,
) -> None:
    cluster = cluster_factory(1)
    node = cluster.wait_for_leader(timeout=WAIT)
    streams = [Stream(node.http) for _ in range(100)]
    try:
        assert {s.status for s in streams} == {200}
        refused = Stream(node.http)
        assert refused.status == 503
        assert "too many event streams" in json.loads(refused.resp.read())["error"]
        refused.close()
        assert node.health() is not None  # the node answers everything else meanwhile
        streams.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the closed connection on its next write or read
            again = Stream(node.http)
            if again.status == 200 or time.monotonic() > deadline:
                break
            again.close()
            time.sleep(0.2)
        assert again.status == 200
        streams.append(again)
    finally:
        for s in streams:
            s.close()


# --------------------------------------------------------------------------- in-process


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, FakeReplica, EventHub]]:
    """A real HTTP server with short limits; its hub with a 0.2 s heartbeat and small bounds."""
    fake = FakeReplica("n1")
    fake.become_leader()
    hub = EventHub(
        fake,
        fake,
        fake.state_machine,
        heartbeat=0.2,
        queue_size=5,
        ring_size=8,
        write_timeout=1.0,
    )
    limits = ApiLimits(header_timeout=0.5, body_timeout=0.5)
    app = create_app(fake, fake, None, limits=limits, events=hub)
    port = free_port_pair("127.0.0.1")
    server = HttpServer(app, "127.0.0.1", port)
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}", fake, hub
    finally:
        await server.stop()


async def read_frames(resp: aiohttp.ClientResponse, n: int, timeout: float) -> list[str]:
    """The next ``n`` frames (events or comments) as text."""
    frames: list[str] = []
    current = ""
    async with asyncio.timeout(timeout):
        while len(frames) < n:
            line = (await resp.content.readline()).decode()
            if line == "":
                break
            if line == "\n":
                if current:
                    frames.append(current)
                current = ""
            else:
                current += line
    return frames


async def test_a_stream_outlives_the_header_and_body_timeouts_with_heartbeats(
    served: tuple[str, FakeReplica, EventHub],
) -> None:
    url, _, hub = served
    async with aiohttp.ClientSession() as session, session.get(f"{url}/api/events") as resp:
        assert resp.status == 200
        started = time.monotonic()
        frames = await read_frames(resp, 2 + 8, timeout=5)  # retry, hello, 8 heartbeats
        assert time.monotonic() - started > 1.5  # three times the header timeout
        assert "event: hello" in frames[1]
        assert all(f.startswith(": keep-alive") for f in frames[2:]), frames
        hub.publish("test", lambda: {"n": 1})
        (last,) = await read_frames(resp, 1, timeout=2)
        while last.startswith(":"):
            (last,) = await read_frames(resp, 1, timeout=2)
        assert "event: test" in last and '"n": 1' in last


async def test_a_client_that_does_not_read_is_dropped_not_buffered(
    served: tuple[str, FakeReplica, EventHub],
) -> None:
    url, _, hub = served
    host, port = url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    # Never read: the socket buffers fill, writes stall, the queue (5) overflows.
    writer.write(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    try:
        for _ in range(500):
            if hub.clients:
                break
            await asyncio.sleep(0.01)
        big = "x" * 64 * 1024
        async with asyncio.timeout(10):
            while hub.clients:
                hub.publish("bulk", lambda: {"pad": big})
                await asyncio.sleep(0.001)
        assert hub.counters["clients_dropped"] >= 1
        assert all(c.queue.qsize() <= 5 for c in hub.clients)
    finally:
        writer.close()


async def test_last_event_id_resumes_and_an_unknown_one_resets(
    served: tuple[str, FakeReplica, EventHub],
) -> None:
    url, _, hub = served
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/events") as resp:
            hello = (await read_frames(resp, 2, timeout=2))[1]
            hub.publish("one", lambda: {"n": 1})
            frames = [f for f in await read_frames(resp, 2, timeout=2) if "event: one" in f]
            one_id = frames[0].split("\n")[0].removeprefix("id: ")
        assert hello.startswith("id: ")
        hub.publish("two", lambda: {"n": 2})  # while no client is connected
        hub.publish("three", lambda: {"n": 3})
        headers = {"Last-Event-ID": one_id}
        async with session.get(f"{url}/api/events", headers=headers) as resp:
            frames = await read_frames(resp, 3, timeout=2)
            kinds = [line for f in frames for line in f.split("\n") if line.startswith("event:")]
            assert kinds == ["event: two", "event: three"]  # no hello: nothing was missed
        for stale in ("0-1", one_id.split("-")[0] + "-999999", "garbage"):
            headers = {"Last-Event-ID": stale}
            async with session.get(f"{url}/api/events", headers=headers) as resp:
                frames = await read_frames(resp, 3, timeout=2)
                assert "event: reset" in frames[1] and "event: hello" in frames[2], frames
        # Older than the ring keeps (8): reset too.
        for i in range(10):
            hub.publish("more", lambda i=i: {"n": i})
        async with session.get(f"{url}/api/events", headers={"Last-Event-ID": one_id}) as resp:
            frames = await read_frames(resp, 3, timeout=2)
            assert "event: reset" in frames[1], frames


# --------------------------------------------------------------------------- a replica


async def test_a_replica_streams_the_changes_its_feed_applies(
    replica: tuple[ReplicaNode, FakeFeed, str],  # noqa: F811  (the fixture imported above)
) -> None:
    _, feed, url = replica
    async with aiohttp.ClientSession() as session, session.get(f"{url}/api/events") as resp:
        assert resp.status == 200
        _, hello = await read_frames(resp, 2, timeout=2)
        assert '"role": "replica"' in hello and '"schedules": 2' in hello
        feed.log.append(add_schedule_command("c"))
        frames = await read_frames(resp, 1, timeout=5)
        assert "event: schedule" in frames[0] and '"id": "c"' in frames[0], frames
        assert '"action": "added"' in frames[0]


async def test_stopping_the_server_ends_open_streams_at_once() -> None:
    fake = FakeReplica("n1")
    hub = EventHub(fake, fake, fake.state_machine)  # the default 15 s heartbeat
    port = free_port_pair("127.0.0.1")
    server = HttpServer(create_app(fake, fake, None, events=hub), "127.0.0.1", port)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            resp = await session.get(f"http://127.0.0.1:{port}/api/events")
            await read_frames(resp, 2, timeout=2)
            started = time.monotonic()
            await asyncio.wait_for(server.stop(), 5)
            assert time.monotonic() - started < 2.0
            assert not hub.clients
            resp.close()
    finally:
        await server.stop()


def test_a_job_run_shows_as_queued_running_and_its_execution(cluster_factory: Any) -> None:
    cluster = cluster_factory(1, ("--tasks", "mesh.sample_tasks"))
    node = cluster.wait_for_leader(timeout=WAIT)
    stream = Stream(node.http)
    try:
        stream.until(lambda e: e["event"] == "hello", timeout=5)
        status, body = post(node, "/api/jobs", {"task": "add", "args": [2, 3]})
        assert status == 202, body
        job_id = body["job_id"]

        def of_job(kind: str) -> Callable[[Event], bool]:
            return lambda e: e["event"] == kind and e["data"]["job_id"] == job_id

        assert stream.until(of_job("job"))["data"]["action"] == "queued"
        execution = stream.until(of_job("execution"))["data"]
        assert execution["task"] == "add" and execution["outcome"] == "success"
        running = [e for e in stream.seen if of_job("job")(e) and e["data"]["action"] == "running"]
        assert running and running[0]["data"]["attempt"] == 1
    finally:
        stream.close()
