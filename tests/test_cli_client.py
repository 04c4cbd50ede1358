"""The CLI's client commands (``schedulezero schedules|executions|handlers|cluster``) against a
real 3-node mesh with API tokens and one handler: what they print, the pages they follow, and
the exit codes scripts rely on (0 done, 1 the API refused with its message, 2 usage).

The commands run in this process through ``mesh.cli.main`` (real HTTP to the nodes); the usage
errors also run as a real ``python -m mesh.cli`` process, which must never print a traceback.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.api.auth import create_token
from mesh.cli import main
from mesh.client import ApiClient, describe_trigger, short_time
from tests.cluster import REPO_ROOT, Cluster, HandlerProc, NodeProcess
from tests.netutil import free_port_pair

pytestmark = pytest.mark.timeout(120)

ROLES = ("read", "operate", "admin")
WAIT = 20.0


class Mesh:
    def __init__(self, cluster: Cluster, tokens: dict[str, str], leader: NodeProcess) -> None:
        self.cluster = cluster
        self.tokens = tokens
        self.leader = leader
        self.follower = next(n for n in cluster.nodes if n is not leader)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("cli-client")
    tokens_path = root / "tokens.json"
    tokens = {role: create_token(tokens_path, f"{role}-user", role) for role in ROLES}
    (root / "cluster").mkdir()
    cluster = Cluster(root / "cluster", 3, ("--api-tokens", str(tokens_path)))
    handler = HandlerProc(
        "h-cli", [n.mesh for n in cluster.nodes], ["mesh.sample_tasks"], root / "handler"
    )
    try:
        cluster.start()
        leader = cluster.wait_for_leader(WAIT)
        handler.start()
        yield Mesh(cluster, tokens, leader)
    finally:
        if handler.running:
            handler.stop()
        cluster.stop_all()


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    """``schedulezero ARGV`` in this process → (exit code, stdout, stderr)."""
    capsys.readouterr()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(argv))
    finally:
        sys.stdin = saved
    out, err = capsys.readouterr()
    return code, out, err


def on(node: NodeProcess, token: str | None) -> tuple[str, ...]:
    return ("--url", node.http, *(("--token", token) if token else ()))


def api_error(url: str, method: str, token: str, payload: Any = None) -> tuple[int, str]:
    """The status and ``{"error"}`` message of a refused call, straight from the API."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10)
    return info.value.code, json.loads(info.value.read())["error"]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("schedulezero: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("schedulezero: error: ")


def body(schedule_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": schedule_id,
        "task": "heartbeat",
        "trigger": {"type": "interval", "hours": 1},
        **extra,
    }


# --------------------------------------------------------------------------- schedules


def test_apply_from_yaml_on_stdin_creates_then_replaces_through_a_follower(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCHEDULEZERO_URL", mesh.follower.http)
    monkeypatch.setenv("SCHEDULEZERO_TOKEN", mesh.tokens["operate"])
    docs = [body("apply-a"), body("apply-b", trigger={"type": "cron", "expr": "0 3 * * *"})]
    code, out, err = run(capsys, "schedules", "apply", "-f", "-", stdin=yaml.safe_dump(docs))
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["created", "apply-a"],
        ["created", "apply-b"],
    ]

    # A list goes in one POST /api/schedules/bulk: what did not change is not written.
    docs[0]["trigger"] = {"type": "interval", "minutes": 5}
    code, out, err = run(capsys, "schedules", "apply", "-f", "-", stdin=yaml.safe_dump(docs))
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["replaced", "apply-a"],
        ["unchanged", "apply-b"],
    ]
    code, out, _ = run(capsys, "schedules", "get", "apply-a", "-o", "json")
    assert code == 0
    assert json.loads(out)["trigger"]["minutes"] == 5

    docs.append({"task": "heartbeat", "trigger": {"type": "interval", "seconds": -1}})
    code, out, err = run(
        capsys, "schedules", "apply", "-f", "-", "-o", "json", stdin=yaml.safe_dump(docs)
    )
    assert (code, out) == (1, "")
    assert one_error_line(err).startswith("400: schedules[2].trigger.seconds: must be")
    code, out, err = run(
        capsys, "schedules", "apply", "-f", "-", "-o", "json", stdin=json.dumps(docs[:2])
    )
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["created"], answer["updated"], answer["unchanged"]) == (0, 0, 2)
    assert [s["id"] for s in answer["schedules"]] == ["apply-a", "apply-b"]


