"""The composition root of a replica process (``schedulezero replica``).

A replica serves the node's HTTP API (mesh.api.http) from its local copy: every GET answers
from the :class:`~mesh.scheduling.state.SchedulerState` the :class:`FeedFollower` keeps current,
every mutation answers 403 ``{"error": "read-only replica: send writes to an admin node"}``, and
``/api/health`` says which zone it serves, which upstream it follows and how far behind it is.

:class:`ReplicaNode` is what the API needs of "the node" (``mesh.contracts.Replica`` and
``NodeView``) for a process that never votes, leads nor proposes anything.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from mesh import eventloop
from mesh.api.auth import ApiTokens, TokenFileError
from mesh.api.events import EventHub
from mesh.consensus.messages import Entry
from mesh.contracts import MembershipRefused, NoLeader, RoleListener
from mesh.scheduling.service import SchedulingService
from mesh.scheduling.state import SchedulerState
from mesh.security.audit import Rejections
from mesh.security.keys import KeyFileError, KeyRing
from mesh.security.policy import InsecureStart, check_open_http, check_unencrypted
from mesh.transport.zmq import MeshTransport
from mesh.zones.replica import FeedFollower, ReplicaStore

__all__ = [
    "READ_ONLY_REPLICA",
    "ReplicaNode",
    "ReplicaOptions",
    "ReplicaStartRefused",
    "certificate_zone",
    "replica_keys",
    "replica_tokens",
    "run_replica",
    "serve_replica",
]

log = logging.getLogger("mesh.zones")

READ_ONLY_REPLICA = "read-only replica: send writes to an admin node"
REPLICA_DB = "replica.db"


class ReplicaStartRefused(Exception):
    """The replica must not start as configured; ``str(err)`` is one line for the user."""


@attrs.frozen
class ReplicaOptions:
    """What ``schedulezero replica`` was told (checked by the CLI)."""

    replica_id: str
    zone: str
    upstreams: tuple[str, ...]
    http: str  # HOST:PORT
    data_dir: Path
    keys: Path | None = None
    insecure: bool = False
    api_tokens: Path | None = None
    anonymous_reads: bool = False  # GETs need no token (docs/zones.md, "Who may read")

    @property
    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        return host, int(port)


def certificate_zone(keys: KeyRing) -> str | None:
    """The ``zone`` metadata of this process's own certificate (``keys create --zone``)."""
    own = keys.get(keys.name)
    zone = getattr(own, "zone", None)
    return zone if isinstance(zone, str) and zone else None


def replica_keys(opts: ReplicaOptions) -> KeyRing | None:
    """The replica's key ring, or None when it may run without keys (every address loopback, or
    ``--insecure``). Raises :class:`ReplicaStartRefused` with the reason otherwise."""
    what = f"replica {opts.replica_id}"
    if opts.keys is None:
        try:
            check_unencrypted([*opts.upstreams, opts.http], insecure=opts.insecure, what=what)
        except InsecureStart as e:
            raise ReplicaStartRefused(str(e)) from None
        return None
    try:
        keys = KeyRing(opts.keys, opts.replica_id)
    except KeyFileError as e:
        raise ReplicaStartRefused(f"--keys: {e}") from None
    if keys.role != "replica":
        raise ReplicaStartRefused(
            f"--keys: {keys.directory / (keys.name + '.key')} has role {keys.role!r}; a replica "
            f"needs a 'replica' key (schedulezero keys create {keys.name} --role replica "
            f"--zone {opts.zone})"
        )
    # The voters serve the zone of the key, whatever the replica says: a mismatch would only
    # be refused by every one of them, so say it here, once.
    zone = certificate_zone(keys)
    if zone != opts.zone:
        raise ReplicaStartRefused(
            f"--zone {opts.zone}: the key {keys.directory / (keys.name + '.key')} is for "
            + (f"zone {zone!r}" if zone else "no zone (the strictest filter)")
            + f"; create it with: schedulezero keys create {keys.name} --role replica "
            f"--zone {opts.zone}"
        )
    if not keys.names("node"):
        log.warning(
            "%s: no node certificate in %s: no upstream can be dialled", what, keys.directory
        )
    return keys


