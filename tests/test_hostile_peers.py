"""Hostile peers against a secured mesh: real node processes, real sockets (issue 11).

Every test replays a probe of issue 11 ("Why") from a raw ZeroMQ peer (tests/rawpeer.py) that
claims whatever the test says, with no key, a key nobody trusts, or a key from the cluster's own
key directory, and shows that the mesh refuses it (the handshake fails, or the message is
dropped and counted in ``/metrics`` by reason) and that nothing changed: terms, leader, voters,
addresses, replicated state, which handler receives the jobs.

Absence is shown as tests/waiting.py says: first a positive sign that the node had every chance
to act (the handshake failed, the refusal was counted, a later write committed everywhere), then
the assertion. One secured 3-node cluster and one handler process (``h1``) are shared by the
module; each test leaves them as it found them, except the revocation test, which comes last.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.consensus.messages import AppendEntries
from mesh.dispatch import protocol as p
from mesh.scheduling.state import SchedulerState
from mesh.supervise import free_port
from tests.cluster import Cluster, HandlerProc, NodeProcess
from tests.rawpeer import RawPeer

pytestmark = pytest.mark.timeout(120)

TASKS = "tests.fixtures.dispatch_tasks"
REJECTED = "schedulezero_security_rejected_total"
ATTACKER = "h2"  # a valid handler key that no handler process uses: the attacker's own


@attrs.frozen
class Secured:
    """The module's secured cluster and its real handler process ``h1``."""

    cluster: Cluster
    h1: HandlerProc
    root: Path

    def roles(self) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
        """(leader, target follower, the other follower), once all three agree on a leader."""
        leader = self.cluster.wait_for_leader(10)
        target, other = (n for n in self.cluster.nodes if n is not leader)
        return leader, target, other


def own_key_dir(cluster: Cluster, name: str, dest: Path) -> Path:
    """A key directory as the host of ``name`` would hold it: its own key pair and the public
    certificates of the nodes (so that revoking ``name`` on the nodes leaves it untouched)."""
    assert cluster.keys_dir is not None
    dest.mkdir(mode=0o700)
    for src in (cluster.keys_dir / f"{name}.key", cluster.keys_dir / f"{name}.key_secret"):
        shutil.copy2(src, dest / src.name)  # copy2 keeps the secret's 0600
    for node in cluster.nodes:
        shutil.copy2(cluster.keys_dir / f"{node.node_id}.key", dest)
    return dest


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("hostile")
    cluster = Cluster(root / "cluster", 3, secure=True)
    for name in ("h1", ATTACKER, "h3"):
        cluster.add_key(name, "handler")
    h1 = HandlerProc(
        "h1",
        [n.mesh for n in cluster.nodes],
        [TASKS],
        root / "h1",
        keys=own_key_dir(cluster, "h1", root / "h1-keys"),
    )
    try:
        cluster.start()
        cluster.wait_for_leader(20)
        h1.start()
        yield Secured(cluster, h1, root)
    finally:
        if h1.running:
            h1.kill(signal.SIGKILL)
        cluster.stop_all()


# ---------------------------------------------------------------------------- observations


def rejected(node: NodeProcess) -> Counter[str]:
    """The node's ``schedulezero_security_rejected_total`` by reason."""
    text = node.metrics_text()
    assert text is not None, f"{node.node_id} does not answer /metrics"
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == REJECTED:
                out[s.labels["reason"]] += int(s.value)
    return out


def wait_counted(cluster: Cluster, node: NodeProcess, reason: str, before: Counter[str]) -> None:
    """Until ``node`` has counted one more refusal for ``reason`` than in ``before``."""
    cluster.wait_for(
        lambda: rejected(node)[reason] > before[reason],
        10,
        f"{node.node_id} to count a refusal for {reason!r} (before: {dict(before)})",
        interval=0.05,
    )


