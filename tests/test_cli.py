"""The ``schedulezero`` command line, run as a real process, and the ``up`` governor."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mesh.cli import main
from mesh.governor import ChildSpec, ProcessGovernor, UpOptions, plan_local_mesh
from mesh.supervise import free_port, get_json, kill, spawn, wait_until
from tests.clierrors import process_error

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULEZERO_")}
    env.update(extra)
    return env


def schedulezero(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [PYTHON, "-m", "mesh.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env if env is not None else clean_env(),
        timeout=timeout,
    )


# --------------------------------------------------------------------------- one-line errors


def test_unknown_flag_is_one_line_and_exit_2() -> None:
    line = process_error(schedulezero("node", "--bogus"))
    assert line == "schedulezero: error: unrecognized arguments: --bogus"


def test_unknown_command_is_one_line_and_exit_2() -> None:
    line = process_error(schedulezero("nod"))
    assert "invalid choice: 'nod'" in line


def test_missing_command_is_one_line_and_exit_2() -> None:
    process_error(schedulezero())


def test_bad_mesh_address_names_the_flag() -> None:
    line = process_error(schedulezero("node", "--mesh", "foo"))
    assert line == "schedulezero: error: --mesh: expected tcp://HOST:PORT, got 'foo'"


def test_bad_discovery_choice_names_the_flag() -> None:
    line = process_error(schedulezero("node", "--discovery", "consul"))
    assert line.startswith("schedulezero: error: --discovery: invalid choice: 'consul'")


def test_non_integer_flag_names_the_flag() -> None:
    line = process_error(schedulezero("node", "--bootstrap-expect", "x"))
    assert line == "schedulezero: error: --bootstrap-expect: expected an integer, got 'x'"


def test_config_file_with_unknown_key_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("mesh: tcp://127.0.0.1:7100\nraft:\n  heartbeat: 1\n")
    line = process_error(schedulezero("node", "--config", str(path)))
    assert str(path) in line and "unknown key 'raft.heartbeat'" in line


def test_config_file_with_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("peers: [tcp://127.0.0.1:7102\nhttp: x\n")
    line = process_error(schedulezero("node", "--config", str(path)))
    assert "invalid YAML" in line and str(path) in line


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    line = process_error(schedulezero("node", "--config", str(path)))
    assert line == f"schedulezero: error: {path}: config file not found"


def test_bad_environment_variable_is_one_line() -> None:
    env = clean_env(SCHEDULEZERO_HTTP="nowhere")
    line = process_error(schedulezero("node", env=env))
    assert line == "schedulezero: error: SCHEDULEZERO_HTTP: expected HOST:PORT, got 'nowhere'"


def test_handler_with_bad_mesh_address_is_one_line() -> None:
    line = process_error(schedulezero("handler", "--mesh", "x", "--tasks", "app"))
    assert line == "schedulezero: error: --mesh: expected tcp://HOST:PORT, got 'x'"


def test_handler_without_required_flags_is_one_line() -> None:
    line = process_error(schedulezero("handler"))
    assert "--mesh" in line and "--tasks" in line


def test_up_with_colliding_ports_is_one_line() -> None:
    line = process_error(schedulezero("up", "--http-base-port", "7101"))
    assert line.startswith("schedulezero: error: --http-base-port: HTTP port 7101 collides")


def test_up_with_zero_nodes_is_one_line() -> None:
    line = process_error(schedulezero("up", "--nodes", "0"))
    assert line == "schedulezero: error: --nodes: must be at least 1, got 0"


@pytest.mark.parametrize("command", [(), ("node",), ("handler",), ("up",)])
def test_help_works(command: tuple[str, ...]) -> None:
    result = schedulezero(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: schedulezero")
    assert result.stderr == ""


def test_main_returns_2_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--mesh", "tcp://127.0.0.1:99999"]) == 2
    err = capsys.readouterr().err
    assert err == "schedulezero: error: --mesh: port 99999 is out of range 1-65534\n"


# --------------------------------------------------------------------------- governor


def python_child(name: str, code: str) -> ChildSpec:
    return ChildSpec(name, (sys.executable, "-c", code), "node")


def run_governor_for(governor: ProcessGovernor, seconds: float) -> int:
    timer = threading.Timer(seconds, governor.request_stop)
    timer.start()
    try:
        return governor.run()
    finally:
        timer.cancel()


def test_governor_restarts_a_child_that_dies(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    code = (
        f"open({str(starts)!r}, 'a').write('x'); print('started', flush=True); raise SystemExit(1)"
    )
    out = io.StringIO()
    governor = ProcessGovernor(
        [python_child("crashy", code)], backoff_initial=0.05, backoff_max=0.2, output=out
    )
    assert run_governor_for(governor, 2.0) == 0
    assert len(starts.read_text()) >= 3
    assert "crashy    | started" in out.getvalue()


def test_governor_does_not_restart_a_child_that_rejects_its_config() -> None:
    governor = ProcessGovernor(
        [python_child("bad", "raise SystemExit(2)")], backoff_initial=0.05, output=io.StringIO()
    )
    started = time.monotonic()
    assert run_governor_for(governor, 10.0) == 1  # every child gave up: run returns early
    assert time.monotonic() - started < 5.0


def test_governor_stops_children_with_sigterm_then_sigkill(tmp_path: Path) -> None:
    polite = "import time\nwhile True: time.sleep(1)"
    stubborn = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\nwhile True: time.sleep(1)"
    )
    out = io.StringIO()
    governor = ProcessGovernor(
        [python_child("polite", polite), python_child("stubborn", stubborn)],
        stop_timeout=0.5,
        output=out,
    )
    pids: dict[str, int] = {}

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 10
        while "ready" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids.update(governor.pids())
        governor.request_stop()

    threading.Thread(target=stop_when_ready, daemon=True).start()
    started = time.monotonic()
    assert governor.run() == 0
    assert time.monotonic() - started < 10
    assert set(pids) == {"polite", "stubborn"}
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_local_mesh_plan_uses_port_pairs_and_static_peers(tmp_path: Path) -> None:
    specs = plan_local_mesh(
        UpOptions(nodes=3, base_port=7100, http_base_port=8100, data_dir=tmp_path, sample=False)
    )
    assert [s.name for s in specs] == ["node-1", "node-2", "node-3"]
    assert [s.http_url for s in specs] == [f"http://127.0.0.1:{8100 + i}" for i in range(3)]
    argv = list(specs[1].argv)
    assert argv[1:4] == ["-m", "mesh.cli", "node"]
    assert argv[argv.index("--mesh") + 1] == "tcp://127.0.0.1:7102"
    assert argv[argv.index("--http") + 1] == "127.0.0.1:8101"
    peers = [argv[i + 1] for i, a in enumerate(argv) if a == "--peer"]
    assert peers == ["tcp://127.0.0.1:7100", "tcp://127.0.0.1:7104"]
    assert argv[argv.index("--bootstrap-expect") + 1] == "3"


# --------------------------------------------------------------------------- schedulezero up


def free_block(nodes: int) -> tuple[int, int]:
    """A mesh base port with 2*nodes free ports and an HTTP base with nodes free ports."""
    return free_port(span=2 * nodes), free_port(span=nodes)


def health(url: str) -> dict | None:
    return get_json(url, timeout=1.0)


def node_pids(data_dir: Path) -> dict[str, int]:
    """Node processes whose command line mentions our data directory, by node id."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "node" in args and any(str(data_dir) in a for a in args) and "--node-id" in args:
            found[args[args.index("--node-id") + 1]] = int(entry.name)
    return found


