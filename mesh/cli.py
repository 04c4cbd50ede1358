"""The ``schedulezero`` command: ``node``, ``replica``, ``handler``, ``up``, ``keys`` and
``tokens``, and the client commands ``schedules``, ``executions``, ``handlers`` and ``cluster``
(calls on a node's HTTP API through mesh.client; docs/cli.md).

Any mistake on the command line or in the configuration ends with exit code 2 and exactly one
line on stderr (``schedulezero: error: ...``); ``--help`` works as usual.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import yaml
from zmq.utils import z85

from mesh.api.auth import ROLES as API_ROLES
from mesh.api.auth import TokenFileError, create_token
from mesh.client import (
    DEFAULT_URL,
    ApiClient,
    ApiError,
    ClientConfigError,
    describe_trigger,
    format_table,
    short_time,
)
from mesh.config import (
    DISCOVERY_MODES,
    ConfigError,
    load_config,
    parse_http_address,
    parse_mesh_address,
)
from mesh.membership.discovery import DiscoveryError
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
    node.add_argument("--discovery", choices=DISCOVERY_MODES, help="static (default) or mdns")
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
    up.add_argument("--discovery", choices=DISCOVERY_MODES, default="static")
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
    _add_client_commands(sub)
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


def _cmd_node(ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {key: getattr(ns, key) for key in _NODE_KEYS}
    args["security.keys"] = ns.keys
    args["security.insecure"] = ns.insecure
    args["security.api_tokens"] = ns.api_tokens
    args["security.tls_cert"] = ns.tls_cert
    args["security.tls_key"] = ns.tls_key
    config = load_config(args, config_file=ns.config, env=os.environ)
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
        )
    except (KeyFileError, InsecureStart) as e:  # raised before the handler starts
        raise UsageError(str(e)) from None


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


# --------------------------------------------------------------------------- client commands
# `schedules`, `executions`, `handlers`, `cluster`: calls on a node's HTTP API (docs/cli.md).
# Exit codes: 0 done, 1 the API refused or could not be reached (its message on stderr, one
# line), 2 a usage mistake.

EXIT_API = 1
OUTPUTS = ("table", "json")


def _client_flags() -> argparse.ArgumentParser:
    """The flags every client command takes, after its own name (``schedules list -o json``)."""
    flags = _Parser(add_help=False)
    flags.add_argument(
        "--url",
        metavar="URL",
        help=f"the node's HTTP API ($SCHEDULEZERO_URL, default {DEFAULT_URL})",
    )
    flags.add_argument("--token", metavar="TOKEN", help="API bearer token ($SCHEDULEZERO_TOKEN)")
    flags.add_argument(
        "--cacert", metavar="FILE", help="PEM CA to trust for https ($SCHEDULEZERO_CACERT)"
    )
    flags.add_argument("-o", "--output", choices=OUTPUTS, default="table", help="table or json")
    return flags


def _add_client_commands(sub: Any) -> None:
    common = _client_flags()

    def leaf(parent: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, parents=[common], allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    schedules = sub.add_parser(
        "schedules", help="list, show, create, apply, pause, resume, delete schedules"
    )
    actions = schedules.add_subparsers(dest="schedules_command", metavar="ACTION", required=True)
    leaf(actions, "list", "every schedule (all pages)", _cmd_schedules_list)
    leaf(actions, "get", "one schedule", _cmd_schedules_get).add_argument("id", metavar="ID")
    for name, verb in (("create", "create"), ("apply", "create or replace")):
        p = leaf(
            actions, name, f"{verb} the schedule(s) in FILE (JSON or YAML)", _cmd_schedules_put
        )
        p.add_argument(
            "-f", "--file", required=True, metavar="FILE", help="a schedule or a list; - = stdin"
        )
    pause = leaf(actions, "pause", "pause a schedule", _cmd_schedules_pause)
    pause.add_argument("id", metavar="ID")
    pause.add_argument("--note", metavar="TEXT", help="why it is paused")
    leaf(actions, "resume", "resume a paused schedule", _cmd_schedules_resume).add_argument(
        "id", metavar="ID"
    )
    leaf(actions, "delete", "delete a schedule", _cmd_schedules_delete).add_argument(
        "id", metavar="ID"
    )
    leaf(actions, "trigger", "run one fire now", _cmd_schedules_trigger).add_argument(
        "id", metavar="ID"
    )
    backfill = leaf(actions, "backfill", "run every fire time in [start, end)", _cmd_backfill)
    backfill.add_argument("id", metavar="ID")
    backfill.add_argument("--start", required=True, metavar="T", help="ISO-8601 date-time")
    backfill.add_argument("--end", required=True, metavar="T", help="ISO-8601 date-time")

    executions = leaf(sub, "executions", "the execution history, newest first", _cmd_executions)
    executions.add_argument("--schedule", metavar="ID", help="only this schedule's")
    executions.add_argument("--outcome", metavar="O", help="only this outcome (e.g. error)")
    executions.add_argument("--since", metavar="T", help="only those since this date-time")
    executions.add_argument("--limit", type=_int_arg, metavar="N", help="at most N")

    leaf(sub, "handlers", "the handlers and their state", _cmd_handlers)

    jobs = sub.add_parser("jobs", help="run a task once now, show a job", allow_abbrev=False)
    jactions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    run_job = leaf(jactions, "run", "run TASK once now; prints the job id", _cmd_jobs_run)
    run_job.add_argument("task", metavar="TASK")
    run_job.add_argument("--args", type=_json_arg(list), default=[], metavar="JSON")
    run_job.add_argument("--kwargs", type=_json_arg(dict), default={}, metavar="JSON")
    leaf(jactions, "get", "a job's status and result", _cmd_jobs_get).add_argument(
        "job_id", metavar="JOB_ID"
    )

    cluster = sub.add_parser("cluster", help="the mesh: leader, members, voters")
    cactions = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    leaf(cactions, "status", "leader, term, quorum and members", _cmd_cluster_status)
    leaf(cactions, "members", "the voters and every known node", _cmd_cluster_members)
    leaf(cactions, "add-member", "make a node a voter (admin)", _cmd_add_member).add_argument(
        "node_id", metavar="ID"
    )
    leaf(cactions, "remove-member", "remove a voter (admin)", _cmd_remove_member).add_argument(
        "node_id", metavar="ID"
    )


def _json_arg(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not JSON: {text[:40]!r}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}, got {text[:40]!r}")
        return value

    return parse


def _client(ns: argparse.Namespace) -> ApiClient:
    env = os.environ
    url = ns.url or env.get("SCHEDULEZERO_URL") or DEFAULT_URL
    token = ns.token or env.get("SCHEDULEZERO_TOKEN") or None
    cacert = ns.cacert or env.get("SCHEDULEZERO_CACERT") or None
    try:
        return ApiClient(url, token=token, cacert=cacert)
    except ClientConfigError as e:
        raise UsageError(str(e)) from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


_SCHEDULE_COLUMNS = ("id", "task", "trigger", "next fire", "paused")


def _schedule_row(s: dict[str, Any]) -> list[Any]:
    paused: Any = bool(s.get("paused"))
    if paused and s.get("note"):
        paused = f"yes: {s['note']}"
    return [
        s.get("id"),
        s.get("task"),
        describe_trigger(s.get("trigger")),
        short_time(s.get("next_fire_time")),
        paused,
    ]


def _cmd_schedules_list(ns: argparse.Namespace) -> int:
    items = _client(ns).schedules()
    if ns.output == "json":
        _print_json(items)
    else:
        print(format_table(_SCHEDULE_COLUMNS, [_schedule_row(s) for s in items]))
    return 0


def _cmd_schedules_get(ns: argparse.Namespace) -> int:
    s = _client(ns).schedule(ns.id)
    if ns.output == "json":
        _print_json(s)
        return 0
    rows = [
        ("id", s.get("id")),
        ("task", s.get("task")),
        ("trigger", describe_trigger(s.get("trigger"))),
        ("next fire", short_time(s.get("next_fire_time"))),
        ("last fire", short_time(s.get("last_fire_time"))),
        ("paused", _schedule_row(s)[4]),
        ("coalesce", s.get("coalesce")),
        ("misfire grace", s.get("misfire_grace_time")),
        ("args", json.dumps(s.get("args", []))),
        ("kwargs", json.dumps(s.get("kwargs", {}))),
        ("metadata", json.dumps(s.get("metadata", {}))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if value is None or isinstance(value, bool):
            value = "-" if value is None else "yes" if value else "no"
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def _read_schedules(source: str) -> tuple[list[dict[str, Any]], bool]:
    """The schedule bodies in ``source`` (a path, or ``-`` for stdin): a JSON or YAML object, a
    list of them, or several YAML documents; and whether the file held just one object."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"-f: cannot read {source}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"-f: {source} is not UTF-8 text") from None
    name = "stdin" if source == "-" else source
    try:
        docs = [json.loads(text)]
    except ValueError:
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise UsageError(f"-f: {name} is neither JSON nor YAML{at}") from None
    items: list[Any] = []
    for doc in docs:
        items.extend(doc if isinstance(doc, list) else [doc])
    if not items:
        raise UsageError(f"-f: {name} holds no schedule")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UsageError(f"-f: {name}: item {i + 1} is not an object (a schedule body)")
    single = len(docs) == 1 and isinstance(docs[0], dict)
    return items, single


