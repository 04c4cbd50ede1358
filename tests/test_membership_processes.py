"""Voter changes through the admin API on a real 3-node cluster (separate processes)."""

from __future__ import annotations

import time

from tests.cluster import Cluster

# Pings run every 0.5 s (membership.ping_interval) and the leader's voter policy after each
# round: an alive node auto_join would add is a voter well within this.
AUTO_JOIN_ROUNDS_SECONDS = 3.0


def voters(cluster: Cluster) -> dict[str, list[str] | None]:
    return {n.node_id: (h["voters"] if (h := n.health()) else None) for n in cluster.running()}


def test_delete_removes_a_dead_voter_and_it_stays_removed_when_it_returns(cluster_factory):
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(10)
    dead = next(n for n in cluster.nodes if n is not leader)
    survivor = next(n for n in cluster.nodes if n is not leader and n is not dead)
    dead.kill()

    # On a follower: forwarded to the leader, committed through the log.
    status, body = survivor.request("DELETE", f"/api/cluster/members/{dead.node_id}", timeout=10)
    assert status == 200, body
    expected = sorted([leader.node_id, survivor.node_id])
    assert body["voters"] == expected and body["removed"] == [dead.node_id]
    cluster.wait_for(
        lambda: all(v == expected for v in voters(cluster).values()),
        5,
        "both survivors to apply the removal",
    )
    status, body = leader.request("DELETE", f"/api/cluster/members/{dead.node_id}")
    assert status == 404 and "not a voter" in body["error"]

    dead.restart()
    cluster.wait_for(
        lambda: any(
            m["node_id"] == dead.node_id and m["state"] == "alive"
            for m in (leader.get_json("/api/cluster/members") or {}).get("members", [])
        ),
        10,
        f"the leader to see {dead.node_id} alive again",
    )
    deadline = time.monotonic() + AUTO_JOIN_ROUNDS_SECONDS
    while time.monotonic() < deadline:  # several voter-policy rounds with the node alive
        assert voters(cluster)[leader.node_id] == expected
        time.sleep(0.1)

    # Only an explicit add brings it back.
    status, body = survivor.request(
        "POST", "/api/cluster/members", {"node_id": dead.node_id}, timeout=10
    )
    assert status == 200, body
    assert dead.node_id in body["voters"] and body["removed"] == []


def test_the_last_voter_cannot_be_removed_and_unknown_nodes_are_404(cluster_factory):
    cluster = cluster_factory(1)
    node = cluster.wait_for_leader(10)
    status, body = node.request("DELETE", f"/api/cluster/members/{node.node_id}")
    assert status == 409 and "last voter" in body["error"]
    status, body = node.request("POST", "/api/cluster/members", {"node_id": "nobody"})
    assert status == 404 and "no known node" in body["error"]
    status, body = node.request("POST", "/api/cluster/members", {"node": "x"})
    assert status == 400 and "unknown field" in body["error"]


def test_removing_the_leader_hands_over_to_a_remaining_voter(cluster_factory):
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(10)
    # Right after its election a leader refuses a change until an entry of its term committed
    # (409, "retry once it is"): retried as a client would, for a bounded time.
    deadline = time.monotonic() + 5
    while True:
        path = f"/api/cluster/members/{leader.node_id}"
        status, body = leader.request("DELETE", path, timeout=10)
        if status != 409 or "still being committed" not in body["error"]:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert status == 200, body
    rest = [n for n in cluster.nodes if n is not leader]
    new = cluster.wait_for_leader(10, among=rest)
    assert new is not leader
    assert sorted(new.health()["voters"]) == sorted(n.node_id for n in rest)
