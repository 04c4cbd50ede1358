"""The ``schedulezero`` command: ``node``, ``handler`` and ``up``.

Any mistake on the command line or in the configuration ends with exit code 2 and exactly one
line on stderr (``schedulezero: error: ...``); ``--help`` works as usual.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mesh.config import DISCOVERY_MODES, ConfigError, load_config, parse_mesh_address
from mesh.membership.discovery import DiscoveryError

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
    node.set_defaults(func=_cmd_node)

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
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    config = load_config(args, config_file=ns.config, env=os.environ)
    _setup_logging(config.log_level)
    try:
        from mesh.app import run_node
    except ModuleNotFoundError as e:
        if e.name not in ("mesh.node",):
            raise
        raise UsageError("node: not available in this build") from None
    return run_node(config)


def _cmd_handler(ns: argparse.Namespace) -> int:
    # Reuse the node's validation of module names and ids.
    config_args = {"tasks": ns.tasks, "log_level": ns.log_level}
    if ns.handler_id is not None:
        config_args["node_id"] = ns.handler_id
    try:
        checked = load_config(config_args, env={})
    except ConfigError as e:
        raise ConfigError(str(e).replace("--node-id", "--handler-id")) from None
    if ns.concurrency < 1:
        raise UsageError(f"--concurrency: must be at least 1, got {ns.concurrency}")
    try:
        from mesh.dispatch.handler import run_handler
    except ModuleNotFoundError as e:
        if e.name not in ("mesh.dispatch", "mesh.dispatch.handler"):
            raise
        raise UsageError("handler: not available in this build") from None
    _setup_logging(checked.log_level)
    return run_handler(
        list(dict.fromkeys(ns.mesh)), list(checked.tasks), ns.handler_id, ns.concurrency
    )


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
    except (UsageError, ConfigError) as e:
        return _fail(str(e))
    except DiscoveryError as e:
        _fail(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
