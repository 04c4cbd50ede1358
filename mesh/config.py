"""Node configuration: one frozen ``Config`` built from four layers.

Precedence, lowest to highest (each layer replaces, never merges, the values below it; lists such
as ``peers`` are replaced whole):

1. built-in defaults (the field defaults below),
2. ``SCHEDULEZERO_*`` environment variables,
3. the YAML config file (``--config FILE``, else ``$SCHEDULEZERO_CONFIG``),
4. command-line flags.

Sections are merged key by key across layers: most of their keys only a file sets, but
``security.keys``, ``security.insecure``, ``security.api_tokens``, ``security.tls_cert`` and
``security.tls_key`` also have a flag and an environment variable.

Every section is a ``msgspec.Struct`` whose field types carry their constraints
(``msgspec.Meta``); each value a layer gives is checked with ``msgspec.convert`` against the
type of the field it sets. Every mistake a user can make raises ``ConfigError`` whose message is
one line naming the flag, environment variable or ``FILE:LINE: key`` at fault and what is wrong
with it. The sections are also the settings of the parts they configure (``DispatchConfig`` is
the dispatcher's, ``GovernorConfig`` the governors'). See docs/configuration.md.

Why this file is long: every setting a user can give is here with its default, constraint,
environment name and one-line error, so the whole surface of configuration is in one place.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
import yaml
from msgspec import Meta

from mesh.security.redact import DEFAULT_SENSITIVE_KEYS
from mesh.validation import dotted, explain

__all__ = [
    "DISCOVERY_MODES",
    "ENV_PREFIX",
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "DispatchConfig",
    "DnsConfig",
    "EventLogConfig",
    "FeedConfig",
    "GovernorConfig",
    "HistoryConfig",
    "MembershipConfig",
    "MetricsConfig",
    "NotifyConfig",
    "RaftConfig",
    "SecurityConfig",
    "ZoneConfig",
    "load_config",
    "parse_dns_server",
    "parse_http_address",
    "parse_mesh_address",
    "pub_address_of",
]

ENV_PREFIX = "SCHEDULEZERO_"
DEFAULT_MESH = "tcp://127.0.0.1:7100"
DEFAULT_HTTP = "127.0.0.1:8100"
DEFAULT_MDNS_SERVICE = "_schedulezero._tcp.local."
# mDNS and DNS cannot tell how big the cluster is: a new cluster waits for this many voters.
DISCOVERY_BOOTSTRAP_EXPECT = 3
MiB = 1024 * 1024

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_WILDCARDS = ("*", "0.0.0.0")


class ConfigError(ValueError):
    """A configuration mistake; ``str(err)`` is one line fit to show the user."""


# --------------------------------------------------------------------------- addresses


def _check_host(host: str, *, bind: bool) -> str:
    """Return the normalised host, or raise ValueError with the reason."""
    if not host:
        raise ValueError("missing host")
    if host.startswith("[") or ":" in host:
        raise ValueError("IPv6 addresses are not supported")
    if host in _WILDCARDS:
        if not bind:
            raise ValueError(f"{host} is a bind-all address, not one other nodes can connect to")
        return "0.0.0.0"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{host!r} is not a valid host name")
    return host


def _check_port(text: str, *, lo: int, hi: int) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not lo <= port <= hi:
        if port == 65535 and hi == 65534:
            raise ValueError("port 65535 leaves no room for the PUB port (PORT+1); use 1-65534")
        raise ValueError(f"port {port} is out of range {lo}-{hi}")
    return port


def parse_mesh_address(value: str, *, bind: bool = False) -> tuple[str, int]:
    """``tcp://HOST:PORT`` → ``(host, port)``; raises ValueError with the reason.

    The mesh port must leave room for ``PORT+1`` (the node's PUB socket). With ``bind=True`` the
    wildcard host ``*``/``0.0.0.0`` is accepted (and normalised to ``0.0.0.0``).
    """
    if not isinstance(value, str) or not value.startswith("tcp://"):
        raise ValueError(f"expected tcp://HOST:PORT, got {value!r}")
    rest = value[len("tcp://") :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"expected tcp://HOST:PORT, got {value!r}")
    return _check_host(host, bind=bind), _check_port(port, lo=1, hi=65534)


def parse_http_address(value: str, *, bind: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (an ``http://`` prefix is tolerated) → ``(host, port)``."""
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    rest = value.removeprefix("http://").rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port or "/" in rest:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return _check_host(host, bind=bind), _check_port(port, lo=1, hi=65535)


def parse_dns_server(value: str) -> tuple[str, int]:
    """``IP[:PORT]`` or ``[IPv6]:PORT`` of a DNS server → ``(ip, port)``; the port defaults to 53.

    An IP, not a name: the resolver that would look the name up is the one being configured.
    """
    host, port = value, "53"
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected IP[:PORT] or [IPv6]:PORT, got {value!r}")
        port = rest[1:] or port
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected IP[:PORT] or [IPv6]:PORT, got {value!r}") from None
    return str(ip), _check_port(port, lo=1, hi=65535)


def pub_address_of(mesh_address: str) -> str:
    """The PUB (broadcast) address that belongs to a mesh address: same host, port + 1."""
    host, port = parse_mesh_address(mesh_address, bind=True)
    return f"tcp://{host}:{port + 1}"


def _primary_ip() -> str:
    """The IPv4 address of the interface that carries the default route (nothing is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 9))
            return str(s.getsockname()[0])
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _default_node_id(mesh: str) -> str:
    _, port = parse_mesh_address(mesh, bind=True)
    suffix = f"-{port}"
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "node"
    return host[: 64 - len(suffix)] + suffix


# --------------------------------------------------------------------------- field types
# A type's ``description`` (when it has one) is what an error says was expected.

Discovery = Literal["static", "mdns", "dns"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
DISCOVERY_MODES: tuple[str, ...] = get_args(Discovery)
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)

Seconds = Annotated[float, Meta(gt=0)]
PerSecond = Annotated[float, Meta(gt=0)]
AtLeastOne = Annotated[int, Meta(ge=1)]
Name = Annotated[str, Meta(min_length=1, description="a non-empty task or handler name")]
NodeId = Annotated[
    str,
    Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}\Z", description="1-64 characters from A-Z a-z 0-9 _ . -"),
]
Module = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z",
        description="a Python module name like 'package.tasks'",
    ),
]
MdnsService = Annotated[
    str,
    Meta(
        pattern=r"^_[A-Za-z0-9-]{1,15}\._(tcp|udp)\.local\.\Z",
        description="a service type like '_schedulezero._tcp.local.'",
    ),
]

DnsName = Annotated[
    str,
    Meta(
        pattern=rf"^{_LABEL}(?:\.{_LABEL})*\.?\Z",
        max_length=253,
        description="a DNS name like 'schedulezero.default.svc.cluster.local'",
    ),
]
MeshPort = Annotated[int, Meta(ge=1, le=65534, description="a mesh port, 1-65534")]


# --------------------------------------------------------------------------- sections


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class RaftConfig(_Section):
    """Raft timing and limits; times are in seconds (``mesh.node.raft_settings`` makes ticks)."""

    heartbeat_interval: Seconds = 0.1
    election_timeout_min: Seconds = 0.3
    election_timeout_max: Seconds = 0.6
    snapshot_threshold: AtLeastOne = 10_000  # log entries since the last snapshot
    # ...or this many bytes (JSON) of log since the last snapshot, whichever comes first: a bulk
    # write of 1,000 schedules is one ~0.6 MB entry, and the log is held in memory decoded
    # (~2 KB a schedule), so 1,000 such entries would otherwise never be compacted.
    snapshot_threshold_bytes: Annotated[int, Meta(ge=1024)] = 128 * MiB
    max_append_entries: AtLeastOne = 512  # entries per AppendEntries message
    # Bytes of entries per AppendEntries (at least one entry is sent), and the largest entry a
    # write may make (larger: 413). Both stay below max_frame_bytes (docs/consensus.md).
    max_append_bytes: Annotated[int, Meta(ge=1024)] = 4 * MiB
    max_entry_bytes: Annotated[int, Meta(ge=1024)] = 8 * MiB
    check_quorum: bool = True
    pre_vote: bool = True


class MembershipConfig(_Section):
    """Failure-detector timing (seconds)."""

    ping_interval: Seconds = 0.5
    suspect_after: Seconds = 1.5
    dead_after: Seconds = 3.0
    # Add a node that pings us but is not in our peer set (so one --peer is enough to join).
    # Off when every link must go through a known address, e.g. a proxy per link in chaos tests.
    learn_peers: bool = True
    # The leader makes alive known nodes voters, one at a time. With keys (a secured mesh) only
    # nodes holding a ``node`` key; never a node removed through DELETE /api/cluster/members.
    # Off: voters change only through POST/DELETE /api/cluster/members (after bootstrap).
    auto_join: bool = True


class DispatchConfig(_Section):
    """How the leader hands jobs to handler processes (seconds); the dispatcher's settings."""

    max_attempts: AtLeastOne = 4  # dispatch attempts per job: first try + retries elsewhere
    ack_timeout: Seconds = 1.0  # a dispatch must start (old handlers: be acknowledged) in this
    default_timeout: Seconds | None = None  # per-job run time limit; None = unlimited
    task_timeouts: dict[Name, Seconds] = {}  # task name -> run time limit
    no_handler_wait: Seconds = 30.0  # jobs without a start deadline wait this long for a handler
    # A job re-dispatched by a new leader goes back to the handler it was assigned to, which
    # answers from its idempotency window; if that handler stays unreachable this long, the job
    # is retried elsewhere (at-least-once, same idempotency key).
    redispatch_wait: Seconds = 10.0
    backoff_initial: Seconds = 0.05  # wait before a retry, doubling up to backoff_max
    backoff_max: Seconds = 1.0


class DnsConfig(_Section):
    """``discovery: dns``: peers from a DNS name (what a Kubernetes headless Service gives).

    Nothing DNS says is trusted beyond "try this address": a peer is who its CURVE key says.
    """

    name: DnsName | None = None  # required with discovery: dns
    port: MeshPort | None = None  # mesh port of A/AAAA peers; default: our own mesh port
    srv: bool = False  # look up SRV _schedulezero._tcp.NAME (host and port) instead of A/AAAA
    server: str | None = None  # IP[:PORT] of the DNS server; default: the system resolver
    interval: Seconds = 10.0  # re-resolve this often, so joins and leaves are seen
    timeout: Seconds = 3.0  # one resolution gives up after this long (tries again next interval)
    max_records: Annotated[int, Meta(ge=1, le=1024)] = 64  # an answer with more is ignored


class SchedulingConfig(_Section):
    """How the leader fires (docs/scheduling.md, "Fire rounds and lookahead")."""

    # Fires due within this many seconds are committed ahead, leased to the leader, and started
    # from a local timer at their time (no commit between a fire time and its dispatch). 0: off.
    lookahead: Annotated[float, Meta(ge=0, le=5)] = 0.1


class GovernorConfig(_Section):
    """Rate limits (dispatches/s), concurrency limits (jobs in flight) and backpressure."""

    rate: PerSecond | None = None  # whole mesh
    task_rates: dict[Name, PerSecond] = {}
    handler_rates: dict[Name, PerSecond] = {}
    burst: PerSecond | None = None  # token-bucket size; default 1 (evenly spaced)
    concurrency: AtLeastOne | None = None  # whole mesh
    task_concurrency: dict[Name, AtLeastOne] = {}
    max_queued_jobs: AtLeastOne = 10_000  # POST /api/jobs answers 429 beyond this


class HistoryConfig(_Section):
    """Retention of the replicated execution history and run-now results."""

    max_executions: AtLeastOne = 10_000
    max_results: AtLeastOne = 10_000


NotifyEvent = Literal["failure", "missed", "skipped", "timeout", "paused", "no_handler"]


class NotifyConfig(_Section):
    """The cluster's default alert webhook and how this node sends alerts when it leads
    (docs/scheduling.md, "notify"). ``webhook`` and ``on`` are the default of every schedule
    without its own ``notify``: the leader commits them to the log when it takes office, so set
    the same on every node. The others are this node's sending settings."""

    webhook: Annotated[
        str, Meta(pattern=r"^https?://\S+\Z", max_length=2000, description="an http(s):// URL")
    ] | None = None  # fmt: skip
    on: tuple[NotifyEvent, ...] = ("failure", "missed", "skipped", "timeout", "no_handler")
    # Loopback, private and link-local targets are refused unless this is true (SSRF guard).
    allow_private: bool = False
    timeout: Seconds = 10.0  # per POST
    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 8  # POSTs per alert before giving up
    backoff_initial: Seconds = 1.0  # exponential backoff between attempts, from this...
    backoff_max: Seconds = 60.0  # ...up to this


class MetricsConfig(_Section):
    """GET /metrics (docs/observability.md)."""

    # Schedules with their own per-schedule series; later ones count under "_other".
    max_schedules: Annotated[int, Meta(ge=0, le=100_000)] = 100


class EventLogConfig(_Section):
    """Rotation of the JSONL event log."""

    max_bytes: Annotated[int, Meta(ge=1024)] = 10 * MiB
    backups: Annotated[int, Meta(ge=0)] = 5


class ApiConfig(_Section):
    """What one HTTP client may cost a node (docs/api.md, "Limits")."""

    max_body_bytes: Annotated[int, Meta(ge=1024)] = MiB  # larger bodies: 413
    max_connections: AtLeastOne = 1024  # beyond: 503 and closed
    header_timeout: Seconds = 10.0  # a request head must arrive within this (slowloris)
    body_timeout: Seconds = 30.0  # the whole body must arrive within this: 408
    max_json_depth: Annotated[int, Meta(ge=2, le=1000)] = 64  # deeper bodies: 400
    # Every mutation (POST, PUT, DELETE, PATCH under /api/) answers 403: e.g. a node that serves
    # a public dashboard while writes go to the admin zone (docs/zones.md).
    read_only: bool = False


class SecurityConfig(_Section):
    """CURVE keys of the mesh (docs/security.md): where they are, or leave to run without."""

    # DIR holding this node's NODE_ID.key_secret and the public certificates it trusts (*.key).
    keys: Path | None = None
    # Without keys, allow binding or dialling non-loopback addresses (unauthenticated, plaintext).
    insecure: bool = False
    # HTTP API tokens file (``schedulezero tokens create``); without it the API binds loopback only.
    api_tokens: Path | None = None
    # GETs without a token are served as a ``read`` caller (redacted); writes still need their
    # token. Without api_tokens only on a read-only API, which may then bind any address
    # (docs/zones.md, "Who may read").
    anonymous_reads: bool = False
    # Serve the HTTP API over TLS with this certificate (chain) and key, both PEM.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Keys whose values are masked ("***") in logs and the event log (any depth, any case).
    sensitive_keys: tuple[Annotated[str, Meta(min_length=1)], ...] = DEFAULT_SENSITIVE_KEYS


# What a zone filter can drop (mesh.zones.filter.DROP_KINDS).
DropKind = Literal["args", "kwargs", "results", "errors", "metadata"]
DROP_KINDS: tuple[str, ...] = get_args(DropKind)
ZoneName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z",
        description="a zone name: 1-64 characters from A-Z a-z 0-9 _ . -",
    ),
]