def test_schedules_created_in_bulk_through_a_follower_fire(mesh: Mesh) -> None:
    client = ApiClient(mesh.follower.http, token=mesh.tokens["operate"])
    ids = [f"bulk-fire-{i}" for i in range(3)]
    bodies = [body(sid, trigger={"type": "interval", "seconds": 0.3}) for sid in ids]
    bodies += [body(f"bulk-idle-{i}", paused=True) for i in range(20)]
    answer = client.bulk_schedules(bodies)
    assert answer["created"] == 23, answer
    assert [s["outcome"] for s in answer["schedules"]] == ["created"] * 23

    def all_fired() -> bool:
        done = {ex["schedule_id"] for ex in client.executions(limit=500)}
        return set(ids) <= done

    mesh.cluster.wait_for(all_fired, WAIT, "an execution of every bulk-created schedule")
    for b in bodies:
        client.delete_schedule(b["id"])


def test_create_from_a_json_file_refuses_an_existing_id_with_the_apis_409_message(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(body("create-once")), encoding="utf-8")
    args = ("schedules", "create", "-f", str(path), *on(mesh.leader, mesh.tokens["operate"]))
    code, out, err = run(capsys, *args, "-o", "json")
    assert code == 0, err
    created = json.loads(out)
    assert created["id"] == "create-once" and created["next_fire_time"]

    code, out, err = run(capsys, *args)
    assert (code, out) == (1, "")
    status, message = api_error(
        mesh.leader.http + "/api/schedules", "POST", mesh.tokens["operate"], body("create-once")
    )
    assert status == 409
    assert one_error_line(err) == f"409: {message}"


def test_list_shows_each_schedule_once_in_words_and_json_matches_the_api(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    operate = on(mesh.leader, mesh.tokens["operate"])
    cron = {"type": "cron", "expr": "*/5 * * * *", "timezone": "Europe/Berlin"}
    for sid, trigger in (("list-i", {"type": "interval", "minutes": 90}), ("list-c", cron)):
        text = json.dumps(body(sid, trigger=trigger, paused=True))
        assert run(capsys, "schedules", "apply", "-f", "-", *operate, stdin=text)[0] == 0

    code, out, err = run(capsys, "schedules", "list", *on(mesh.follower, mesh.tokens["read"]))
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "TASK", "TRIGGER", "NEXT", "FIRE", "PAUSED"]
    by_id = {row.split()[0]: row for row in rows}
    assert len(by_id) == len(rows)
    assert "every 1h 30m" in by_id["list-i"] and by_id["list-i"].rstrip().endswith("yes")
    assert "cron */5 * * * * (Europe/Berlin)" in by_id["list-c"]

    code, out, _ = run(capsys, "schedules", "list", "-o", "json", *operate)
    listed = json.loads(out)
    api = ApiClient(mesh.leader.http, token=mesh.tokens["operate"]).request("GET", "/api/schedules")
    assert listed == api["schedules"]


def test_the_client_follows_next_page_after_page(mesh: Mesh) -> None:
    client = ApiClient(mesh.leader.http, token=mesh.tokens["operate"])
    for sid in ("page-1", "page-2", "page-3"):
        client.apply_schedule(body(sid, paused=True))
    every = [s["id"] for s in client.schedules()]
    one_by_one = [s["id"] for s in client.pages("/api/schedules", "schedules", {"limit": 1})]
    assert one_by_one == every and {"page-1", "page-2", "page-3"} <= set(every)


