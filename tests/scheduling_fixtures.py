"""Helpers for testing the scheduling plug-ins against a real, in-process, single-node mesh.

``solo_leader`` starts one ``MeshNode`` (real ZeroMQ sockets on 127.0.0.1, real SQLite log) that
elects itself, so every store mutation really goes propose → commit → apply. ``started_store``
starts a ``ReplicatedDataStore`` the way APScheduler does, with a ``LocalEventBroker`` on the same
exit stack, inside a task of its own: pytest-asyncio runs a fixture's setup and teardown in
different tasks, but the broker's anyio task group must be exited by the task that entered it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from logging import Logger
from pathlib import Path

from apscheduler.eventbrokers.local import LocalEventBroker

from mesh.app import build_node
from mesh.config import load_config
from mesh.node import MeshNode
from mesh.scheduling.state import SchedulerState
from mesh.scheduling.store import ReplicatedDataStore
from tests.netutil import free_mesh_address, free_port_pair

ELECTION_TIMEOUT = 10.0


class FakeClock:
    """An injectable wall clock for the leader's store: stands still until moved."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def move_to(self, when: datetime) -> None:
        self.now = when

    def shift(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@asynccontextmanager
async def solo_leader(
    data_dir: Path, state: SchedulerState, node_id: str = "solo"
) -> AsyncIterator[MeshNode]:
    """A started single-node mesh that has elected itself leader; stopped on exit."""
    config = load_config(
        {
            "node_id": node_id,
            "data_dir": str(data_dir),
            "mesh": free_mesh_address(),
            "http": f"127.0.0.1:{free_port_pair()}",
        },
        None,
        {},
    )
    node = build_node(config, state_machine=state)
    elected = asyncio.Event()
    node.on_role_change(lambda role, _term, _leader: role == "leader" and elected.set())
    await node.start()
    try:
        if not node.is_leader:
            await asyncio.wait_for(elected.wait(), ELECTION_TIMEOUT)
        yield node
    finally:
        await node.stop(transfer=False)


@asynccontextmanager
async def started_store(
    node: MeshNode,
    state: SchedulerState,
    logger: Logger,
    clock: FakeClock,
    *,
    pipelined: bool = False,
) -> AsyncIterator[ReplicatedDataStore]:
    """A ``ReplicatedDataStore`` on ``node``, started with a ``LocalEventBroker``.

    ``pipelined`` gives it ``propose_nowait`` as the leader's scheduler does: ``add_job`` then
    returns before its commit and per-job commands share batch entries."""
    store = ReplicatedDataStore(
        propose=node.propose,
        propose_nowait=node.propose_nowait if pipelined else None,
        state=state,
        term=node.core.term,
        clock=clock,
    )
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def host() -> None:
        async with AsyncExitStack() as exit_stack:
            broker = LocalEventBroker()
            await broker.start(exit_stack, logger)
            await store.start(exit_stack, broker, logger)
            started.set_result(None)
            await stop.wait()

    task = asyncio.get_running_loop().create_task(host(), name="datastore-host")
    await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        await task  # raises what made the start fail
    try:
        yield store
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