def _cmd_schedules_put(ns: argparse.Namespace) -> int:
    bodies, single = _read_schedules(ns.file)
    client = _client(ns)
    done: list[dict[str, Any]] = []
    for i, body in enumerate(bodies):
        label = body.get("id") if isinstance(body.get("id"), str) else f"item {i + 1}"
        try:
            if ns.schedules_command == "apply":
                action, s = client.apply_schedule(body)
            else:
                action, s = "created", client.create_schedule(body)
        except ApiError as e:
            if len(bodies) > 1:  # say which one, and that the earlier ones are in
                raise ApiError(
                    f"{label}: {e} ({len(done)} of {len(bodies)} done)", e.status
                ) from None
            raise
        done.append(s)
        for warning in s.get("warnings") or []:
            print(f"{PROG}: warning: {s.get('id')}: {warning}", file=sys.stderr)
        if ns.output == "table":
            print(f"{action} {s.get('id')} (next fire {short_time(s.get('next_fire_time'))})")
    if ns.output == "json":
        _print_json(done[0] if single else done)
    return 0


def _print_schedule_change(ns: argparse.Namespace, s: Any, verb: str) -> None:
    if ns.output == "json":
        _print_json(s)
    else:
        print(f"{verb} {ns.id}")


def _cmd_schedules_pause(ns: argparse.Namespace) -> int:
    _print_schedule_change(ns, _client(ns).pause(ns.id, ns.note), "paused")
    return 0