class ZoneConfig(_Section):
    """What the voters let through to the replicas of one zone (docs/zones.md). ``drop``
    defaults to every kind: a zone lets a kind through only when its config says so."""

    drop: tuple[DropKind, ...] = DROP_KINDS
    sensitive_keys: tuple[Annotated[str, Meta(min_length=1)], ...] = DEFAULT_SENSITIVE_KEYS


class FeedConfig(_Section):
    """The change feed a voter serves to read-only replicas (docs/zones.md): how many recent
    changes it keeps so that a replica back from a short absence resumes without a snapshot."""

    window_entries: AtLeastOne = 10_000
    window_bytes: Annotated[int, Meta(ge=1024)] = 64 * MiB


# --------------------------------------------------------------------------- Config


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a node needs to know at start-up. Build it with ``load_config``.

    Fields whose default depends on another field (``node_id``, ``data_dir``,
    ``advertise_mesh``, ``advertise_http``, ``bootstrap_expect``) are derived at construction, so
    on a built ``Config`` they are never ``None``.
    """

    mesh: str = DEFAULT_MESH
    advertise_mesh: str | None = None  # default: mesh (the primary IP for a bind-all host)
    http: str = DEFAULT_HTTP
    advertise_http: str | None = None  # default: http (likewise)
    node_id: NodeId | None = None  # default: HOSTNAME-MESHPORT
    data_dir: Path | None = None  # default: data/NODE_ID
    peers: tuple[str, ...] = ()
    discovery: Discovery = "static"
    bootstrap_expect: AtLeastOne | None = None  # default: static: the whole peer list; mdns: 3
    tasks: tuple[Module, ...] = ()
    raft: RaftConfig = msgspec.field(default_factory=RaftConfig)
    membership: MembershipConfig = msgspec.field(default_factory=MembershipConfig)
    dispatch: DispatchConfig = msgspec.field(default_factory=DispatchConfig)
    scheduling: SchedulingConfig = msgspec.field(default_factory=SchedulingConfig)
    governors: GovernorConfig = msgspec.field(default_factory=GovernorConfig)
    history: HistoryConfig = msgspec.field(default_factory=HistoryConfig)
    notify: NotifyConfig = msgspec.field(default_factory=NotifyConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    eventlog: EventLogConfig = msgspec.field(default_factory=EventLogConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    # Zone name -> its filter; a replica whose zone is not here gets every kind dropped.
    zones: dict[ZoneName, ZoneConfig] = {}
    feed: FeedConfig = msgspec.field(default_factory=FeedConfig)
    max_frame_bytes: Annotated[int, Meta(ge=1024)] = 16 * MiB
    log_level: LogLevel = "INFO"
    mdns_service: MdnsService = DEFAULT_MDNS_SERVICE
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)

    def __post_init__(self) -> None:
        def derive(name: str, value: Any) -> None:
            msgspec.structs.force_setattr(self, name, value)

        if self.advertise_mesh is None:
            derive("advertise_mesh", _advertise(self.mesh, "tcp://"))
        if self.advertise_http is None:
            derive("advertise_http", _advertise(self.http, ""))
        if self.node_id is None:
            derive("node_id", _default_node_id(self.mesh))
        derive("data_dir", Path(self.data_dir or Path("data") / self.node_id).expanduser())
        # Our own address in the peer list is dropped, so every node of a cluster can share one
        # identical peer list; duplicates are dropped too (first occurrence wins).
        own = {self.advertise_mesh, self.mesh}
        derive("peers", tuple(dict.fromkeys(p for p in self.peers if p not in own)))
        if self.bootstrap_expect is None:
            n = len(self.peers) + 1 if self.discovery == "static" else DISCOVERY_BOOTSTRAP_EXPECT
            derive("bootstrap_expect", n)
        _check_relations(self)

    # ----- helpers other modules use

    @property
    def mesh_host_port(self) -> tuple[str, int]:
        """Host and port the ROUTER socket binds (``mesh``)."""
        return parse_mesh_address(self.mesh, bind=True)

    @property
    def pub_address(self) -> str:
        """Bind address of the PUB socket: the mesh host, mesh port + 1."""
        return pub_address_of(self.mesh)

    @property
    def advertise_pub_address(self) -> str:
        """The PUB address other nodes subscribe to: the advertised mesh port + 1."""
        return pub_address_of(self.advertise_mesh)

    @property
    def http_host_port(self) -> tuple[str, int]:
        return parse_http_address(self.http, bind=True)

    @property
    def state_db_path(self) -> Path:
        return self.data_dir / "broker_state.db"

    @property
    def eventlog_path(self) -> Path:
        return self.data_dir / "logs" / "events.jsonl"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (for logs and ``/api`` debugging)."""
        return msgspec.to_builtins(self, enc_hook=str)  # str: the one non-JSON type, Path


