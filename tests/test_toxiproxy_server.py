"""chaos/toxiproxy_server.py, driven by the real toxiproxy-python client over real sockets.

The server runs in a background thread (as the chaos suite runs it); upstreams are small threaded
TCP servers on 127.0.0.1. Tests marked "ported" are toxiproxy-python's own test suite
(douglas/toxiproxy-python, test/toxiproxy_test.py and test/toxiproxy_api_test.py), with fixed
ports replaced by free ones and its no-op ``assert passed, approx(...)`` made real assertions.

Timings are asserted only as behaviour: a toxic delays by *at least* its delay, and without it
the same exchange is quicker than that delay. How fast the proxy is belongs to the benchmark.
That a toxic dropped data (rather than delayed it) is shown by an end of stream sent after the
data through the same link arriving with nothing before it, not by waiting for a while.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import requests
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer, validate_response
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists
from toxiproxy.proxy import Proxy
from toxiproxy.utils import can_connect_to

from chaos.toxiproxy_server import (
    ToxiproxyHandle,
    _slices,
    bound_port,
    ensure_toxiproxy,
    serve_in_thread,
    start_server,
)
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# ---------------------------------------------------------------------------- upstream servers

Serve = Callable[[socket.socket, "Upstream"], None]


class Upstream:
    """A threaded TCP server on 127.0.0.1 running ``serve(conn, self)`` per connection."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []  # what recording servers got, recv by recv
        self.finished = 0  # connections whose serve() has returned (saw the end, or failed)
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve(conn, self)
        except OSError:
            pass  # resets are part of what these tests provoke
        finally:
            conn.close()
            with self.lock:
                self.finished += 1

    def record(self, data: bytes) -> None:
        with self.lock:
            self.received.append(data)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def echo(conn: socket.socket, _: Upstream) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def omgs(conn: socket.socket, _: Upstream) -> None:
    """toxiproxy-python's test server: answers one line with ``omgs``."""
    if conn.makefile("rb").readline().strip():
        conn.sendall(b"omgs\n")


def greet_and_record(conn: socket.socket, upstream: Upstream) -> None:
    conn.sendall(b"hello\n")
    while data := conn.recv(65536):
        upstream.record(data)


def greet_record_a_line_and_close(conn: socket.socket, upstream: Upstream) -> None:
    conn.sendall(b"hello\n")
    upstream.record(conn.makefile("rb").readline())


def echo_until_bye(conn: socket.socket, _: Upstream) -> None:
    """Echoes; closes after echoing data that ends with ``bye``."""
    while data := conn.recv(65536):
        conn.sendall(data)
        if data.endswith(b"bye"):
            return


def record(conn: socket.socket, upstream: Upstream) -> None:
    while data := conn.recv(65536):
        upstream.record(data)


def say_bye_and_close(conn: socket.socket, _: Upstream) -> None:
    conn.sendall(b"bye")


@pytest.fixture
def make_upstream() -> Iterator[Callable[[Serve], Upstream]]:
    made: list[Upstream] = []

    def factory(serve: Serve = echo) -> Upstream:
        made.append(Upstream(serve))
        return made[-1]

    yield factory
    for upstream in made:
        upstream.close()


# ---------------------------------------------------------------------------- server and client


@pytest.fixture(scope="module")
def server() -> Iterator[ToxiproxyHandle]:
    handle = serve_in_thread(HOST, 0, seed=7)
    yield handle
    handle.stop()


@pytest.fixture
def toxiproxy(server: ToxiproxyHandle) -> Iterator[Toxiproxy]:
    client = Toxiproxy()
    client.update_api_consumer(server.host, server.port)
    yield client
    client.update_api_consumer(server.host, server.port)  # a test may have pointed it away
    client.reset()
    client.destroy_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def connect(proxy: Proxy) -> socket.socket:
    host, port = proxy.listen.split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def recv_until_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    started = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - started


def connect_to_proxy(host: str, port: str) -> float:
    """toxiproxy-python's helper: how long one line takes to be answered through the proxy."""
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        before = time.monotonic()
        sock.sendall(b"omg\n")
        sock.recv(1024)
        return time.monotonic() - before
    finally:
        sock.close()


def api(server: ToxiproxyHandle, path: str) -> str:
    return server.url + path


# ---------------------------------------------------------------------------- proxies


def test_create_proxy(toxiproxy: Toxiproxy) -> None:  # ported
    listen = f"{HOST}:{free_port()}"
    proxy = toxiproxy.create(
        upstream="localhost:3306", name="test_mysql_master", enabled=False, listen=listen
    )

    assert proxy.upstream == "localhost:3306"
    assert proxy.name == "test_mysql_master"
    assert proxy.enabled is False
    assert proxy.listen == listen
    assert can_connect_to(HOST, int(listen.split(":")[1])) is False


