"""The ``schedulezero`` command: ``node``, ``replica``, ``handler``, ``up``, ``keys``, ``tokens``
and ``restore``, and the client commands ``schedules``, ``executions``, ``handlers``, ``cluster``,
``backup`` and ``scenario`` (calls on a node's HTTP API: mesh.client_commands,
mesh.backup_commands, mesh.scenario_commands; docs/cli.md).

Any mistake on the command line or in the configuration ends with exit code 2 and exactly one
line on stderr (``schedulezero: error: ...``); ``--help`` works as usual.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from zmq.utils import z85

from mesh.api.auth import ROLES as API_ROLES
from mesh.api.auth import TokenFileError, create_token
from mesh.backup import BackupError
from mesh.backup_commands import add_backup_commands
from mesh.client import ApiError, ClientConfigError
from mesh.client_commands import EXIT_API, add_client_commands
from mesh.config import (
    DISCOVERY_MODES,
    Config,
    ConfigError,
    load_config,
    parse_http_address,
    parse_mesh_address,
)
from mesh.membership.discovery import DiscoveryError
from mesh.scenario_commands import add_scenario_commands
from mesh.scheduling.controls import MAX_TAGS, parse_tag
from mesh.security.keys import (
    ROLES,
    KeyFileError,
    KeyRing,
    check_name,
    check_zone,
    create_key,
    load_certificates,
)
from mesh.security.policy import InsecureStart

__all__ = ["UsageError", "build_parser", "main"]

PROG = "schedulezero"
EXIT_USAGE = 2


class UsageError(Exception):
    """A user mistake on the command line; the message is one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line and an exception, not a usage dump and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(" ".join(message.removeprefix("argument ").split()))


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seconds_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def _tag_arg(text: str) -> tuple[str, str]:
    try:
        return parse_tag(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mesh_arg(text: str) -> str:
    try:
        host, port = parse_mesh_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return f"tcp://{host}:{port}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="ScheduleZero Mesh: a leader-elected, replicated job scheduler.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    node = sub.add_parser(
        "node",
        help="run one mesh node",
        description="Run one mesh node. Precedence: defaults < SCHEDULEZERO_* environment "
        "< --config file < flags. The node binds the mesh port and the next one (PUB).",
        allow_abbrev=False,
    )
    node.add_argument("--config", metavar="FILE", help="YAML config file ($SCHEDULEZERO_CONFIG)")
    node.add_argument("--node-id", metavar="ID", help="unique node name (default HOSTNAME-PORT)")
    node.add_argument("--data-dir", metavar="DIR", help="state directory (default ./data/ID)")
    node.add_argument("--mesh", metavar="tcp://HOST:PORT", help="mesh bind address (uses PORT+1)")
    node.add_argument("--advertise-mesh", metavar="tcp://HOST:PORT", help="address peers dial")
    node.add_argument("--http", metavar="HOST:PORT", help="HTTP API bind address")
    node.add_argument("--advertise-http", metavar="HOST:PORT", help="HTTP address others use")
    node.add_argument(
        "--peer",
        dest="peers",
        action="append",
        metavar="tcp://HOST:PORT",
        help="mesh address of another node (repeatable)",
    )
    node.add_argument(
        "--discovery", choices=DISCOVERY_MODES, help="static (default), mdns or dns (--dns-name)"
    )
    node.add_argument(
        "--dns-name",
        metavar="NAME",
        help="discovery dns: resolve NAME's A records (a headless Service) for peers",
    )
    node.add_argument(
        "--dns-port", type=_int_arg, metavar="PORT", help="mesh port of DNS peers (default: ours)"
    )
    node.add_argument(
        "--dns-srv",
        action="store_true",
        default=None,
        help="ask for SRV _schedulezero._tcp.NAME (host and port) instead of A records",
    )
    node.add_argument(
        "--dns-server", metavar="IP[:PORT]", help="DNS server to ask (default: the system's)"
    )
    node.add_argument(
        "--dns-interval", type=_seconds_arg, metavar="SECONDS", help="re-resolve every SECONDS (10)"
    )
    node.add_argument(
        "--tasks", action="append", metavar="MODULE", help="module with @mesh.task functions"
    )
    node.add_argument(
        "--bootstrap-expect",
        type=_int_arg,
        metavar="N",
        help="voters to wait for before the first election of a new cluster",
    )
    node.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    _security_flags(node, "NODE_ID")
    node.add_argument(
        "--api-tokens",
        metavar="FILE",
        help="HTTP API tokens file (schedulezero tokens create); without it the API binds "
        "loopback only ($SCHEDULEZERO_API_TOKENS)",
    )
    node.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve HTTPS: certificate chain, PEM ($SCHEDULEZERO_TLS_CERT)",
    )
    node.add_argument(
        "--tls-key", metavar="FILE", help="serve HTTPS: private key, PEM ($SCHEDULEZERO_TLS_KEY)"
    )
    node.set_defaults(func=_cmd_node)

    replica = sub.add_parser(
        "replica",
        help="run a read-only replica that follows its zone's change feed (docs/zones.md)",
        description="Run a read-only replica: it follows the zone-filtered change feed of any "
        "voter among --upstream, keeps a durable copy in --data-dir and serves every GET of the "
        "API from it; every mutation answers 403.",
        allow_abbrev=False,
    )
    replica.add_argument(
        "--node-id", required=True, metavar="ID", help="the replica's name (its key's name)"
    )
    replica.add_argument(
        "--upstream",
        dest="upstreams",
        action="append",
        required=True,
        type=_mesh_arg,
        metavar="tcp://HOST:PORT",
        help="a voter's mesh address (repeatable; the replica fails over between them)",
    )
    replica.add_argument(
        "--zone", required=True, metavar="NAME", help="the zone of the replica's key"
    )
    replica.add_argument("--http", required=True, metavar="HOST:PORT", help="HTTP API bind address")
    replica.add_argument("--data-dir", metavar="DIR", help="local copy (default ./data/ID)")
    replica.add_argument("--log-level", default="INFO", metavar="LEVEL")
    _security_flags(replica, "ID")
    replica.add_argument(
        "--api-tokens",
        metavar="FILE",
        help="HTTP API tokens file; without it the API binds loopback only unless --insecure "
        "or --anonymous-reads",
    )
    replica.add_argument(
        "--anonymous-reads",
        action="store_true",
        help="serve GETs without a token, as a 'read' caller (sensitive values masked); "
        "without --api-tokens the API may then bind any address (docs/zones.md)",
    )
    replica.set_defaults(func=_cmd_replica)

    handler = sub.add_parser(
        "handler",
        help="run a handler process that executes tasks for the mesh",
        allow_abbrev=False,
    )
    handler.add_argument(
        "--mesh",
        dest="mesh",
        action="append",
        required=True,
        type=_mesh_arg,
        metavar="tcp://HOST:PORT",
        help="a node's mesh address (repeatable)",
    )
    handler.add_argument(
        "--tasks", action="append", required=True, metavar="MODULE", help="task module"
    )
    handler.add_argument("--handler-id", metavar="ID", help="handler name (default generated)")
    handler.add_argument("--concurrency", type=_int_arg, default=4, metavar="N")
    handler.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        type=_tag_arg,
        metavar="KEY=VALUE",
        help="a tag schedules can target (target.tags); repeatable",
    )
    handler.add_argument("--log-level", default="INFO", metavar="LEVEL")
    _security_flags(handler, "HANDLER_ID")
    handler.set_defaults(func=_cmd_handler)

    up = sub.add_parser(
        "up",
        help="run a local development mesh (N nodes + M handlers) until Ctrl-C",
        allow_abbrev=False,
    )
    up.add_argument("--nodes", type=_int_arg, default=3, metavar="N")
    up.add_argument("--handlers", type=_int_arg, default=0, metavar="M")
    up.add_argument("--base-port", type=_int_arg, default=7100, metavar="PORT")
    up.add_argument("--http-base-port", type=_int_arg, default=8100, metavar="PORT")
    up.add_argument("--data-dir", default="data/up", metavar="DIR")
    up.add_argument("--tasks", action="append", default=[], metavar="MODULE")
    up.add_argument("--discovery", choices=("static", "mdns"), default="static")
    up.add_argument("--log-level", metavar="LEVEL")
    up.add_argument("--no-sample", dest="sample", action="store_false", help="no sample schedule")
    up.set_defaults(func=_cmd_up)

    keys = sub.add_parser(
        "keys",
        help="create and list CURVE keys (docs/security.md)",
        description="CURVE keys of the mesh: DIR/NAME.key (public, with the role) and "
        "DIR/NAME.key_secret (mode 0600). Give every process that must trust a key a copy of "
        "its .key file; keep each .key_secret on its own host only.",
        allow_abbrev=False,
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = keys_sub.add_parser(
        "create", help="create the key pair of one node, handler or replica", allow_abbrev=False
    )
    create.add_argument("name", metavar="NAME", help="the node id, handler id or replica id")
    create.add_argument("--role", required=True, choices=ROLES, help="what the key may do")
    create.add_argument("--dir", required=True, metavar="DIR", help="key directory")
    create.add_argument(
        "--zone",
        metavar="ZONE",
        help="a replica's zone: the voters serve it that zone's filter (docs/zones.md)",
    )
    create.set_defaults(func=_cmd_keys_create)
    listing = keys_sub.add_parser(
        "list", help="the public certificates in DIR: name, role, fingerprint", allow_abbrev=False
    )
    listing.add_argument("--dir", required=True, metavar="DIR", help="key directory")
    listing.set_defaults(func=_cmd_keys_list)

    tokens = sub.add_parser(
        "tokens",
        help="create HTTP API tokens (docs/security.md)",
        description="HTTP API bearer tokens. The tokens file stores only a hash of each token; "
        "give every node the same file (--api-tokens FILE). Running nodes re-read it when it "
        "changes.",
        allow_abbrev=False,
    )
    tokens_sub = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    tcreate = tokens_sub.add_parser(
        "create",
        help="add a token to FILE (created mode 0600) and print it on stdout",
        allow_abbrev=False,
    )
    tcreate.add_argument("name", metavar="NAME", help="who uses the token (shown in the audit)")
    tcreate.add_argument("--role", required=True, choices=API_ROLES, help="what it may do")
    tcreate.add_argument("--file", required=True, metavar="FILE", help="tokens file")
    tcreate.set_defaults(func=_cmd_tokens_create)
    add_client_commands(sub)
    add_backup_commands(sub)
    add_scenario_commands(sub)
    return parser


def _security_flags(parser: argparse.ArgumentParser, id_name: str) -> None:
    parser.add_argument(
        "--keys",
        metavar="DIR",
        help=f"CURVE key directory: DIR/{id_name}.key_secret, trusting DIR/*.key "
        "($SCHEDULEZERO_KEYS)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="without --keys (or, for a node's HTTP API, without --api-tokens), run "
        "unauthenticated even on non-loopback addresses ($SCHEDULEZERO_INSECURE)",
    )


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Job arguments appear in handler logs too: mask sensitive keys as a node's logs do.
    from mesh.observability.logredact import install

    install()


_NODE_KEYS = (
    "node_id",
    "data_dir",
    "mesh",
    "advertise_mesh",
    "http",
    "advertise_http",
    "peers",
    "discovery",
    "tasks",
    "bootstrap_expect",
    "log_level",
)


def node_config(ns: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """The ``Config`` a ``schedulezero node`` command line gives: its flags over its --config
    file over ``env``. Public so that a deployment's own command lines (the Kubernetes
    manifests' container args) can be checked exactly as the node will read them."""
    args: dict[str, Any] = {key: getattr(ns, key) for key in _NODE_KEYS}
    args["security.keys"] = ns.keys
    args["security.insecure"] = ns.insecure
    args["security.api_tokens"] = ns.api_tokens
    args["security.tls_cert"] = ns.tls_cert
    args["security.tls_key"] = ns.tls_key
    for key in ("name", "port", "srv", "server", "interval"):
        args[f"dns.{key}"] = getattr(ns, f"dns_{key}")
    return load_config(args, config_file=ns.config, env=env)


def _cmd_node(ns: argparse.Namespace) -> int:
    config = node_config(ns, os.environ)
    _setup_logging(config.log_level)
    try:
        from mesh.app import run_node
    except ModuleNotFoundError as e:
        if e.name not in ("mesh.node",):
            raise
        raise UsageError("node: not available in this build") from None
    return run_node(config)


def _cmd_replica(ns: argparse.Namespace) -> int:
    from mesh.zones.replica_app import ReplicaOptions, run_replica

    try:
        check_name(ns.node_id)
    except KeyFileError as e:
        raise UsageError(f"--node-id: {e}") from None
    try:
        check_zone(ns.zone)
    except KeyFileError as e:
        raise UsageError(f"--zone: {e}") from None
    try:
        host, port = parse_http_address(ns.http, bind=True)
    except ValueError as e:
        raise UsageError(f"--http: {e}") from None
    # The node's checks of the level and the paths (an empty one is refused).
    checked = load_config(
        {
            "log_level": ns.log_level,
            "data_dir": ns.data_dir,
            "security.keys": ns.keys,
            "security.api_tokens": ns.api_tokens,
        },
        env={},
    )
    opts = ReplicaOptions(
        replica_id=ns.node_id,
        zone=ns.zone,
        upstreams=tuple(dict.fromkeys(ns.upstreams)),
        http=f"{host}:{port}",
        data_dir=checked.data_dir if ns.data_dir else Path("data") / ns.node_id,
        keys=checked.security.keys,
        insecure=bool(ns.insecure),
        api_tokens=checked.security.api_tokens,
        anonymous_reads=ns.anonymous_reads,
    )
    _setup_logging(checked.log_level)
    return run_replica(opts)


# The only settings a handler takes from the environment: a node's others are not its own.
_HANDLER_ENV = ("SCHEDULEZERO_KEYS", "SCHEDULEZERO_INSECURE")


def _cmd_handler(ns: argparse.Namespace) -> int:
    # Reuse the node's validation of module names, ids and the security settings.
    config_args: dict[str, Any] = {
        "tasks": ns.tasks,
        "log_level": ns.log_level,
        "security.keys": ns.keys,
        "security.insecure": ns.insecure,
    }
    if ns.handler_id is not None:
        config_args["node_id"] = ns.handler_id
    env = {var: os.environ[var] for var in _HANDLER_ENV if var in os.environ}
    try:
        checked = load_config(config_args, env=env)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--node-id", "--handler-id")) from None
    if ns.concurrency < 1:
        raise UsageError(f"--concurrency: must be at least 1, got {ns.concurrency}")
    tags = _tags(ns.tags)
    if checked.security.keys is not None:
        if ns.handler_id is None:
            raise UsageError("--keys: needs --handler-id, the name of the handler's key")
        _key_ring(checked.security.keys, ns.handler_id, "handler")  # say what is wrong, early
    try:
        from mesh.dispatch.handler import run_handler
    except ModuleNotFoundError as e:
        if e.name not in ("mesh.dispatch", "mesh.dispatch.handler"):
            raise
        raise UsageError("handler: not available in this build") from None
    _setup_logging(checked.log_level)
    try:
        return run_handler(
            list(dict.fromkeys(ns.mesh)),
            list(checked.tasks),
            ns.handler_id,
            ns.concurrency,
            keys_dir=checked.security.keys,
            insecure=checked.security.insecure,
            tags=tags,
        )
    except (KeyFileError, InsecureStart) as e:  # raised before the handler starts
        raise UsageError(str(e)) from None


def _tags(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """``--tag`` pairs as a handler's tags: at most ``MAX_TAGS``, each key once."""
    tags: dict[str, str] = {}
    for key, value in pairs:
        if tags.get(key, value) != value:
            raise UsageError(f"--tag: {key} given twice ({tags[key]} and {value})")
        tags[key] = value
    if len(tags) > MAX_TAGS:
        raise UsageError(f"--tag: at most {MAX_TAGS} tags, got {len(tags)}")
    return tags


def _key_ring(directory: Path, name: str, role: str) -> KeyRing:
    """The key ring of a process named ``name`` that must hold a ``role`` key; UsageError if not."""
    try:
        ring = KeyRing(directory, name)
    except KeyFileError as e:
        raise UsageError(f"--keys: {e}") from None
    if ring.role != role:
        raise UsageError(
            f"--keys: {directory / (name + '.key')} has role {ring.role!r}; "
            f"a {role} needs a {role!r} key (schedulezero keys create {name} --role {role})"
        )
    return ring


def _cmd_keys_create(ns: argparse.Namespace) -> int:
    if ns.zone is not None:
        if ns.role != "replica":
            raise UsageError(f"--zone: only a replica key has a zone (this is a {ns.role} key)")
        try:
            check_zone(ns.zone)
        except KeyFileError as e:
            raise UsageError(f"--zone: {e}") from None
    try:
        public, secret = create_key(ns.dir, ns.name, ns.role, zone=ns.zone)
    except KeyFileError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--dir: cannot write keys in {ns.dir}: {e.strerror or e}") from None
    what = f"{ns.role}, zone {ns.zone}" if ns.zone is not None else ns.role
    print(f"created {public} (public, {what}) and {secret} (secret, mode 600)")
    return 0


def _cmd_keys_list(ns: argparse.Namespace) -> int:
    directory = Path(ns.dir)
    if not directory.is_dir():
        raise UsageError(f"--dir: {directory} is not a directory")
    for cert in load_certificates(directory).values():
        # The public key itself (Z85, as in the .key file) is the fingerprint to compare.
        secret = "secret" if (directory / f"{cert.name}.key_secret").exists() else "-"
        print(f"{cert.name}\t{cert.role}\t{z85.encode(cert.public).decode()}\t{secret}")
    return 0


def _cmd_tokens_create(ns: argparse.Namespace) -> int:
    try:
        token = create_token(ns.file, ns.name, ns.role)
    except TokenFileError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--file: cannot write {ns.file}: {e.strerror or e}") from None
    print(token)  # the token and nothing else: `TOKEN=$(schedulezero tokens create ...)`
    return 0


def _cmd_up(ns: argparse.Namespace) -> int:
    from mesh.governor import UpOptions, run_up

    checked = load_config(
        {"tasks": ns.tasks or None, "log_level": ns.log_level}, env={}
    )  # validates module names and the level
    _setup_logging(checked.log_level if ns.log_level else "INFO")
    opts = UpOptions(
        nodes=ns.nodes,
        handlers=ns.handlers,
        base_port=ns.base_port,
        http_base_port=ns.http_base_port,
        data_dir=Path(ns.data_dir),
        tasks=checked.tasks,
        sample=ns.sample,
        discovery=ns.discovery,
        log_level=checked.log_level if ns.log_level else None,
    )
    return run_up(opts)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``schedulezero`` console script; returns the exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except UsageError as e:
        return _fail(str(e))
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    try:
        return int(ns.func(ns) or 0)
    except (UsageError, ConfigError, ClientConfigError, BackupError) as e:
        return _fail(str(e))
    except DiscoveryError as e:
        _fail(str(e))
        return 1
    except ApiError as e:  # the API's own message, one line (docs/cli.md "Exit codes")
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_API
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
