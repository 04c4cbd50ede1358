"""Local development governor behind ``schedulezero up``.

``ProcessGovernor`` keeps a set of child processes (nodes, later handlers) alive: it starts them,
prefixes their output with their name, restarts one that dies unexpectedly after a backoff that
grows while it keeps crashing, and on SIGINT/SIGTERM stops them all (SIGTERM, up to 5 s, then
SIGKILL). ``plan_local_mesh`` turns ``up``'s options into child specs.

Children are started by mesh.supervise in their own session (and so process group), so a
terminal Ctrl-C reaches only the governor, which then stops them in order; on Linux they also get
SIGTERM if the governor itself is killed.

``up`` runs secured: on first run it creates one CURVE key per node and per handler in
``DATA_DIR/keys`` (mode 0700; ``ensure_keys``), reuses them after, and starts every child with
``--keys DATA_DIR/keys``. It also creates an API tokens file ``DATA_DIR/tokens.json`` with one
``admin`` token, whose value it writes to ``DATA_DIR/admin.token`` (mode 0600; ``ensure_token``)
and prints the path of: the nodes start with ``--api-tokens``, as in production.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from mesh.api.auth import TokenFileError, create_token, load_tokens
from mesh.config import ConfigError
from mesh.security.keys import KeyFileError, create_key
from mesh.supervise import (
    child_env,
    get_json,
    handler_command,
    http_request,
    node_command,
    spawn,
    stop_all,
)

__all__ = [
    "SAMPLE_SCHEDULE",
    "SAMPLE_TASKS_MODULE",
    "ChildSpec",
    "ProcessGovernor",
    "UpOptions",
    "ensure_keys",
    "ensure_token",
    "plan_local_mesh",
    "run_up",
]

log = logging.getLogger("mesh.governor")

# A child exiting with this code rejected its configuration; restarting cannot help.
EXIT_CONFIG_ERROR = 2

TOKEN_NAME = "up-admin"  # the admin token ``up`` creates in DATA_DIR/tokens.json
TOKEN_FILE_NAME = "admin.token"
SAMPLE_TASKS_MODULE = "mesh.sample_tasks"
SAMPLE_SCHEDULE: dict[str, Any] = {
    "id": "sample-heartbeat",
    "task": "heartbeat",
    "trigger": {"type": "interval", "seconds": 10},
    "args": [],
    "kwargs": {"message": "hello from schedulezero up"},
    "coalesce": "latest",
    "misfire_grace_time": 30,
}


@attrs.frozen
class ChildSpec:
    """One supervised process."""

    name: str
    argv: tuple[str, ...]
    kind: str = "node"  # "node" | "handler"
    http_url: str | None = None  # base URL of a node's HTTP API


@attrs.define
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff: float = 0.0
    restarts: int = 0
    gave_up: bool = False


class ProcessGovernor:
    def __init__(
        self,
        specs: Sequence[ChildSpec] = (),
        *,
        env: dict[str, str] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        stable_after: float = 30.0,
        stop_timeout: float = 5.0,
        poll_interval: float = 0.2,
        output: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._children = [_Child(spec) for spec in specs]
        self._env = env
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stable_after = stable_after
        self._stop_timeout = stop_timeout
        self._poll_interval = poll_interval
        self._output = output if output is not None else sys.stderr
        self._clock = clock
        self._stop = threading.Event()
        self._force = threading.Event()
        self._write_lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._on_ready: list[Callable[[ProcessGovernor], None]] = []

    # ----- configuration

    def add(self, spec: ChildSpec) -> None:
        """Supervise one more child (from the governor thread, before or during ``run``)."""
        self._children.append(_Child(spec))

    def on_ready(self, fn: Callable[[ProcessGovernor], None]) -> None:
        """Run ``fn(governor)`` in a background thread once every child has been started."""
        self._on_ready.append(fn)

    @property
    def specs(self) -> list[ChildSpec]:
        return [c.spec for c in self._children]

    @property
    def stopping(self) -> threading.Event:
        return self._stop

    def pids(self) -> dict[str, int]:
        return {c.spec.name: c.proc.pid for c in self._children if c.proc is not None}

    # ----- running

    def request_stop(self) -> None:
        """Ask ``run`` to stop all children and return (safe from signal handlers)."""
        if self._stop.is_set():
            self._force.set()  # a second Ctrl-C: do not wait for graceful exits
        self._stop.set()

    def run(self) -> int:
        """Supervise until a stop is requested; returns 0, or 1 if every child gave up."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda _s, _f: self.request_stop())
        try:
            return self._supervise()
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        for child in self._children:
            self._spawn(child)
        for fn in self._on_ready:
            threading.Thread(target=fn, args=(self,), daemon=True, name="governor-ready").start()
        while not self._stop.is_set():
            now = self._clock()
            for child in self._children:
                if child.gave_up:
                    continue
                if child.proc is None:
                    if now >= child.restart_at:
                        self._spawn(child)
                    continue
                code = child.proc.poll()
                if code is not None and not self._stop.is_set():
                    self._exited(child, code, now)
            if self._children and all(c.gave_up for c in self._children):
                log.error("governor: every child gave up; stopping")
                return 1
            self._stop.wait(self._poll_interval)
        return 0

    def _exited(self, child: _Child, code: int, now: float) -> None:
        name = child.spec.name
        child.proc = None
        if code == EXIT_CONFIG_ERROR:
            child.gave_up = True
            log.error("governor: %s rejected its configuration (exit 2); not restarting", name)
            return
        if now - child.started_at >= self._stable_after or child.backoff == 0:
            child.backoff = self._backoff_initial
        else:
            child.backoff = min(child.backoff * 2, self._backoff_max)
        child.restart_at = now + child.backoff
        log.warning(
            "governor: %s exited unexpectedly with code %s; restarting in %.1f s",
            name,
            code,
            child.backoff,
        )

    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        try:
            # SIGTERM, not SIGKILL, if the governor dies: a node still hands over leadership.
            proc = spawn(
                spec.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._env,
                death_signal=signal.SIGTERM,
            )
        except OSError as e:
            child.gave_up = True
            log.error("governor: cannot start %s: %s", spec.name, e)
            return
        if child.started_at:
            child.restarts += 1
            log.info("governor: restarted %s (pid %d)", spec.name, proc.pid)
        child.proc = proc
        child.started_at = self._clock()
        reader = threading.Thread(
            target=self._forward, args=(spec.name, proc), daemon=True, name=f"out-{spec.name}"
        )
        reader.start()
        self._readers.append(reader)

    def _forward(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._write_lock:
                self._output.write(f"{name:<10}| {line}\n")
                self._output.flush()

    def _shutdown(self) -> None:
        procs = {c.proc: c.spec.name for c in self._children if c.proc is not None}
        # A second Ctrl-C (``_force``) cuts the graceful wait short.
        for proc in stop_all(procs, self._stop_timeout, hurry=self._force):
            log.warning("governor: %s did not stop in time; killed it", procs[proc])
        for reader in self._readers:
            reader.join(timeout=1.0)


# --------------------------------------------------------------------------- schedulezero up


@attrs.frozen(kw_only=True)
class UpOptions:
    nodes: int = 3
    handlers: int = 0
    base_port: int = 7100
    http_base_port: int = 8100
    data_dir: Path = Path("data/up")
    tasks: tuple[str, ...] = ()
    sample: bool = True
    discovery: str = "static"
    log_level: str | None = None
    secure: bool = True  # CURVE keys in data_dir/keys for every child

    @property
    def keys_dir(self) -> Path | None:
        return self.data_dir / "keys" if self.secure else None

    @property
    def tokens_file(self) -> Path | None:
        return self.data_dir / "tokens.json" if self.secure else None

    @property
    def token_file(self) -> Path:
        """Where the admin token's value is kept (mode 0600)."""
        return self.data_dir / TOKEN_FILE_NAME


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def plan_local_mesh(opts: UpOptions, python: str = sys.executable) -> list[ChildSpec]:
    """Child specs for N nodes on 127.0.0.1 (+ M handlers); raises ConfigError on bad options."""
    if opts.nodes < 1:
        raise ConfigError(f"--nodes: must be at least 1, got {opts.nodes}")
    if opts.handlers < 0:
        raise ConfigError(f"--handlers: must be at least 0, got {opts.handlers}")
    mesh_ports = [opts.base_port + 2 * i for i in range(opts.nodes)]
    http_ports = [opts.http_base_port + i for i in range(opts.nodes)]
    if opts.base_port < 1 or mesh_ports[-1] + 1 > 65535:
        raise ConfigError(
            f"--base-port: {opts.nodes} nodes need ports {opts.base_port}-{mesh_ports[-1] + 1}, "
            "which must lie within 1-65535"
        )
    if opts.http_base_port < 1 or http_ports[-1] > 65535:
        raise ConfigError(
            f"--http-base-port: {opts.nodes} nodes need ports {opts.http_base_port}-"
            f"{http_ports[-1]}, which must lie within 1-65535"
        )
    used_by_mesh = {p for port in mesh_ports for p in (port, port + 1)}
    clash = sorted(used_by_mesh.intersection(http_ports))
    if clash:
        raise ConfigError(
            f"--http-base-port: HTTP port {clash[0]} collides with the mesh ports "
            f"{opts.base_port}-{mesh_ports[-1] + 1}"
        )

    sample = opts.sample and _module_available(SAMPLE_TASKS_MODULE)
    node_tasks = list(opts.tasks)
    handler_tasks = list(opts.tasks)
    if sample:
        (handler_tasks if opts.handlers else node_tasks).append(SAMPLE_TASKS_MODULE)

    meshes = [f"tcp://127.0.0.1:{p}" for p in mesh_ports]
    specs: list[ChildSpec] = []
    for i in range(opts.nodes):
        node_id = f"node-{i + 1}"
        extra = ["--discovery", opts.discovery, "--bootstrap-expect", str(opts.nodes)]
        if opts.tokens_file is not None:
            extra += ["--api-tokens", str(opts.tokens_file)]
        if opts.log_level:
            extra += ["--log-level", opts.log_level]
        argv = node_command(
            node_id,
            data_dir=opts.data_dir / node_id,
            mesh=meshes[i],
            http=f"127.0.0.1:{http_ports[i]}",
            peers=[m for j, m in enumerate(meshes) if j != i] if opts.discovery == "static" else (),
            tasks=node_tasks,
            keys=opts.keys_dir,
            extra=extra,
            python=python,
        )
        specs.append(ChildSpec(node_id, tuple(argv), "node", f"http://127.0.0.1:{http_ports[i]}"))

    if opts.handlers and not _module_available("mesh.dispatch.handler"):
        log.warning("governor: handlers are not available in this build; starting none")
    elif opts.handlers and not handler_tasks:
        log.warning("governor: handlers need --tasks MODULE; starting none")
    else:
        for i in range(opts.handlers):
            argv = handler_command(
                f"handler-{i + 1}",
                mesh=meshes,
                tasks=handler_tasks,
                keys=opts.keys_dir,
                python=python,
            )
            specs.append(ChildSpec(f"handler-{i + 1}", tuple(argv), "handler"))
    return specs


def ensure_keys(directory: Path, specs: Sequence[ChildSpec]) -> list[str]:
    """A key for every child (named after it, role = its kind) in ``directory`` (mode 0700),
    unless it already has one; returns the names created. ConfigError if one is half there."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
    except OSError as e:
        raise ConfigError(f"--data-dir: cannot create the key directory {directory}: {e}") from None
    created = []
    for spec in specs:
        if (directory / f"{spec.name}.key_secret").exists():
            continue  # reused: the child itself checks that it is usable
        try:
            create_key(directory, spec.name, spec.kind)
        except (KeyFileError, OSError) as e:
            raise ConfigError(f"--data-dir: cannot create the key of {spec.name}: {e}") from None
        created.append(spec.name)
    return created


def ensure_token(opts: UpOptions) -> tuple[str, bool]:
    """``(token, created)``: the admin token of ``opts.tokens_file``, created with its value in
    ``opts.token_file`` (0600) on first run and read back after. ConfigError if only one of the
    two files is there (or either is unusable): nothing is overwritten."""
    tokens, holder = opts.tokens_file, opts.token_file
    assert tokens is not None
    if tokens.exists() or holder.exists():
        try:
            token = holder.read_text("utf-8").strip()
            load_tokens(tokens)
        except (OSError, TokenFileError) as e:
            raise ConfigError(
                f"{opts.data_dir}: {tokens.name} and {holder.name} belong together and one is "
                f"missing or unusable ({e}); remove both to have new ones made"
            ) from None
        return token, False
    opts.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = create_token(tokens, TOKEN_NAME, "admin")
    fd = os.open(holder, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, True


def _announce_when_ready(
    governor: ProcessGovernor, *, sample: bool, out: IO[str], token: str | None = None
) -> None:
    """Report the leader once one is elected, then create the sample schedule (best effort)."""
    nodes = [s for s in governor.specs if s.kind == "node" and s.http_url]
    leader_url = None
    while leader_url is None and not governor.stopping.wait(0.5):
        for spec in nodes:
            health = get_json(f"{spec.http_url}/api/health")
            if isinstance(health, dict) and health.get("leader_id"):
                print(
                    f"mesh ready: leader {health['leader_id']} (term {health.get('term')})",
                    file=out,
                    flush=True,
                )
                leader_url = spec.http_url
                break
    if not sample or leader_url is None:
        return
    while not governor.stopping.is_set():
        try:
            status, body, _ = http_request(
                f"{leader_url}/api/schedules", "POST", SAMPLE_SCHEDULE, timeout=5.0, token=token
            )
        except OSError:
            status, body = None, None
        if status is not None and status < 400:
            print(f"sample schedule {SAMPLE_SCHEDULE['id']!r} created", file=out, flush=True)
            return
        if status == 409:
            return  # already there from an earlier run
        if status is not None and status < 500:
            log.warning("governor: sample schedule refused (%s): %s", status, str(body)[:200])
            return
        governor.stopping.wait(1.0)


def run_up(opts: UpOptions, out: IO[str] | None = None) -> int:
    """``schedulezero up``: run a local mesh until SIGINT/SIGTERM."""
    out = out if out is not None else sys.stdout
    specs = plan_local_mesh(opts)
    if opts.keys_dir is not None:
        created = ensure_keys(opts.keys_dir, specs)
        what = f"created {', '.join(created)}" if created else "reused"
        print(f"CURVE keys: {opts.keys_dir} ({what})", file=out, flush=True)
    token = None
    if opts.tokens_file is not None:
        token, made = ensure_token(opts)
        print(
            f"API token (admin): {opts.token_file} ({'created' if made else 'reused'}); "
            f"export SCHEDULEZERO_TOKEN=$(cat {opts.token_file})",
            file=out,
            flush=True,
        )
    # The user's SCHEDULEZERO_* settings apply to the nodes `up` starts.
    governor = ProcessGovernor(specs, env=child_env(keep_settings=True))
    sample = opts.sample and _module_available(SAMPLE_TASKS_MODULE)
    if opts.sample and not sample:
        log.info("governor: %s is not in this build; no sample schedule", SAMPLE_TASKS_MODULE)
    governor.on_ready(lambda g: _announce_when_ready(g, sample=sample, out=out, token=token))
    urls = [spec.http_url for spec in specs if spec.http_url]
    for spec in specs:
        if spec.http_url:
            print(f"{spec.name}: {spec.http_url}/api/health", file=out, flush=True)
    if urls:
        paste = " (paste the API token into its token field)" if token else ""
        print(f"dashboard: {urls[0]}/ (any node serves it){paste}", file=out, flush=True)
    print("press Ctrl-C to stop", file=out, flush=True)
    code = governor.run()
    print("stopped", file=out, flush=True)
    return code
