"""``--discovery dns``: peers from A or SRV records of a local DNS server (tests/dnsserver.py).

Unit tests drive ``DnsDiscovery.refresh()`` by hand (the periodic loop sleeps for an hour) except
where the loop itself is the behaviour; the last test runs three real node processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.config import load_config
from mesh.membership.discovery import UnionDiscovery, make_discovery
from mesh.membership.dnsdiscovery import DnsDiscovery
from mesh.supervise import (
    REPO_ROOT,
    child_env,
    node_command,
    spawn,
    stop_all,
    tail,
    wait_until,
)
from tests.dnsserver import DnsServer
from tests.netutil import free_port_pair
from tests.waiting import one_leader_agreed, wait_until_async

NAME = "mesh.test."
SRV_NAME = "_schedulezero._tcp.mesh.test."
OWN = "tcp://127.0.0.1:7100"
HOUR = 3600.0


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as s:
        yield s


def discovery(server: DnsServer, **kwargs) -> DnsDiscovery:
    kwargs.setdefault("port", 7100)
    kwargs.setdefault("interval", HOUR)
    kwargs.setdefault("timeout", 0.5)
    return DnsDiscovery(NAME, [OWN], server=server.address, **kwargs)


# --------------------------------------------------------------------------- A records


async def test_a_records_become_peers_on_the_mesh_port_without_our_own_address(
    server: DnsServer,
) -> None:
    server.records[(NAME, "A")] = ["127.0.0.1", "10.0.0.2", "10.0.0.3"]
    d = discovery(server)
    heard: list[frozenset[str]] = []
    d.set_listener(heard.append)
    await d.start()
    try:
        expected = {"tcp://10.0.0.2:7100", "tcp://10.0.0.3:7100"}
        assert d.peers() == expected
        assert heard == [expected]
    finally:
        await d.close()


async def test_re_resolution_sees_peers_join_and_leave(server: DnsServer) -> None:
    server.records[(NAME, "A")] = ["10.0.0.2"]
    d = discovery(server, interval=0.05)
    await d.start()
    try:
        assert d.peers() == {"tcp://10.0.0.2:7100"}
        server.records[(NAME, "A")] = ["10.0.0.3", "10.0.0.4"]
        await wait_until_async(
            lambda: d.peers() == {"tcp://10.0.0.3:7100", "tcp://10.0.0.4:7100"},
            5.0,
            lambda: f"the new records to be seen: {sorted(d.peers())}",
        )
    finally:
        await d.close()


async def test_a_name_without_records_means_no_peers(server: DnsServer) -> None:
    server.records[(NAME, "A")] = ["10.0.0.2"]
    d = discovery(server)
    await d.start()
    del server.records[(NAME, "A")]
    assert await d.refresh() is True
    assert d.peers() == frozenset()
    await d.close()


async def test_unusable_addresses_in_a_records_are_skipped(server: DnsServer) -> None:
    server.records[(NAME, "A")] = ["0.0.0.0", "224.0.0.251", "255.255.255.255", "10.0.0.2"]
    d = discovery(server)
    await d.start()
    assert d.peers() == {"tcp://10.0.0.2:7100"}
    await d.close()


async def test_our_own_host_name_is_left_out_by_its_address(server: DnsServer) -> None:
    server.records[(NAME, "A")] = ["127.0.0.1", "10.0.0.2"]
    d = DnsDiscovery(NAME, ["tcp://localhost:7100"], port=7100, server=server.address)
    await d.start()
    assert d.peers() == {"tcp://10.0.0.2:7100"}
    await d.close()


# --------------------------------------------------------------------------- SRV records


async def test_srv_records_give_host_and_port_from_glue(server: DnsServer) -> None:
    server.records[(SRV_NAME, "SRV")] = ["0 0 7100 a.mesh.test.", "0 0 7202 b.mesh.test."]
    server.records[("a.mesh.test.", "A")] = ["127.0.0.1"]
    server.records[("b.mesh.test.", "A")] = ["10.0.0.2"]
    queries_before = server.queries
    d = discovery(server, srv=True)
    await d.start()
    assert d.peers() == {"tcp://10.0.0.2:7202"}  # 127.0.0.1:7100 is our own
    assert server.queries - queries_before == 1  # the targets' addresses came as glue
    await d.close()


async def test_srv_targets_without_glue_are_resolved(server: DnsServer) -> None:
    server.glue = False
    server.records[(SRV_NAME, "SRV")] = ["0 0 7202 b.mesh.test.", "0 0 7204 c.mesh.test."]
    server.records[("b.mesh.test.", "A")] = ["10.0.0.2"]
    server.records[("c.mesh.test.", "A")] = ["10.0.0.3", "10.0.0.4"]
    d = discovery(server, srv=True)
    await d.start()
    assert d.peers() == {"tcp://10.0.0.2:7202", "tcp://10.0.0.3:7204", "tcp://10.0.0.4:7204"}
    await d.close()


async def test_srv_records_with_no_target_or_no_room_for_the_pub_port_are_skipped(
    server: DnsServer,
) -> None:
    server.records[(SRV_NAME, "SRV")] = [
        "0 0 7202 b.mesh.test.",
        "0 0 65535 b.mesh.test.",  # PORT+1 (the PUB socket) would not exist
        "0 0 7300 .",  # "no service here"
    ]
    server.records[("b.mesh.test.", "A")] = ["10.0.0.2"]
    d = discovery(server, srv=True)
    await d.start()
    assert d.peers() == {"tcp://10.0.0.2:7202"}
    await d.close()


# --------------------------------------------------------------------------- hostile answers


@pytest.mark.parametrize("mode", ["garbage", "servfail", "truncated"])
async def test_a_bad_answer_is_ignored_and_the_last_peers_kept(
    server: DnsServer, mode: str
) -> None:
    server.records[(NAME, "A")] = ["10.0.0.2"]
    d = discovery(server)
    await d.start()
    server.mode = mode
    assert await d.refresh() is False
    assert d.peers() == {"tcp://10.0.0.2:7100"}
    server.mode = "answer"
    server.records[(NAME, "A")] = ["10.0.0.3"]
    assert await d.refresh() is True
    assert d.peers() == {"tcp://10.0.0.3:7100"}
    await d.close()


async def test_an_answer_with_more_than_max_records_is_ignored_whole(server: DnsServer) -> None:
    server.records[(NAME, "A")] = ["10.0.0.2"]
    d = discovery(server, max_records=8)
    await d.start()
    server.records[(NAME, "A")] = [f"10.1.0.{i}" for i in range(1, 10)]
    assert await d.refresh() is False
    assert d.peers() == {"tcp://10.0.0.2:7100"}
    server.records[(NAME, "A")] = [f"10.1.0.{i}" for i in range(1, 9)]
    assert await d.refresh() is True
    assert len(d.peers()) == 8
    await d.close()


async def test_srv_targets_adding_up_to_more_than_max_records_are_ignored(
    server: DnsServer,
) -> None:
    server.records[(SRV_NAME, "SRV")] = ["0 0 7202 b.mesh.test.", "0 0 7204 c.mesh.test."]
    server.records[("b.mesh.test.", "A")] = [f"10.1.0.{i}" for i in range(1, 5)]
    server.records[("c.mesh.test.", "A")] = [f"10.2.0.{i}" for i in range(1, 5)]
    d = discovery(server, srv=True, max_records=6)
    await d.start()
    assert d.peers() == frozenset()
    assert await d.refresh() is False
    await d.close()


async def test_a_server_that_is_down_keeps_the_last_peers_and_is_retried(
    server: DnsServer,
) -> None:
    server.records[(NAME, "A")] = ["10.0.0.2"]
    d = discovery(server, interval=0.05, timeout=0.1)
    await d.start()
    try:
        server.mode = "silent"
        asked = server.queries
        await wait_until_async(lambda: server.queries >= asked + 3, 5.0, "retries while down")
        assert d.peers() == {"tcp://10.0.0.2:7100"}
        server.records[(NAME, "A")] = ["10.0.0.3"]
        server.mode = "answer"
        await wait_until_async(
            lambda: d.peers() == {"tcp://10.0.0.3:7100"}, 5.0, "the server to be heard again"
        )
    finally:
        await d.close()


async def test_start_with_the_server_down_starts_with_no_peers(server: DnsServer) -> None:
    server.mode = "silent"
    d = discovery(server, timeout=0.1)
    await d.start()
    assert d.peers() == frozenset()
    await d.close()


# --------------------------------------------------------------------------- configuration


def test_make_discovery_builds_dns_discovery_from_the_config() -> None:
    args = {"discovery": "dns", "dns.name": "mesh.test", "mesh": "tcp://127.0.0.1:7300"}
    d = make_discovery(load_config({**args, "dns.server": "127.0.0.1:5300"}, None, {}))
    assert isinstance(d, DnsDiscovery)
    assert (d.name, d.port, d.srv, d.server) == ("mesh.test", 7300, False, "127.0.0.1:5300")
    seeded = make_discovery(load_config({**args, "peers": ["tcp://10.0.0.9:7100"]}, None, {}))
    assert isinstance(seeded, UnionDiscovery)


# --------------------------------------------------------------------------- real nodes


def test_three_nodes_found_through_dns_elect_one_leader(tmp_path: Path) -> None:
    """A headless Service's shape: one name, one A record per node, one shared mesh port."""
    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    mesh_port = free_port_pair("127.0.0.1")
    procs, https = [], []
    with DnsServer() as server:
        server.records[(NAME, "A")] = ips
        try:
            for i, ip in enumerate(ips):
                http = f"{ip}:{free_port_pair('127.0.0.1')}"
                https.append(f"http://{http}")
                argv = node_command(
                    f"d{i}",
                    data_dir=tmp_path / f"d{i}",
                    mesh=f"tcp://{ip}:{mesh_port}",
                    http=http,
                    extra=[
                        "--discovery",
                        "dns",
                        "--dns-name",
                        NAME,
                        "--dns-server",
                        server.address,
                        "--dns-interval",
                        "0.5",
                    ],
                )
                log = tmp_path / f"d{i}.log"
                procs.append(spawn(argv, stdout=log, cwd=REPO_ROOT, env=child_env()))

            def agreed() -> list | None:
                return one_leader_agreed(https, 3)

            def logs() -> str:
                return "\n".join(tail(tmp_path / f"d{i}.log", 10) for i in range(3))

            healths = wait_until(
                agreed, 20, "one leader agreed by three DNS nodes", diagnostics=logs
            )
            assert all(h["voters"] == ["d0", "d1", "d2"] for h in healths), (healths, logs())
            assert sum(h["role"] == "leader" for h in healths) == 1
        finally:
            stop_all(procs)