def consensus(cluster: Cluster) -> dict[str, tuple[int, str | None, tuple[str, ...]]]:
    """(term, leader, voters) as each node reports it."""
    out = {}
    for n in cluster.nodes:
        h = n.health()
        assert h is not None, f"{n.node_id} does not answer /api/health"
        out[n.node_id] = (h["term"], h["leader_id"], tuple(h["voters"]))
    return out


def commit_everywhere(cluster: Cluster, leader: NodeProcess, name: str) -> int:
    """Commit one write through ``leader`` and wait until every node applied it; its index.

    The sign that the nodes went on after a hostile message: the leader still leads its term
    and every follower took its AppendEntries (a paused schedule, it never fires).
    """
    body = {"id": name, "task": name, "trigger": {"type": "interval", "hours": 1}, "paused": True}
    status, reply = leader.request("POST", "/api/schedules", body)
    assert status == 201, reply
    health = leader.health()
    assert health is not None
    index = int(health["commit_index"])
    cluster.wait_for(
        lambda: all((h := n.health()) and h["applied_index"] >= index for n in cluster.nodes),
        10,
        f"every node to apply index {index} ({name})",
    )
    return index


def forged_append(leader: NodeProcess, target: NodeProcess, term: int) -> dict[str, Any]:
    """The probe of issue 11: an empty AppendEntries 'from the leader' with ``term``."""
    append = AppendEntries(
        src=leader.node_id, dst=target.node_id, term=term, prev_log_index=0, prev_log_term=0
    )
    return append.to_dict()


def http_addresses(node: NodeProcess) -> dict[str | None, str | None]:
    """What ``node`` believes each member's HTTP address is (GET /api/cluster)."""
    body = node.get_json("/api/cluster")
    assert isinstance(body, dict), f"{node.node_id} does not answer /api/cluster"
    return {m["node_id"]: m["http_address"] for m in body["members"]}


def handlers_alive(cluster: Cluster, *handlers: HandlerProc) -> None:
    def check() -> bool:
        leader = cluster.leader_now()
        body = leader.get_json("/api/handlers") if leader else None
        seen = {h["handler_id"]: h for h in body["handlers"]} if body else {}
        return all(
            h.handler_id in seen
            and seen[h.handler_id]["state"] == "alive"
            and seen[h.handler_id]["pid"] == h.pid
            for h in handlers
        )

    cluster.wait_for(check, 15, f"handlers {[h.handler_id for h in handlers]} alive")


def executions(node: NodeProcess, schedule_id: str) -> list[dict[str, Any]]:
    body = node.get_json(f"/api/executions?schedule_id={schedule_id}&limit=1000", timeout=5)
    return body["executions"] if body else []


# ---------------------------------------------------------------------------- the probe, as filed


def test_without_keys_the_forged_append_moves_every_term(cluster_factory) -> None:
    """Why keys exist: on a mesh without them (loopback only) the probe of issue 11 works. It
    also shows that the forged append below is the real thing, so the refusals that follow
    refuse an attack that would otherwise succeed."""
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(10)
    target = next(n for n in cluster.nodes if n is not leader)
    term = consensus(cluster)[target.node_id][0]

    with RawPeer(target.mesh) as peer:
        peer.send("raft", forged_append(leader, target, term + 5))
        assert peer.handshake() == "succeeded"
        cluster.wait_for(
            lambda: all(t >= term + 5 for t, _, _ in consensus(cluster).values()),
            10,
            f"every node to reach term {term + 5}",
        )


def test_a_plaintext_append_naming_the_leader_with_a_higher_term_changes_nothing(
    secured: Secured,
) -> None:
    cluster = secured.cluster
    leader, target, _ = secured.roles()
    before = consensus(cluster)

    with RawPeer(target.mesh) as peer:  # no CURVE: what `make run` answered before issue 11
        peer.send("raft", forged_append(leader, target, before[target.node_id][0] + 5))
        assert peer.handshake() == "failed"
    commit_everywhere(cluster, leader, "after-plaintext")

    assert consensus(cluster) == before


