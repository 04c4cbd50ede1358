"""The composition root: the one place that knows every concrete part and wires them together.

Everything else is handed its collaborators through the small contracts of ``mesh.contracts``:

- ``build_node``: the log store (``broker_state.db``), the event bus with observability
  subscribed (JSONL event log, state db), the ZeroMQ transport and discovery, then the Raft
  driver (``MeshNode``) on top of them.
- ``build_scheduling``: the replicated scheduler state, the handler dispatcher (with its
  registry and governors) and the leader-only scheduling service with its event broker.
- ``serve`` / ``run_node``: a node process — node, scheduling and the HTTP API — until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import time
from collections.abc import Callable

from mesh.config import Config
from mesh.membership.discovery import make_discovery
from mesh.node import MeshNode
from mesh.observability.eventlog import EventLog
from mesh.observability.recorder import EventBus, Recorder
from mesh.observability.state_db import StateDB
from mesh.scheduling.service import SchedulingService
from mesh.scheduling.state import SchedulerState
from mesh.statemachine import KVStateMachine, StateMachine
from mesh.storage.raft_store import RaftStore
from mesh.transport.zmq import MeshTransport

__all__ = ["build_node", "build_scheduling", "run_node", "serve"]


def build_node(
    config: Config,
    *,
    state_machine: StateMachine | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> MeshNode:
    """A node with its storage, transport, discovery and observability (not started)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    bus = EventBus()
    bus.subscribe(
        Recorder(
            config.node_id,
            mesh_address=config.advertise_mesh,
            http_address=config.advertise_http,
            eventlog=EventLog(
                config.eventlog_path,
                config.node_id,
                max_bytes=config.eventlog.max_bytes,
                backups=config.eventlog.backups,
            ),
            statedb=StateDB(config.state_db_path, node_id=config.node_id),
        )
    )
    return MeshNode(
        config,
        store=RaftStore(config.state_db_path),
        transport=MeshTransport(
            config.node_id, config.mesh, max_frame_bytes=config.max_frame_bytes
        ),
        discovery=make_discovery(config),
        events=bus,
        state_machine=state_machine if state_machine is not None else KVStateMachine(),
        clock=clock,
        wall_clock=wall_clock,
        rng=rng,
    )


def build_scheduling(node: MeshNode, state: SchedulerState) -> SchedulingService:
    """The handler dispatcher and the leader-only scheduler service of a node."""
    import mesh.dispatch.webhook  # noqa: F401  (registers the built-in "webhook" task)
    from mesh.dispatch.dispatcher import HandlerDispatcher
    from mesh.dispatch.governors import Governors
    from mesh.scheduling.broker import LIFECYCLE_EVENTS, ZMQEventBroker

    dispatcher = HandlerDispatcher(
        node,
        node,
        node,
        state,
        governors=Governors(node.config.governors),
        settings=node.config.dispatch,
    )

    def broker() -> ZMQEventBroker:
        return ZMQEventBroker(
            transport=node.transport,
            peers=sorted(node.members.peers),
            remote_events=LIFECYCLE_EVENTS,
        )

    return SchedulingService(node, state, broker_factory=broker, dispatcher=dispatcher)


async def serve(config: Config, *, ready: Callable[[MeshNode], None] | None = None) -> None:
    """Run a node with its scheduler and HTTP API until SIGINT/SIGTERM, then shut down."""
    from mesh.api.http import HttpServer, create_app

    state = SchedulerState(
        max_executions=config.history.max_executions, max_results=config.history.max_results
    )
    node = build_node(config, state_machine=state)
    service = build_scheduling(node, state)
    await node.start()
    http = HttpServer(create_app(node, node, service), *config.http_host_port)
    try:
        await http.start()
    except BaseException:
        await service.close()
        await node.stop(transfer=False)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"schedulezero node {node.id}: mesh {config.advertise_mesh}, "
        f"http http://{config.advertise_http}/api/health",
        flush=True,
    )
    if ready:
        ready(node)
    await stop.wait()
    await node.stop(transfer=True)
    await service.close()
    await http.stop()


def run_node(config: Config) -> int:
    from mesh.tasks import TaskModuleError, load_task_modules

    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        load_task_modules(config.tasks)
    except TaskModuleError as e:
        print(f"schedulezero: error: --tasks: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except OSError as e:
        print(f"schedulezero: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
