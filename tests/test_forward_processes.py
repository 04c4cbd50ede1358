"""Writes through a follower of real ``schedulezero node`` processes on a secured mesh: they
reach the leader over the mesh (``api_forward``), run as the caller there, and can be read back
from the follower at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.api.auth import create_token
from tests.test_api_auth_processes import call, follower_of, schedule

pytestmark = pytest.mark.timeout(120)

WAIT = 15.0


def test_a_write_through_a_follower_goes_over_the_mesh_as_its_caller(
    cluster_factory: Any, tmp_path: Path
) -> None:
    tokens_path = tmp_path / "tokens.json"
    operate = create_token(tokens_path, "ops", "operate")
    admin = create_token(tokens_path, "root", "admin")
    cluster = cluster_factory(3, ("--api-tokens", str(tokens_path)), secure=True)
    leader = cluster.wait_for_leader()
    follower = follower_of(cluster, leader)
    written: list[str] = []

    def forwarded_over_the_mesh() -> dict[str, Any] | None:
        # Until the follower heard (in a ping) that the leader takes api_forward, it uses HTTP.
        sid = f"fw{len(written)}"
        status, body, headers = call(
            follower.http + "/api/schedules", "POST", schedule(sid), token=operate
        )
        assert status == 201, body
        assert headers["X-ScheduleZero-Served-By"].startswith(f"{leader.node_id}@")
        written.append(sid)
        # Read your writes: the follower answers only once it applied the write.
        assert call(follower.http + f"/api/schedules/{sid}", token=operate)[0] == 200
        _, audit, _ = call(leader.http + "/api/audit?limit=1000", token=admin)
        [row] = [e for e in audit["audit"] if e["schedule_id"] == sid]
        return row if row["peer"] == f"mesh:{follower.node_id}" else None

    row = cluster.wait_for(forwarded_over_the_mesh, WAIT, "a write forwarded over the mesh")
    assert (row["token"], row["role"], row["method"], row["status"]) == (
        "ops",
        "operate",
        "POST",
        201,
    )
    assert (row["node_id"], row["received_by"], row["client"]) == (
        leader.node_id,
        follower.node_id,
        "127.0.0.1",
    )