def test_a_key_not_in_the_key_directory_is_refused_at_the_handshake_and_counted(
    secured: Secured,
) -> None:
    cluster = secured.cluster
    leader, target, _ = secured.roles()
    before, counted = consensus(cluster), rejected(target)

    with RawPeer(
        target.mesh, key="unknown", keys_dir=cluster.keys_dir, server=target.node_id
    ) as peer:
        peer.send("raft", forged_append(leader, target, before[target.node_id][0] + 5))
        assert peer.handshake() == "failed"
    wait_counted(cluster, target, "unknown_key", counted)
    commit_everywhere(cluster, leader, "after-unknown-key")

    assert consensus(cluster) == before


# ------------------------------------------------------------ valid keys, false claims

# Who attacks, and the reason the node must count: a handler key may not speak for any node
# ("role"); a node key (the other follower's, stolen or misused) may not speak for another node
# ("sender_mismatch").
FORGERS = [
    pytest.param(ATTACKER, "role", id="handler-key"),
    pytest.param(None, "sender_mismatch", id="other-node-key"),
]


def forger(secured: Secured, key: str | None) -> str:
    """The key name a parametrized forger uses (None: the follower that is not the target)."""
    return key if key is not None else secured.roles()[2].node_id


@pytest.mark.parametrize(("key", "reason"), FORGERS)
def test_a_raft_append_forged_with_a_valid_key_is_dropped_and_counted(
    secured: Secured, key: str | None, reason: str
) -> None:
    cluster = secured.cluster
    leader, target, _ = secured.roles()
    before, counted = consensus(cluster), rejected(target)

    with RawPeer(
        target.mesh, key=forger(secured, key), keys_dir=cluster.keys_dir, server=target.node_id
    ) as peer:
        peer.send("raft", forged_append(leader, target, before[target.node_id][0] + 5))
        assert peer.handshake() == "succeeded"
        wait_counted(cluster, target, reason, counted)
    commit_everywhere(cluster, leader, f"after-append-{reason}")

    assert consensus(cluster) == before


@pytest.mark.parametrize(("key", "reason"), FORGERS)
def test_a_ping_claiming_a_new_node_adds_no_member_and_no_voter(
    secured: Secured, key: str | None, reason: str
) -> None:
    cluster = secured.cluster
    leader, _, _ = secured.roles()  # the leader: it is the one that adds voters
    before, counted = consensus(cluster), rejected(leader)
    intruder = f"intruder-{reason}"

    with RawPeer(
        leader.mesh, key=forger(secured, key), keys_dir=cluster.keys_dir, server=leader.node_id
    ) as peer:
        peer.send(
            "ping",
            {
                "node_id": intruder,
                "mesh": f"tcp://127.0.0.1:{free_port(pair=True)}",
                "http": f"127.0.0.1:{free_port()}",
                "role": "follower",
                "term": before[leader.node_id][0],
                "leader_id": leader.node_id,
                "bootstrapped": True,
            },
        )
        wait_counted(cluster, leader, reason, counted)
    commit_everywhere(cluster, leader, f"after-new-node-ping-{reason}")

    assert intruder not in http_addresses(leader)
    assert consensus(cluster) == before


@pytest.mark.parametrize(("key", "reason"), FORGERS)
def test_a_ping_claiming_the_leader_with_another_http_address_redirects_nothing(
    secured: Secured, key: str | None, reason: str
) -> None:
    """A follower forwards client writes to the leader's HTTP address: a ping must not be able
    to point it elsewhere."""
    cluster = secured.cluster
    leader, target, _ = secured.roles()
    before, counted = consensus(cluster), rejected(target)
    addresses = http_addresses(target)
    assert addresses[leader.node_id] == leader.http.removeprefix("http://")

    with RawPeer(
        target.mesh, key=forger(secured, key), keys_dir=cluster.keys_dir, server=target.node_id
    ) as peer:
        peer.send(
            "ping",
            {
                "node_id": leader.node_id,
                "mesh": leader.mesh,
                "http": f"127.0.0.1:{free_port()}",  # where the attacker would listen
                "role": "leader",
                "term": before[leader.node_id][0],
                "leader_id": leader.node_id,
                "bootstrapped": True,
            },
        )
        wait_counted(cluster, target, reason, counted)
    commit_everywhere(cluster, leader, f"after-address-ping-{reason}")

    assert http_addresses(target) == addresses
    assert consensus(cluster) == before


