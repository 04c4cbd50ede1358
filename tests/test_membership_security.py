"""Membership nobody can forge: identity checks on node messages, pings that cannot rewrite
another node's entry, voters that change only through the log (issue 11).

Unit tests drive a real (unstarted) MeshNode, a real Members table and a real Raft core with
``Incoming`` objects whose authenticated ``sender``/``sender_role`` are set as the secured
transport sets them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.app import build_node
from mesh.config import Config, MembershipConfig
from mesh.consensus.core import RaftCore
from mesh.consensus.messages import CONFIG, AppendEntries, Entry, HardState
from mesh.consensus.sim import SimCluster
from mesh.contracts import Incoming
from mesh.membership.members import Members, Peer
from mesh.membership.voters import apply_voter_policy
from mesh.node import MeshNode
from mesh.storage.raft_store import RaftStore
from tests.netutil import free_mesh_address

# ----------------------------------------------------------------------------- a node


@pytest.fixture
async def node(tmp_path: Path) -> Any:
    """n1, follower at term 3 of a configuration {n1, n2, n3} (not started: no sockets)."""
    config = Config(node_id="n1", data_dir=tmp_path / "n1", mesh=free_mesh_address())
    config.data_dir.mkdir(parents=True)
    store = RaftStore(config.state_db_path)
    store.save(
        entries=[Entry(term=1, index=1, kind=CONFIG, data={"voters": ["n1", "n2", "n3"]})],
        hard_state=HardState(3, None, 1),
    )
    store.close()
    n = build_node(config)
    yield n
    n.store.close()


def append(src: str, term: int) -> dict[str, Any]:
    msg = AppendEntries(src=src, dst="n1", term=3, prev_log_index=1, prev_log_term=1)
    return {**msg.to_dict(), "term": term}


def incoming(kind: str, payload: dict[str, Any], sender: str | None, role: str | None) -> Incoming:
    return Incoming(
        kind=kind,
        payload=payload,
        rid=b"r",
        identity=(sender or "").encode(),
        sender=sender,
        sender_role=role,
    )


async def test_raft_from_a_handler_key_is_dropped_and_counted(node: MeshNode) -> None:
    node._on_message(incoming("raft", append("n2", 9), sender="n2", role="handler"))
    assert node.core.term == 3
    assert node.rejections.counts["role"] == 1


async def test_raft_naming_another_node_than_its_key_is_dropped(node: MeshNode) -> None:
    node._on_message(incoming("raft", append("n2", 9), sender="n3", role="node"))
    assert node.core.term == 3
    assert node.rejections.counts["sender_mismatch"] == 1


async def test_raft_from_the_node_its_key_names_is_stepped(node: MeshNode) -> None:
    node._on_message(incoming("raft", append("n2", 4), sender="n2", role="node"))
    assert (node.core.term, node.core.leader_id) == (4, "n2")
    assert sum(node.rejections.counts.values()) == 0


@pytest.mark.parametrize("term", [1 << 48, 1 << 62, (1 << 63) + 5])
async def test_a_huge_term_is_refused(node: MeshNode, term: int) -> None:
    node._on_message(incoming("raft", append("n2", term), sender=None, role=None))
    assert node.core.term == 3
    assert node.rejections.counts["malformed"] == 1


async def test_a_ping_from_a_handler_key_is_not_answered(node: MeshNode) -> None:
    ping = {"node_id": "h1", "mesh": "tcp://127.0.0.1:7999", "http": "127.0.0.1:8999"}
    assert node._on_message(incoming("ping", ping, sender="h1", role="handler")) is None
    assert node.members.peers == {} and node.rejections.counts["role"] == 1


async def test_a_snapshot_chunk_from_a_voter_that_is_not_the_leader_is_refused(
    node: MeshNode,
) -> None:
    node._on_message(incoming("raft", append("n2", 3), sender="n2", role="node"))
    assert node.core.leader_id == "n2"
    chunk = {
        "src": "n3",
        "term": 3,
        "index": 50,
        "snap_term": 3,
        "voters": ["n3"],
        "offset": 0,
        "size": 2,
        "data": "e30=",
        "crc": 0,
    }
    reply = node._on_message(incoming("snap_chunk", chunk, sender="n3", role="node"))
    assert reply is not None and reply["ok"] is False and "not the leader" in reply["error"]
    assert node.rejections.counts["snapshot_not_leader"] == 1
    assert node.core.snap_index == 0


# ----------------------------------------------------------------------------- pings


class Dialer:
    """The transport as membership sees it; ``names`` plays the authenticated name per address."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def connect(self, address: str) -> None:
        pass

    async def request(self, address: str, kind: str, payload: Any, *, timeout: float) -> Any:
        raise TimeoutError

    def name_at(self, address: str) -> str | None:
        return self.names.get(address)