def _advertise(bind: str, scheme: str) -> str:
    """Default advertised address: the bind address, or the primary IP for a bind-all host."""
    try:
        if scheme:
            host, port = parse_mesh_address(bind, bind=True)
        else:
            host, port = parse_http_address(bind, bind=True)
    except ValueError:
        return bind  # reported by validation with the proper label
    if host == "0.0.0.0":
        host = _primary_ip()
    return f"{scheme}{host}:{port}"


_ENVELOPE_BYTES = 64 * 1024  # room in a frame for an AppendEntries' own fields


def _check_relations(c: Config) -> None:
    """Checks that involve more than one field; messages name the keys."""
    r, m = c.raft, c.membership
    if r.election_timeout_min >= r.election_timeout_max:
        raise ConfigError(
            f"raft.election_timeout_min ({r.election_timeout_min}) must be less than "
            f"raft.election_timeout_max ({r.election_timeout_max})"
        )
    if r.heartbeat_interval >= r.election_timeout_min:
        raise ConfigError(
            f"raft.heartbeat_interval ({r.heartbeat_interval}) must be less than "
            f"raft.election_timeout_min ({r.election_timeout_min})"
        )
    largest = max(r.max_append_bytes, r.max_entry_bytes)
    if largest + _ENVELOPE_BYTES > c.max_frame_bytes:
        # An AppendEntries holds at most max(budget, one entry) plus its envelope.
        raise ConfigError(
            f"raft.max_append_bytes and raft.max_entry_bytes ({largest}) plus "
            f"{_ENVELOPE_BYTES} bytes must fit in max_frame_bytes ({c.max_frame_bytes})"
        )
    if m.ping_interval >= m.suspect_after:
        raise ConfigError(
            f"membership.ping_interval ({m.ping_interval}) must be less than "
            f"membership.suspect_after ({m.suspect_after})"
        )
    if m.suspect_after >= m.dead_after:
        raise ConfigError(
            f"membership.suspect_after ({m.suspect_after}) must be less than "
            f"membership.dead_after ({m.dead_after})"
        )
    if c.discovery == "static" and c.bootstrap_expect > len(c.peers) + 1:
        raise ConfigError(
            f"bootstrap_expect ({c.bootstrap_expect}) is larger than the static cluster "
            f"(this node + {len(c.peers)} peers); the first election would never happen"
        )
    if c.discovery == "dns" and c.dns.name is None:
        raise ConfigError("discovery dns needs a name to resolve: dns.name (--dns-name)")
    if (c.security.tls_cert is None) != (c.security.tls_key is None):
        raise ConfigError(
            "security.tls_cert (--tls-cert) and security.tls_key (--tls-key) go together: "
            "give both or neither"
        )
    mesh_host, mesh_port = c.mesh_host_port
    http_host, http_port = c.http_host_port
    if http_port in (mesh_port, mesh_port + 1) and (
        mesh_host == http_host or "0.0.0.0" in (mesh_host, http_host)
    ):
        raise ConfigError(
            f"http port {http_port} collides with the mesh ports {mesh_port}-{mesh_port + 1}"
        )