def _cmd_schedules_resume(ns: argparse.Namespace) -> int:
    s = _client(ns).resume(ns.id)
    _print_schedule_change(ns, s, f"resumed (next fire {short_time(s.get('next_fire_time'))})")
    return 0


def _cmd_schedules_delete(ns: argparse.Namespace) -> int:
    _client(ns).delete_schedule(ns.id)
    _print_schedule_change(ns, {"id": ns.id, "deleted": True}, "deleted")
    return 0


def _not_offered(e: ApiError, what: str) -> ApiError:
    # A route this node does not have answers aiohttp's own 404/405, not the API's messages.
    if e.status in (404, 405) and str(e).split(": ", 1)[-1] in ("Not Found", "Method Not Allowed"):
        return ApiError(f"{e}: this node's API does not offer {what} (an older version?)", e.status)
    return e


def _cmd_schedules_trigger(ns: argparse.Namespace) -> int:
    try:
        answer = _client(ns).trigger(ns.id)
    except ApiError as e:
        raise _not_offered(e, "POST /api/schedules/{id}/trigger") from None
    _print_schedule_change(ns, answer, "triggered")
    return 0


def _cmd_backfill(ns: argparse.Namespace) -> int:
    try:
        answer = _client(ns).backfill(ns.id, ns.start, ns.end)
    except ApiError as e:
        raise _not_offered(e, "POST /api/schedules/{id}/backfill") from None
    _print_schedule_change(ns, answer, "backfill requested for")
    return 0


