"""Peer discovery: the static list and mDNS over real multicast sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.config import load_config
from mesh.membership.discovery import (
    Discovery,
    DiscoveryError,
    MdnsDiscovery,
    StaticDiscovery,
    UnionDiscovery,
    choose_interfaces,
    make_discovery,
)
from tests.waiting import wait_until_async

REPO = Path(__file__).resolve().parent.parent
MDNS_GROUP = "224.0.0.251"


def multicast_problem() -> str | None:
    """Why multicast on 127.0.0.1 cannot work here, or None if a datagram makes the round trip."""
    rx = tx = None
    try:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", 0))
        port = rx.getsockname()[1]
        mreq = struct.pack("4s4s", socket.inet_aton(MDNS_GROUP), socket.inet_aton("127.0.0.1"))
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        rx.settimeout(2.0)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        tx.sendto(b"probe", (MDNS_GROUP, port))
        if rx.recv(16) != b"probe":
            return "multicast probe on 127.0.0.1 returned garbage"
        return None
    except OSError as e:
        return f"multicast on 127.0.0.1 does not work here: {e}"
    finally:
        for s in (rx, tx):
            if s is not None:
                s.close()


needs_multicast = pytest.mark.skipif(
    (reason := multicast_problem()) is not None, reason=reason or ""
)


def unique_service_type() -> str:
    """A service type of our own, so concurrent test runs never see each other's nodes."""
    return f"_sz{secrets.token_hex(4)}._tcp.local."


# --------------------------------------------------------------------------- static


async def test_static_discovery_excludes_own_address_and_notifies_on_start() -> None:
    own = "tcp://127.0.0.1:7100"
    discovery = StaticDiscovery([own, "tcp://127.0.0.1:7102", "tcp://127.0.0.1:7104"], own)
    heard: list[frozenset[str]] = []
    discovery.set_listener(heard.append)
    await discovery.start()
    expected = frozenset({"tcp://127.0.0.1:7102", "tcp://127.0.0.1:7104"})
    assert discovery.peers() == expected
    assert heard == [expected]
    await discovery.close()


async def test_static_update_notifies_only_on_change() -> None:
    own = "tcp://127.0.0.1:7100"
    discovery = StaticDiscovery(["tcp://127.0.0.1:7102"], own)
    heard: list[frozenset[str]] = []
    discovery.set_listener(heard.append)
    await discovery.start()
    discovery.update(["tcp://127.0.0.1:7102"])
    discovery.update(["tcp://127.0.0.1:7102", "tcp://127.0.0.1:7106", own])
    assert heard == [
        frozenset({"tcp://127.0.0.1:7102"}),
        frozenset({"tcp://127.0.0.1:7102", "tcp://127.0.0.1:7106"}),
    ]


async def test_a_failing_listener_does_not_break_discovery() -> None:
    def explode(_peers: frozenset[str]) -> None:
        raise RuntimeError("boom")

    discovery = StaticDiscovery(["tcp://127.0.0.1:7102"], "tcp://127.0.0.1:7100")
    discovery.set_listener(explode)
    await discovery.start()
    assert discovery.peers() == {"tcp://127.0.0.1:7102"}


async def test_union_discovery_merges_sources_into_one_peer_set() -> None:
    a = StaticDiscovery(["tcp://127.0.0.1:7102"], "tcp://127.0.0.1:7100")
    b = StaticDiscovery(["tcp://127.0.0.1:7104"], "tcp://127.0.0.1:7100")
    union = UnionDiscovery([a, b])
    heard: list[frozenset[str]] = []
    union.set_listener(heard.append)
    await union.start()
    assert union.peers() == {"tcp://127.0.0.1:7102", "tcp://127.0.0.1:7104"}
    b.update([])
    assert heard[-1] == {"tcp://127.0.0.1:7102"}
    await union.close()