def start_up(tmp_path: Path, nodes: int = 3) -> tuple[subprocess.Popen[bytes], list[str]]:
    base, http = free_block(nodes)
    proc = spawn(
        [
            *(PYTHON, "-m", "mesh.cli", "up", "--nodes", str(nodes), "--base-port", str(base)),
            *("--http-base-port", str(http), "--data-dir", str(tmp_path / "up"), "--no-sample"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        env=clean_env(),
    )
    urls = [f"http://127.0.0.1:{http + i}/api/health" for i in range(nodes)]
    return proc, urls


def interrupt(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int:
    """What a terminal (SIGINT) or a service manager (SIGTERM) does to ``up``; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        return kill(proc)


@pytest.mark.slow
def test_up_starts_a_mesh_and_stops_it_cleanly_on_sigint(tmp_path: Path) -> None:
    proc, urls = start_up(tmp_path)
    try:
        wait_until(lambda: all(health(u) for u in urls), 30, "every node to answer")
        wait_until(lambda: any((health(u) or {}).get("leader_id") for u in urls), 15, "a leader")
        assert len(node_pids(tmp_path)) == 3
    finally:
        code = interrupt(proc)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 0
    for url in urls:
        assert url in out
    wait_until(lambda: not node_pids(tmp_path), 2, "every node process to exit")


@pytest.mark.slow
def test_up_restarts_a_node_that_was_killed(tmp_path: Path) -> None:
    proc, urls = start_up(tmp_path)
    try:
        wait_until(lambda: all(health(u) for u in urls), 30, "every node to answer")
        victim = node_pids(tmp_path)["node-2"]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: node_pids(tmp_path).get("node-2") not in (None, victim), 10, "a new node-2"
        )
        wait_until(lambda: health(urls[1]) is not None, 30, "node-2 to answer again")
    finally:
        assert interrupt(proc, signal.SIGTERM) == 0
    wait_until(lambda: not node_pids(tmp_path), 2, "every node process to exit")