class Events:
    def emit(self, event: str, **fields: Any) -> None:
        pass


A2, A3 = "tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003"


def members(dialer: Dialer | None = None, *, learn_peers: bool = True) -> Members:
    m = Members(
        "n1",
        "tcp://127.0.0.1:7001",
        dialer=dialer or Dialer(),
        events=Events(),
        settings=MembershipConfig(learn_peers=learn_peers),
        local_info=dict,
        clock=lambda: 100.0,
        wall_clock=lambda: 1e9,
    )
    m.on_discovered([A2, A3])
    m.peers[A2].node_id, m.peers[A2].http = "n2", "127.0.0.1:8002"
    m.peers[A3].node_id, m.peers[A3].http = "n3", "127.0.0.1:8003"
    return m


def test_a_ping_cannot_rewrite_another_nodes_http_address() -> None:
    m = members()
    m.on_ping({"node_id": "n2", "mesh": A2, "http": "10.6.6.6:80"})
    m.on_ping({"node_id": "n9", "mesh": A2, "http": "10.6.6.6:80"})
    assert (m.peers[A2].node_id, m.peers[A2].http) == ("n2", "127.0.0.1:8002")


def test_a_ping_claiming_another_nodes_mesh_address_does_not_take_its_entry() -> None:
    m = members()
    m.on_ping({"node_id": "n3", "mesh": A2, "http": "127.0.0.1:8003"})
    assert m.by_id("n2") is m.peers[A2] and m.by_id("n3") is m.peers[A3]


def test_a_ping_from_an_unknown_node_adds_its_address_but_not_its_identity() -> None:
    dialer = Dialer()
    m = members(dialer)
    m.on_ping({"node_id": "n4", "mesh": "tcp://127.0.0.1:7004", "http": "127.0.0.1:8004"})
    peer = m.peers["tcp://127.0.0.1:7004"]
    assert peer.node_id is None and m.alive() == []  # known once it answers our own ping


@pytest.mark.parametrize(
    "bad",
    [
        {"node_id": "n2", "term": 1 << 60},
        {"node_id": "n2", "term": True},
        {"node_id": "n2", "role": "emperor"},
        {"node_id": "n2" * 100},
        {"node_id": ["n2"]},
        {"node_id": "n4", "mesh": "udp://x", "http": "10.6.6.6:80"},
        {"node_id": "n2", "http": "http://a b:1"},
    ],
)
def test_bad_ping_fields_are_ignored(bad: dict[str, Any]) -> None:
    m = members()
    m.on_ping({"mesh": A2, **bad})
    peer = m.peers[A2]
    assert sorted(m.peers) == [A2, A3] and peer.node_id == "n2"
    assert type(peer.term) is int and peer.term < 1 << 48 and peer.role in (None, "follower")
    assert peer.http == "127.0.0.1:8002"


