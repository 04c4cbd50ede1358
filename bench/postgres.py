"""A throwaway PostgreSQL cluster for the APScheduler+PostgreSQL baseline.

The benchmark starts its own cluster in a temporary directory (``initdb``, then ``postgres``
in the foreground as our child), listening on 127.0.0.1 at a free port and on a unix socket in
that directory only, with the default durability (``fsync=on``, ``synchronous_commit=on``) as a
real deployment. ``initdb`` refuses to run as root: when the benchmark runs as root the cluster
belongs to the ``postgres`` user (Debian's package creates it), or ``nobody`` without one.
:meth:`Cluster.stop` (called in ``finally`` by :func:`cluster`) shuts it down fast (SIGINT),
SIGKILLs it after a timeout, and removes the directory; the postmaster also gets SIGKILL if the
benchmark dies (``PR_SET_PDEATHSIG``) and its backends exit when it does.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mesh.supervise import free_port

DATABASE = "bench"
USER = "bench"
INSTALL_HINT = "apt-get install -y postgresql"


class PostgresMissing(Exception):
    """PostgreSQL (or the Python drivers) cannot be used here; the message says why."""


def binaries() -> Path:
    """The directory holding initdb and postgres (the newest Debian install, else PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.parent.name.split(".")],
    )
    for candidate in reversed(found):
        d = Path(candidate).parent
        if (d / "initdb").exists():
            return d
    pg, init = shutil.which("postgres"), shutil.which("initdb")
    if pg and init and Path(pg).parent == Path(init).parent:
        return Path(pg).parent
    raise PostgresMissing(
        f"PostgreSQL is not installed (no initdb/postgres in /usr/lib/postgresql/*/bin or on "
        f"PATH): {INSTALL_HINT}"
    )


def drivers_missing() -> str | None:
    """Why the baseline's Python drivers cannot be imported, or None."""
    for mod in ("asyncpg", "psycopg"):
        try:
            __import__(mod)
        except ImportError as e:
            return f"the Python driver {mod} is missing ({e}): pip install '.[bench]'"
    return None


def _owner() -> pwd.struct_passwd | None:
    """The user the cluster runs as when we are root; None to run it as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresMissing("running as root and neither a postgres nor a nobody user exists")


def _preexec() -> None:
    # After the uid change (which clears it): SIGKILL the postmaster if the benchmark dies.
    from mesh.supervise import _die_with_parent

    fn = _die_with_parent(signal.SIGKILL)
    if fn is not None:
        fn()


class Cluster:
    """One running cluster: :attr:`dsn` for SQLAlchemy (asyncpg), :attr:`conninfo` for libpq."""

    def __init__(self, *, start_timeout: float = 60.0, stop_timeout: float = 30.0) -> None:
        self.bin = binaries()
        self.version = self.bin.parent.name
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.owner = _owner()
        self.dir = Path(tempfile.mkdtemp(prefix="schedulezero-bench-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    # -------------------------------------------------------------------------- start / stop

    def _run_as(self) -> dict[str, object]:
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self.owner is not None:
            env.update(HOME=str(self.dir), USER=self.owner.pw_name, LOGNAME=self.owner.pw_name)
        return env

    def start(self) -> Cluster:
        if self.owner is not None:
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)
        # --no-sync: initdb's own final flush only (a fresh, throwaway cluster); the server
        # below runs with fsync on.
        init = subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            env=self._env(),
            cwd=self.dir,
            capture_output=True,
            timeout=self.start_timeout,
            check=False,
            **self._run_as(),  # type: ignore[arg-type]
        )
        if init.returncode != 0:
            raise PostgresMissing(
                f"initdb failed (exit {init.returncode}): "
                + (init.stderr or init.stdout).decode(errors="replace").strip()[-400:]
            )
        with open(self.log, "ab") as log:
            if self.owner is not None:
                os.chown(self.log, self.owner.pw_uid, self.owner.pw_gid)
            self.proc = subprocess.Popen(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.dir),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=on",
                    "-c",
                    "synchronous_commit=on",
                    "-c",
                    "max_connections=100",
                ],
                env=self._env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_preexec,
                **self._run_as(),  # type: ignore[arg-type]
            )
        self._wait_ready()
        self._createdb()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise PostgresMissing(
                    f"postgres exited with {self.proc.returncode}: {self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                if self._psql("SELECT 1", "postgres").returncode == 0:
                    return
            time.sleep(0.1)
        raise PostgresMissing(
            f"postgres did not accept connections within "
            f"{self.start_timeout:.0f}s: {self.log_tail()}"
        )

    def _psql(self, sql: str, db: str) -> subprocess.CompletedProcess[bytes]:
        psql = self.bin / "psql"
        if not psql.exists():
            return self._py_exec(sql, db)
        return subprocess.run(
            [str(psql), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", db, "-Atc", sql],
            env=self._env(),
            capture_output=True,
            timeout=30,
            check=False,
        )

    def _py_exec(self, sql: str, db: str) -> subprocess.CompletedProcess[bytes]:
        import psycopg

        try:
            with psycopg.connect(self.conninfo_for(db), autocommit=True) as conn:
                conn.execute(sql)  # type: ignore[arg-type]
            return subprocess.CompletedProcess([], 0, b"", b"")
        except psycopg.Error as e:
            return subprocess.CompletedProcess([], 1, b"", str(e).encode())

    def _createdb(self) -> None:
        r = self._psql(f"CREATE DATABASE {DATABASE}", "postgres")
        if r.returncode != 0:
            raise PostgresMissing(f"CREATE DATABASE failed: {r.stderr.decode(errors='replace')}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after the timeout, then remove the directory."""
        try:
            p = self.proc
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
                try:
                    p.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
            if p is not None:
                # Backends exit once the postmaster is gone; kill any straggler of its group.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -------------------------------------------------------------------------- addresses

    def conninfo_for(self, db: str = DATABASE) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    @property
    def conninfo(self) -> str:
        return self.conninfo_for(DATABASE)

    @property
    def dsn(self) -> str:
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{DATABASE}"


@contextlib.contextmanager
def cluster(**kwargs: float) -> Iterator[Cluster]:
    """A started cluster, stopped (and its directory removed) on every way out."""
    c = Cluster(**kwargs)
    try:
        yield c.start()
    finally:
        c.stop()