def test_create_with_port_0_reports_the_bound_port(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p", listen=f"{HOST}:0")

    host, port = proxy.listen.split(":")
    assert host == HOST and int(port) != 0
    assert proxy.enabled is True
    assert can_connect_to(host, int(port)) is True


def test_create_with_a_host_name_reports_the_bound_ip(toxiproxy: Toxiproxy) -> None:
    proxy = toxiproxy.create(upstream="localhost:3306", name="p", listen="localhost:0")
    assert proxy.listen.startswith("127.0.0.1:")


def test_proxy_is_listed_and_shown_with_its_toxics(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    proxy = toxiproxy.create(upstream="localhost:3306", name="test_mysql_master")

    assert set(toxiproxy.proxies()) == {"test_mysql_master"}
    shown = requests.get(api(server, "/proxies/test_mysql_master"), timeout=5)
    assert shown.status_code == 200
    assert shown.json() == {
        "name": "test_mysql_master",
        "listen": proxy.listen,
        "upstream": "localhost:3306",
        "enabled": True,
        "toxics": [],
    }


def test_create_and_find_proxy(toxiproxy: Toxiproxy) -> None:  # ported
    toxiproxy.create(upstream="localhost:3306", name="test_mysql_master")
    proxy = toxiproxy.get_proxy("test_mysql_master")

    assert proxy.upstream == "localhost:3306"
    assert proxy.name == "test_mysql_master"


def test_find_invalid_proxy(toxiproxy: Toxiproxy) -> None:  # ported
    assert toxiproxy.get_proxy("invalid_proxy") is None


def test_missing_proxy_is_404_proxy_not_found(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    with pytest.raises(NotFound):
        APIConsumer.get("/proxies/invalid_proxy")
    reply = requests.get(api(server, "/proxies/invalid_proxy"), timeout=5)
    assert reply.json() == {"error": "proxy not found", "status": 404}


def test_cant_create_proxies_same_name(toxiproxy: Toxiproxy) -> None:  # ported
    toxiproxy.create(upstream="localhost:3306", name="test_mysql_master")

    with pytest.raises(ProxyExists) as excinfo:
        toxiproxy.create(upstream="localhost:3306", name="test_mysql_master")
    assert excinfo.typename == "ProxyExists"


def test_proxy_exists(toxiproxy: Toxiproxy, server: ToxiproxyHandle) -> None:  # ported (api)
    body = {"upstream": "localhost:3306", "name": "test_mysql_service"}
    validate_response(requests.post(api(server, "/proxies"), json=body, timeout=5))

    with pytest.raises(ProxyExists) as excinfo:
        validate_response(requests.post(api(server, "/proxies"), json=body, timeout=5))
    assert json.loads(excinfo.value.args[0]) == {"error": "proxy already exists", "status": 409}


def test_create_answers_201_with_the_proxy(toxiproxy: Toxiproxy, server: ToxiproxyHandle) -> None:
    body = {"name": "p", "upstream": "localhost:3306", "listen": f"{HOST}:0"}
    reply = requests.post(api(server, "/proxies"), json=body, timeout=5)
    assert reply.status_code == 201
    assert reply.json()["name"] == "p" and reply.json()["toxics"] == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"upstream": "localhost:3306"}, "missing required field: name"),
        ({"name": "p"}, "missing required field: upstream"),
        ({"name": "p", "upstream": "nowhere"}, "upstream 'nowhere' is not a valid host:port"),
        ({"name": 5, "upstream": "localhost:1"}, "field 'name' must be a string, got number"),
        ({"name": "p", "upstream": "localhost:1", "enabled": "yes"}, "must be a boolean"),
        ([1, 2], "body must be a JSON object, got array"),
    ],
)
def test_bad_create_body_is_400_and_creates_nothing(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle, body: object, error: str
) -> None:
    reply = requests.post(api(server, "/proxies"), json=body, timeout=5)
    assert reply.status_code == 400
    assert reply.json()["status"] == 400
    assert error in reply.json()["error"]
    assert toxiproxy.proxies() == {}