# --------------------------------------------------------------------------- checking one value
# A layer's value for one top-level key (for a section: its mapping) is checked by msgspec
# against that field's type; what a type cannot say (address syntax, ports) is parsed after.


def _given(tp: Any) -> Any:
    """A field's type as a layer gives it: a layer's None means "not given", never a value."""
    rest = tuple(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) in (Union, UnionType) and len(rest) == 1:
        return rest[0]
    return tp


_FIELDS: dict[str, Any] = {f.name: _given(f.type) for f in msgspec.structs.fields(Config)}
_SECTIONS: dict[str, type[_Section]] = {
    n: tp for n, tp in _FIELDS.items() if isinstance(tp, type) and issubclass(tp, _Section)
}
# What flags may set: every top-level field, and the few section keys named "section.key".
_TOP = set(_FIELDS) - set(_SECTIONS)
_NESTED = {
    "security.keys",
    "security.insecure",
    "security.api_tokens",
    "security.tls_cert",
    "security.tls_key",
    "dns.name",
    "dns.port",
    "dns.srv",
    "dns.server",
    "dns.interval",
}


class _Invalid(Exception):
    """A value a layer gave is wrong: where in the value (empty: the value itself), and why.

    ``allowed`` is set when the mistake is an unknown key (the last step of ``path``).
    """

    def __init__(
        self, path: tuple[str | int, ...], reason: str, allowed: tuple[str, ...] | None = None
    ) -> None:
        super().__init__(reason)
        self.path, self.reason, self.allowed = path, reason, allowed