def test_a_ping_says_which_request_kinds_its_node_answers() -> None:
    """How a follower learns that the leader takes writes over the mesh (``api_forward``)."""
    m = members()
    m.on_ping({"node_id": "n2", "accepts": ["api_forward", "hello"]})
    assert m.peers[A2].accepts == {"api_forward", "hello"}
    m.on_ping({"node_id": "n2"})  # restarted as an older version: it says nothing
    assert m.peers[A2].accepts == frozenset()


@pytest.mark.parametrize(
    "accepts",
    [
        "api_forward",
        ["API_FORWARD"],
        ["api_forward", 7],
        ["x" * 33],
        [f"k{i}" for i in range(33)],
    ],
    ids=["not-a-list", "not-a-kind", "not-a-string", "too-long", "too-many"],
)
def test_a_bad_list_of_accepted_kinds_is_ignored_whole(accepts: Any) -> None:
    m = members()
    m.on_ping({"node_id": "n2", "accepts": accepts})
    assert m.peers[A2].accepts == frozenset()


def test_a_ping_reply_naming_another_node_than_the_key_at_that_address_is_ignored() -> None:
    dialer = Dialer()
    m = members(dialer)
    dialer.names[A3] = "n3"
    m.on_ping_reply(m.peers[A3], {"node_id": "n7", "http": "10.6.6.6:80"})
    assert (m.peers[A3].node_id, m.peers[A3].http) == ("n3", "127.0.0.1:8003")
    m.on_ping_reply(m.peers[A3], {"node_id": "n3", "http": "127.0.0.1:9003", "role": "leader"})
    assert (m.peers[A3].http, m.peers[A3].role) == ("127.0.0.1:9003", "leader")


# ----------------------------------------------------------------------------- voters


def leader_core(voters: list[str]) -> RaftCore:
    core = RaftCore(voters[0])
    core.bootstrap(voters)
    while not core.is_leader:
        core.tick()
    core.commit = core.last_index  # the no-op: a membership change may be proposed now
    return core


def alive(*ids: str) -> list[Peer]:
    return [
        Peer(address=f"tcp://127.0.0.1:{7100 + i}", node_id=n, state="alive")
        for i, n in enumerate(ids)
    ]


def test_a_secured_leader_adds_only_node_key_holders() -> None:
    core = leader_core(["n1"])
    keys = {"n1", "n2"}
    assert not apply_voter_policy(core, alive("n9"), 1, may_vote=keys.__contains__)
    assert core.voters == {"n1"}
    assert apply_voter_policy(core, alive("n9", "n2"), 1, may_vote=keys.__contains__)
    assert core.voters == {"n1", "n2"}


def test_auto_join_off_never_grows_the_voters() -> None:
    core = leader_core(["n1"])
    assert not apply_voter_policy(core, alive("n2", "n3"), 1, auto_join=False)
    assert core.voters == {"n1"}


def test_a_removed_node_is_not_added_back_automatically() -> None:
    core = leader_core(["n1"])
    core.change_voters({"n1", "n2"}, removed=set())
    core.commit = core.last_index
    core.change_voters({"n1"}, removed={"n2"})
    core.commit = core.last_index
    assert core.removed == {"n2"}
    assert not apply_voter_policy(core, alive("n2"), 1)
    assert core.voters == {"n1"}


def test_a_leader_that_removes_itself_steps_down_and_another_leads() -> None:
    c = SimCluster(["a", "b", "c"], seed=21)
    assert c.wait_for(lambda: c.stable_leader() is not None, 600)
    ld = c.stable_leader()
    assert c.wait_for(lambda: ld.core.commit >= ld.core.pending_conf_index, 100)  # its no-op
    ld.core.change_voters(ld.core.voters - {ld.id}, removed={ld.id})
    c._process(ld)
    others = [n for n in c.nodes.values() if n.id != ld.id]
    assert c.wait_for(lambda: any(n.core.is_leader for n in others), 600)
    assert not ld.core.is_leader
    new = next(n for n in others if n.core.is_leader)
    assert new.core.voters == {n.id for n in others} and new.core.removed == {ld.id}