def test_listen_address_in_use_is_500_as_in_toxiproxy(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    with socket.create_server((HOST, 0)) as taken:
        listen = f"{HOST}:{taken.getsockname()[1]}"
        body = {"name": "p", "upstream": "localhost:3306", "listen": listen}
        reply = requests.post(api(server, "/proxies"), json=body, timeout=5)
    assert reply.status_code == 500
    assert reply.json()["error"].startswith(f"listen tcp {listen}: ")


def test_destroy_proxy(toxiproxy: Toxiproxy) -> None:  # ported
    proxy = toxiproxy.create(upstream="localhost:3306", name="test_mysql_master")
    host, port = proxy.listen.split(":")

    assert toxiproxy.destroy(proxy) is True
    assert "test_mysql_master" not in toxiproxy.proxies()
    assert can_connect_to(host, int(port)) is False


def test_destroy_invalid_proxy(toxiproxy: Toxiproxy) -> None:  # ported
    assert toxiproxy.destroy("invalid_proxy") is False


def test_delete_missing_proxy_is_404(toxiproxy: Toxiproxy) -> None:
    with pytest.raises(NotFound):
        APIConsumer.delete("/proxies/invalid_proxy")


def test_proxy_names_may_hold_url_special_characters(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="c1-n1>n2")
    proxy.add_toxic(type="latency", attributes={"latency": 1})

    assert set(toxiproxy.get_proxy("c1-n1>n2").toxics()) == {"latency_downstream"}
    assert proxy.destroy() is True
    assert toxiproxy.proxies() == {}


def test_disable_proxy(toxiproxy: Toxiproxy) -> None:  # ported
    proxy = toxiproxy.create(upstream="localhost:3306", name="test_mysql_master")
    proxy.disable()
    assert proxy.enabled is False
    assert toxiproxy.get_proxy("test_mysql_master").enabled is False


def test_enable_proxy(toxiproxy: Toxiproxy) -> None:  # ported
    proxy = toxiproxy.create(upstream="localhost:3306", name="test_mysql_master")
    proxy.disable()
    proxy.enable()
    assert proxy.enabled is True
    assert toxiproxy.get_proxy("test_mysql_master").enabled is True


def test_disabled_proxy_refuses_connections_and_reenabling_reuses_its_address(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    host, port = proxy.listen.split(":")

    proxy.disable()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5)

    proxy.enable()
    assert toxiproxy.get_proxy("p").listen == proxy.listen
    with connect(proxy) as sock:
        round_trip(sock)


def test_disabling_closes_live_connections(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    with connect(proxy) as sock:
        round_trip(sock)
        proxy.disable()
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass


def test_take_endpoint_down(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:  # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_rubby_server")
    proxy_host, proxy_port = proxy.listen.split(":")
    listen_addr = proxy.listen

    with proxy.down():
        assert can_connect_to(proxy_host, int(proxy_port)) is False

    assert can_connect_to(proxy_host, int(proxy_port)) is True
    assert listen_addr == proxy.listen


def test_changing_upstream_sends_new_connections_to_it(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream(echo).address, name="p")
    greeter = make_upstream(greet_and_record)

    updated = APIConsumer.post("/proxies/p", json={"upstream": greeter.address}).json()

    assert updated["upstream"] == greeter.address
    assert updated["listen"] == proxy.listen and updated["enabled"] is True
    with connect(proxy) as sock:
        assert recv_exactly(sock, 6) == b"hello\n"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"enabled": "no"}, "bad request body: field 'enabled' must be a boolean, got string"),
        ({"upstream": 5}, "bad request body: field 'upstream' must be a string, got number"),
        ("p", "bad request body: body must be a JSON object, got string"),
    ],
)
def test_bad_update_body_is_400_and_changes_nothing(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle, body: object, error: str
) -> None:
    toxiproxy.create(upstream="localhost:3306", name="p")
    reply = requests.post(api(server, "/proxies/p"), json=body, timeout=5)
    assert (reply.status_code, reply.json()) == (400, {"error": error, "status": 400})
    assert toxiproxy.get_proxy("p").enabled is True


