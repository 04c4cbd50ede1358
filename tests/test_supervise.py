"""mesh.supervise: the one way harnesses and ``schedulezero up`` run child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.supervise import (
    REPO_ROOT,
    Child,
    child_env,
    ephemeral_range_start,
    free_port,
    spawn,
    stop,
    stop_all,
    wait_for_http,
    wait_until,
)

SLEEPER = "import time\nprint('ready', flush=True)\nwhile True: time.sleep(1)"
STUBBORN = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER


def _ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_free_ports_are_below_the_ephemeral_range_bindable_and_never_repeated() -> None:
    seen = set()
    for _ in range(50):
        port = free_port(pair=True)
        assert port + 1 < ephemeral_range_start()
        assert port not in seen and port + 1 not in seen
        seen.update((port, port + 1))
        for p in (port, port + 1):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))


def test_stop_ends_a_polite_child_with_sigterm_and_a_stubborn_one_with_sigkill() -> None:
    polite = spawn([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE)
    stubborn = spawn([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    _ready(polite)
    _ready(stubborn)

    killed = stop_all([polite, stubborn], timeout=0.5)

    assert killed == [stubborn]
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL


def test_stop_returns_the_exit_code_of_a_child_that_already_exited() -> None:
    proc = spawn([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(10)
    assert stop(proc) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_is_killed_when_its_parent_dies() -> None:
    # The parent spawns a sleeper through mesh.supervise, reports its pid, then exits abruptly.
    parent_code = (
        "import os, sys\n"
        "from mesh.supervise import spawn\n"
        "child = spawn([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", parent_code],
        env=child_env(),
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    grandchild = int(out)
    try:
        wait_until(lambda: not _alive(grandchild), 5.0, "the orphan to die", error=AssertionError)
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_wait_for_http_gives_up_at_once_when_the_server_exits() -> None:
    proc = spawn([sys.executable, "-c", "raise SystemExit(3)"])
    url = f"http://127.0.0.1:{free_port()}/api/health"
    started = time.monotonic()

    with pytest.raises(AssertionError, match="exited with code 3 while waiting for the server"):
        wait_for_http(url, 30.0, proc=proc, what="the server", error=AssertionError)

    assert time.monotonic() - started < 10.0


def test_wait_until_says_what_it_waited_for_with_the_diagnostics() -> None:
    with pytest.raises(AssertionError) as raised:
        wait_until(
            lambda: None, 0.1, "nothing", error=AssertionError, diagnostics=lambda: "the logs"
        )
    assert str(raised.value) == "timed out after 0.1s waiting for nothing\nthe logs"


def test_child_env_leaves_out_harness_settings_unless_asked_to_keep_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCHEDULEZERO_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")

    env = child_env({"EXTRA": "1"})

    assert "SCHEDULEZERO_LOG_LEVEL" not in env
    assert env["EXTRA"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(":") == [str(REPO_ROOT), "/elsewhere"]
    assert child_env(keep_settings=True)["SCHEDULEZERO_LOG_LEVEL"] == "DEBUG"


def test_a_child_appends_a_banner_and_its_output_to_its_log_on_every_start(
    tmp_path: Path,
) -> None:
    log = tmp_path / "logs" / "echo.log"
    child = Child("echo", [sys.executable, "-c", "print('hello')"], log=log)

    for _ in range(2):
        child.start()
        assert child.proc is not None
        assert child.proc.wait(10) == 0

    lines = log.read_text().splitlines()
    assert [line.split(" at ")[0] for line in lines] == [
        "----- start #1",
        "hello",
        "----- start #2",
        "hello",
    ]
