"""Who votes: the bootstrap rule and the leader's voter policy, as pure functions.

- **Bootstrap.** A brand-new cluster: the smallest node id among ``bootstrap_expect`` fresh nodes
  writes the first configuration; the others receive it by replication (one writer, no conflict).
  A node that sees any bootstrapped peer waits to be added instead.
- **Growth** (``membership.auto_join``, on by default). The leader adds alive, known nodes that
  are not voters yet, one at a time (Raft's single-server membership change), in node-id order;
  never a node removed through the admin API (the configuration's ``removed`` set).
- **Who may vote.** Both rules consider only nodes ``may_vote`` accepts: on a secured mesh the
  holders of a ``node`` key. A ping never changes the voter set by itself.

The node calls these every membership round and applies their answer to the Raft core.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence

from mesh.consensus.core import ConfigChangeInProgress, NotLeader, RaftCore
from mesh.membership.members import Peer

log = logging.getLogger("mesh.membership")


def bootstrap_voters(
    node_id: str, *, fresh: bool, alive: Iterable[Peer], expect: int
) -> list[str] | None:
    """The first configuration this node must write now, or None (not fresh, a cluster already
    exists, too few nodes seen yet, or another node is the one to write it)."""
    if not fresh:
        return None
    peers = [p for p in alive if p.node_id]
    if any(p.bootstrapped for p in peers):
        return None  # a cluster exists: its leader will add us
    ids = sorted({node_id, *(p.node_id for p in peers if p.node_id)})
    if len(ids) >= expect and ids[0] == node_id:
        return ids
    return None


def voter_to_add(
    voters: Collection[str], alive: Iterable[Peer], removed: Collection[str] = ()
) -> str | None:
    """The next alive node the leader should make a voter, if any."""
    for p in sorted(alive, key=lambda p: p.node_id or ""):
        if p.node_id and p.node_id not in voters and p.node_id not in removed:
            return p.node_id
    return None


def _everyone(_node_id: str) -> bool:
    return True


def apply_voter_policy(
    core: RaftCore,
    alive: Sequence[Peer],
    expect: int,
    *,
    auto_join: bool = True,
    may_vote: Callable[[str], bool] = _everyone,
) -> bool:
    """Bootstrap or grow the voter set on ``core`` as the rules above say; True when the core
    changed (the driver then processes its Ready)."""
    alive = [p for p in alive if p.node_id and may_vote(p.node_id)]
    first = bootstrap_voters(
        core.id, fresh=not (core.voters or core.last_index or core.term), alive=alive, expect=expect
    )
    if first is not None:
        core.bootstrap(first)
        log.info("%s bootstrapped a new cluster with voters %s", core.id, first)
        return True
    if not auto_join or not core.is_leader or core.pending_conf_index > core.commit:
        return False
    new = voter_to_add(core.voters, alive, core.removed)
    if new is None:
        return False
    try:
        core.change_voters(core.voters | {new})
    except (NotLeader, ConfigChangeInProgress):
        return False
    log.info("%s adds %s as a voter", core.id, new)
    return True