def test_make_discovery_follows_the_config() -> None:
    static = make_discovery(load_config({"peers": ["tcp://127.0.0.1:7102"]}, None, {}))
    assert isinstance(static, StaticDiscovery)
    mdns = make_discovery(load_config({"discovery": "mdns"}, None, {}))
    assert isinstance(mdns, MdnsDiscovery)
    both = make_discovery(
        load_config({"discovery": "mdns", "peers": ["tcp://127.0.0.1:7102"]}, None, {})
    )
    assert isinstance(both, UnionDiscovery)
    for d in (static, mdns, both):
        assert isinstance(d, Discovery)


def test_loopback_nodes_use_the_loopback_interface() -> None:
    assert choose_interfaces("tcp://127.0.0.1:7100") == ["127.0.0.1"]
    assert choose_interfaces("tcp://localhost:7100") == ["127.0.0.1"]


# --------------------------------------------------------------------------- mDNS


def mdns_node(i: int, service_type: str, **kwargs) -> MdnsDiscovery:
    return MdnsDiscovery(
        f"node-{i}",
        f"tcp://127.0.0.1:{17100 + 2 * i}",
        f"127.0.0.1:{18100 + i}",
        service_type=service_type,
        **kwargs,
    )


@needs_multicast
async def test_three_mdns_nodes_find_each_other_and_see_one_leave() -> None:
    service_type = unique_service_type()
    nodes = [mdns_node(i, service_type) for i in range(3)]
    heard: list[list[frozenset[str]]] = [[] for _ in nodes]
    for node, log in zip(nodes, heard, strict=True):
        node.set_listener(log.append)
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        addresses = [n.mesh_address for n in nodes]

        def all_found() -> bool:
            return all(
                n.peers() == frozenset(a for a in addresses if a != n.mesh_address) for n in nodes
            )

        await wait_until_async(
            all_found, 5.0, lambda: f"all to find each other: {[sorted(n.peers()) for n in nodes]}"
        )
        assert all(log and log[-1] == n.peers() for n, log in zip(nodes, heard, strict=True))
        assert nodes[0].info(addresses[1]) == {
            "node_id": "node-1",
            "mesh": addresses[1],
            "http": "127.0.0.1:18101",
            "name": f"node-1.{service_type}",
        }
        assert nodes[0].info("tcp://127.0.0.1:1") == {}

        await nodes[2].close()
        gone = addresses[2]
        await wait_until_async(
            lambda: all(gone not in n.peers() for n in nodes[:2]),
            5.0,
            lambda: f"{gone} to be gone: {[sorted(n.peers()) for n in nodes[:2]]}",
        )
        assert nodes[0].peers() == {addresses[1]}
    finally:
        for n in nodes:
            await n.close()


@needs_multicast
async def test_a_second_node_with_the_same_id_is_refused() -> None:
    service_type = unique_service_type()
    first = mdns_node(1, service_type)
    second = MdnsDiscovery(
        "node-1", "tcp://127.0.0.1:17900", "127.0.0.1:18900", service_type=service_type
    )
    try:
        await first.start()
        with pytest.raises(DiscoveryError, match="already uses node id 'node-1'"):
            await second.start()
    finally:
        await second.close()
        await first.close()


CRASHING_PEER = """
import asyncio, sys
from mesh.membership.discovery import MdnsDiscovery

async def main():
    d = MdnsDiscovery("victim", "tcp://127.0.0.1:17500", "127.0.0.1:18500",
                      service_type=sys.argv[1], ttl=3)
    await d.start()
    print("registered", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@needs_multicast
async def test_a_crashed_peer_without_goodbye_leaves_after_its_ttl() -> None:
    service_type = unique_service_type()
    watcher = mdns_node(0, service_type, ttl=3)
    peer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_PEER, service_type, stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        await watcher.start()
        assert peer.stdout is not None
        line = await asyncio.wait_for(peer.stdout.readline(), 10)
        assert line.strip() == b"registered"
        await wait_until_async(
            lambda: watcher.peers() == {"tcp://127.0.0.1:17500"}, 5.0, "the victim to be seen"
        )
        peer.kill()  # SIGKILL: no goodbye packets
        await peer.wait()
        started = time.monotonic()
        await wait_until_async(
            lambda: not watcher.peers(), 15.0, lambda: f"expiry: {sorted(watcher.peers())}"
        )
        assert time.monotonic() - started > 1.0  # dropped by expiry, not by a goodbye
    finally:
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
        await watcher.close()


NETNS_SCRIPT = """
import asyncio, sys
from mesh.membership.discovery import MdnsDiscovery