def _duration(ex: dict[str, Any]) -> str:
    try:
        started = datetime.fromisoformat(str(ex["started_at"]))
        finished = datetime.fromisoformat(str(ex["finished_at"]))
    except (KeyError, ValueError, TypeError):
        return "-"
    seconds = (finished - started).total_seconds()
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def _cmd_executions(ns: argparse.Namespace) -> int:
    if ns.limit is not None and ns.limit < 1:
        raise UsageError(f"--limit: must be at least 1, got {ns.limit}")
    items = _client(ns).executions(
        schedule_id=ns.schedule, outcome=ns.outcome, since=ns.since, limit=ns.limit or 0
    )
    if ns.output == "json":
        _print_json(items)
        return 0
    columns = ("job", "schedule", "outcome", "fire time", "duration", "handler", "try", "term")
    columns += ("error",)
    rows = [
        [
            ex.get("job_id"),
            ex.get("schedule_id"),
            ex.get("outcome"),
            short_time(ex.get("scheduled_fire_time") or ex.get("started_at")),
            _duration(ex),
            ex.get("handler_id"),
            ex.get("attempt"),
            ex.get("term"),
            ex.get("error"),
        ]
        for ex in items
    ]
    print(format_table(columns, rows))
    return 0


def _cmd_handlers(ns: argparse.Namespace) -> int:
    items = _client(ns).handlers()
    if ns.output == "json":
        _print_json(items)
        return 0
    columns = ("handler", "state", "tasks", "tags", "active", "ok", "failed", "avg ms")
    columns += ("last seen",)
    rows = [
        [
            h.get("handler_id"),
            h.get("state"),
            h.get("tasks"),
            h.get("tags"),
            h.get("active_jobs"),
            h.get("succeeded"),
            h.get("failed"),
            h.get("avg_ms"),
            short_time(h.get("last_seen")) if isinstance(h.get("last_seen"), str) else None,
        ]
        for h in items
    ]
    print(format_table(columns, rows))
    return 0


def _cmd_jobs_run(ns: argparse.Namespace) -> int:
    answer = _client(ns).run_job(ns.task, ns.args, ns.kwargs)
    for warning in answer.get("warnings") or []:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if ns.output == "json":
        _print_json(answer)
    else:
        print(answer.get("job_id"))  # alone, for `JOB=$(schedulezero jobs run ...)`
    return 0


def _cmd_jobs_get(ns: argparse.Namespace) -> int:
    status = _client(ns).job(ns.job_id)
    if ns.output == "json" or not isinstance(status, dict):
        _print_json(status)
        return 0
    width = max((len(k) for k in status), default=0)
    for key, value in status.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        print(f"{key + ':':<{width + 1}} {shown}")
    return 0


def _cmd_cluster_status(ns: argparse.Namespace) -> int:
    client = _client(ns)
    cluster, health = client.cluster(), client.health()
    if ns.output == "json":
        _print_json({**cluster, "node": health})
        return 0
    quorum = cluster.get("has_quorum", health.get("has_quorum"))
    print(
        f"leader: {cluster.get('leader_id') or '(none)'}  term: {cluster.get('term')}  "
        f"quorum: {'-' if quorum is None else 'yes' if quorum else 'no'}  "
        f"answered by: {health.get('node_id')} ({health.get('role')})"
    )
    columns = ("node", "role", "state", "voter", "http", "last seen")
    rows = [
        [
            m.get("node_id"),
            m.get("role"),
            m.get("state"),
            m.get("voter"),
            m.get("http_address"),
            short_time(m.get("last_seen")),
        ]
        for m in cluster.get("members", [])
    ]
    print(format_table(columns, rows))
    return 0


def _print_members(ns: argparse.Namespace, members: Any) -> None:
    if ns.output == "json":
        _print_json(members)
        return
    print(
        f"leader: {members.get('leader_id') or '(none)'}  term: {members.get('term')}  "
        f"voters: {', '.join(members.get('voters', [])) or '(none)'}"
    )
    columns = ("node", "voter", "removed", "state", "mesh", "http")
    rows = [
        [
            m.get("node_id"),
            m.get("voter"),
            m.get("removed"),
            m.get("state"),
            m.get("mesh_address"),
            m.get("http_address"),
        ]
        for m in members.get("members", [])
    ]
    print(format_table(columns, rows))


def _cmd_cluster_members(ns: argparse.Namespace) -> int:
    _print_members(ns, _client(ns).members())
    return 0


def _cmd_add_member(ns: argparse.Namespace) -> int:
    _print_members(ns, _client(ns).add_member(ns.node_id))
    return 0


def _cmd_remove_member(ns: argparse.Namespace) -> int:
    _print_members(ns, _client(ns).remove_member(ns.node_id))
    return 0


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
    except (UsageError, ConfigError) as e:
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