def test_null_fields_in_an_update_leave_the_proxy_as_it_is(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    toxiproxy.create(upstream="localhost:3306", name="p", enabled=False)
    body = {"upstream": None, "enabled": None, "listen": None}
    reply = requests.post(api(server, "/proxies/p"), json=body, timeout=5)
    assert reply.status_code == 200
    assert (reply.json()["upstream"], reply.json()["enabled"]) == ("localhost:3306", False)


def test_update_accepts_patch_like_toxiproxy_2_6(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    toxiproxy.create(upstream="localhost:3306", name="p")
    reply = requests.patch(api(server, "/proxies/p"), json={"enabled": False}, timeout=5)
    assert reply.status_code == 200 and reply.json()["enabled"] is False


def test_running_helper(toxiproxy: Toxiproxy) -> None:  # ported
    assert toxiproxy.running() is True


def test_version(toxiproxy: Toxiproxy) -> None:  # ported
    version = toxiproxy.version()
    assert isinstance(version, bytes)
    assert json.loads(version)["version"].startswith("2.")


def test_version_of_invalid_toxiproxy(toxiproxy: Toxiproxy) -> None:  # ported
    toxiproxy.update_api_consumer(HOST, free_port())
    assert toxiproxy.version() is None


def test_proxy_not_running_with_bad_host(toxiproxy: Toxiproxy) -> None:  # ported
    toxiproxy.update_api_consumer(HOST, free_port())
    assert toxiproxy.running() is False


# ---------------------------------------------------------------------------- populate and reset


def test_populate_creates_proxies_array(toxiproxy: Toxiproxy) -> None:  # ported
    proxies = [
        {"name": "populate1", "upstream": "localhost:3306", "listen": f"localhost:{free_port()}"},
        {"name": "populate2", "upstream": "localhost:3306", "listen": f"localhost:{free_port()}"},
    ]

    proxies = toxiproxy.populate(proxies)

    assert len(proxies) == 2
    for proxy in proxies:
        host, port = proxy.listen.split(":")
        assert can_connect_to(host, int(port)) is True


def test_populate_creates_proxies_update_listen(toxiproxy: Toxiproxy) -> None:  # ported
    first, second = free_port(), free_port()
    toxiproxy.populate([{"name": "p1", "upstream": "localhost:3306", "listen": f"{HOST}:{first}"}])

    proxies = toxiproxy.populate(
        [{"name": "p1", "upstream": "localhost:3306", "listen": f"{HOST}:{second}"}]
    )

    assert [proxy.listen for proxy in proxies] == [f"{HOST}:{second}"]
    assert can_connect_to(HOST, second) is True
    assert can_connect_to(HOST, first) is False


def test_populate_endpoint_keeps_unchanged_proxies_and_replaces_changed_ones(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    same = {"name": "same", "upstream": "localhost:3306", "listen": f"{HOST}:{free_port()}"}
    moved = {"name": "moved", "upstream": "localhost:3306", "listen": f"{HOST}:{free_port()}"}
    first = requests.post(api(server, "/populate"), json=[same, moved], timeout=5)
    assert first.status_code == 201
    assert [p["name"] for p in first.json()["proxies"]] == ["same", "moved"]
    for name in ("same", "moved"):
        toxiproxy.get_proxy(name).add_toxic(type="latency", attributes={"latency": 5})

    moved["upstream"] = "localhost:3307"
    second = requests.post(api(server, "/populate"), json=[same, moved], timeout=5)

    assert second.status_code == 201
    proxies = {p["name"]: p for p in second.json()["proxies"]}
    assert [t["name"] for t in proxies["same"]["toxics"]] == ["latency_downstream"]
    assert proxies["moved"]["upstream"] == "localhost:3307"
    assert proxies["moved"]["toxics"] == []


def test_populate_endpoint_rejects_a_bad_entry_and_creates_nothing(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    body = [{"name": "ok", "upstream": "localhost:3306"}, {"name": "no_upstream"}]
    reply = requests.post(api(server, "/populate"), json=body, timeout=5)

    assert reply.status_code == 400
    assert reply.json() == {
        "error": "missing required field: upstream at proxy 2",
        "status": 400,
        "proxies": [],
    }
    assert toxiproxy.proxies() == {}


def test_reset(toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]) -> None:  # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_rubby_server")
    proxy_host, proxy_port = proxy.listen.split(":")
    listen_addr = proxy.listen

    proxy.disable()
    assert can_connect_to(proxy_host, int(proxy_port)) is False

    proxy.add_toxic(type="latency", attributes={"latency": 123})

    assert toxiproxy.reset() is True
    assert can_connect_to(proxy_host, int(proxy_port)) is True
    assert proxy.toxics() == {}
    assert listen_addr == proxy.listen


# ---------------------------------------------------------------------------- toxics API


def test_toxic_defaults_to_downstream_full_toxicity_and_a_type_stream_name(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    proxy = toxiproxy.create(upstream="localhost:3306", name="p")
    proxy.add_toxic(type="latency", attributes={"latency": 123})

    reply = requests.get(api(server, "/proxies/p/toxics/latency_downstream"), timeout=5)
    assert reply.json() == {
        "attributes": {"latency": 123, "jitter": 0},
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
    }


def test_toxic_create_answers_200_with_the_toxic_as_toxiproxy(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    toxiproxy.create(upstream="localhost:3306", name="p")
    body = {"type": "bandwidth", "stream": "upstream", "toxicity": 0.5}
    reply = requests.post(api(server, "/proxies/p/toxics"), json=body, timeout=5)
    assert reply.status_code == 200
    assert reply.json() == {
        "attributes": {"rate": 0},
        "name": "bandwidth_upstream",
        "type": "bandwidth",
        "stream": "upstream",
        "toxicity": 0.5,
    }


def test_toxics_are_listed_upstream_first(toxiproxy: Toxiproxy, server: ToxiproxyHandle) -> None:
    proxy = toxiproxy.create(upstream="localhost:3306", name="p")
    proxy.add_toxic(type="latency", name="down")
    proxy.add_toxic(type="latency", name="up", stream="upstream")

    reply = requests.get(api(server, "/proxies/p/toxics"), timeout=5)
    assert [t["name"] for t in reply.json()] == ["up", "down"]


def test_duplicate_toxic_name_is_409(toxiproxy: Toxiproxy) -> None:
    proxy = toxiproxy.create(upstream="localhost:3306", name="p")
    proxy.add_toxic(type="latency", attributes={"latency": 1})
    with pytest.raises(ProxyExists) as excinfo:
        proxy.add_toxic(type="latency", attributes={"latency": 2})
    assert json.loads(excinfo.value.args[0]) == {"error": "toxic already exists", "status": 409}


def test_invalid_direction(toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]) -> None:
    # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_rubby_server")

    with pytest.raises(InvalidToxic) as excinfo:
        proxy.add_toxic(type="latency", attributes={"latency": 123}, stream="lolstream")
    assert excinfo.typename == "InvalidToxic"
    assert b"stream was invalid, can be either upstream or downstream" in excinfo.value.args[0]


@pytest.mark.parametrize(
    ("toxic", "error"),
    [
        ({"type": "earthquake"}, "invalid toxic type"),
        ({"type": "latency", "stream": ""}, "stream was invalid"),
        ({"type": "latency", "attributes": {"latency": "1s"}}, "must be an integer, got string"),
        ({"type": "latency", "attributes": {"latency": 1.5}}, "must be an integer, got number"),
        ({"type": "latency", "attributes": {"latency": -1}}, "must be between 0 and"),
        ({"type": "latency", "attributes": {"latncy": 1}}, "unknown attribute 'latncy'"),
        ({"type": "latency", "toxicity": 2}, "toxicity must be between 0 and 1"),
        ({"type": "slicer", "attributes": {"delay": 1}}, "'average_size' of a slicer"),
    ],
)
def test_bad_toxic_is_400_invalid_toxic(toxiproxy: Toxiproxy, toxic: dict, error: str) -> None:
    proxy = toxiproxy.create(upstream="localhost:3306", name="p")
    with pytest.raises(InvalidToxic) as excinfo:
        proxy.add_toxic(**toxic)
    assert error in json.loads(excinfo.value.args[0])["error"]
    assert proxy.toxics() == {}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"toxicity": "high"}, "field 'toxicity' must be a number, got string"),
        ({"toxicity": -0.5}, "toxicity must be between 0 and 1, got -0.5"),
        ({"attributes": [1]}, "attributes must be a JSON object, got array"),
        ({"attributes": {"latency": None}}, "attribute 'latency' must be an integer, got null"),
        (
            {"attributes": {"latency": 2**63}},
            f"attribute 'latency' must be between 0 and {2**63 - 1}",
        ),
        (
            {"attributes": {"rate": 1}},
            "unknown attribute 'rate' for toxic type latency (known: latency, jitter)",
        ),
    ],
)
def test_bad_toxic_update_is_400_and_changes_nothing(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle, body: dict, error: str
) -> None:
    proxy = toxiproxy.create(upstream="localhost:3306", name="p")
    proxy.add_toxic(type="latency", attributes={"latency": 100})
    reply = requests.post(api(server, "/proxies/p/toxics/latency_downstream"), json=body, timeout=5)
    assert (reply.status_code, reply.json()) == (
        400,
        {"error": f"bad request body: {error}", "status": 400},
    )
    toxic = proxy.get_toxic("latency_downstream")
    assert (toxic.attributes, toxic.toxicity) == ({"latency": 100, "jitter": 0}, 1.0)