@pytest.mark.parametrize(
    ("key", "claim", "reason"),
    [
        pytest.param(ATTACKER, "leader", "role", id="handler-key-as-leader"),
        pytest.param(None, "leader", "sender_mismatch", id="node-key-as-leader"),
        pytest.param(None, "self", "snapshot_not_leader", id="node-key-as-itself"),
    ],
)
def test_a_forged_snapshot_chunk_is_refused_and_the_state_stays(
    secured: Secured, key: str | None, claim: str, reason: str
) -> None:
    """A complete one-chunk image of an empty state (what the old code installed from anyone
    naming a member) must not replace the follower's state."""
    cluster = secured.cluster
    leader, target, other = secured.roles()
    commit_everywhere(cluster, leader, f"kept-{reason}")
    schedules_before = target.get_json("/api/schedules")
    before, counted = consensus(cluster), rejected(target)
    health = target.health()
    assert health is not None and schedules_before
    term, forged_index = before[target.node_id][0], health["commit_index"] + 1000
    image = SchedulerState().snapshot()
    src = leader.node_id if claim == "leader" else other.node_id

    with RawPeer(
        target.mesh, key=forger(secured, key), keys_dir=cluster.keys_dir, server=target.node_id
    ) as peer:
        peer.send(
            "snap_chunk",
            {
                "src": src,
                "term": term,
                "index": forged_index,
                "snap_term": term,
                "voters": [src],
                "offset": 0,
                "size": len(image),
                "data": base64.b64encode(image).decode("ascii"),
                "crc": zlib.crc32(image),
            },
            rid=b"chunk-1",
        )
        wait_counted(cluster, target, reason, counted)
    commit_everywhere(cluster, leader, f"after-chunk-{reason}")

    after = target.get_json("/api/schedules")
    assert after is not None
    assert {s["id"] for s in schedules_before["schedules"]} <= {s["id"] for s in after["schedules"]}
    health = target.health()
    assert health is not None and health["applied_index"] < forged_index
    assert consensus(cluster) == before


# ---------------------------------------------------------------------------- handler identities


@pytest.mark.parametrize(("key", "reason"), FORGERS)
def test_a_write_forwarded_by_a_key_that_is_not_the_forwarding_node_is_refused_unanswered(
    secured: Secured, key: str | None, reason: str
) -> None:
    """``api_forward`` runs a write on the leader as a follower's client: only that follower's
    own node key may send it (a handler key, or another node's key claiming it, may not)."""
    cluster = secured.cluster
    leader, target, _ = secured.roles()
    counted = rejected(leader)
    name = f"forged-forward-{reason}"
    body = {"id": name, "task": name, "trigger": {"type": "interval", "hours": 1}, "paused": True}
    forward = {
        "node": target.node_id,
        "method": "POST",
        "target": "/api/schedules",
        "headers": {"Content-Type": "application/json"},
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "client": "127.0.0.1",
    }

    with RawPeer(
        leader.mesh, key=forger(secured, key), keys_dir=cluster.keys_dir, server=leader.node_id
    ) as peer:
        peer.send("api_forward", forward, rid=b"fwd-1")
        wait_counted(cluster, leader, reason, counted)
        commit_everywhere(cluster, leader, f"after-forward-{reason}")
        assert peer.received() == []  # not even an error answer

    status, _ = leader.request("GET", f"/api/schedules/{name}")
    assert status == 404


