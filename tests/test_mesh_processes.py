"""The mesh core as real processes: `schedulezero node` on 127.0.0.1, static peers, real signals.

These tests assert behaviour (one leader, failover, rejoin, leadership transfer, identical logs,
quorum loss, robustness to garbage), not speed: the only time bounds are generous ones taken
from the specification (failover within 3 s, a SIGTERM transfer within 1 s). Benchmarks measure
speed. The harness is tests/cluster.py.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from mesh.storage.raft_store import RaftStore
from tests.cluster import Cluster, NodeProcess

pytestmark = pytest.mark.timeout(90)

FAILOVER_BOUND = 3.0  # seconds: kill -9 of the leader → a new leader (spec)
TRANSFER_BOUND = 1.0  # seconds: SIGTERM of the leader → a new leader (< one election timeout)


def _term(node: NodeProcess) -> int:
    h = node.health()
    assert h is not None, f"{node.node_id} does not answer /api/health"
    return int(h["term"])


def _metrics(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = node.metrics_text()
    assert text is not None, f"{node.node_id} does not answer /metrics"
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _commit_everywhere(cluster: Cluster, leader: NodeProcess, name: str) -> int:
    """Commit one write through ``leader``, wait until every node has applied it; its index.

    The followers apply it only on AppendEntries from that leader in its term: proof that the
    leader still leads and replicates at this point (a paused schedule: it never fires).
    """
    body = {"id": name, "task": name, "trigger": {"type": "interval", "hours": 1}, "paused": True}
    status, reply = leader.request("POST", "/api/schedules", body)
    assert status == 201, reply
    health = leader.health()
    assert health is not None, f"{leader.node_id} does not answer /api/health"
    index = int(health["commit_index"])
    cluster.wait_for(
        lambda: all((h := n.health()) and h["applied_index"] >= index for n in cluster.nodes),
        10,
        f"every node to apply index {index} ({name})",
    )
    return index


def _wait_new_leader(
    cluster: Cluster, survivors: list[NodeProcess], old_term: int, since: float, timeout: float
) -> tuple[NodeProcess, float]:
    """The first survivor seen as leader in a term above ``old_term``, and the seconds since
    ``since`` (a monotonic time) at which it was seen."""
    leader = cluster.wait_for(
        lambda: cluster.leader_now(survivors, newer_than_term=old_term, agree=False),
        timeout,
        f"a new leader among {[n.node_id for n in survivors]} after term {old_term}",
        interval=0.01,
    )
    return leader, time.monotonic() - since


# ------------------------------------------------------------------------------ election


def test_three_nodes_with_static_peers_elect_one_leader_all_agree_on(cluster_factory):
    cluster = cluster_factory(3)

    leader = cluster.wait_for_leader(timeout=10)

    healths = cluster.healths()
    assert all(healths.values()), healths
    roles = sorted(h["role"] for h in healths.values())
    assert roles == ["follower", "follower", "leader"], healths
    assert {(h["leader_id"], h["term"]) for h in healths.values()} == {
        (leader.node_id, healths[leader.node_id]["term"])
    }, healths
    assert all(h["voters"] == ["n0", "n1", "n2"] for h in healths.values()), healths


def test_kill_9_of_the_leader_elects_a_new_leader_with_a_higher_term_within_3s(
    cluster_factory,
):
    cluster = cluster_factory(3)
    old = cluster.wait_for_leader(timeout=10)
    old_term = _term(old)
    survivors = [n for n in cluster.nodes if n is not old]

    killed_at = old.kill(signal.SIGKILL)
    new, failover = _wait_new_leader(cluster, survivors, old_term, killed_at, timeout=10)

    assert failover < FAILOVER_BOUND, (
        f"failover took {failover:.3f}s (bound {FAILOVER_BOUND}s)\n{cluster.diagnostics()}"
    )
    agreed = cluster.wait_for_leader(timeout=5, among=survivors, newer_than_term=old_term)
    assert agreed is new
    print(f"kill -9 failover: {failover:.3f}s, term {old_term} -> {_term(new)}")


def test_killed_leader_restarted_from_its_data_dir_rejoins_as_follower_and_catches_up(
    cluster_factory,
):
    cluster = cluster_factory(3)
    old = cluster.wait_for_leader(timeout=10)
    old_term = _term(old)
    survivors = [n for n in cluster.nodes if n is not old]
    old.kill(signal.SIGKILL)
    new = cluster.wait_for_leader(timeout=10, among=survivors, newer_than_term=old_term)

    old.restart()
    caught_up = cluster.wait_caught_up(old, timeout=10)

    assert caught_up["node"]["leader_id"] == new.node_id
    assert caught_up["node"]["commit_index"] >= caught_up["leader"]["commit_index"]
    started = [e for e in old.events() if e["type"] == "node_started"]
    assert len(started) == 2, started
    # It came back with its log and term from broker_state.db, not as a blank node.
    assert started[1]["term"] >= old_term and started[1]["last_index"] >= 2, started[1]
    assert cluster.leader_now() is new, cluster.healths()


def test_sigterm_of_the_leader_transfers_leadership_without_an_election_timeout(
    cluster_factory,
):
    cluster = cluster_factory(3)
    old = cluster.wait_for_leader(timeout=10)
    old_term = _term(old)
    survivors = [n for n in cluster.nodes if n is not old]

    sent_at = old.kill(signal.SIGTERM)
    new, gap = _wait_new_leader(cluster, survivors, old_term, sent_at, timeout=10)
    exit_code = old.wait_exit(10)

    transferred = [e for e in old.events() if e["type"] == "leadership_transferred"]
    assert exit_code == 0, old.output_tail()
    assert len(transferred) == 1, old.events()
    assert transferred[0]["succeeded"] is True, transferred
    assert transferred[0]["target"] == new.node_id, (transferred, new.node_id)
    assert gap < TRANSFER_BOUND, (
        f"no leader for {gap:.3f}s after SIGTERM (bound {TRANSFER_BOUND}s)\n{cluster.diagnostics()}"
    )
    print(f"SIGTERM transfer: new leader after {gap:.3f}s")


# ------------------------------------------------------------------------------ the log


def test_raft_logs_of_all_nodes_are_identical_up_to_the_minimum_commit_index(cluster_factory):
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(timeout=10)
    changes = 0
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        term = _term(leader)
        survivors = [n for n in cluster.nodes if n is not leader]
        leader.kill(sig)
        if sig == signal.SIGTERM:
            leader.wait_exit(10)
        new = cluster.wait_for_leader(timeout=10, among=survivors, newer_than_term=term)
        leader.restart()
        cluster.wait_caught_up(leader, timeout=10)
        leader, changes = new, changes + 1
    cluster.stop_all()
    assert not cluster.running()

    logs = {}
    for n in cluster.nodes:
        store = RaftStore(n.state_db, sync=False)
        try:
            hard_state, snapshot, entries = store.load()
        finally:
            store.close()
        assert snapshot is None, f"{n.node_id} has a snapshot; compare from it instead"
        logs[n.node_id] = (hard_state.commit, entries)

    min_commit = min(commit for commit, _ in logs.values())
    # The first configuration plus one no-op per leader term, at least.
    assert min_commit >= 2 + changes, {k: c for k, (c, _) in logs.items()}
    prefixes = {
        node_id: [(e.term, e.index, e.kind, json.dumps(e.data, sort_keys=True)) for e in entries]
        for node_id, (_, entries) in logs.items()
    }
    for node_id, prefix in prefixes.items():
        assert [i for _, i, _, _ in prefix[:min_commit]] == list(range(1, min_commit + 1)), node_id
    reference = prefixes["n0"][:min_commit]
    for node_id, prefix in prefixes.items():
        assert prefix[:min_commit] == reference, f"{node_id} differs from n0 below {min_commit}"
    assert len({t for t, _, _, _ in reference}) >= changes + 1, reference


def test_a_graceful_stop_leaves_the_commit_index_on_disk(cluster_factory):
    # A commit-index-only change is not fsync'd on its own (it rides on the next entries); the
    # stop path must still write the final one, so a restart re-applies everything it knew.
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(timeout=10)
    for follower in (n for n in cluster.nodes if n is not leader):
        cluster.wait_caught_up(follower)  # the heartbeats brought it the leader's commit index
    cluster.stop_all()
    for n in cluster.nodes:
        stopped = [e for e in n.events() if e["type"] == "node_stopped"]
        assert stopped, n.node_id
        store = RaftStore(n.state_db, sync=False)
        try:
            hard_state, _, entries = store.load()
        finally:
            store.close()
        assert hard_state.commit == stopped[-1]["commit_index"] >= 2, n.node_id
        assert entries and entries[-1].index >= hard_state.commit


# ------------------------------------------------------------------------------ quorum


def test_five_nodes_keep_a_leader_with_two_dead_and_have_none_with_three_dead(cluster_factory):
    cluster = cluster_factory(5)
    leader = cluster.wait_for_leader(timeout=15)
    term = _term(leader)
    followers = [n for n in cluster.nodes if n is not leader]

    # Two dead, one of them the leader: the other three still form a majority and elect one.
    leader.kill(signal.SIGKILL)
    followers[0].kill(signal.SIGKILL)
    survivors = followers[1:]
    new = cluster.wait_for_leader(timeout=10, among=survivors, newer_than_term=term)

    # Three dead: the leader is still running but hears only one follower (2 of 5).
    victim = next(n for n in survivors if n is not new)
    victim.kill(signal.SIGKILL)
    remaining = [n for n in survivors if n is not victim]

    def campaigning_without_quorum() -> dict | None:
        # The leader stepped down (CheckQuorum) and each survivor's own election timer has
        # fired since: it runs a pre-vote ("precandidate"), which 2 of 5 voters can never win,
        # so it never spends a term on a real candidacy.
        healths = cluster.healths(remaining)
        done = all(
            h and h["role"] == "precandidate" and not h["has_quorum"] for h in healths.values()
        )
        return healths if done else None

    cluster.wait_for(campaigning_without_quorum, 10, "both survivors to campaign without a quorum")
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        healths = cluster.healths(remaining)
        assert all(healths.values()), f"/api/health stopped answering: {healths}"
        assert not [i for i, h in healths.items() if h["role"] == "leader"], (
            f"a node still claims leadership without a quorum (CheckQuorum): {healths}"
        )
        assert not [i for i, h in healths.items() if h["has_quorum"]], healths
        time.sleep(0.1)


# ------------------------------------------------------------------------------ HTTP views


def test_cluster_view_on_a_follower_lists_all_members_alive_with_their_roles(cluster_factory):
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(timeout=10)
    follower = next(n for n in cluster.nodes if n is not leader)
    expected_roles = {n.node_id: "leader" if n is leader else "follower" for n in cluster.nodes}

    def view() -> dict | None:
        body = follower.get_json("/api/cluster")
        if not body:
            return None
        roles = {m["node_id"]: m["role"] for m in body["members"]}
        return body if roles == expected_roles else None

    body = cluster.wait_for(view, 5, "/api/cluster to show every member's role")

    assert body["leader_id"] == leader.node_id
    assert body["term"] == _term(leader)
    members = {m["node_id"]: m for m in body["members"]}
    assert sorted(members) == ["n0", "n1", "n2"], body
    assert all(m["state"] == "alive" for m in members.values()), body
    for n in cluster.nodes:
        assert members[n.node_id]["mesh_address"] == n.mesh, body
        assert members[n.node_id]["http_address"] == n.http.removeprefix("http://"), body
        assert members[n.node_id]["last_seen"], body


def test_metrics_endpoint_serves_prometheus_text_with_term_and_leadership(cluster_factory):
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(timeout=10)
    follower = next(n for n in cluster.nodes if n is not leader)
    term = _term(leader)

    for node, is_leader in ((leader, 1.0), (follower, 0.0)):
        text = node.metrics_text()
        assert text is not None and "mesh_term" in text and "mesh_is_leader" in text, text
        samples = _metrics(node)
        labels = (("node_id", node.node_id),)
        assert samples[("mesh_is_leader", labels)] == is_leader, samples
        assert samples[("mesh_term", labels)] == term, samples


# ------------------------------------------------------------------------------ robustness

GARBAGE: list[tuple[str, list[bytes]]] = [
    ("version", [b"SZ9", b"raft", b"", b"{}"]),
    ("version", [b"HTTP/1.1 GET /", b"raft", b"", b"{}"]),
    ("shape", [b"SZ1", b"raft"]),
    ("shape", [b"SZ1", b"raft", b"", b"{}", b"extra"]),
    ("kind", [b"SZ1", b"RAFT!", b"", b"{}"]),
    ("json", [b"SZ1", b"raft", b"", b"{not json"]),
    ("json", [b"SZ1", b"raft", b"", b"\xff\xfe\x00"]),
    ("json", [b"SZ1", b"raft", b"", b"[1, 2, 3]"]),
]


def _bogus_raft_payloads(target: str) -> list[dict]:
    """Raft payloads that are valid JSON objects but not valid messages."""
    base = {"src": "ghost", "dst": target, "term": 1}
    return [
        {"bogus": True},
        {"type": "no_such_message", **base},
        {"type": ["append"], **base},
        {"type": "append", **base},  # missing prev_log_index / prev_log_term
        {"type": "append", **base, "prev_log_index": 0, "prev_log_term": 0, "entries": "xyz"},
        {"type": "append", **base, "prev_log_index": 0, "prev_log_term": 0, "entries": [{}]},
        {"type": "snap", **base, "snapshot": {"index": 1, "term": 1, "voters": 7}},
        {"type": "snap", **base, "snapshot": {"index": 1, "term": 1, "voters": [], "data": 5}},
    ]


def _send_raw(address: str, messages: list[list[bytes]]) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"garbage-client")  # not any node's id
        sock.setsockopt(zmq.SNDTIMEO, 2000)
        sock.connect(address)
        for frames in messages:
            sock.send_multipart(frames)
        sock.close(linger=2000)  # flush before the context goes
    finally:
        ctx.term()


def test_malformed_frames_on_the_mesh_port_are_dropped_and_counted_not_fatal(cluster_factory):
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(timeout=10)
    before = cluster.healths()
    bogus = [
        [b"SZ1", b"raft", b"", json.dumps(p).encode()] for p in _bogus_raft_payloads(leader.node_id)
    ]

    _send_raw(leader.mesh, [frames for _, frames in GARBAGE] + bogus)

    def counted() -> dict | None:
        samples = _metrics(leader)
        dropped = {
            dict(labels)["kind"]: value
            for (name, labels), value in samples.items()
            if name == "mesh_transport_events_total"
            and dict(labels)["kind"].startswith("dropped_frames.")
        }
        wanted = {f"dropped_frames.{r}" for r, _ in GARBAGE}
        seen = {k for k, v in dropped.items() if v > 0}
        return (
            dropped if wanted <= seen and dropped.get("dropped_frames.raft") == len(bogus) else None
        )

    cluster.wait_for(counted, 5, "every malformed message counted in /metrics")
    _commit_everywhere(cluster, leader, "after-garbage")
    after = cluster.healths()
    assert all(n.running for n in cluster.nodes), cluster.diagnostics()
    assert {(h["leader_id"], h["term"]) for h in after.values()} == {
        (leader.node_id, before[leader.node_id]["term"])
    }, (before, after)


def test_raft_messages_with_wrongly_typed_fields_are_dropped_without_disturbing_the_leader(
    cluster_factory,
):
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(timeout=10)
    term = _term(leader)
    payloads = [
        # The leader's own term, so it passes the term checks, then a string index.
        {
            "type": "append",
            "src": "ghost",
            "dst": leader.node_id,
            "term": term,
            "prev_log_index": "x",
            "prev_log_term": 0,
        },
        {
            "type": "append_resp",
            "src": "ghost",
            "dst": leader.node_id,
            "term": term + 0.5,
            "success": True,
        },
    ]

    _send_raw(leader.mesh, [[b"SZ1", b"raft", b"", json.dumps(p).encode()] for p in payloads])

    def dropped() -> float:
        key = (
            "mesh_transport_events_total",
            (("kind", "dropped_frames.raft"), ("node_id", leader.node_id)),
        )
        return _metrics(leader).get(key, 0)

    cluster.wait_for(lambda: dropped() >= len(payloads), 5, "both messages counted as dropped")
    _commit_everywhere(cluster, leader, "after-bad-fields")
    after = cluster.healths()
    assert {(h["leader_id"], h["term"]) for h in after.values()} == {(leader.node_id, term)}, after
    assert dropped() == len(payloads)


def test_broker_state_db_records_instances_leadership_metrics_and_the_raft_log(cluster_factory):
    import sqlite3

    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    follower.kill(signal.SIGKILL)
    cluster.wait_for(
        lambda: any(
            m["state"] in ("suspect", "dead")
            for m in (leader.get_json("/api/cluster") or {"members": []})["members"]
        ),
        10,
        "the leader to notice the dead follower",
    )
    cluster.stop_all()
    db = sqlite3.connect(leader.state_db)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"instances", "leadership_log", "event_metrics", "node_log", "raft_log"} <= tables
    instances = {r[0] for r in db.execute("SELECT instance_id FROM instances")}
    assert {n.node_id for n in cluster.nodes} <= instances
    assert (
        db.execute(
            "SELECT count(*) FROM leadership_log WHERE instance_id=? AND event_type='elected'",
            (leader.node_id,),
        ).fetchone()[0]
        >= 1
    )
    assert db.execute("SELECT count(*) FROM event_metrics").fetchone()[0] >= 1
    assert db.execute("SELECT count(*) FROM raft_log").fetchone()[0] >= 2