def _comma_list(v: Any) -> Any:
    return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v


def _address(parse: Callable[..., tuple[str, int]], scheme: str, *, bind: bool) -> Callable:
    def normalise(v: str) -> str:
        host, port = parse(v, bind=bind)
        return f"{scheme}{host}:{port}"

    return normalise


_mesh_peer = _address(parse_mesh_address, "tcp://", bind=False)

# Applied before msgspec sees the value: a comma-separated string is a list; levels ignore case.
_BEFORE: dict[str, Callable[[Any], Any]] = {
    "peers": _comma_list,
    "tasks": _comma_list,
    "log_level": lambda v: v.upper() if isinstance(v, str) else v,
    "notify": lambda v: _yaml_on(v),
}


def _yaml_on(section: Any) -> Any:
    """YAML 1.1 reads an unquoted ``on:`` key as the boolean true: it means ``notify.on``."""
    if isinstance(section, dict) and True in section:
        return {("on" if k is True else k): v for k, v in section.items()}
    return section


# Applied after: what the type alone cannot check. Raise ValueError with the bare reason.
_AFTER: dict[str, Callable[[Any], Any]] = {
    "mesh": _address(parse_mesh_address, "tcp://", bind=True),
    "advertise_mesh": _mesh_peer,
    "http": _address(parse_http_address, "", bind=True),
    "advertise_http": _address(parse_http_address, "", bind=False),
    "peers": lambda v: tuple(dict.fromkeys(map(_mesh_peer, v))),
    "tasks": lambda v: tuple(dict.fromkeys(v)),
    "dns": lambda v: _checked_dns(v),
}