def test_a_read_token_cannot_pause_exit_1_with_the_apis_403_message(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    ApiClient(mesh.leader.http, token=mesh.tokens["operate"]).apply_schedule(body("guarded"))
    url = mesh.follower.http + "/api/schedules/guarded/pause"
    status, message = api_error(url, "POST", mesh.tokens["read"])
    assert status == 403

    code, out, err = run(
        capsys, "schedules", "pause", "guarded", *on(mesh.follower, mesh.tokens["read"])
    )
    assert (code, out) == (1, "")
    assert one_error_line(err) == f"403: {message}"
    code, out, _ = run(
        capsys, "schedules", "get", "guarded", "-o", "json", *on(mesh.leader, mesh.tokens["read"])
    )
    assert code == 0 and json.loads(out)["paused"] is False


def test_without_a_token_the_cli_exits_1_with_the_401_message(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCHEDULEZERO_TOKEN", raising=False)
    code, _, err = run(capsys, "schedules", "list", "--url", mesh.leader.http)
    assert code == 1
    assert one_error_line(err).startswith("401: ")


def test_pause_with_a_note_resume_and_delete(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    operate = on(mesh.follower, mesh.tokens["operate"])
    ApiClient(mesh.leader.http, token=mesh.tokens["operate"]).apply_schedule(body("cycle"))

    code, out, err = run(capsys, "schedules", "pause", "cycle", "--note", "maintenance", *operate)
    assert (code, out.strip()) == (0, "paused cycle"), err
    got = json.loads(run(capsys, "schedules", "get", "cycle", "-o", "json", *operate)[1])
    assert got["paused"] is True
    assert got["note"] == "maintenance"
    assert "yes: maintenance" in run(capsys, "schedules", "get", "cycle", *operate)[1]
    code, out, _ = run(capsys, "schedules", "resume", "cycle", "-o", "json", *operate)
    assert code == 0 and json.loads(out)["paused"] is False
    assert json.loads(out)["note"] == ""

    assert run(capsys, "schedules", "delete", "cycle", *operate)[:2] == (0, "deleted cycle\n")
    code, _, err = run(capsys, "schedules", "get", "cycle", *operate)
    assert code == 1 and one_error_line(err).startswith("404: ") and "cycle" in err


def test_trigger_and_backfill_run_a_schedule_outside_its_times(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    operate = on(mesh.follower, mesh.tokens["operate"])
    hourly = body("trig", trigger={"type": "interval", "hours": 1,
                                   "start_time": "2024-01-01T00:00:00Z"}, paused=True)  # fmt: skip
    ApiClient(mesh.leader.http, token=mesh.tokens["operate"]).apply_schedule(hourly)
    code, out, err = run(capsys, "schedules", "trigger", "trig", *operate)
    assert code == 0 and out.startswith("triggered trig: job "), err
    window = ("--start", "2024-01-01T00:00:00Z", "--end", "2024-01-01T03:00:00Z")
    code, out, err = run(capsys, "schedules", "backfill", "trig", *window, "-o", "json", *operate)
    assert code == 0, err
    answer = json.loads(out)
    assert (answer["fire_times"], answer["already_run"], len(answer["job_ids"])) == (3, 0, 3)
    code, out, err = run(capsys, "schedules", "backfill", "trig", *window, *operate)
    assert (code, out.strip()) == (
        0,
        "backfill of trig: 3 fire times, 3 already ran, 0 queued to run one after another",
    ), err


def test_schedules_get_shows_the_added_fields(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    operate = on(mesh.follower, mesh.tokens["operate"])
    limited = body("limited", remaining_runs=5, history={"keep_success": 3}, overlap="skip",
                   paused=True)  # fmt: skip
    ApiClient(mesh.leader.http, token=mesh.tokens["operate"]).apply_schedule(limited)
    out = run(capsys, "schedules", "get", "limited", *operate)[1]
    assert "remaining runs: 5" in out
    assert 'history:        {"keep_success": 3, "keep_failed": null}' in out
    assert "overlap:        skip" in out


@pytest.mark.parametrize(
    "argv",
    [
        ("executions", "--outcome", "exploded"),
        ("schedules", "backfill", "x", "--start", "2024-01-01T00:00:00", "--end", "2024-01-02Z"),
        ("schedules", "backfill", "x", "--start", "yesterday", "--end", "2024-01-02T00:00:00Z"),
        ("schedules", "backfill", "x", "--start", "2024-01-01T00:00:00Z"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    code, _, err = run(capsys, *argv, "--url", "http://127.0.0.1:9")
    assert code == 2
    one_error_line(err)


# --------------------------------------------------------------------------- the rest


def test_executions_of_a_schedule_are_listed_with_limit_and_outcome(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    operate = on(mesh.follower, mesh.tokens["operate"])
    fast = body("beat", trigger={"type": "interval", "seconds": 0.3})
    assert run(capsys, "schedules", "apply", "-f", "-", *operate, stdin=json.dumps(fast))[0] == 0

    def two_done() -> list[dict[str, Any]] | None:
        code, out, err = run(
            capsys, "executions", "--schedule", "beat", "--limit", "2", "-o", "json", *operate
        )
        assert code == 0, err
        items = json.loads(out)
        return items if len(items) == 2 else None

    items = mesh.cluster.wait_for(two_done, WAIT, "two executions of 'beat'")
    assert {ex["schedule_id"] for ex in items} == {"beat"}
    assert {ex["handler_id"] for ex in items} == {"h-cli"}

    code, out, err = run(
        capsys, "executions", "--schedule", "beat", "--outcome", "success", *operate
    )
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["JOB", "SCHEDULE", "OUTCOME"]
    assert rows and all(row.split()[1:3] == ["beat", "success"] for row in rows)

    # An outcome the mesh does not know is refused before any request (exit 2, one line).
    code, _, err = run(capsys, "executions", "--outcome", "bogus", *operate)
    assert code == 2 and "--outcome" in one_error_line(err)
    ApiClient(mesh.leader.http, token=mesh.tokens["operate"]).delete_schedule("beat")


def test_jobs_run_prints_the_job_id_and_jobs_get_its_result(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    operate = on(mesh.follower, mesh.tokens["operate"])
    code, out, err = run(capsys, "jobs", "run", "add", "--args", "[1, 2]", *operate)
    assert code == 0, err
    job_id = out.strip()

    def finished() -> dict[str, Any] | None:
        code, out, err = run(capsys, "jobs", "get", job_id, "-o", "json", *operate)
        assert code == 0, err
        status = json.loads(out)
        return status if status.get("outcome") else None

    status = mesh.cluster.wait_for(finished, WAIT, f"job {job_id} of add(1, 2) to finish")
    assert status["outcome"] == "success" and status["return_value"] == 3, status
    code, _, err = run(capsys, "jobs", "run", "add", "--args", "{}", *operate)
    assert code == 2 and "--args: expected a JSON list" in one_error_line(err)


def test_handlers_lists_the_running_handler(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    read = on(mesh.follower, mesh.tokens["read"])

    def listed() -> str | None:
        code, out, err = run(capsys, "handlers", *read)
        assert code == 0, err
        return out if "h-cli" in out else None

    out = mesh.cluster.wait_for(listed, WAIT, "the handler in `schedulezero handlers`")
    assert out.splitlines()[0].split()[:2] == ["HANDLER", "STATE"]
    _, out, _ = run(capsys, "handlers", "-o", "json", *read)
    assert "heartbeat" in next(h for h in json.loads(out) if h["handler_id"] == "h-cli")["tasks"]


def test_cluster_status_and_members_name_the_leader_and_the_voters(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    read = on(mesh.follower, mesh.tokens["read"])
    code, out, err = run(capsys, "cluster", "status", *read)
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"leader: {mesh.leader.node_id}  term: ")
    assert {n.node_id for n in mesh.cluster.nodes} <= set(out.split())

    code, out, _ = run(capsys, "cluster", "members", "-o", "json", *read)
    assert code == 0
    assert set(json.loads(out)["voters"]) == {n.node_id for n in mesh.cluster.nodes}


def test_membership_changes_need_an_admin_token(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    voter = mesh.follower.node_id
    code, _, err = run(
        capsys, "cluster", "add-member", voter, *on(mesh.leader, mesh.tokens["operate"])
    )
    assert code == 1 and one_error_line(err).startswith("403: ")
    # Adding a node that already votes changes nothing, and answers the voter set.
    code, out, err = run(
        capsys, "cluster", "add-member", voter, "-o", "json", *on(mesh.leader, mesh.tokens["admin"])
    )
    assert code == 0, err
    assert voter in json.loads(out)["voters"]


# --------------------------------------------------------------------------- without a mesh


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["schedules"], "ACTION"),
        (["schedules", "list", "-o", "xml"], "invalid choice: 'xml'"),
        (["schedules", "list", "--url", "localhost:8100"], "--url: expected http://"),
        (["schedules", "create"], "-f/--file"),
        (["schedules", "apply", "-f", "/nonexistent/s.yaml"], "-f: cannot read"),
        (["executions", "--limit", "0"], "--limit: must be at least 1"),
        (["executions", "--limit", "many"], "--limit: expected an integer"),
        (["schedules", "pause"], "ID"),
        (["cluster", "status", "--cacert", "/nonexistent/ca.pem"], "--cacert: cannot load"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line_and_no_traceback(argv: list[str], says: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert says in one_error_line(proc.stderr)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "holds no schedule"),
        ("[1, 2]", "item 1 is not an object"),
        ("id: [unclosed", "neither JSON nor YAML"),
        ('"just a string"', "item 1 is not an object"),
    ],
)
def test_a_file_that_holds_no_schedule_bodies_is_a_usage_error(
    content: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "schedules", "create", "-f", "-", stdin=content)
    assert (code, out) == (2, "")
    assert says in one_error_line(err)


def test_an_unreachable_node_exits_1_saying_so(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port_pair('127.0.0.1')}"
    code, out, err = run(capsys, "handlers", "--url", url)
    assert (code, out) == (1, "")
    assert one_error_line(err).startswith(f"cannot reach {url}: ")


def test_triggers_are_described_in_words() -> None:
    assert describe_trigger({"type": "interval", "hours": 1, "minutes": 30}) == "every 1h 30m"
    assert describe_trigger({"type": "interval", "seconds": 0.5}) == "every 0.5s"
    assert describe_trigger({"type": "cron", "expr": "0 3 * * *", "timezone": "UTC"}) == (
        "cron 0 3 * * * (UTC)"
    )
    assert describe_trigger({"type": "date", "run_time": "2026-11-23T10:00:00+00:00"}) == (
        "once at 2026-11-23 10:00:00Z"
    )
    calendar = {"type": "calendarinterval", "months": 1, "hour": 10, "minute": 0, "second": 0}
    assert describe_trigger(calendar) == "every 1 month at 10:00:00"
    assert short_time("2026-05-01T12:00:00.123456+02:00") == "2026-05-01 12:00:00+02:00"