async def main():
    nodes = [MdnsDiscovery(f"n{i}", f"tcp://127.0.0.1:{7100 + 2 * i}", f"127.0.0.1:{8100 + i}",
                           service_type=sys.argv[1]) for i in range(3)]
    await asyncio.gather(*(n.start() for n in nodes))
    for _ in range(100):
        if all(len(n.peers()) == 2 for n in nodes):
            break
        await asyncio.sleep(0.05)
    print(",".join(str(len(n.peers())) for n in nodes), flush=True)
    for n in nodes:
        await n.close()

asyncio.run(main())
"""


@pytest.mark.netns
def test_mdns_works_in_a_namespace_with_only_loopback() -> None:
    """``lo`` has no MULTICAST flag and there is no route: binding to 127.0.0.1 still works."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"szdisc{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        flags = subprocess.run(
            ["ip", "-n", name, "link", "show", "lo"], capture_output=True, text=True
        ).stdout
        assert "MULTICAST" not in flags.split(">")[0]
        service_type = unique_service_type()
        result = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", NETNS_SCRIPT, service_type],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert result.stdout.strip() == "2,2,2", result.stderr[-2000:]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


NETNS_PEER_SCRIPT = """
import asyncio, sys
from mesh.membership.discovery import MdnsDiscovery

async def main():
    node_id, ip, service_type = sys.argv[1:4]
    d = MdnsDiscovery(node_id, f"tcp://{ip}:7100", f"{ip}:8100", service_type=service_type)
    await d.start()
    for _ in range(100):
        if d.peers():
            break
        await asyncio.sleep(0.05)
    print(",".join(sorted(d.peers())), flush=True)
    # Stay visible until the test has heard from both sides: it then closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await d.close()

asyncio.run(main())
"""


@pytest.mark.netns
def test_mdns_finds_a_node_in_another_network_namespace() -> None:
    """Two namespaces joined by a veth pair: each node binds zeroconf to its own address."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = secrets.token_hex(3)
    ns_a, ns_b, veth_a, veth_b = f"sza{tag}", f"szb{tag}", f"sva{tag}", f"svb{tag}"
    if subprocess.run(["ip", "netns", "add", ns_a], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        for cmd in (
            ["ip", "netns", "add", ns_b],
            ["ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b],
            ["ip", "link", "set", veth_a, "netns", ns_a],
            ["ip", "link", "set", veth_b, "netns", ns_b],
            ["ip", "-n", ns_a, "addr", "add", "10.213.0.1/24", "dev", veth_a],
            ["ip", "-n", ns_b, "addr", "add", "10.213.0.2/24", "dev", veth_b],
            ["ip", "-n", ns_a, "link", "set", veth_a, "up"],
            ["ip", "-n", ns_b, "link", "set", veth_b, "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        service_type = unique_service_type()
        script = (sys.executable, "-c", NETNS_PEER_SCRIPT)
        procs = [
            subprocess.Popen(
                ["ip", "netns", "exec", ns, *script, node_id, ip, service_type],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            for ns, node_id, ip in ((ns_a, "a", "10.213.0.1"), (ns_b, "b", "10.213.0.2"))
        ]
        try:
            # Each prints what it found (after at most 5 s of looking); both stay up until both
            # have printed, then communicate() closes their stdin and they leave.
            found = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
            outputs = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert found[0] == "tcp://10.213.0.2:7100", outputs[0][1][-2000:]
        assert found[1] == "tcp://10.213.0.1:7100", outputs[1][1][-2000:]
    finally:
        subprocess.run(["ip", "netns", "del", ns_a], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns_b], capture_output=True)
