"""Chaos scenarios: named fault schedules, and a seeded random composition of them.

A scenario gets the nemesis, the cluster, a seeded RNG and a duration; it injects faults during
that time and leaves healing to the runner.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chaos.nemesis import Nemesis
    from chaos.topology import ChaosCluster

Scenario = Callable[["Nemesis", "ChaosCluster", random.Random, float], None]


def _leader(cluster: ChaosCluster, timeout: float = 5.0) -> str:
    """The agreed leader; failing that (mid-election), any node that says it leads, or n1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader = cluster.stable_leader()
        if leader is not None:
            return leader
        time.sleep(0.05)
    for node_id, h in cluster.healths().items():
        if h and h["role"] == "leader":
            return node_id
    return cluster.ids[0]


def leader_partition(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    """The leader is cut off from every other node (silently); it still reaches the handlers."""
    nem.isolate(_leader(cluster), silent=True)
    time.sleep(dur)


def leader_partition_loud(
    nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float
) -> None:
    """As above, with connections closed and refused instead of silently black-holed."""
    nem.isolate(_leader(cluster), silent=False)
    time.sleep(dur)


def isolate_follower(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    leader = _leader(cluster)
    nem.isolate(rng.choice([i for i in cluster.ids if i != leader]))
    time.sleep(dur)


def one_way_from_leader(
    nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float
) -> None:
    """Nothing the leader sends arrives anywhere, but it still hears everyone."""
    leader = _leader(cluster)
    for other in cluster.ids:
        if other != leader:
            nem.cut(leader, other)
    n = len(cluster.ids)
    nem.partitions.append(
        {"start": time.time(), "end": None, "minority": [[leader]] if n > 1 else []}
    )
    time.sleep(dur)


def one_way_to_leader(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    """The leader hears nobody (its acks vanish), but everyone hears it."""
    leader = _leader(cluster)
    for other in cluster.ids:
        if other != leader:
            nem.cut(other, leader)
    nem.partitions.append({"start": time.time(), "end": None, "minority": [[leader]]})
    time.sleep(dur)


def majority_minority(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    """Split into a minority holding the leader and a majority (2/3 of 5, 1/2 of 3)."""
    leader = _leader(cluster)
    others = [i for i in cluster.ids if i != leader]
    rng.shuffle(others)
    k = len(cluster.ids) // 2 - 1
    minority = [leader, *others[:k]]
    nem.partition(minority, [i for i in cluster.ids if i not in minority])
    time.sleep(dur)


def latency_jitter(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    nem.latency(rng.choice([20, 50, 100]), rng.choice([10, 30, 60]))
    time.sleep(dur)


def connection_resets(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    end = time.monotonic() + dur
    while time.monotonic() < end:
        target = rng.choice(cluster.ids)
        nem.reset_connections(target)
        time.sleep(0.3)
        nem.heal()
        time.sleep(0.4)


def kill_leader(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    leader = _leader(cluster)
    nem.kill(leader)
    time.sleep(dur / 2)
    nem.restart(leader)
    time.sleep(dur / 2)


def pause_leader(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    """SIGSTOP the leader (a GC pause or a frozen VM), then SIGCONT it."""
    leader = _leader(cluster)
    nem.pause(leader)
    time.sleep(dur)
    nem.resume(leader)


def flapping(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    end = time.monotonic() + dur
    while time.monotonic() < end:
        leader = cluster.stable_leader() or rng.choice(cluster.ids)
        nem.isolate(leader, silent=rng.random() < 0.5)
        time.sleep(rng.uniform(0.2, 0.8))
        nem.heal()
        time.sleep(rng.uniform(0.2, 0.8))


SCENARIOS: dict[str, Scenario] = {
    "leader_partition": leader_partition,
    "leader_partition_loud": leader_partition_loud,
    "isolate_follower": isolate_follower,
    "one_way_from_leader": one_way_from_leader,
    "one_way_to_leader": one_way_to_leader,
    "majority_minority": majority_minority,
    "latency_jitter": latency_jitter,
    "connection_resets": connection_resets,
    "kill_leader": kill_leader,
    "pause_leader": pause_leader,
    "flapping": flapping,
}


def random_schedule(nem: Nemesis, cluster: ChaosCluster, rng: random.Random, dur: float) -> None:
    """Two or three scenarios back to back, healed in between."""
    steps = rng.randint(2, 3)
    for _ in range(steps):
        name = rng.choice(sorted(SCENARIOS))
        nem._note("step", scenario=name)
        SCENARIOS[name](nem, cluster, rng, dur / steps)
        nem.heal()
        nem.restart_all()
        time.sleep(0.5)


SCENARIOS["random"] = random_schedule
