"""Node configuration: one frozen ``Config`` built from four layers.

Precedence, lowest to highest (each layer replaces, never merges, the values below it; lists such
as ``peers`` are replaced whole):

1. built-in defaults (the attrs defaults below),
2. ``SCHEDULEZERO_*`` environment variables,
3. the YAML config file (``--config FILE``, else ``$SCHEDULEZERO_CONFIG``),
4. command-line flags.

Every mistake a user can make raises ``ConfigError`` whose message is one line naming the flag,
environment variable or ``FILE: key`` at fault and what is wrong with it. See docs/configuration.md.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

__all__ = [
    "DISCOVERY_MODES",
    "ENV_PREFIX",
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "EventLogSettings",
    "MembershipSettings",
    "RaftSettings",
    "load_config",
    "parse_http_address",
    "parse_mesh_address",
    "pub_address_of",
]

ENV_PREFIX = "SCHEDULEZERO_"
DISCOVERY_MODES = ("static", "mdns")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_MESH = "tcp://127.0.0.1:7100"
DEFAULT_HTTP = "127.0.0.1:8100"
DEFAULT_MDNS_SERVICE = "_schedulezero._tcp.local."
MDNS_BOOTSTRAP_EXPECT = 3
MiB = 1024 * 1024

_NODE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
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


# --------------------------------------------------------------------------- sections


@attrs.frozen(kw_only=True)
class RaftSettings:
    """Raft timing and limits; times are in seconds."""

    heartbeat_interval: float = 0.1
    election_timeout_min: float = 0.3
    election_timeout_max: float = 0.6
    snapshot_threshold: int = 10_000  # log entries since the last snapshot
    max_append_entries: int = 512  # entries per AppendEntries message
    check_quorum: bool = True
    pre_vote: bool = True


@attrs.frozen(kw_only=True)
class MembershipSettings:
    """Failure-detector timing (seconds)."""

    ping_interval: float = 0.5
    suspect_after: float = 1.5
    dead_after: float = 3.0
    # Add a node that pings us but is not in our peer set (so one --peer is enough to join).
    # Off when every link must go through a known address, e.g. a proxy per link in chaos tests.
    learn_peers: bool = True


@attrs.frozen(kw_only=True)
class DispatchSettings:
    """How the leader hands jobs to handler processes (seconds)."""

    max_attempts: int = 4  # dispatch attempts per job: first try + retries on other handlers
    ack_timeout: float = 1.0  # a handler must acknowledge a dispatch within this
    default_timeout: float | None = None  # per-job run time limit; None = unlimited
    task_timeouts: dict[str, float] = attrs.Factory(dict)  # task name -> run time limit
    no_handler_wait: float = 30.0  # jobs without a start deadline wait this long for a handler
    redispatch_wait: float = 10.0  # a new leader waits this long for a job's assigned handler


@attrs.frozen(kw_only=True)
class GovernorSettings:
    """Rate limits (dispatches/s), concurrency limits (jobs in flight) and backpressure."""

    rate: float | None = None
    task_rates: dict[str, float] = attrs.Factory(dict)
    handler_rates: dict[str, float] = attrs.Factory(dict)
    burst: float | None = None  # token-bucket size; default 1 (evenly spaced)
    concurrency: int | None = None
    task_concurrency: dict[str, int] = attrs.Factory(dict)
    max_queued_jobs: int = 10_000  # POST /api/jobs answers 429 beyond this


@attrs.frozen(kw_only=True)
class HistorySettings:
    """Retention of the replicated execution history and run-now results."""

    max_executions: int = 10_000
    max_results: int = 10_000


@attrs.frozen(kw_only=True)
class EventLogSettings:
    """Rotation of the JSONL event log."""

    max_bytes: int = 10 * MiB
    backups: int = 5


# --------------------------------------------------------------------------- Config


@attrs.frozen(kw_only=True)
class Config:
    """Everything a node needs to know at start-up. Build it with ``load_config``.

    Fields whose default depends on another field (``node_id``, ``data_dir``,
    ``advertise_mesh``, ``advertise_http``, ``bootstrap_expect``) are derived at construction, so
    on a built ``Config`` they are never ``None``.
    """

    mesh: str = DEFAULT_MESH
    advertise_mesh: str = attrs.field(
        default=attrs.Factory(lambda self: _advertise(self.mesh, "tcp://"), takes_self=True)
    )
    http: str = DEFAULT_HTTP
    advertise_http: str = attrs.field(
        default=attrs.Factory(lambda self: _advertise(self.http, ""), takes_self=True)
    )
    node_id: str = attrs.field(
        default=attrs.Factory(lambda self: _default_node_id(self.mesh), takes_self=True)
    )
    data_dir: Path = attrs.field(
        default=attrs.Factory(lambda self: Path("data") / self.node_id, takes_self=True),
        converter=lambda p: Path(p).expanduser(),
    )
    peers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    discovery: str = "static"
    bootstrap_expect: int = attrs.field(
        default=attrs.Factory(lambda self: self._default_bootstrap_expect(), takes_self=True)
    )
    tasks: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    raft: RaftSettings = attrs.Factory(RaftSettings)
    membership: MembershipSettings = attrs.Factory(MembershipSettings)
    dispatch: DispatchSettings = attrs.Factory(DispatchSettings)
    governors: GovernorSettings = attrs.Factory(GovernorSettings)
    history: HistorySettings = attrs.Factory(HistorySettings)
    eventlog: EventLogSettings = attrs.Factory(EventLogSettings)
    max_frame_bytes: int = 16 * MiB
    log_level: str = "INFO"
    mdns_service: str = DEFAULT_MDNS_SERVICE

    def __attrs_post_init__(self) -> None:
        # Our own address in the peer list is dropped, so every node of a cluster can share one
        # identical peer list; duplicates are dropped too (first occurrence wins).
        own = {self.advertise_mesh, self.mesh}
        peers = tuple(dict.fromkeys(p for p in self.peers if p not in own))
        object.__setattr__(self, "peers", peers)
        _check_relations(self)

    def _default_bootstrap_expect(self) -> int:
        if self.discovery == "mdns":
            return MDNS_BOOTSTRAP_EXPECT
        own = {self.advertise_mesh, self.mesh}
        return len({p for p in self.peers if p not in own}) + 1

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

        def conv(_inst: Any, _field: Any, value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return list(value)
            return value

        return attrs.asdict(self, value_serializer=conv)


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
    mesh_host, mesh_port = c.mesh_host_port
    http_host, http_port = c.http_host_port
    if http_port in (mesh_port, mesh_port + 1) and (
        mesh_host == http_host or "0.0.0.0" in (mesh_host, http_host)
    ):
        raise ConfigError(
            f"http port {http_port} collides with the mesh ports {mesh_port}-{mesh_port + 1}"
        )


# --------------------------------------------------------------------------- field parsers
# Each parser takes a value already of the YAML/CLI kind (or text from the environment, see
# _from_text) and returns the typed value, raising ValueError with the bare reason.


def _type_name(v: Any) -> str:
    return {str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(v), type(v).__name__
    )


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_type_name(v)} {v!r}")
    return v


def _int_at_least(lo: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {_type_name(v)} {v!r}")
        if v < lo:
            raise ValueError(f"must be at least {lo}, got {v}")
        return v

    return parse


def _positive_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number of seconds, got {_type_name(v)} {v!r}")
    if not v > 0:
        raise ValueError(f"must be greater than 0, got {v}")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_type_name(v)} {v!r}")
    return v


def _node_id(v: Any) -> str:
    v = _str(v)
    if not _NODE_ID_RE.fullmatch(v):
        raise ValueError(f"expected 1-64 characters from A-Z a-z 0-9 _ . -, got {v!r}")
    return v


def _path(v: Any) -> Path:
    if isinstance(v, Path):
        return v
    if not _str(v):
        raise ValueError("must not be empty")
    return Path(v).expanduser()


def _mesh_bind(v: Any) -> str:
    host, port = parse_mesh_address(_str(v), bind=True)
    return f"tcp://{host}:{port}"


def _mesh_peer(v: Any) -> str:
    host, port = parse_mesh_address(_str(v))
    return f"tcp://{host}:{port}"


def _http_bind(v: Any) -> str:
    host, port = parse_http_address(_str(v), bind=True)
    return f"{host}:{port}"


def _http_peer(v: Any) -> str:
    host, port = parse_http_address(_str(v))
    return f"{host}:{port}"


def _list_of(item: Callable[[Any], str]) -> Callable[[Any], tuple[str, ...]]:
    def parse(v: Any) -> tuple[str, ...]:
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        if not isinstance(v, list | tuple):
            raise ValueError(f"expected a list, got {_type_name(v)} {v!r}")
        return tuple(dict.fromkeys(item(x) for x in v))

    return parse


def _module(v: Any) -> str:
    v = _str(v)
    if not _MODULE_RE.fullmatch(v):
        raise ValueError(f"expected a Python module name like 'package.tasks', got {v!r}")
    return v


def _discovery(v: Any) -> str:
    v = _str(v)
    if v not in DISCOVERY_MODES:
        raise ValueError(f"expected one of {', '.join(DISCOVERY_MODES)}, got {v!r}")
    return v


def _log_level(v: Any) -> str:
    v = _str(v).upper()
    if v not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {v!r}")
    return v


def _mdns_service(v: Any) -> str:
    v = _str(v)
    if not re.fullmatch(r"_[A-Za-z0-9-]{1,15}\._(tcp|udp)\.local\.", v):
        raise ValueError(f"expected a service type like '_schedulezero._tcp.local.', got {v!r}")
    return v


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else parse(v)


def _mapping_of(parse: Callable[[Any], Any]) -> Callable[[Any], dict[str, Any]]:
    def convert(v: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping of task/handler name to a value, got {v!r}")
        out = {}
        for k, item in v.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"keys must be non-empty names, got {k!r}")
            try:
                out[k] = parse(item)
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
        return out

    return convert


_TOP: dict[str, Callable[[Any], Any]] = {
    "node_id": _node_id,
    "data_dir": _path,
    "mesh": _mesh_bind,
    "advertise_mesh": _mesh_peer,
    "http": _http_bind,
    "advertise_http": _http_peer,
    "peers": _list_of(_mesh_peer),
    "discovery": _discovery,
    "bootstrap_expect": _int_at_least(1),
    "tasks": _list_of(_module),
    "max_frame_bytes": _int_at_least(1024),
    "log_level": _log_level,
    "mdns_service": _mdns_service,
}
_SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any], Any]]]] = {
    "raft": (
        RaftSettings,
        {
            "heartbeat_interval": _positive_float,
            "election_timeout_min": _positive_float,
            "election_timeout_max": _positive_float,
            "snapshot_threshold": _int_at_least(1),
            "max_append_entries": _int_at_least(1),
            "check_quorum": _bool,
            "pre_vote": _bool,
        },
    ),
    "membership": (
        MembershipSettings,
        {
            "ping_interval": _positive_float,
            "suspect_after": _positive_float,
            "dead_after": _positive_float,
            "learn_peers": _bool,
        },
    ),
    "dispatch": (
        DispatchSettings,
        {
            "max_attempts": _int_at_least(1),
            "ack_timeout": _positive_float,
            "default_timeout": _optional(_positive_float),
            "task_timeouts": _mapping_of(_positive_float),
            "no_handler_wait": _positive_float,
            "redispatch_wait": _positive_float,
        },
    ),
    "governors": (
        GovernorSettings,
        {
            "rate": _optional(_positive_float),
            "task_rates": _mapping_of(_positive_float),
            "handler_rates": _mapping_of(_positive_float),
            "burst": _optional(_positive_float),
            "concurrency": _optional(_int_at_least(1)),
            "task_concurrency": _mapping_of(_int_at_least(1)),
            "max_queued_jobs": _int_at_least(1),
        },
    ),
    "history": (
        HistorySettings,
        {"max_executions": _int_at_least(1), "max_results": _int_at_least(1)},
    ),
    "eventlog": (
        EventLogSettings,
        {"max_bytes": _int_at_least(1024), "backups": _int_at_least(0)},
    ),
}

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
}
CONFIG_ENV_VAR = "SCHEDULEZERO_CONFIG"

# Field → the command-line flag that sets it (for error messages).
FLAGS: dict[str, str] = {
    "peers": "--peer",
    "config": "--config",
}


def _flag(key: str) -> str:
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def _from_text(key: str, text: str) -> Any:
    """Environment values are strings; turn numbers into numbers before the common parser."""
    if key in ("bootstrap_expect", "max_frame_bytes"):
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
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


def _unknown(where: str, key: Any, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _parse_file(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    data, lines = _read_yaml(path)

    def where(*keys: str) -> str:
        line = lines.get(keys)
        return f"{path}:{line}" if line else str(path)

    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            _, parsers = _SECTIONS[key]
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where(key)}: {key}: expected a mapping, got {_type_name(value)} {value!r}"
                )
            sec = sections.setdefault(key, {})
            for sub, subvalue in value.items():
                if sub not in parsers:
                    raise _unknown(where(key, str(sub)), f"{key}.{sub}", parsers)
                try:
                    sec[sub] = parsers[sub](subvalue)
                except ValueError as e:
                    raise ConfigError(f"{where(key, sub)}: {key}.{sub}: {e}") from None
        elif key in _TOP:
            if value is None:
                continue
            try:
                top[key] = _TOP[key](value)
            except ValueError as e:
                raise ConfigError(f"{where(key)}: {key}: {e}") from None
        else:
            raise _unknown(where(str(key)), key, [*_TOP, *_SECTIONS])
    return top, sections


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
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}

    for var, key in ENV_VARS.items():
        if env.get(var, "").strip():  # an empty variable counts as unset
            try:
                top[key] = _TOP[key](_from_text(key, env[var]))
            except ValueError as e:
                raise ConfigError(f"{var}: {e}") from None

    if config_file is None and env.get(CONFIG_ENV_VAR):
        config_file = env[CONFIG_ENV_VAR]
    if config_file is not None:
        file_top, sections = _parse_file(Path(config_file).expanduser())
        top.update(file_top)

    for key, value in (args or {}).items():
        if value is None:
            continue
        if key not in _TOP:
            raise ConfigError(f"{_flag(key)}: not a configuration option")
        try:
            top[key] = _TOP[key](value)
        except ValueError as e:
            raise ConfigError(f"{_flag(key)}: {e}") from None

    built = {name: cls(**sections.get(name, {})) for name, (cls, _) in _SECTIONS.items()}
    return Config(**top, **built)
