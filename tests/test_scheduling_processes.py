"""The scheduler on real node processes: writes through followers, firing on the leader, and the
firing guarantee across leader crashes."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from mesh.config import SchedulingConfig
from tests.cluster import Cluster, NodeProcess

TASKS = ("--tasks", "tests.fixtures.recorder_tasks")
# Fires a round committed ahead of a pause or delete still run (scheduling.lookahead).
LOOKAHEAD = timedelta(seconds=SchedulingConfig().lookahead)


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fires_after(path: Path, moment: datetime) -> list[datetime]:
    """Fire times recorded in ``path`` later than ``moment``."""
    fires = (datetime.fromisoformat(r["fire"]) for r in _records(path))
    return [f for f in fires if f > moment]


def _missing_fires(records: list[dict], period: timedelta) -> list[tuple[datetime, datetime]]:
    """Neighbouring recorded fire times further apart than one period."""
    times = sorted({datetime.fromisoformat(r["fire"]) for r in records})
    return [(a, b) for a, b in itertools.pairwise(times) if b - a != period]


def _create(node: NodeProcess, schedule_id: str, seconds: float, path: Path, **extra) -> None:
    body = {
        "id": schedule_id,
        "task": "record",
        "trigger": {"type": "interval", "seconds": seconds},
        "kwargs": {"path": str(path)},
        **extra,
    }
    status, created = node.request("POST", "/api/schedules", body)
    assert status == 201, created


def _follower(cluster: Cluster, *, not_: tuple = ()):
    leader = cluster.wait_for_leader()
    return leader, next(n for n in cluster.running() if n is not leader and n not in not_)


def test_schedule_written_to_a_follower_is_on_every_node_fires_on_the_leader_and_stops_when_deleted(
    cluster_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3, TASKS)
    leader, follower = _follower(cluster)
    out = tmp_path / "fires.jsonl"
    body = {
        "id": "every-quarter",
        "task": "record",
        "trigger": {"type": "interval", "seconds": 0.25},
        "kwargs": {"path": str(out)},
    }
    status, created = follower.request("POST", "/api/schedules", body)
    assert status == 201, created
    assert created["id"] == "every-quarter" and created["next_fire_time"]
    for node in cluster.running():
        status, got = node.request("GET", "/api/schedules/every-quarter")
        assert status == 200 and got["task"] == "record", (node, got)
    cluster.wait_for(lambda: len(_records(out)) >= 4, 10, "four fires")
    assert {r["pid"] for r in _records(out)} == {leader.pid}
    witness = tmp_path / "witness.jsonl"
    _create(follower, "witness", 0.25, witness)
    other = next(n for n in cluster.running() if n not in (leader, follower))
    status, _ = other.request("DELETE", "/api/schedules/every-quarter")
    assert status == 204
    deleted_at = datetime.now(UTC)
    # Another schedule of the same period fired four times since: the scheduler had as many
    # chances to fire the deleted one. A fire due before the delete may still land, and so may
    # one its fire round committed ahead, within the lookahead (docs/scheduling.md).
    cluster.wait_for(
        lambda: len(_fires_after(witness, deleted_at)) >= 4, 10, "four more fires of a witness"
    )
    assert _fires_after(out, deleted_at + LOOKAHEAD) == []
    for node in cluster.running():
        assert node.request("GET", "/api/schedules/every-quarter")[0] == 404


def test_every_fire_time_runs_exactly_once_across_two_leader_kills(
    cluster_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(3, TASKS)
    _, follower = _follower(cluster)
    out = tmp_path / "fires.jsonl"
    status, created = follower.request(
        "POST",
        "/api/schedules",
        {
            "id": "failover",
            "task": "record",
            "trigger": {"type": "interval", "seconds": 0.25},
            "kwargs": {"path": str(out)},
            "coalesce": "all",
            "misfire_grace_time": 60,
        },
    )
    assert status == 201, created

    def fired_by(term: int, at_least: int) -> bool:
        records = _records(out)
        return len(records) >= at_least and any(r["token"] == term for r in records)

    term = 0
    for _ in range(2):
        leader = cluster.wait_for_leader(newer_than_term=term)
        term = leader.health()["term"]
        # The fencing token is the leader's term: this leader has fired before it dies.
        cluster.wait_for(
            lambda term=term: fired_by(term, 4), 10, f"fires by the leader of term {term}"
        )
        leader.kill(signal.SIGKILL)
        cluster.wait_for_leader(among=[n for n in cluster.running()], newer_than_term=term)
        leader.restart()
    node = cluster.wait_for_leader(newer_than_term=term)
    term = node.health()["term"]
    cluster.wait_for(
        lambda: fired_by(term, 12) and len({r["fire"] for r in _records(out)}) >= 12,
        20,
        f"12 fire times, some by the leader of term {term}",
    )
    assert node.request("DELETE", "/api/schedules/failover")[0] == 204
    # A fire in flight when the delete committed may still land: wait until every fire time up
    # to the last one recorded is there (a fire that never runs fails this wait).
    period = timedelta(seconds=0.25)
    cluster.wait_for(
        lambda: not _missing_fires(_records(out), period),
        10,
        "no fire time missing between the first and the last",
    )

    records = _records(out)
    fires = Counter(r["fire"] for r in records)
    # A duplicate would only be legitimate as a retry (attempt > 1) of a job whose runner died
    # mid-job; a second *first* attempt would mean the scheduler fired the same time twice.
    first_attempts = Counter(r["fire"] for r in records if r["attempt"] == 1)
    assert [f for f, n in first_attempts.items() if n > 1] == []
    times = sorted(datetime.fromisoformat(f) for f in fires)
    gaps = _missing_fires(records, period)
    assert gaps == [], f"missing fire times between {gaps[:3]}"
    assert len({r["token"] for r in records}) >= 3, "fires should come from three leader terms"
    assert len(times) >= 12


def test_run_now_job_reports_its_result_on_any_node(cluster_factory) -> None:
    cluster = cluster_factory(3, TASKS)
    _, follower = _follower(cluster)
    status, body = follower.request("POST", "/api/jobs", {"task": "double", "args": [21]})
    assert status == 202, body

    def finished():
        st, job = follower.request("GET", f"/api/jobs/{body['job_id']}")
        return job if st == 200 and job.get("status") == "success" else None

    job = cluster.wait_for(finished, 10, "the job to finish")
    assert job["return_value"] == 42
    status, hist = follower.request("GET", "/api/executions?limit=5")
    assert status == 200 and any(e["job_id"] == body["job_id"] for e in hist["executions"])
    # Filtered on a follower: a run-now job's time is its start, and since is inclusive.
    [record] = [e for e in hist["executions"] if e["job_id"] == body["job_id"]]
    started = datetime.fromisoformat(record["started_at"])
    later = quote((started + timedelta(microseconds=1)).isoformat(), safe="")

    def listed(query: str) -> bool:
        status, page = follower.request("GET", f"/api/executions?{query}")
        assert status == 200, (query, page)
        return any(e["job_id"] == body["job_id"] for e in page["executions"])

    assert listed(f"outcome=success&since={quote(record['started_at'], safe='')}")
    assert not listed("outcome=error")
    assert not listed(f"since={later}")
    status, err = follower.request("GET", "/api/executions?outcome=done")
    assert status == 400 and "success" in err["error"], err


def test_pause_and_resume_through_a_follower(cluster_factory, tmp_path: Path) -> None:
    cluster = cluster_factory(3, TASKS)
    _, follower = _follower(cluster)
    out, witness = tmp_path / "fires.jsonl", tmp_path / "witness.jsonl"
    _create(follower, "p", 0.2, out)
    _create(follower, "witness", 0.2, witness)
    cluster.wait_for(lambda: len(_records(out)) >= 2, 10, "fires")
    status, paused = follower.request("POST", "/api/schedules/p/pause")
    assert status == 200 and paused["paused"] is True
    paused_at = datetime.now(UTC)
    # Another schedule of the same period fired five times since: the scheduler had as many
    # chances to fire the paused one. A fire due before the pause may still land, and so may one
    # its fire round committed ahead, within the lookahead (docs/scheduling.md).
    cluster.wait_for(
        lambda: len(_fires_after(witness, paused_at)) >= 5, 10, "five more fires of a witness"
    )
    assert _fires_after(out, paused_at + LOOKAHEAD) == []
    status, resumed = follower.request("POST", "/api/schedules/p/resume")
    assert status == 200 and resumed["paused"] is False
    cluster.wait_for(lambda: _fires_after(out, paused_at), 10, "fires after resume")


def test_writes_without_a_quorum_get_503_quickly_and_reads_still_work(cluster_factory) -> None:
    cluster = cluster_factory(3, TASKS)
    _leader, follower = _follower(cluster)
    for n in cluster.running():
        if n is not follower:
            n.kill(signal.SIGKILL)
    started = time.monotonic()
    status, body = follower.request(
        "POST",
        "/api/schedules",
        {"id": "x", "task": "record", "trigger": {"type": "interval", "seconds": 1}},
        timeout=15,
    )
    elapsed = time.monotonic() - started
    assert status == 503 and "leader" in body["error"], body
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert follower.request("GET", "/api/schedules")[0] == 200


BAD_SCHEDULES = [
    ("not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({"id": "a", "task": "t", "trigger": {"type": "weekly"}}, "unknown trigger type"),
    ({"id": "a", "task": "t", "trigger": {"type": "cron", "expr": "* * *"}}, "cron"),
    (
        {
            "id": "a",
            "task": "t",
            "trigger": {"type": "cron", "expr": "* * * * *", "timezone": "Mars/Base"},
        },
        "timezone",
    ),
    ({"id": "a", "task": 5, "trigger": {"type": "interval", "seconds": 1}}, "task"),
    ({"id": "a", "task": "t", "trigger": {"type": "interval", "seconds": "x"}}, "seconds"),
    ({"id": "a", "task": "t", "trigger": {"type": "interval", "seconds": 1}, "bogus": 1}, "bogus"),
    (
        {
            "id": "a",
            "task": "t",
            "trigger": {"type": "interval", "seconds": 1},
            "coalesce": "sometimes",
        },
        "coalesce",
    ),
]


def test_bad_input_gets_a_clear_400_on_every_write_endpoint(cluster_factory) -> None:
    cluster = cluster_factory(3, TASKS)
    _, follower = _follower(cluster)
    import urllib.request

    for body, needle in BAD_SCHEDULES:
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        req = urllib.request.Request(
            follower.http + "/api/schedules",
            data=raw,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                req, timeout=5
            ) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        assert status == 400, (body, status, text)
        assert needle.lower() in json.loads(text)["error"].lower(), (body, text)
    ok = {"id": "dup", "task": "record", "trigger": {"type": "interval", "seconds": 60}}
    assert follower.request("POST", "/api/schedules", ok)[0] == 201
    status, body = follower.request("POST", "/api/schedules", ok)
    assert status == 409 and "already exists" in body["error"]
    assert follower.request("GET", "/api/schedules/nope")[0] == 404
    assert follower.request("DELETE", "/api/schedules/nope")[0] == 404
    assert follower.request("POST", "/api/schedules/nope/pause")[0] == 404
    status, body = follower.request("PUT", "/api/schedules/dup", {**ok, "id": "other"})
    assert status == 400, body
    assert follower.request("POST", "/api/jobs", {"task": 7})[0] == 400
    assert follower.request("GET", "/api/jobs/not-a-uuid")[0] == 400
    assert follower.request("GET", "/api/jobs/00000000-0000-0000-0000-000000000000")[0] == 404
    assert follower.request("GET", "/api/executions?limit=0")[0] == 400
    assert follower.request("GET", "/api/executions?limit=abc")[0] == 400
    big = {
        "id": "big",
        "task": "t",
        "trigger": {"type": "interval", "seconds": 1},
        "kwargs": {"blob": "x" * (2 * 1024 * 1024)},
    }
    status, body = follower.request("POST", "/api/schedules", big, timeout=10)
    assert status == 413 and "too large" in body["error"]


def test_a_follower_that_missed_compacted_entries_catches_up_through_a_snapshot(
    cluster_factory,
) -> None:
    cluster = cluster_factory(3, TASKS, config={"raft": {"snapshot_threshold": 20}})
    leader, follower = _follower(cluster)
    follower.kill(signal.SIGKILL)
    for i in range(40):
        body = {"id": f"snap-{i}", "task": "record", "trigger": {"type": "interval", "hours": 1}}
        status, reply = leader.request("POST", "/api/schedules", body)
        assert status == 201, reply
    # Two snapshot thresholds past what the follower holds: its missing entries are compacted.
    assert leader.health()["commit_index"] > 2 * 20
    follower.restart()
    cluster.wait_caught_up(follower, timeout=15)
    status, listed = follower.request("GET", "/api/schedules")
    assert status == 200
    assert {f"snap-{i}" for i in range(40)} <= {s["id"] for s in listed["schedules"]}
    installed = [e for e in follower.events() if e["type"] == "snapshot_installed"]
    assert installed, "the follower should have caught up from the leader's snapshot"
    assert any(e["type"] == "snapshot_taken" for e in leader.events())


def test_a_log_of_few_large_entries_is_compacted_once_its_bytes_reach_the_threshold(
    cluster_factory,
) -> None:
    # 8 entries of ~40 KB: far below 10,000 entries, over 128 KiB (+ up to 25 %) of log.
    config = {"raft": {"snapshot_threshold": 10_000, "snapshot_threshold_bytes": 128 * 1024}}
    cluster = cluster_factory(3, TASKS, config=config)
    leader = cluster.wait_for_leader()
    for i in range(8):
        body = {
            "id": f"big-{i}",
            "task": "record",
            "trigger": {"type": "interval", "hours": 1},
            "kwargs": {"blob": "x" * 40_000},
        }
        status, reply = leader.request("POST", "/api/schedules", body)
        assert status == 201, reply
    cluster.wait_for(
        lambda: any(e["type"] == "snapshot_taken" for e in leader.events()),
        15,
        "a snapshot on the leader",
    )


def test_a_snapshot_larger_than_the_message_limit_reaches_a_follower_in_chunks(
    cluster_factory,
) -> None:
    # 40 schedules carrying 900 KB each. The leader snapshots every 16-20 entries; its second
    # snapshot holds at least 28 of them: a ~25 MB image, above the 16 MiB frame limit that a
    # single InstallSnapshot message would have to fit in.
    cluster = cluster_factory(3, TASKS, config={"raft": {"snapshot_threshold": 16}})
    leader, follower = _follower(cluster)
    follower.kill(signal.SIGKILL)
    blob = "x" * 900_000
    for i in range(40):
        body = {
            "id": f"big-{i}",
            "task": "record",
            "trigger": {"type": "interval", "hours": 1},
            "kwargs": {"blob": blob},
        }
        status, reply = leader.request("POST", "/api/schedules", body, timeout=10)
        assert status == 201, reply
    cluster.wait_for(
        lambda: sum(e["type"] == "snapshot_taken" for e in leader.events()) >= 2,
        30,
        "the leader to take two snapshots",
        interval=0.2,
    )
    follower.restart()
    cluster.wait_caught_up(follower, timeout=30)
    sent = [e for e in leader.events() if e["type"] == "snapshot_sent"]
    assert sent and max(e["bytes"] for e in sent) > 16 * 1024 * 1024
    assert any(e["type"] == "snapshot_installed" for e in follower.events())
    status, one = follower.request("GET", "/api/schedules/big-39")
    assert status == 200 and len(one["kwargs"]["blob"]) == 900_000
    assert leader.health()["role"] == "leader"  # writing the image never cost it leadership


def test_every_trigger_type_round_trips_through_a_follower_and_every_node(cluster_factory) -> None:
    cluster = cluster_factory(3, TASKS)
    _, follower = _follower(cluster)
    triggers = {
        "cron-expr": {"type": "cron", "expr": "0 3 29 2 *", "timezone": "Europe/Berlin"},
        "cron-fields": {"type": "cron", "hour": "4", "minute": "*/15", "day_of_week": "mon-fri"},
        "interval": {"type": "interval", "minutes": 5, "start_time": "2031-01-01T00:00:00Z"},
        "date": {"type": "date", "run_time": "2031-01-01T00:00:00+00:00"},
        # A future start: from today, 04:00 has passed after 04:00 UTC and the leader would fire
        # (and advance) it between the create and the listing.
        "calendar": {
            "type": "calendarinterval",
            "months": 1,
            "hour": 4,
            "start_date": "2031-01-01",
        },
    }
    created = {}
    for sid, trigger in triggers.items():
        status, body = follower.request(
            "POST", "/api/schedules", {"id": sid, "task": "record", "trigger": trigger}
        )
        assert status == 201, (sid, body)
        created[sid] = body
    for node in cluster.running():
        status, listed = node.request("GET", "/api/schedules")
        assert status == 200, listed
        by_id = {s["id"]: s for s in listed["schedules"]}
        for sid, body in created.items():
            assert by_id[sid]["trigger"]["type"] == triggers[sid]["type"]
            assert by_id[sid]["next_fire_time"] == body["next_fire_time"], (node, sid)
    status, body = follower.request("GET", "/api/schedules/cron-expr")
    assert status == 200 and body["trigger"]["expr"] == "0 3 29 2 *"


def test_fires_a_killed_leader_committed_ahead_run_once_on_the_next_leader(
    cluster_factory, tmp_path: Path
) -> None:
    # A lookahead of 2 s: when the leader dies, the fires of its next 2 s are already committed
    # (leased to it, their schedule advanced past them). The next leader must run each of them
    # once, at its time: none lost with the dead leader, none fired again by the new one.
    cluster = cluster_factory(3, TASKS, config={"scheduling": {"lookahead": 2.0}})
    leader, follower = _follower(cluster)
    out = tmp_path / "fires.jsonl"
    period = timedelta(seconds=0.25)
    _create(follower, "ahead", 0.25, out, coalesce="all", misfire_grace_time=60)
    term = leader.health()["term"]
    cluster.wait_for(lambda: len(_records(out)) >= 4, 10, "fires by the first leader")
    killed_at = datetime.now(UTC)
    leader.kill(signal.SIGKILL)
    new = cluster.wait_for_leader(newer_than_term=term)
    new_term = new.health()["term"]
    cluster.wait_for(
        lambda: len(_fires_after(out, killed_at + timedelta(seconds=3))) >= 4,
        15,
        "fires after the dead leader's window",
    )
    assert new.request("DELETE", "/api/schedules/ahead")[0] == 204
    cluster.wait_for(lambda: not _missing_fires(_records(out), period), 10, "no fire time missing")
    records = _records(out)
    first_attempts = Counter(r["fire"] for r in records if r["attempt"] == 1)
    assert [f for f, n in first_attempts.items() if n > 1] == []
    assert _missing_fires(records, period) == []
    # Fired ahead by the dead leader (inside its window), run by the new one.
    window = [
        r
        for r in records
        if killed_at < datetime.fromisoformat(r["fire"]) < killed_at + timedelta(seconds=1.5)
    ]
    assert window and {r["token"] for r in window} == {new_term}, window
    # ...and their jobs were committed by the dead leader's term, in its fire rounds.
    committed = _round_jobs(new.state_db)
    for r in window:
        assert committed.get(r["job"]) == term, (r, sorted(set(committed.values())))


def _round_jobs(state_db: Path) -> dict[str, int]:
    """Job id -> the term of the log entry (a fire_round) that added it, from a node's log."""
    conn = sqlite3.connect(state_db)
    try:
        rows = conn.execute("SELECT term, data FROM raft_log WHERE kind = 'command'").fetchall()
    finally:
        conn.close()
    out = {}
    for entry_term, data in rows:
        command = json.loads(data)
        if isinstance(command, dict) and command.get("op") == "fire_round":
            for row in command["schedules"]:
                for job in row["jobs"]:
                    out[job["id"]] = entry_term
    return out
