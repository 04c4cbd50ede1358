"""Child processes for everything that runs our own commands: ``schedulezero up``
(mesh/governor.py), the test harness (tests/cluster.py), the chaos suite and the benchmark.

One way to do each thing:

- :func:`free_port`: a port, or a port pair, to give a child; chosen *below* the ephemeral range.
- :func:`node_command`, :func:`handler_command`: the command lines of ``schedulezero node`` and
  ``schedulezero handler`` (``python -m mesh.cli ...``, the checkout's code, not an installed one).
- :func:`child_env`: a child's environment: unbuffered output, this checkout first on PYTHONPATH,
  and (for harnesses) no ``SCHEDULEZERO_*`` setting leaking in from the developer's shell.
- :func:`spawn`: ``Popen`` with stdin closed, output to log files or a pipe, its own session (a
  terminal's Ctrl-C reaches only the parent, which then stops its children in order) and, on
  Linux, a signal when the parent dies (``PR_SET_PDEATHSIG``): no child outlives a killed harness.
  The kernel sends it when the *thread* that spawned the child ends, so spawn long-lived children
  from a thread that lives as long as they should.
- :func:`stop_all` / :func:`stop`: SIGTERM, wait up to a timeout, SIGKILL, reap. :func:`kill`:
  SIGKILL and reap.
- :class:`Child`: a restartable child whose output goes to log files: what harnesses wrap.
- :func:`wait_until`, :func:`wait_for_http`: bounded polling; :func:`http_request`,
  :func:`get_json`: HTTP without any proxy from the environment; :func:`tail`: a log's last lines.

Standard library only: ``schedulezero up`` uses it in the product, the harnesses outside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self, TypeVar

__all__ = [
    "REPO_ROOT",
    "STOP_TIMEOUT",
    "Child",
    "HttpReply",
    "child_env",
    "ephemeral_range_start",
    "free_port",
    "get_json",
    "handler_command",
    "http_request",
    "kill",
    "node_command",
    "spawn",
    "stop",
    "stop_all",
    "tail",
    "wait_for_http",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parent.parent  # the directory that holds ``mesh``
STOP_TIMEOUT = 5.0  # SIGTERM → SIGKILL: a node hands over leadership, a handler drains
REAP_TIMEOUT = 10.0  # after SIGKILL only a stuck kernel takes longer
T = TypeVar("T")

# --------------------------------------------------------------------------- ports

# Port 0 would give a port from the *ephemeral* range, the one outgoing connections draw from:
# between choosing it and the child binding it, one of the many connections a mesh opens can
# take it ("Address already in use"). So ports are drawn below that range, checked by binding,
# and never handed out twice per process.
_port_lock = threading.Lock()
_handed_out: set[int] = set()
_port_rng = random.Random()


def ephemeral_range_start() -> int:
    """The lowest port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(
    host: str = "127.0.0.1", *, pair: bool = False, span: int = 1, attempts: int = 500
) -> int:
    """A free port P outside the ephemeral range; P..P+span-1 are all free (``pair``: span 2)."""
    span = max(span, 2 if pair else 1)
    high = max(12_000, ephemeral_range_start()) - span
    low = 10_000 if high > 20_000 else 1_024
    with _port_lock:
        for _ in range(attempts):
            port = _port_rng.randrange(low, high)
            wanted = range(port, port + span)
            if any(p in _handed_out for p in wanted):
                continue
            if all(_is_free(host, p) for p in wanted):
                _handed_out.update(wanted)
                return port
    raise RuntimeError(f"no free port found on {host} in {low}-{high}")


# --------------------------------------------------------------------------- command lines


