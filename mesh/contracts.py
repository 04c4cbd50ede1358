"""The contracts between the layers, in one place (as APScheduler keeps its own in ``abc.py``).

The upper layers (``mesh.api``, ``mesh.scheduling``, ``mesh.dispatch``) depend on these small
protocols, never on the classes that implement them (``mesh.node.MeshNode``, the ZeroMQ
transport, the membership table). Only the composition root (``mesh.app``) knows both sides and
hands each part its collaborators::

    api ──→ scheduling / dispatch ──→ contracts ←── node / consensus / transport / storage

Each protocol is what one consumer needs, no more: a fake that implements it is enough to test
that consumer (tests/fakes.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import attrs

__all__ = [
    "BroadcastHandler",
    "Broadcaster",
    "Directory",
    "EventSink",
    "ImageSource",
    "Incoming",
    "LeaderLink",
    "MembershipRefused",
    "MessageBus",
    "MessageHandler",
    "NoLeader",
    "NodeView",
    "ProposalFailed",
    "ProposalTooLarge",
    "Replica",
    "RoleListener",
    "StateImage",
    "refusal",
    "term_identity",
]


class NoLeader(Exception):
    """No leader is known (election in progress, or this node cannot see a quorum)."""


class ProposalFailed(Exception):
    """The command may or may not have been committed: leadership changed while it was pending."""


class ProposalTooLarge(ValueError):
    """The command is larger than one log entry may be (``raft.max_entry_bytes``); nothing was
    written. The API answers 413."""


class MembershipRefused(Exception):
    """A voter change that cannot be made (unknown node, last voter, ...); ``status`` is the
    HTTP status that says why (400, 404 or 409)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# fn(role, term, leader_id), called after every change of role, term or leader.
RoleListener = Callable[[str, int, "str | None"], None]


@attrs.frozen
class Incoming:
    """One valid message received by this process.

    ``identity`` is who to answer when the message arrived on our ROUTER (``b""`` when it
    arrived on a DEALER; ``address`` is then the mesh address that DEALER is connected to,
    ``""`` for ROUTER receipts). Pass it back to ``send_to_identity``.

    ``sender`` and ``sender_role`` are the *authenticated* sender: the name and role of the
    CURVE certificate of the connection the message came over (our ROUTER: the client's key,
    checked by ZAP; a DEALER: the server key we dialled with). Both are None on an unencrypted
    link (no ``--keys``, loopback only), where nothing is authenticated.
    """

    kind: str
    payload: dict[str, Any]
    rid: bytes
    identity: bytes
    address: str = ""
    sender: str | None = None
    sender_role: str | None = None


def refusal(msg: Incoming, claimed: object, role: str) -> str | None:
    """Why ``msg`` may not speak as ``claimed`` with ``role``, or None when it may.

    The rule of an authenticated mesh: identity is the key. A message whose claimed sender (a
    Raft ``src``, a ping's ``node_id``, a hello's ``handler_id``) is not its connection's
    certificate name, or whose certificate's role may not send it, is refused. Unauthenticated
    links (``sender is None``) carry nothing to check against.
    """
    if msg.sender is None:
        return None
    if msg.sender_role != role:
        return "role"
    if claimed != msg.sender:
        return "sender_mismatch"
    return None


# Called with (topic, payload) for each broadcast received (its return value is ignored).
BroadcastHandler = Callable[[str, "dict[str, Any]"], Any]

# A message handler may answer a request by returning a JSON-able dict (or None: no answer),
# or an awaitable of one (the transport then answers when it completes).
MessageHandler = Callable[[Incoming], "dict[str, Any] | Awaitable[dict[str, Any] | None] | None"]


@runtime_checkable
class Replica(Protocol):
    """What scheduling, dispatch and the API need from this node's copy of the replicated log."""

    @property
    def node_id(self) -> str: ...

    @property
    def role(self) -> str:
        """``follower`` | ``precandidate`` | ``candidate`` | ``leader``."""

    @property
    def term(self) -> int: ...

    @property
    def leader_id(self) -> str | None: ...

    @property
    def is_leader(self) -> bool: ...

    @property
    def commit_index(self) -> int: ...

    @property
    def handing_over(self) -> bool:
        """True while this node transfers its leadership away or shuts down: work that fails
        then must not be restarted here."""

    def propose_nowait(self, command: Any) -> asyncio.Future[Any]:
        """Append a command and return at once; the future resolves with the state machine's
        answer once the command is applied. Raises ``NoLeader`` on a non-leader."""

    async def propose(self, command: Any, *, timeout: float = 5.0) -> Any:
        """Replicate a command and return the state machine's answer once it is applied;
        ``ProposalFailed`` when that cannot be confirmed."""

    async def wait_applied(self, index: int, timeout: float) -> bool:
        """Wait until this node has applied ``index``; False on timeout."""

    def on_role_change(self, fn: RoleListener) -> None: ...

    async def add_voter(self, node_id: str) -> dict[str, Any]:
        """Make a known node a voter through the log (a single-server change) and forget that
        it was removed; returns ``cluster_members()`` once applied. Raises
        ``MembershipRefused`` or ``NoLeader``."""

    async def remove_voter(self, node_id: str) -> dict[str, Any]:
        """Remove a voter through the log and mark it removed (automatic growth never adds it
        back); returns ``cluster_members()`` once applied. A leader removing itself steps down
        once the change is committed. Raises ``MembershipRefused`` or ``NoLeader``."""