def test_updating_a_toxic_merges_attributes_and_sets_toxicity(
    toxiproxy: Toxiproxy, server: ToxiproxyHandle
) -> None:
    proxy = toxiproxy.create(upstream="localhost:3306", name="p")
    proxy.add_toxic(type="latency", attributes={"latency": 100, "jitter": 10})

    reply = APIConsumer.post(
        "/proxies/p/toxics/latency_downstream",
        json={"attributes": {"latency": 300}, "toxicity": 0.25},
    )

    assert reply.status_code == 200
    toxic = proxy.get_toxic("latency_downstream")
    assert toxic.attributes == {"latency": 300, "jitter": 10}
    assert toxic.toxicity == 0.25


def test_delete_toxic(toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]) -> None:
    # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_rubby_server")
    proxy_host, proxy_port = proxy.listen.split(":")
    listen_addr = proxy.listen

    proxy.add_toxic(type="latency", attributes={"latency": 123})
    assert can_connect_to(proxy_host, int(proxy_port)) is True
    assert proxy.get_toxic("latency_downstream").attributes["latency"] == 123

    assert proxy.destroy_toxic("latency_downstream") is True
    assert proxy.toxics() == {}
    assert listen_addr == proxy.listen


def test_missing_toxic_is_404(toxiproxy: Toxiproxy) -> None:
    toxiproxy.create(upstream="localhost:3306", name="p")
    with pytest.raises(NotFound) as excinfo:
        APIConsumer.delete("/proxies/p/toxics/nope")
    assert json.loads(excinfo.value.args[0]) == {"error": "toxic not found", "status": 404}