def test_a_hello_claiming_h1_from_another_handler_key_is_refused_and_h1_keeps_its_jobs(
    secured: Secured,
) -> None:
    cluster, h1 = secured.cluster, secured.h1
    handlers_alive(cluster, h1)
    leader, _, _ = secured.roles()
    counted = rejected(leader)
    out = secured.root / "stolen-id-runs"
    out.mkdir()
    hello = {"handler_id": h1.handler_id, "tasks": ["tally"], "concurrency": 8, "pid": 1}
    schedule = {
        "id": "stolen-id",
        "task": "tally",
        "trigger": {"type": "interval", "seconds": 0.5},
        "kwargs": {"out_dir": str(out)},
    }
    got: list[tuple[str, dict[str, Any]]] = []

    with RawPeer(
        leader.mesh, key=ATTACKER, keys_dir=cluster.keys_dir, server=leader.node_id
    ) as peer:
        peer.send(p.HELLO, hello, rid=b"hello-0")
        wait_counted(cluster, leader, "sender_mismatch", counted)
        status, body = leader.request("POST", "/api/schedules", schedule)
        assert status == 201, body

        def fired_four_times() -> bool:
            # The attacker keeps claiming h1, more often than h1's own heartbeat.
            peer.send(p.HELLO, hello, rid=b"hello-n")
            got.extend(peer.received())
            return len(executions(leader, "stolen-id")) >= 4

        cluster.wait_for(fired_four_times, 20, "four fires of 'stolen-id'", interval=0.1)
        status, body = leader.request("DELETE", "/api/schedules/stolen-id")
        assert status in (200, 204), body
        got.extend(peer.received())

    runs = executions(leader, "stolen-id")
    assert {(e["handler_id"], e["outcome"]) for e in runs} == {("h1", "success")}, runs
    assert got == []  # not one dispatch, not even a reply to its hellos


def test_revoking_a_handler_key_cuts_that_handler_off(secured: Secured) -> None:
    """Runs last: h1 stays revoked. Its key is deleted from the nodes' key directory and the
    nodes get SIGHUP; h1 (which keeps its own directory) still runs and says hello, but its
    messages are dropped as ``revoked`` and the jobs go to h3."""
    cluster, h1 = secured.cluster, secured.h1
    assert cluster.keys_dir is not None
    h3 = HandlerProc(
        "h3",
        [n.mesh for n in cluster.nodes],
        [TASKS],
        secured.root / "h3",
        keys=own_key_dir(cluster, "h3", secured.root / "h3-keys"),
    )
    h3.start()
    try:
        handlers_alive(cluster, h1, h3)
        leader, _, _ = secured.roles()
        counted = rejected(leader)
        out = secured.root / "revoked-runs"
        out.mkdir()

        (cluster.keys_dir / "h1.key").unlink()
        for node in cluster.nodes:
            node.kill(signal.SIGHUP)
        wait_counted(cluster, leader, "revoked", counted)  # h1's next hello, dropped
        assert h1.running

        jobs = []
        for _ in range(6):
            status, body = leader.request(
                "POST", "/api/jobs", {"task": "tally", "kwargs": {"out_dir": str(out)}}
            )
            assert status == 202, body
            jobs.append(body["job_id"])

        def finished() -> dict[str, dict[str, Any]] | None:
            body = leader.get_json("/api/executions?limit=10000", timeout=5)
            got = {e["job_id"]: e for e in body["executions"]} if body else {}
            return got if set(jobs) <= got.keys() else None

        done = cluster.wait_for(finished, 30, "six jobs to finish", interval=0.2)
        assert {(done[j]["handler_id"], done[j]["outcome"]) for j in jobs} == {("h3", "success")}
        assert not (out / "h1.jsonl").exists()  # h1 never ran one of them
    finally:
        h3.kill(signal.SIGKILL)