def replica_tokens(opts: ReplicaOptions) -> ApiTokens | None:
    """The HTTP API's tokens file, or None: then the API binds loopback only, unless
    ``--insecure`` or ``--anonymous-reads`` (the node's rule, mesh.security.policy: a replica's
    API is read-only)."""
    what = f"replica {opts.replica_id}"
    if opts.api_tokens is not None:
        try:
            return ApiTokens(opts.api_tokens)
        except TokenFileError as e:
            raise ReplicaStartRefused(f"--api-tokens: {e}") from None
    try:
        check_open_http(
            opts.http,
            insecure=opts.insecure,
            what=what,
            anonymous_reads=opts.anonymous_reads,
            read_only=True,
        )
    except InsecureStart as e:
        raise ReplicaStartRefused(str(e)) from None
    return None


class ReplicaNode:
    """``Replica`` and ``NodeView`` for the API of a replica: reads only, never a leader."""

    def __init__(
        self, opts: ReplicaOptions, follower: FeedFollower, transport: MeshTransport
    ) -> None:
        self.opts = opts
        self.follower = follower
        self.transport = transport

    # ------------------------------------------------------------------ Replica

    @property
    def node_id(self) -> str:
        return self.opts.replica_id

    @property
    def role(self) -> str:
        return "replica"

    @property
    def term(self) -> int:
        return self.follower.term

    @property
    def leader_id(self) -> str | None:
        return self.follower.leader_id

    @property
    def is_leader(self) -> bool:
        return False

    @property
    def commit_index(self) -> int:
        return self.follower.applied

    @property
    def handing_over(self) -> bool:
        return False

    def propose_nowait(self, command: Any) -> asyncio.Future[Any]:
        raise NoLeader(READ_ONLY_REPLICA)

    async def propose(self, command: Any, *, timeout: float = 5.0) -> Any:
        raise NoLeader(READ_ONLY_REPLICA)

    async def wait_applied(self, index: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.follower.applied < index:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def on_role_change(self, fn: RoleListener) -> None:
        """A replica's role never changes."""

    async def add_voter(self, node_id: str) -> dict[str, Any]:
        raise MembershipRefused(403, READ_ONLY_REPLICA)

    async def remove_voter(self, node_id: str) -> dict[str, Any]:
        raise MembershipRefused(403, READ_ONLY_REPLICA)

    # ------------------------------------------------------------------ NodeView

    def health(self) -> dict[str, Any]:
        f = self.follower
        lag = f.lag_seconds()
        return {
            "node_id": self.node_id,
            "role": "replica",
            "zone": self.opts.zone,
            "upstream": f.upstream,
            "upstream_node": f.upstream_name,
            "following": f.following,
            "lag_seconds": round(lag, 3) if lag is not None else None,
            "applied_index": f.applied,
            "commit_index": f.commit,
            "leader_id": f.leader_id,
            "term": f.term,
        }

    def _me(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "http_address": self.opts.http,
            "state": "alive",
            "role": "replica",
            "zone": self.opts.zone,
            "upstream": self.follower.upstream,
            "voter": False,
        }

    def cluster(self) -> dict[str, Any]:
        f = self.follower
        return {
            "leader_id": f.leader_id,
            "term": f.term,
            "has_quorum": None,  # a replica cannot see the voters, only its upstream
            "members": [self._me()],
        }

    def cluster_members(self) -> dict[str, Any]:
        f = self.follower
        return {
            "leader_id": f.leader_id,
            "term": f.term,
            "voters": [],
            "removed": [],
            "auto_join": False,
            "members": [{**self._me(), "removed": False}],
        }

    def leader_http(self) -> str | None:
        return None

    def metrics(self) -> dict[str, Any]:
        f = self.follower
        lag = f.lag_seconds()
        return {
            "term": f.term,
            "commit_index": f.commit,
            "applied_index": f.applied,
            "last_index": f.applied,
            "snapshot_index": f.snapshot_seq,
            "is_leader": 0,
            "has_quorum": int(f.following),
            "peers_alive": int(f.following),
            "transport": dict(self.transport.counters),
            "security_rejected": dict(self.transport.rejections.counts),
            "extra": {
                "replica_lag_seconds": lag if lag is not None else -1.0,
                **{f"replica_{k}": v for k, v in sorted(f.counters.items())},
            },
        }


class _ObservedState(SchedulerState):
    """The replica's copy, telling ``GET /api/events`` (``hub``) of every change the feed
    applies to it, as a voter's apply listener does."""

    hub: EventHub | None = None

    def apply(self, entry: Entry) -> Any:
        result = super().apply(entry)
        if self.hub is not None:
            self.hub.on_apply(entry, result)
        return result

    def restore(self, data: bytes) -> None:
        super().restore(data)
        if self.hub is not None:
            self.hub.resync("snapshot installed")


async def serve_replica(
    opts: ReplicaOptions,
    *,
    keys: KeyRing | None = None,
    tokens: ApiTokens | None = None,
    ready: Callable[[ReplicaNode], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a replica until SIGINT/SIGTERM (or ``stop``): load the local copy, serve the API
    from it, follow the feed; on the way out write the copy once more."""
    from mesh.api.http import HttpServer, create_app

    opts.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = _ObservedState(alerts=False)
    store = ReplicaStore(opts.data_dir / REPLICA_DB)
    transport = MeshTransport(opts.replica_id, None, keys=keys, rejections=Rejections())
    follower = FeedFollower(opts.replica_id, opts.zone, opts.upstreams, state, transport, store)
    transport.set_handler(follower.on_message)
    follower.load()
    node = ReplicaNode(opts, follower, transport)
    service = SchedulingService(node, state)  # its read paths only: it never leads here
    # Leader and term come with the feed's heartbeats: compared once a second (diff_leader).
    state.hub = events = EventHub(node, node, state, handlers=service.handlers, diff_leader=True)
    app = create_app(
        node,
        node,
        service,
        tokens=tokens,
        read_only=READ_ONLY_REPLICA,
        anonymous_reads=opts.anonymous_reads,
        events=events,
    )
    http = HttpServer(app, *opts.http_host_port)
    try:
        await http.start()
    except BaseException:
        store.close()
        raise
    await transport.start()
    await follower.start()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if keys is not None:
            loop.add_signal_handler(signal.SIGHUP, transport.reload_keys)
    secured = f"CURVE keys in {keys.directory}" if keys is not None else "no keys"
    access = "API tokens" if tokens is not None else "no API tokens"
    if opts.anonymous_reads:
        access += ", anonymous reads"
    print(
        f"schedulezero replica {opts.replica_id}: zone {opts.zone}, upstreams "
        f"{', '.join(opts.upstreams)} ({secured}), http http://{opts.http}/api/health "
        f"(read-only, {access})",
        flush=True,
    )
    if ready is not None:
        ready(node)
    try:
        await stop.wait()
    finally:
        await http.stop()
        await follower.stop()
        await transport.close()
        store.close()


def run_replica(opts: ReplicaOptions) -> int:
    """The ``schedulezero replica`` process; returns its exit code (2: refused to start)."""
    try:
        keys = replica_keys(opts)
        tokens = replica_tokens(opts)
    except ReplicaStartRefused as e:
        print(f"schedulezero: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    try:
        eventloop.run(serve_replica(opts, keys=keys, tokens=tokens))
    except (OSError, sqlite3.Error) as e:  # the HTTP port, the data directory, replica.db
        print(f"schedulezero: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
