"""``schedulezero scenario ...`` (mesh/scenario_commands.py, docs/cli.md "Scenarios").

The local checks run as real ``python -m mesh.cli`` processes with no node at all: a mistake in
the file or in a ``--param`` is exit 2, one line naming where, before any network call. The
rest runs the CLI as a real process against a real 3-node mesh: a tiny scenario passes (exit
0, PASS), an assertion that cannot hold fails (exit 1, FAIL with the measured value), ``--format
json`` is the result JSON, and the run is followed to its end through a follower and across the
death of the node the CLI was talking to.
"""

from __future__ import annotations

import csv
import http.server
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from mesh.client import MAX_EVENT_BYTES, ApiClient, ApiError
from mesh.scenario_commands import _Progress
from mesh.scenarios import format
from tests.cluster import REPO_ROOT, Cluster, NodeProcess, http_request
from tests.netutil import free_port_pair

pytestmark = pytest.mark.timeout(180)

WAIT = 20.0
RUN_TIMEOUT = 60.0  # one CLI process, start to end

TINY = """\
test:
  name: cli_tiny
  description: five creates, a short sleep, five deletes
  parameters:
    count: 5
  steps:
    - name: create
      type: loop
      iterations: ${count}
      action:
        method: create_schedule
        args: {task_id: noop, trigger: {type: interval, seconds: 3600}}
    - name: wait
      type: sleep
      duration: 0.2
    - name: delete
      type: loop
      iterations: ${count}
      action: {method: delete_schedule}
  metrics:
    - creation_rate
  assertions:
    - creation_rate > ${floor}
"""


def tiny(floor: str = "0", name: str = "cli_tiny") -> str:
    """The tiny scenario, named ``name``, asserting ``creation_rate > floor``."""
    return TINY.replace("name: cli_tiny", f"name: {name}").replace("${floor}", floor)