@runtime_checkable
class MessageBus(Protocol):
    """Point-to-point messages with processes that are not Raft voters (handlers)."""

    def handle(self, kind: str, fn: MessageHandler) -> None:
        """Route incoming messages of ``kind`` to ``fn``."""

    def send_to_identity(self, identity: bytes, kind: str, payload: dict[str, Any]) -> bool:
        """Send on our ROUTER to the peer connected with routing id ``identity``; False when
        it could not be queued."""

    def reject(self, msg: Incoming, reason: str, detail: str = "") -> None:
        """Count a refused message by ``reason`` (``schedulezero_security_rejected_total``) and
        log it at most once a minute per peer; the caller then drops it."""


@runtime_checkable
class LeaderLink(Protocol):
    """Requests from this node to the leader over the mesh (a follower forwarding a write)."""

    def leader_accepting(self, kind: str) -> str | None:
        """The mesh address of the current leader when it said (in its pings) that it answers
        requests of ``kind``; None when no leader is known, or it does not (an older version)."""

    async def request(
        self,
        address: str,
        kind: str,
        payload: dict[str, Any],
        *,
        timeout: float,
        connect_timeout: float,
    ) -> dict[str, Any]:
        """Send one request to the node at ``address`` and return its answer. Raises
        TimeoutError when none arrives within ``timeout``; ConnectionError when closed or, with
        nothing sent, when that node is not connected within ``connect_timeout`` (it is down);
        ValueError, with nothing sent, when the request is larger than one mesh message may be.
        The request is sent at most once: one that timed out may still have been acted on."""


@runtime_checkable
class Directory(Protocol):
    """Where the nodes of the mesh are (what a handler needs to be told to find them)."""

    def address_of(self, node_id: str) -> str | None:
        """The mesh address of a node (this one's own included), if known."""

    def mesh_addresses(self) -> list[str]:
        """This node's mesh address, then every known peer's."""


@runtime_checkable
class Broadcaster(Protocol):
    """Best-effort broadcast between nodes (the transport's PUB/SUB), for the event broker."""

    node_id: str

    @property
    def bound_address(self) -> str:
        """This node's mesh address (``""`` when it has none)."""

    @property
    def pub_address(self) -> str:
        """The address of this node's PUB socket (``""`` when it has none)."""

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Broadcast ``payload`` on ``topic`` (not delivered to this process)."""

    def subscribe(self, address: str) -> None:
        """Receive the broadcasts of the node at mesh ``address``."""

    def unsubscribe(self, address: str) -> None: ...

    def set_broadcast_handler(self, fn: BroadcastHandler | None) -> None:
        """The one function every received broadcast goes to: ``fn(topic, payload)``."""


@runtime_checkable
class NodeView(Protocol):
    """The read views the HTTP API serves about the node and its cluster."""

    def health(self) -> dict[str, Any]: ...

    def cluster(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...

    def cluster_members(self) -> dict[str, Any]:
        """The voters, the removed nodes and every known peer (GET /api/cluster/members)."""

    def leader_http(self) -> str | None:
        """The HTTP address of the leader (this node's own when it leads), if known."""


@attrs.frozen
class StateImage:
    """A consistent image of the replicated state (``StateMachine.snapshot()``) as of the applied
    entry ``index``, in an open, already unlinked file: nothing is left on disk when ``fd`` is
    closed (the reader closes it). ``term`` is the leader's term when it was taken (no entry of
    the image carries a later one), ``snapshot_term`` the term of the entry at ``index``."""

    fd: int
    size: int
    index: int
    term: int
    snapshot_term: int
    voters: tuple[str, ...]


class ImageSource(Protocol):
    """What the backup endpoint needs of the leader (``GET /api/backup``, mesh.api.backup)."""

    async def state_image(self) -> StateImage:
        """An image that holds every entry committed before the call (a linearizable read);
        ``NoLeader`` when this node does not lead, ``ProposalFailed`` when it cannot prove it
        still does."""


@runtime_checkable
class EventSink(Protocol):
    """Where a part reports what happened (node events: elections, peers, snapshots, ...).
    Observability subscribes to it; the reporting part does not know who listens."""

    def emit(self, event: str, **fields: Any) -> None: ...


def term_identity(node_id: str, term: int) -> str:
    """``node@term``: who led which term. The scheduler identity of a leader's APScheduler, the
    ``scheduler_id`` of its job assignments, and the ``X-ScheduleZero-Served-By`` of its writes."""
    return f"{node_id}@{term}"