def test_enable_and_disable_proxy_with_toxic(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:  # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_rubby_server")
    proxy_host, proxy_port = proxy.listen.split(":")
    listen_addr = proxy.listen

    proxy.add_toxic(type="latency", attributes={"latency": 123})

    proxy.disable()
    assert can_connect_to(proxy_host, int(proxy_port)) is False

    proxy.enable()
    assert can_connect_to(proxy_host, int(proxy_port)) is True

    latency_toxic = proxy.get_toxic("latency_downstream")
    assert latency_toxic.attributes["latency"] == 123
    assert listen_addr == proxy.listen


# ---------------------------------------------------------------------------- toxics on traffic


def test_apply_downstream_toxic(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:  # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_proxy")
    proxy_host, proxy_port = proxy.listen.split(":")
    proxy.add_toxic(type="latency", attributes={"latency": 100})

    assert connect_to_proxy(proxy_host, proxy_port) >= 0.1


def test_apply_upstream_toxic(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:  # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_proxy")
    proxy_host, proxy_port = proxy.listen.split(":")
    proxy.add_toxic(stream="upstream", type="latency", attributes={"latency": 100})

    assert connect_to_proxy(proxy_host, proxy_port) >= 0.1


def test_apply_prolong_toxics(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:  # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_proxy")
    proxy_host, proxy_port = proxy.listen.split(":")
    proxy.add_toxic(stream="upstream", type="latency", attributes={"latency": 100})
    proxy.add_toxic(type="latency", attributes={"latency": 100})

    assert connect_to_proxy(proxy_host, proxy_port) >= 0.2


def test_multiple_of_same_toxic_type(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:  # ported
    proxy = toxiproxy.create(upstream=make_upstream(omgs).address, name="test_proxy")
    proxy_host, proxy_port = proxy.listen.split(":")
    proxy.add_toxic(type="latency", attributes={"latency": 100})
    proxy.add_toxic(type="latency", attributes={"latency": 100}, name="second_latency_downstream")

    assert connect_to_proxy(proxy_host, proxy_port) >= 0.2


def test_latency_jitter_stays_within_latency_plus_or_minus_jitter(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="latency", attributes={"latency": 100, "jitter": 50})
    with connect(proxy) as sock:
        times = [round_trip(sock) for _ in range(6)]
    assert all(t >= 0.05 for t in times), times
    assert max(times) - min(times) > 0.005, "jitter should vary the delay"


def test_latency_added_to_a_live_connection_applies_and_removing_it_lifts_it(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    with connect(proxy) as sock:
        round_trip(sock)
        proxy.add_toxic(type="latency", attributes={"latency": 200})
        assert round_trip(sock) >= 0.2
        proxy.destroy_toxic("latency_downstream")
        assert round_trip(sock) < 0.2  # no longer carries the 200 ms


def test_updating_latency_on_a_live_connection_takes_effect(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="latency", attributes={"latency": 10})
    with connect(proxy) as sock:
        assert 0.01 <= round_trip(sock) < 0.25  # the 10 ms, not yet the 250 ms
        APIConsumer.post(
            "/proxies/p/toxics/latency_downstream", json={"attributes": {"latency": 250}}
        )
        assert round_trip(sock) >= 0.25


def test_bandwidth_bounds_throughput(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="bandwidth", attributes={"rate": 100})  # 100 KB/s
    payload = random.randbytes(50_000)  # 0.5 s at 100 KB/s
    with connect(proxy) as sock:
        elapsed = round_trip(sock, payload)
    assert elapsed >= 0.45


def test_timeout_0_blocks_data_and_removing_it_closes_the_connection(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream(echo_until_bye).address, name="p")
    with connect(proxy) as blocked, connect(proxy) as held:
        round_trip(blocked)
        round_trip(held)
        proxy.add_toxic(type="timeout", attributes={"timeout": 0})
        # The upstream echoes this, then closes: its end of stream passes the toxic after the
        # echo, so an end of stream with nothing before it shows the echo was dropped.
        blocked.sendall(b"lost, bye")
        assert recv_until_eof(blocked) == b""

        proxy.destroy_toxic("timeout_downstream")
        assert held.recv(1) == b""


def test_timeout_closes_the_connection_after_its_delay(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="timeout", attributes={"timeout": 300})
    started = time.monotonic()
    with connect(proxy) as sock:
        sock.sendall(b"lost")
        assert recv_until_eof(sock) == b""
    assert time.monotonic() - started >= 0.28


def test_reset_peer_resets_the_connection_after_its_timeout(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="reset_peer", attributes={"timeout": 200})
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"data")
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert time.monotonic() - started >= 0.19


def test_upstream_reset_peer_resets_the_client_too(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="reset_peer", stream="upstream", attributes={"timeout": 0})
    with connect(proxy) as sock:
        sock.sendall(b"data")
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_slicer_delivers_every_byte_in_small_slices(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    recorder = make_upstream(record)
    proxy = toxiproxy.create(upstream=recorder.address, name="p")
    proxy.add_toxic(
        type="slicer",
        stream="upstream",
        attributes={"average_size": 100, "size_variation": 20, "delay": 3000},
    )
    payload = random.randbytes(3000)
    with connect(proxy) as sock:
        sock.sendall(payload)
        wait_until(
            lambda: sum(map(len, recorder.received)) >= len(payload), 5, "every byte upstream"
        )
    assert b"".join(recorder.received) == payload
    assert len(recorder.received) >= 15  # about 30 slices; a few may merge in the socket


def test_slices_cover_the_data_contiguously_with_no_empty_slice() -> None:
    rng = random.Random(3)
    for size in (1, 2, 99, 100, 101, 1000, 32768):
        bounds = _slices(rng, 0, size, 10, 9)
        assert bounds[0] == 0 and bounds[-1] == size
        assert all(bounds[i] == bounds[i + 1] for i in range(1, len(bounds) - 1, 2))
        assert all(bounds[i] < bounds[i + 1] for i in range(0, len(bounds), 2))


def test_limit_data_closes_after_the_byte_limit(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="limit_data", attributes={"bytes": 10})
    payload = bytes(range(100))
    with connect(proxy) as sock:
        sock.sendall(payload)
        assert recv_until_eof(sock) == payload[:10]


def test_slow_close_delays_the_close(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream(say_bye_and_close).address, name="p")
    with connect(proxy) as sock:
        started = time.monotonic()
        assert recv_until_eof(sock) == b"bye"
        plain = time.monotonic() - started

    proxy.add_toxic(type="slow_close", attributes={"delay": 300})
    with connect(proxy) as sock:
        started = time.monotonic()
        assert recv_until_eof(sock) == b"bye"
        delayed = time.monotonic() - started
    # Without the toxic the close came before its 300 ms; with it, not before them.
    assert plain < 0.3 and delayed >= 0.28, (plain, delayed)


def test_toxicity_0_never_applies(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="timeout", attributes={"timeout": 0}, toxicity=0.0)
    proxy.add_toxic(type="latency", attributes={"latency": 1000}, toxicity=0.0)
    for _ in range(5):
        with connect(proxy) as sock:
            assert round_trip(sock) < 1.0  # the latency toxic would add 1000 ms


def test_toxicity_is_decided_per_connection(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    proxy = toxiproxy.create(upstream=make_upstream().address, name="p")
    proxy.add_toxic(type="latency", attributes={"latency": 100}, toxicity=0.5)
    delayed = []
    for _ in range(16):
        with connect(proxy) as sock:
            first = round_trip(sock) >= 0.1
            assert (round_trip(sock) >= 0.1) == first, "one connection, one decision"
            delayed.append(first)
    assert any(delayed) and not all(delayed)


def test_upstream_toxic_affects_only_client_to_server(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    greeter = make_upstream(greet_and_record)
    proxy = toxiproxy.create(upstream=greeter.address, name="p")
    proxy.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
    with connect(proxy) as sock:
        assert recv_exactly(sock, 6) == b"hello\n"
        sock.sendall(b"request")
        # Our end of stream passes the toxic after the request: once the upstream has seen
        # it, the request was dropped, not delayed.
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: greeter.finished == 1, 5, "the upstream to see the end of stream")
    assert greeter.received == []


def test_downstream_toxic_affects_only_server_to_client(
    toxiproxy: Toxiproxy, make_upstream: Callable[..., Upstream]
) -> None:
    greeter = make_upstream(greet_record_a_line_and_close)
    proxy = toxiproxy.create(upstream=greeter.address, name="p")
    proxy.add_toxic(type="timeout", stream="downstream", attributes={"timeout": 0})
    with connect(proxy) as sock:
        sock.sendall(b"request\n")
        # The upstream closes after the request: its end of stream passes the toxic after the
        # greeting, so an end of stream with nothing before it shows the greeting was dropped.
        assert recv_until_eof(sock) == b""
    assert greeter.received == [b"request\n"]


def test_unreachable_upstream_closes_the_client_connection(toxiproxy: Toxiproxy) -> None:
    proxy = toxiproxy.create(upstream=f"{HOST}:{free_port()}", name="p")
    with connect(proxy) as sock:
        assert recv_until_eof(sock) == b""


# ---------------------------------------------------------------------------- raw HTTP rules


@pytest.fixture
async def api_url() -> AsyncIterator[str]:
    runner, stop = await start_server(HOST, 0)
    yield f"http://{HOST}:{bound_port(runner)}"
    await stop()


async def test_bad_json_is_400_with_a_json_error(api_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(api_url + "/proxies", data=b"{not json") as reply:
            assert reply.status == 400
            body = await reply.json()
    assert body["status"] == 400
    assert body["error"].startswith("bad request body: invalid JSON")


async def test_empty_body_is_400_bad_request_body_eof(api_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(api_url + "/proxies") as reply:
            assert reply.status == 400
            assert await reply.json() == {"error": "bad request body: EOF", "status": 400}


async def test_unknown_path_is_404_page_not_found(api_url: str) -> None:  # ported (api)
    async with aiohttp.ClientSession() as session:
        async with session.get(api_url + "/not_found") as reply:
            assert reply.status == 404
            assert await reply.text() == "404 page not found\n"


async def test_wrong_method_is_405(api_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.delete(api_url + "/proxies") as reply:
            assert reply.status == 405


async def test_browsers_are_refused_with_403(api_url: str) -> None:
    headers = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(api_url + "/proxies") as reply:
            assert reply.status == 403


async def test_stopping_the_server_closes_its_proxies() -> None:
    runner, stop = await start_server(HOST, 0)
    body = {"name": "p", "upstream": "localhost:3306", "listen": f"{HOST}:0"}
    async with aiohttp.ClientSession() as session:
        url = f"http://{HOST}:{bound_port(runner)}/proxies"
        async with session.post(url, json=body) as reply:
            _, port = (await reply.json())["listen"].split(":")
    _, writer = await asyncio.open_connection(HOST, int(port))
    writer.close()

    await stop()

    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, int(port))


# ---------------------------------------------------------------------------- running it


def test_ensure_toxiproxy_starts_ours_when_no_binary_is_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    handle = ensure_toxiproxy(HOST, 0)
    try:
        assert handle.kind == "python"
        assert requests.get(handle.url + "/version", timeout=5).status_code == 200
    finally:
        handle.stop()
    assert can_connect_to(HOST, handle.port) is False


def test_ensure_toxiproxy_reuses_a_server_already_answering(server: ToxiproxyHandle) -> None:
    handle = ensure_toxiproxy(server.host, server.port)
    assert handle.kind == "existing"
    handle.stop()
    assert can_connect_to(server.host, server.port) is True


def test_ensure_toxiproxy_runs_toxiproxy_server_from_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A stand-in binary that takes toxiproxy-server's flags (-host, -port).
    binary = tmp_path / "toxiproxy-server"
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} -m chaos.toxiproxy_server "$@"\n')
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    handle = ensure_toxiproxy(HOST, 0)
    try:
        assert handle.kind == "binary"
        assert requests.get(handle.url + "/proxies", timeout=5).json() == {}
    finally:
        handle.stop()
    assert can_connect_to(HOST, handle.port) is False


def test_cli_serves_until_sigterm_and_exits_0() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "chaos.toxiproxy_server", "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: process.poll() is not None or can_connect_to(HOST, port), 10, "the server"
        )
        assert process.poll() is None
        assert "version" in requests.get(f"http://{HOST}:{port}/version", timeout=5).json()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_cli_exits_2_with_one_line_when_the_port_is_taken() -> None:
    with socket.create_server((HOST, 0)) as taken:
        result = subprocess.run(
            [sys.executable, "-m", "chaos.toxiproxy_server", "--port", str(taken.getsockname()[1])],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot listen on" in result.stderr