def _checked_dns(dns: DnsConfig) -> DnsConfig:
    if dns.server is not None:
        parse_dns_server(dns.server)
    return dns


def _path_hook(tp: type, v: Any) -> Any:
    """msgspec's ``dec_hook`` for the one type it does not know, ``Path``."""
    if v == "":
        raise ValueError("must not be empty")
    if tp is Path and isinstance(v, str | Path):
        return Path(v).expanduser()
    raise ValueError(f"expected a path, got {v!r}")


def _check(key: str, value: Any) -> Any:
    """``value`` for ``key`` (top level, or ``section.key``) as the field holds it; raises
    ``_Invalid``. A section's value is checked whole and returned as the dict of the keys given.
    """
    section, _, name = key.partition(".")
    if name:
        checked = _check(section, {name: value})
        return checked[name]
    if key in _SECTIONS and isinstance(value, dict):
        value = _BEFORE.get(key, lambda v: v)(value)
        struct = _check_value(key, value)
        return {k: getattr(struct, k) for k in value}
    return _check_value(key, value)


def _check_value(key: str, value: Any) -> Any:
    tp = _FIELDS[key]
    value = _BEFORE.get(key, lambda v: v)(value)
    try:
        checked = msgspec.convert(value, tp, dec_hook=_path_hook)
    except msgspec.ValidationError as e:
        problem = explain(e, value, tp)
        allowed = problem.allowed if problem.kind == "unknown" else None
        raise _Invalid(problem.path, problem.reason(), allowed) from None
    try:
        return _AFTER.get(key, lambda v: v)(checked)
    except ValueError as e:
        raise _Invalid((), str(e)) from None