def schedulezero(*argv: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``schedulezero ARGV`` as a real process (stderr is not a terminal: a line per step)."""
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("schedulezero: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("schedulezero: error: ")


def write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- local checks


@pytest.fixture
def nowhere() -> str:
    """A URL nothing listens on: a check that calls the API would say "cannot reach"."""
    return f"http://127.0.0.1:{free_port_pair('127.0.0.1')}"


def test_a_yaml_syntax_error_is_exit_2_with_its_line_before_any_call(
    tmp_path: Path, nowhere: str
) -> None:
    path = write(
        tmp_path, tiny().replace("      iterations: ${count}\n", "      iterations: [\n", 1)
    )
    proc = schedulezero("scenario", "run", path, "--url", nowhere)
    assert (proc.returncode, proc.stdout) == (2, "")
    message = one_error_line(proc.stderr)
    # Where the parser met it: the line after the unclosed "[", at the next mapping key.
    assert message.startswith(f"{path}: line 11, column 15: "), message
    assert "cannot reach" not in message


def test_a_structure_error_names_the_field_and_its_line(tmp_path: Path, nowhere: str) -> None:
    path = write(tmp_path, tiny().replace("iterations: ${count}", "iterations: many", 1))
    proc = schedulezero("scenario", "run", path, "--url", nowhere)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "steps[0].iterations (line 9)" in one_error_line(proc.stderr)


def test_an_unknown_param_is_exit_2_naming_the_scenarios_parameters(
    tmp_path: Path, nowhere: str
) -> None:
    proc = schedulezero("scenario", "run", write(tmp_path, tiny()), "--param", "cuont=3")
    assert (proc.returncode, proc.stdout) == (2, "")
    message = one_error_line(proc.stderr)
    assert "has no parameter 'cuont'; its parameters: count" in message


@pytest.mark.parametrize(
    ("params", "says"),
    [
        (["count=lots"], "count: must be an integer, got 'lots'"),
        (["count"], "--param must be NAME=VALUE"),
        (["count=0"], "iterations"),  # valid text, but the resolved loop is not
        (["count=1", "count=2"], "--param count: given twice"),
    ],
)
def test_a_bad_param_value_is_exit_2(tmp_path: Path, params: list[str], says: str) -> None:
    argv = [arg for p in params for arg in ("--param", p)]
    proc = schedulezero("scenario", "validate", write(tmp_path, tiny()), *argv)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert says in one_error_line(proc.stderr)


def test_validate_prints_the_plan_with_the_params(tmp_path: Path) -> None:
    proc = schedulezero("scenario", "validate", write(tmp_path, tiny()), "--param", "count=7")
    assert proc.returncode == 0, proc.stderr
    assert "cli_tiny (version " in proc.stdout
    assert "steps: 3, actions in all: 14" in proc.stdout
    assert "assertions: creation_rate > 0" in proc.stdout


def test_a_shipped_scenario_is_named_without_a_file() -> None:
    proc = schedulezero("scenario", "validate", "schedule_storm")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("schedule_storm (version ")
    proc = schedulezero("scenario", "validate", "no_such_scenario")
    assert proc.returncode == 2
    assert "shipped: " in one_error_line(proc.stderr)


# --------------------------------------------------------------------------- the stream


class _Stream(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the server's ``body`` as a text/event-stream, then closes."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(self.server.body)  # type: ignore[attr-defined]

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stream_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Stream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def url_of(server: http.server.HTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_the_client_reads_server_sent_events(stream_server: Any) -> None:
    stream_server.body = (
        b': keepalive\n\nevent: progress\ndata: {"status":\n'
        b'data: "running"}\n\nevent: done\r\ndata: {"status": "passed"}\r\n\r\n'
    )
    events = list(ApiClient(url_of(stream_server)).events("/api/tests/metrics/x"))
    assert events == [("progress", {"status": "running"}), ("done", {"status": "passed"})]


def test_an_event_larger_than_the_bound_breaks_the_stream(stream_server: Any) -> None:
    """A node (or what answers in its place) cannot make the CLI buffer without end."""
    stream_server.body = b"event: progress\n" + b"data: x\n" * (MAX_EVENT_BYTES // 2 + 1)
    with pytest.raises(ApiError, match=r"the stream from .* broke") as info:
        list(ApiClient(url_of(stream_server)).events("/api/tests/metrics/x"))
    assert info.value.status is None  # the CLI turns to polling


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_progress_is_one_line_rewritten_and_a_new_one_per_step() -> None:
    plan = format.plan(format.load(tiny()), run_id=format.PLACEHOLDER_RUN_ID)
    out = _Terminal()
    progress = _Progress(out, plan.steps)
    for index, done in ((0, 1), (0, 4), (1, 0), (2, 3)):
        progress.show({"run_id": "r", "status": "running", "step": {"index": index, "done": done}})
    progress.show({"run_id": "r", "status": "passed"})
    progress.end()
    lines = out.getvalue().split("\n")
    assert lines[0].split("\r")[1:] == [
        "r: step 1/3 create 1/5\x1b[K",
        "r: step 1/3 create 4/5\x1b[K",
    ]
    assert lines[1:] == [
        "\rr: step 2/3 wait (sleep 0.2 s)\x1b[K",
        "\rr: step 3/3 delete 3/5\x1b[K",
        "\rr: passed\x1b[K",
        "",
    ]


# --------------------------------------------------------------------------- against a mesh


class Mesh:
    def __init__(self, cluster: Cluster, leader: NodeProcess) -> None:
        self.cluster = cluster
        self.leader = leader
        self.follower = next(n for n in cluster.nodes if n is not leader)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("scenario-cli")
    cluster = Cluster(root, 3)
    try:
        cluster.start()
        yield Mesh(cluster, cluster.wait_for_leader(WAIT))
    finally:
        cluster.stop_all()


def test_a_tiny_scenario_passes_exit_0_with_its_metrics_and_pass(
    mesh: Mesh, tmp_path: Path
) -> None:
    proc = schedulezero("scenario", "run", write(tmp_path, tiny()), "--url", mesh.follower.http)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": PASSED" in proc.stdout
    assert "creation_rate > 0" in proc.stdout and "PASS" in proc.stdout
    assert "schedules/sec" in proc.stdout
    assert proc.stderr.splitlines()[-1].endswith(": passed")  # a line per step before (racy)
    assert "Traceback" not in proc.stderr


def test_an_assertion_that_fails_is_exit_1_with_fail_and_the_measured_value(
    mesh: Mesh, tmp_path: Path
) -> None:
    path = write(tmp_path, tiny("1e12", name="cli_tiny_fail"))
    proc = schedulezero("scenario", "run", path, "--url", mesh.leader.http)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ": FAILED" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("creation_rate >"))
    expr, measured, verdict = row.split("  ")[0], row.split()[-2], row.split()[-1]
    assert (expr, verdict) == ("creation_rate > 1e12", "FAIL")
    assert float(measured) > 0


def test_format_json_prints_the_result_only(mesh: Mesh, tmp_path: Path) -> None:
    path = write(tmp_path, tiny(name="cli_tiny_json"))
    proc = schedulezero(
        "scenario", "run", path, "--param", "count=3", "--format", "json", "--url", mesh.leader.http
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "passed"
    assert result["parameters"]["count"] == 3  # sent as the integer it is
    assert result["metrics"]["actions_total"]["value"] == 6
    assert [a["passed"] for a in result["assertions"]] == [True]
    # The same run through results, runs and list.
    run_id = result["run_id"]
    again = schedulezero(
        "scenario", "results", run_id, "--format", "json", "--url", mesh.follower.http
    )
    assert json.loads(again.stdout)["run_id"] == run_id
    exported = schedulezero(
        "scenario", "results", run_id, "--format", "csv", "--url", mesh.leader.http
    )
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(r["name"], r["passed"]) for r in rows if r["kind"] == "assertion"] == [
        ("creation_rate > 0", "true")
    ]
    listed = schedulezero("scenario", "runs", "--name", "cli_tiny_json", "--url", mesh.leader.http)
    assert run_id in listed.stdout and "passed" in listed.stdout
    library = schedulezero("scenario", "list", "--url", mesh.leader.http)
    assert "cli_tiny_json" in library.stdout


def test_schedule_sends_the_params_typed_with_the_loaded_scenarios_defaults(mesh: Mesh) -> None:
    ApiClient(mesh.leader.http).load_scenario(tiny(name="cli_sched"))
    argv = ("scenario", "schedule", "cli_sched", "--cron", "0 3 * * *", "--url", mesh.follower.http)
    proc = schedulezero(*argv, "--param", "count=2", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    schedule = json.loads(proc.stdout)
    assert schedule["id"] == "scenario-cli_sched"
    assert schedule["kwargs"] == {"name": "cli_sched", "parameters": {"count": 2}}
    bad = schedulezero(*argv, "--id", "other", "--param", "count=two")
    assert bad.returncode == 2
    assert one_error_line(bad.stderr) == "parameter count: must be an integer, got 'two'"


def test_an_unknown_run_is_exit_1_with_the_apis_404(mesh: Mesh) -> None:
    proc = schedulezero("scenario", "results", "0123456789abcdef", "--url", mesh.leader.http)
    assert proc.returncode == 1
    # The API's message should be "no run '...'" (mesh/scenarios/http.py puts it in the 404's
    # text, which the error middleware drops for its reason): the status is what is sure.
    assert one_error_line(proc.stderr).startswith("404: ")


def test_cancel_ends_a_running_run_and_its_cli_exits_1(mesh: Mesh, tmp_path: Path) -> None:
    slow = tiny(name="cli_slow").replace("duration: 0.2", "duration: 60")
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "scenario",
            "run",
            write(tmp_path, slow),
            *("--url", mesh.leader.http),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert cli.stderr is not None
        # The progress, a line per step (stderr is no terminal), named and sized from the file;
        # cancelled once the CLI shows the sleep.
        seen = read_until(cli.stderr, ": step 2/3 wait (sleep 60 s)\n")
        run_id = seen[-1].split(":")[0]
        cancel = schedulezero("scenario", "cancel", run_id, "--url", mesh.follower.http)
        assert cancel.returncode == 0, cancel.stderr
        assert (
            cancel.stdout == f"run {run_id}: cancel requested (it was running); it ends cancelled\n"
        )
        out, err = cli.communicate(timeout=RUN_TIMEOUT)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 1, out + err
    assert f"run {run_id} of cli_slow: CANCELLED" in out
    assert err == f"{run_id}: cancelled\n"


def read_until(pipe: IO[str], text: str, timeout: float = WAIT) -> list[str]:
    """Lines from ``pipe`` up to one that ends with ``text`` (AssertionError after ``timeout``)."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in pipe:
            lines.append(line)
            if line.endswith(text):
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no line ending {text!r} in {timeout} s: {lines}"
    return lines


def test_the_run_is_followed_to_its_end_when_the_node_the_cli_asks_dies(
    cluster_factory: Any, tmp_path: Path
) -> None:
    """The CLI talks to the leader; it is killed during the run's sleep: the stream breaks, the
    CLI polls the other nodes, the new leader resumes the run and the CLI reports it passed."""
    cluster = cluster_factory(3)
    leader = cluster.wait_for_leader(WAIT)
    resumable = tiny(name="cli_failover").replace("duration: 0.2", "duration: 4")
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "scenario",
            "run",
            write(tmp_path, resumable),
            *("--url", leader.http, "--format", "json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        wait_for_step(leader, "cli_failover", 1)
        leader.kill()
        out, err = cli.communicate(timeout=RUN_TIMEOUT)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, out + err
    assert "live progress lost" in err and "Traceback" not in err
    result = json.loads(out)
    assert (result["status"], result["resumed"]) == ("passed", 1)
    assert result["leader"] != leader.node_id


def wait_for_step(node: NodeProcess, name: str, index: int) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        code, body = http_request(f"{node.http}/api/tests/runs?name={name}&limit=1")
        if code == 200 and body["runs"] and body["runs"][0]["step"]["index"] >= index:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run of {name} did not reach step {index} in {WAIT} s")
