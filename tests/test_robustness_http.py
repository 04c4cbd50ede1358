"""What one HTTP client may cost a node (mesh.api.limits), against a real node process with raw
sockets: deep JSON and NaN answer 400, a slow body 408, a slowloris client is cut off at the
header timeout, and connections beyond the limit get 503 while the node keeps serving."""

from __future__ import annotations

import json
import socket
import time

import pytest

from mesh.api.limits import loads
from mesh.api.schema import BadRequest

HOST = "127.0.0.1"
LIMITS = {"header_timeout": 1.0, "body_timeout": 1.0, "max_connections": 16}


def _raw_post(port: int, body: bytes, *, timeout: float = 5.0) -> tuple[int, dict]:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(
            b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        return _read_response(s)


def _read_response(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def _closed_by_peer(s: socket.socket) -> bool:
    """True once the server has closed ``s`` (a read gives EOF or a reset)."""
    s.setblocking(False)
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    finally:
        s.setblocking(True)


def test_json_nested_5000_deep_answers_400_not_500(cluster_factory) -> None:
    node = cluster_factory(1).wait_for_leader()
    status, body = _raw_post(node.http_port, b"[" * 5000 + b"]" * 5000)
    assert status == 400, body
    assert "nested too deeply" in body["error"]
    assert node.health()["role"] == "leader"


def test_nan_in_a_body_answers_400_and_the_node_keeps_leading(cluster_factory) -> None:
    node = cluster_factory(1).wait_for_leader()
    status, body = _raw_post(node.http_port, b'{"task": "t", "kwargs": {"x": NaN}}')
    assert status == 400, body
    assert "NaN" in body["error"]
    status, _ = node.request("POST", "/api/jobs", {"task": "t", "kwargs": {"x": 1}}, timeout=5)
    assert status == 202
    assert node.running and node.health()["role"] == "leader"


def test_a_body_larger_than_the_limit_answers_413(cluster_factory) -> None:
    node = cluster_factory(1, config={"api": {"max_body_bytes": 4096}}).wait_for_leader()
    status, body = _raw_post(
        node.http_port, b'{"task": "t", "kwargs": {"x": "%s"}}' % (b"y" * 5000)
    )
    assert status == 413, body
    assert "limit 4096 bytes" in body["error"]


def test_a_body_that_stops_arriving_answers_408(cluster_factory) -> None:
    node = cluster_factory(1, config={"api": LIMITS}).wait_for_leader()
    with socket.create_connection((HOST, node.http_port), timeout=10) as s:
        s.sendall(
            b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\nConnection: close\r\n\r\n{"task":'
        )
        started = time.monotonic()
        status, body = _read_response(s)
    assert status == 408, body
    assert time.monotonic() - started < 5


def test_slowloris_clients_are_cut_off_and_connections_beyond_the_limit_get_503(
    cluster_factory,
) -> None:
    node = cluster_factory(1, config={"api": LIMITS}).wait_for_leader()
    slow: list[socket.socket] = []
    try:
        # 16 clients take every slot by sending a request head one byte at a time.
        for _ in range(16):
            s = socket.create_connection((HOST, node.http_port), timeout=5)
            s.sendall(b"G")
            slow.append(s)
        time.sleep(0.2)  # let the node register them all
        with socket.create_connection((HOST, node.http_port), timeout=5) as extra:
            # Refused on arrival: the node answers before the client says anything (a request
            # already sent may meet a reset instead, as the node reads nothing from it).
            status, body = _read_response(extra)
        assert status == 503, body
        assert "too many connections" in body["error"]
        # They keep trickling bytes, yet none completes its head within the header timeout.
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline and not all(_closed_by_peer(s) for s in slow):
            for s in slow:
                try:
                    s.send(b"E")
                except OSError:
                    pass
            time.sleep(0.25)
        assert all(_closed_by_peer(s) for s in slow), "a slowloris connection stayed open"
    finally:
        for s in slow:
            s.close()
    assert node.health(timeout=2.0)["role"] == "leader"


def test_loads_bounds_depth_and_refuses_non_json_numbers() -> None:
    assert loads(b'{"a": [[1]]}', 3) == {"a": [[1]]}
    with pytest.raises(BadRequest, match="more than 2 levels"):
        loads(b'{"a": [[1]]}', 2)
    with pytest.raises(BadRequest, match="more than 64 levels"):
        loads(b"[" * 100_000 + b"]" * 100_000, 64)
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        with pytest.raises(BadRequest, match="not a JSON number"):
            loads(b'{"x": %s}' % constant, 64)
    assert loads(b'"[[[[ in a string ]]]]"', 1) == "[[[[ in a string ]]]]"