# Environment variable → field. Values are text; lists are comma-separated.
ENV_VARS: dict[str, str] = {
    "SCHEDULEZERO_NODE_ID": "node_id",
    "SCHEDULEZERO_DATA_DIR": "data_dir",
    "SCHEDULEZERO_MESH": "mesh",
    "SCHEDULEZERO_ADVERTISE_MESH": "advertise_mesh",
    "SCHEDULEZERO_HTTP": "http",
    "SCHEDULEZERO_ADVERTISE_HTTP": "advertise_http",
    "SCHEDULEZERO_PEERS": "peers",
    "SCHEDULEZERO_DISCOVERY": "discovery",
    "SCHEDULEZERO_TASKS": "tasks",
    "SCHEDULEZERO_BOOTSTRAP_EXPECT": "bootstrap_expect",
    "SCHEDULEZERO_LOG_LEVEL": "log_level",
    "SCHEDULEZERO_KEYS": "security.keys",
    "SCHEDULEZERO_INSECURE": "security.insecure",
    "SCHEDULEZERO_API_TOKENS": "security.api_tokens",
    "SCHEDULEZERO_TLS_CERT": "security.tls_cert",
    "SCHEDULEZERO_TLS_KEY": "security.tls_key",
    "SCHEDULEZERO_DNS_NAME": "dns.name",
    "SCHEDULEZERO_DNS_PORT": "dns.port",
    "SCHEDULEZERO_DNS_SRV": "dns.srv",
    "SCHEDULEZERO_DNS_SERVER": "dns.server",
    "SCHEDULEZERO_DNS_INTERVAL": "dns.interval",
}
CONFIG_ENV_VAR = "SCHEDULEZERO_CONFIG"