def node_command(
    node_id: str,
    *,
    data_dir: Path,
    mesh: str,
    http: str,
    peers: Iterable[str] = (),
    config: Path | None = None,
    tasks: Iterable[str] = (),
    keys: Path | None = None,
    extra: Iterable[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """``schedulezero node``: ``mesh`` is tcp://HOST:PORT, ``http`` HOST:PORT, ``keys`` the CURVE
    key directory (``--keys``); ``extra`` comes last, so its options win over the ones before."""
    argv = [python, "-m", "mesh.cli", "node", "--node-id", node_id, "--data-dir", str(data_dir)]
    argv += ["--mesh", mesh, "--http", http]
    if config is not None:
        argv += ["--config", str(config)]
    if keys is not None:
        argv += ["--keys", str(keys)]
    for peer in peers:
        argv += ["--peer", peer]
    for module in tasks:
        argv += ["--tasks", module]
    return argv + list(extra)


def handler_command(
    handler_id: str,
    *,
    mesh: Iterable[str],
    tasks: Iterable[str] = (),
    concurrency: int | None = None,
    keys: Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """``schedulezero handler`` dialling every address of ``mesh``; ``keys``: ``--keys DIR``."""
    argv = [python, "-m", "mesh.cli", "handler", "--handler-id", handler_id]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if keys is not None:
        argv += ["--keys", str(keys)]
    for address in mesh:
        argv += ["--mesh", address]
    for module in tasks:
        argv += ["--tasks", module]
    return argv


# --------------------------------------------------------------------------- spawning


def child_env(
    extra: Mapping[str, str] | None = None, *, keep_settings: bool = False
) -> dict[str, str]:
    """Our environment for a child, plus ``extra``.

    Output is unbuffered (log tails are current) and this checkout comes first on PYTHONPATH, so
    ``python -m mesh.cli`` runs the same code as the parent from any directory. Unless
    ``keep_settings``, ``SCHEDULEZERO_*`` variables are left out: a harness configures its
    children itself.
    """
    env = {
        k: v for k, v in os.environ.items() if keep_settings or not k.startswith("SCHEDULEZERO_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1
_prctl = _find_prctl()  # looked up here: between fork and exec the child should only call it


def _die_with_parent(sig: int | None) -> Callable[[], None] | None:
    """A preexec function asking Linux to send ``sig`` to the child when its parent dies."""
    if sig is None or _prctl is None:
        return None
    prctl = _prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    stdout: Path | int | None = subprocess.DEVNULL,
    stderr: Path | int | None = subprocess.STDOUT,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    own_session: bool = True,
    death_signal: int | None = signal.SIGKILL,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdin closed.

    ``stdout``/``stderr`` are a file to append to (a Path) or a ``subprocess`` constant
    (``PIPE``, ``STDOUT``, ``DEVNULL``; None inherits ours). ``own_session`` puts the child in a
    new session and process group; ``death_signal`` (None: none) is what it gets on Linux when
    this process dies. ``env`` None inherits ours unchanged.
    """
    with contextlib.ExitStack() as files:

        def target(where: Path | int | None) -> Any:
            if not isinstance(where, Path):
                return where
            where.parent.mkdir(parents=True, exist_ok=True)
            return files.enter_context(open(where, "ab"))

        out = target(stdout)
        err = subprocess.STDOUT if stderr == stdout and isinstance(stderr, Path) else target(stderr)
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=own_session,
            preexec_fn=_die_with_parent(death_signal),
        )


# --------------------------------------------------------------------------- stopping


def stop_all(
    procs: Iterable[subprocess.Popen[Any]],
    timeout: float = STOP_TIMEOUT,
    *,
    hurry: threading.Event | None = None,
) -> list[subprocess.Popen[Any]]:
    """SIGTERM every running process at once, wait up to ``timeout`` for all of them (no longer
    once ``hurry`` is set), SIGKILL whatever still runs, and reap all. Returns the killed ones."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in running:
        while p.poll() is None and not (hurry is not None and hurry.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # In slices, so that ``hurry`` cuts the wait short.
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(min(left, 0.05) if hurry is not None else left)
    killed = [p for p in running if p.poll() is None]
    for p in killed:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    for p in running:
        with contextlib.suppress(subprocess.TimeoutExpired):  # pragma: no cover - stuck kernel
            p.wait(REAP_TIMEOUT)
    return killed


def stop(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    stop_all([proc], timeout)
    return proc.returncode


def kill(proc: subprocess.Popen[Any], timeout: float = REAP_TIMEOUT) -> int:
    """SIGKILL and reap; returns the exit code (``subprocess.TimeoutExpired`` if not reaped)."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    return proc.wait(timeout)


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no file)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class Child:
    """A restartable child process whose stdout (and stderr, unless ``stderr_log`` is given)
    goes to ``log``. Every start appends a banner line to its logs. Subclasses that build their
    command line at start time override :meth:`command`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str] = (),
        *,
        log: Path,
        stderr_log: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = REPO_ROOT,
        death_signal: int | None = signal.SIGKILL,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.stderr_log = stderr_log
        self.env = env
        self.cwd = cwd
        self.death_signal = death_signal
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0  # monotonic

    def command(self) -> list[str]:
        return list(self.argv)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def start(self) -> Self:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        banner = f"----- start #{self.starts + 1} at {time.time():.3f}\n".encode()
        for path in (self.log, self.stderr_log):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "ab") as f:
                    f.write(banner)
        self.proc = spawn(
            self.command(),
            stdout=self.log,
            stderr=self.stderr_log or subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            death_signal=self.death_signal,
        )
        self.starts += 1
        self.started_at = time.monotonic()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if never started)."""
        return None if self.proc is None else stop(self.proc, timeout)

    def kill(self) -> float:
        """SIGKILL and reap; returns the monotonic time the signal was sent."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        sent_at = time.monotonic()
        kill(self.proc)
        return sent_at

    def tail(self, lines: int = 25) -> str:
        if self.stderr_log is None:
            return tail(self.log, lines)
        return f"-- stdout:\n{tail(self.log, lines)}\n-- stderr:\n{tail(self.stderr_log, lines)}"


# --------------------------------------------------------------------------- waiting and HTTP


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str = "a condition",
    *,
    interval: float = 0.02,
    error: Callable[[str], Exception] = TimeoutError,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy, and return that. After ``timeout``
    raise ``error("timed out after …s waiting for <what>")`` with ``diagnostics()`` appended."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            extra = f"\n{diagnostics()}" if diagnostics is not None else ""
            raise error(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        time.sleep(interval)


# A server that is down or dying: refused, reset, or cut off in the middle of an answer.
_NO_ANSWER = (OSError, http.client.HTTPException)
# Our own requests must never go through an http_proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HttpReply(NamedTuple):
    status: int
    body: Any  # decoded JSON when the Content-Type says JSON, else the text
    headers: dict[str, str]


def http_request(
    url: str,
    method: str = "GET",
    body: Any = None,
    *,
    timeout: float = 2.0,
    token: str | None = None,
) -> HttpReply:
    """One HTTP request with an optional JSON body and bearer ``token``; OSError if the server
    is unreachable."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _opener.open(req, timeout=timeout) as resp:
            status, raw, message = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        status, raw, message = e.code, e.read(), e.headers
    text = raw.decode("utf-8", "replace")
    headers = dict(message)
    if text and "json" in message.get("Content-Type", ""):
        with contextlib.suppress(ValueError):
            return HttpReply(status, json.loads(text), headers)
    return HttpReply(status, text, headers)


def get_json(url: str, timeout: float = 1.0) -> Any | None:
    """GET ``url``: its decoded body on 200, else None (also when unreachable)."""
    try:
        status, body, _ = http_request(url, timeout=timeout)
    except _NO_ANSWER:
        return None
    return body if status == 200 else None


def wait_for_http(
    url: str,
    timeout: float,
    *,
    proc: subprocess.Popen[Any] | None = None,
    what: str | None = None,
    interval: float = 0.02,
    error: Callable[[str], Exception] = TimeoutError,
    diagnostics: Callable[[], str] | None = None,
) -> Any:
    """Until GET ``url`` answers 200; returns its decoded body. If ``proc`` (the server) exits
    meanwhile, raise ``error`` at once rather than at the timeout."""
    what = what or f"{url} to answer"

    def check() -> tuple[Any] | None:
        if proc is not None and proc.poll() is not None:
            extra = f"\n{diagnostics()}" if diagnostics is not None else ""
            raise error(f"exited with code {proc.returncode} while waiting for {what}{extra}")
        try:
            status, body, _ = http_request(url, timeout=1.0)
        except _NO_ANSWER:
            return None
        return (body,) if status == 200 else None  # a 1-tuple: an empty body counts as an answer

    return wait_until(
        check, timeout, what, interval=interval, error=error, diagnostics=diagnostics
    )[0]