# Field → the command-line flag that sets it (for error messages).
FLAGS: dict[str, str] = {
    "peers": "--peer",
    "config": "--config",
    "security.keys": "--keys",
    "security.insecure": "--insecure",
    "security.api_tokens": "--api-tokens",
    "security.tls_cert": "--tls-cert",
    "security.tls_key": "--tls-key",
    "dns.name": "--dns-name",
    "dns.port": "--dns-port",
    "dns.srv": "--dns-srv",
    "dns.server": "--dns-server",
    "dns.interval": "--dns-interval",
}


def _flag(key: str) -> str:
    return FLAGS.get(key, "--" + key.replace("_", "-"))


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_text(key: str, text: str) -> Any:
    """Environment values are strings; turn numbers and booleans into such before checking."""
    if key in ("bootstrap_expect", "max_frame_bytes", "dns.port"):
        try:
            return int(text.strip())
        except ValueError:
            raise _Invalid((), f"expected an integer, got {text!r}") from None
    if key == "dns.interval":
        try:
            return float(text.strip())
        except ValueError:
            raise _Invalid((), f"expected a number of seconds, got {text!r}") from None
    if key in ("security.insecure", "dns.srv"):
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise _Invalid((), f"expected one of {', '.join(_TRUE + _FALSE)}, got {text!r}")
        return word in _TRUE
    return text.strip()


# --------------------------------------------------------------------------- YAML


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every mapping key, by key path (for error messages)."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    p = (*path, str(k.value))
                    lines[p] = v.start_mark.line + 1
                    walk(v, p)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: config file is a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data, _key_lines(text)


def _unknown(where: str, key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rpartition(".")[2], list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _parse_file(path: Path) -> dict[str, Any]:
    data, lines = _read_yaml(path)

    def where(*keys: str | int) -> str:
        # The line of the deepest key the file has (list items have none of their own).
        for n in range(len(keys), 0, -1):
            line = lines.get(tuple(map(str, keys[:n])))
            if line:
                return f"{path}:{line}"
        return str(path)

    given: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _FIELDS:
            raise _unknown(where(str(key)), str(key), _FIELDS)
        if value is None:
            continue
        try:
            given[key] = _check(key, value)
        except _Invalid as e:
            full = (key, *e.path)
            if e.allowed is not None:
                raise _unknown(where(*full), dotted(full), e.allowed) from None
            raise ConfigError(f"{where(*full)}: {dotted(full)}: {e.reason}") from None
    return given


# --------------------------------------------------------------------------- load_config


def load_config(
    args: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the node's ``Config``: defaults < ``SCHEDULEZERO_*`` env < YAML file < ``args``.

    ``args`` maps field names (``node_id``, ``mesh``, ``peers``, ...) to command-line values;
    ``None`` means "flag not given". ``config_file`` falls back to ``$SCHEDULEZERO_CONFIG``.
    Raises ``ConfigError`` (one line) on any mistake.
    """
    env = {} if env is None else env
    given: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        # A section merges key by key across layers; anything else is replaced whole.
        section, _, name = key.partition(".")
        if name:
            given.setdefault(section, {})[name] = value
        elif key in _SECTIONS:
            given.setdefault(key, {}).update(value)
        else:
            given[key] = value

    for var, key in ENV_VARS.items():
        if env.get(var, "").strip():  # an empty variable counts as unset
            try:
                put(key, _check(key, _from_text(key, env[var])))
            except _Invalid as e:
                raise ConfigError(f"{var}: {e.reason}") from None

    if config_file is None and env.get(CONFIG_ENV_VAR):
        config_file = env[CONFIG_ENV_VAR]
    if config_file is not None:
        for key, value in _parse_file(Path(config_file).expanduser()).items():
            put(key, value)

    for key, value in (args or {}).items():
        if value is None:
            continue
        if key not in _TOP and key not in _NESTED:
            raise ConfigError(f"{_flag(key)}: not a configuration option")
        try:
            put(key, _check(key, value))
        except _Invalid as e:
            raise ConfigError(f"{_flag(key)}: {e.reason}") from None

    for name, section in _SECTIONS.items():
        if name in given:
            given[name] = section(**given[name])  # every value was checked on its way in
    return Config(**given)
