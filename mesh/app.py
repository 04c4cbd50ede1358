"""The composition root: the one place that knows every concrete part and wires them together.

Everything else is handed its collaborators through the small contracts of ``mesh.contracts``:

- ``build_node``: the log store (``broker_state.db``), the event bus with observability
  subscribed (JSONL event log, state db), the ZeroMQ transport and discovery, then the Raft
  driver (``MeshNode``) on top of them.
- ``build_scheduling``: the replicated scheduler state, the handler dispatcher (with its
  registry and governors) and the leader-only scheduling service with its event broker.
- ``node_keys``: the node's CURVE key ring (``--keys``), or the no-keys rule (loopback only,
  one warning, unless ``--insecure``) when it has none.
- ``http_security``: the HTTP API's tokens file (``--api-tokens``) or the same loopback rule for
  an API without tokens, and the TLS contexts (``--tls-cert/--tls-key``).
- ``build_feed``: the change feed the node serves to read-only replicas, filtered per zone
  (``mesh.zones``).
- ``VoterView``: what the HTTP API reads about a voter — the node's views, with the counters of
  the parts composed around it (the replicas' feed, the replicated scheduling counters).
- ``serve`` / ``run_node``: a node process — node, scheduling, the replicas' feed and the HTTP
  API — until SIGTERM; SIGHUP re-reads the key directory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import ssl
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import attrs

from mesh import eventloop
from mesh.api.auth import ApiTokens, TokenFileError
from mesh.config import Config
from mesh.membership.discovery import make_discovery
from mesh.node import EXIT_NODE_FAILED, MeshNode
from mesh.observability import gcpause
from mesh.observability.eventlog import EventLog
from mesh.observability.recorder import EventBus, Recorder
from mesh.observability.state_db import AuditLog, StateDB
from mesh.scheduling.service import SchedulingService
from mesh.scheduling.state import SchedulerState
from mesh.security.audit import Rejections
from mesh.security.keys import KeyFileError, KeyRing
from mesh.security.policy import InsecureStart, check_open_http, check_unencrypted
from mesh.statemachine import KVStateMachine, StateMachine
from mesh.storage.raft_store import RaftStore
from mesh.transport.zmq import MeshTransport
from mesh.zones.feed import FeedServer, FeedSettings
from mesh.zones.filter import zone_filters

if TYPE_CHECKING:
    from aiohttp import web

    from mesh.scenarios.runner import ScenarioRunner

__all__ = [
    "HttpSecurity",
    "NodeFailed",
    "StartRefused",
    "VoterView",
    "build_feed",
    "build_node",
    "build_scheduling",
    "http_security",
    "node_keys",
    "run_node",
    "serve",
]

log = logging.getLogger("mesh.app")

# How long a failed node may take to close its sockets before the process exits regardless.
FAILED_SHUTDOWN_SECONDS = 5.0


class StartRefused(Exception):
    """The node must not start as configured; ``str(err)`` is one line for the user (exit 2)."""


class NodeFailed(Exception):
    """The node stopped after an internal fault (``MeshNode.failure``): exit status 70."""


def node_keys(config: Config) -> KeyRing | None:
    """The node's key ring (``security.keys``), or None when it may run without keys.

    With keys, ``DIR/<node_id>.key_secret`` must exist and be a ``node`` key. Without, every
    address the node binds or dials must be loopback unless ``security.insecure`` (one warning
    either way). Raises :class:`StartRefused` otherwise.
    """
    what = f"node {config.node_id}"
    if config.security.keys is not None:
        try:
            keys = KeyRing(config.security.keys, config.node_id)
        except KeyFileError as e:
            raise StartRefused(f"{what}: {e}") from None
        if keys.role != "node":
            raise StartRefused(
                f"{what}: {keys.directory / (keys.name + '.key')} is a {keys.role!r} key; a node "
                f"needs a 'node' key (schedulezero keys create {keys.name} --role node)"
            )
        return keys
    addresses = [
        config.mesh,
        config.advertise_mesh,
        config.http,
        config.advertise_http,
        *config.peers,
    ]
    try:
        check_unencrypted(addresses, insecure=config.security.insecure, what=what)
    except InsecureStart as e:
        raise StartRefused(str(e)) from None
    return None


@attrs.frozen
class HttpSecurity:
    """Who may call the node's HTTP API, and over what: see :func:`http_security`."""

    tokens: ApiTokens | None = None
    server_ssl: ssl.SSLContext | None = None  # serve HTTPS
    client_ssl: ssl.SSLContext | None = None  # how a follower checks the leader (forwarding)

    @property
    def scheme(self) -> str:
        return "https" if self.server_ssl is not None else "http"


def http_security(config: Config) -> HttpSecurity:
    """The tokens file and TLS contexts of the node's HTTP API; raises :class:`StartRefused`.

    Without ``security.api_tokens`` the API may bind only loopback unless ``security.insecure``
    (the rule of :func:`node_keys`, for HTTP). With TLS, a follower forwarding a write checks the
    leader's certificate against the system CAs and the certificates in ``--tls-cert`` (so one
    self-signed certificate shared by every node, or certificates from one CA, both work); each
    node's certificate must name the host of its ``advertise_http``.
    """
    what = f"node {config.node_id}"
    sec = config.security
    tokens = None
    if sec.api_tokens is not None:
        try:
            tokens = ApiTokens(sec.api_tokens)
        except TokenFileError as e:
            raise StartRefused(f"{what}: --api-tokens: {e}") from None
    else:
        try:
            check_open_http(
                config.http,
                insecure=sec.insecure,
                what=what,
                anonymous_reads=sec.anonymous_reads,
                read_only=config.api.read_only,
            )
        except InsecureStart as e:
            raise StartRefused(str(e)) from None
    if sec.tls_cert is None or sec.tls_key is None:
        return HttpSecurity(tokens)
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(sec.tls_cert, sec.tls_key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        client.load_verify_locations(cafile=sec.tls_cert)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise StartRefused(
            f"{what}: --tls-cert {sec.tls_cert} / --tls-key {sec.tls_key}: cannot use them: {e}"
        ) from None
    return HttpSecurity(tokens, server, client)


def build_node(
    config: Config,
    *,
    state_machine: StateMachine | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    keys: KeyRing | None = None,
    rejections: Rejections | None = None,
) -> MeshNode:
    """A node with its storage, transport, discovery and observability (not started).

    ``keys`` makes every mesh socket CURVE (``node_keys``); ``rejections`` is the process's one
    counter of refused messages (``schedulezero_security_rejected_total``).
    """
    # The Raft log holds schedules' secrets as given: a new data directory is private (0700).
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
                sensitive_keys=config.security.sensitive_keys,
            ),
            statedb=StateDB(config.state_db_path, node_id=config.node_id),
        )
    )
    return MeshNode(
        config,
        store=RaftStore(config.state_db_path),
        transport=MeshTransport(
            config.node_id,
            config.mesh,
            max_frame_bytes=config.max_frame_bytes,
            keys=keys,
            rejections=rejections if rejections is not None else Rejections(),
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
    from mesh.dispatch.alerts import AlertSender
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

    return SchedulingService(
        node,
        state,
        broker_factory=broker,
        dispatcher=dispatcher,
        lookahead=timedelta(seconds=node.config.scheduling.lookahead),
        alerts=AlertSender(node.config.notify).run,
    )


def add_scenarios(
    app: web.Application,
    service: SchedulingService,
    view: VoterView,
    config: Config,
    http_sec: HttpSecurity,
) -> ScenarioRunner:
    """The scenario suite of a voter: its runner (a term task of the leader's scheduler, also
    found by scenario schedules' fires) and its ``/api/tests`` routes."""
    from mesh.scenarios.http import add_scenario_routes
    from mesh.scenarios.localapi import LoopbackApi, VoterMemory
    from mesh.scenarios.runner import ScenarioRunner, current_runner

    token = (
        http_sec.tokens.add_internal("scenario-runner", "read")
        if http_sec.tokens is not None
        else None
    )
    local = LoopbackApi(
        f"{http_sec.scheme}://{config.advertise_http}",
        token=token,
        ssl_context=http_sec.client_ssl,
    )

    def voters() -> list[tuple[str, str]]:
        members = view.cluster()["members"]
        return [(m["node_id"], m["http_address"]) for m in members if m.get("voter")]

    memory = VoterMemory(voters, scheme=http_sec.scheme, ssl_context=http_sec.client_ssl)
    runner = ScenarioRunner(service, local_api=local, memory=memory)
    app.on_cleanup.append(lambda _app: local.close())
    app.on_cleanup.append(lambda _app: memory.close())
    service.term_tasks["scenarios"] = runner.lead
    service.term_context.append((current_runner, runner))
    add_scenario_routes(app, service)
    return runner


def build_feed(node: MeshNode, state: SchedulerState, keys: KeyRing | None) -> FeedServer:
    """The change feed of a voter (not started), on the node's message bus and apply listener.

    Built before the node starts, so that the entries it applies at start are in the window.
    Each replica is served the filter of its certificate's zone (``zones`` in the config).
    """
    feed = FeedServer(
        node,
        node,
        applied_index=lambda: node.core.applied,
        snapshot=state.snapshot,
        certificate=keys.get if keys is not None else None,
        filters=zone_filters(node.config.zones),
        settings=FeedSettings(
            window_entries=node.config.feed.window_entries,
            window_bytes=node.config.feed.window_bytes,
        ),
    )
    node.on_apply(feed.on_apply)
    return feed


@attrs.frozen
class VoterView:
    """The ``NodeView`` a voter's API serves: the node's own views, and in ``metrics()`` the
    counters of the parts built around the node, which the node itself does not know (it never
    imports the layers above it): ``feed`` (the replicas' change feed, docs/zones.md) and
    ``scheduling`` (the replicated fire counters of the scheduler state, docs/scheduling.md).
    """

    node: MeshNode
    feed: FeedServer
    state: SchedulerState

    def health(self) -> dict[str, Any]:
        return self.node.health()

    def cluster(self) -> dict[str, Any]:
        # The read-only replicas that follow this voter (each follows one voter at a time).
        return {**self.node.cluster(), "replicas": self.feed.replicas()}

    def cluster_members(self) -> dict[str, Any]:
        return self.node.cluster_members()

    def leader_http(self) -> str | None:
        return self.node.leader_http()

    def metrics(self) -> dict[str, Any]:
        s = self.state
        return {
            **self.node.metrics(),
            "feed": {
                "subscribers": len(self.feed.subscriptions),
                "events": dict(self.feed.counters),
            },
            "scheduling": {
                "fires_recorded": s.fires_recorded,
                "fires_deduplicated": s.fires_deduplicated,
                "fires_skipped": s.fires_skipped,
                "alerts_recorded": s.outbox.seq,
                "alerts_sent": s.outbox.sent,
                "alerts_failed": s.outbox.failed,
                "alerts_dropped": s.outbox.dropped,
            },
            "alerts_pending": len(s.outbox.events),
            "fires": s.fire_metrics.export(),
        }


async def serve(
    config: Config,
    *,
    keys: KeyRing | None = None,
    http_sec: HttpSecurity | None = None,
    ready: Callable[[MeshNode], None] | None = None,
) -> None:
    """Run a node with its scheduler and HTTP API until SIGINT/SIGTERM, then shut down.

    ``keys`` as ``node_keys(config)`` returned them; SIGHUP then re-reads the key directory (it
    is also polled every few seconds), so an added or deleted ``.key`` file takes effect.
    ``http_sec`` as ``http_security(config)`` returned it (computed here when not given).
    """
    if http_sec is None:
        http_sec = http_security(config)
    from mesh.api.events import EventHub
    from mesh.api.http import READ_ONLY_NODE, HttpServer, create_app
    from mesh.api.limits import ApiLimits

    state = SchedulerState(
        max_executions=config.history.max_executions,
        max_results=config.history.max_results,
        metric_schedules=config.metrics.max_schedules,
    )
    node = build_node(config, state_machine=state, keys=keys)
    service = build_scheduling(node, state)
    feed = build_feed(node, state, keys)
    view = VoterView(node, feed, state)
    # GET /api/events: subscribed before the node starts, like the feed.
    events = EventHub(
        node, view, state, handlers=service.handlers, sensitive_keys=config.security.sensitive_keys
    )
    node.on_apply(events.on_apply)
    if isinstance(node.events, EventBus):
        node.events.subscribe(events.node_event)
    await node.start()
    await feed.start()
    audit = AuditLog(config.state_db_path)
    # The dashboard reads the leadership history the node's recorder writes (its own connection).
    history = StateDB(config.state_db_path, node_id=config.node_id)
    a = config.api
    limits = ApiLimits(
        max_body_bytes=a.max_body_bytes,
        max_connections=a.max_connections,
        header_timeout=a.header_timeout,
        body_timeout=a.body_timeout,
        max_json_depth=a.max_json_depth,
    )
    app = create_app(
        node,
        view,
        service,
        tokens=http_sec.tokens,
        audit=audit,
        sensitive_keys=config.security.sensitive_keys,
        client_ssl=http_sec.client_ssl,
        limits=limits,
        read_only=READ_ONLY_NODE if a.read_only else None,
        anonymous_reads=config.security.anonymous_reads,
        events=events,
        leadership=history.leadership_history,
        bus=node,
        link=node,
        images=node,
    )
    add_scenarios(app, service, view, config, http_sec)
    app.on_cleanup.append(lambda _app: _close(audit, history))
    http = HttpServer(app, *config.http_host_port, ssl_context=http_sec.server_ssl)
    try:
        await http.start()
    except BaseException:
        await feed.close()
        await service.close()
        await node.stop(transfer=False)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if keys is not None:
        loop.add_signal_handler(signal.SIGHUP, node.transport.reload_keys)
    secured = f"CURVE keys in {keys.directory}" if keys is not None else "no keys"
    tokens = "API tokens" if http_sec.tokens is not None else "no API tokens"
    if config.security.anonymous_reads:
        tokens += ", anonymous reads"
    print(
        f"schedulezero node {node.id}: mesh {config.advertise_mesh} ({secured}), "
        f"http {http_sec.scheme}://{config.advertise_http}/api/health ({tokens})",
        flush=True,
    )
    if ready:
        ready(node)
    stopped = asyncio.ensure_future(stop.wait())
    failed = asyncio.ensure_future(node.failed.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    failed.cancel()
    if node.failure is not None:
        # Close what can be closed, bounded: nothing must keep a failed node's process alive.
        try:
            async with asyncio.timeout(FAILED_SHUTDOWN_SECONDS):
                await http.stop()
                await feed.close()
                await service.close()
                await node.stop(transfer=False)
        except Exception:
            log.exception("shutting down the failed node %s", node.id)
        raise NodeFailed(f"{type(node.failure).__name__}: {node.failure}")
    await feed.close()
    await node.stop(transfer=True)
    await service.close()
    await http.stop()


async def _close(audit: AuditLog, history: StateDB) -> None:
    audit.close()
    history.close()


# APScheduler logs one INFO line per finished job; the execution history records every job, and
# at a thousand fires per second those lines were the bulk of a leader's log and ~4 % of its CPU.
# They are kept at --log-level debug.
_JOB_LINES = frozenset({"Job %s completed successfully", "Job %s was cancelled"})


def _quiet_job_lines(record: logging.LogRecord) -> bool:
    return record.msg not in _JOB_LINES


async def _serve_frozen(config: Config, keys: KeyRing | None, http_sec: HttpSecurity) -> None:
    """``serve``, with the garbage collector's full collections kept short (mesh.gcpause)."""
    freezer = asyncio.get_running_loop().create_task(gcpause.freeze_loop())
    try:
        await serve(config, keys=keys, http_sec=http_sec)
    finally:
        freezer.cancel()


def run_node(config: Config) -> int:
    from mesh.tasks import TaskModuleError, load_task_modules

    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from mesh.observability.logredact import install

    install(config.security.sensitive_keys)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("apscheduler._schedulers.async_").addFilter(_quiet_job_lines)
    try:
        load_task_modules(config.tasks)
    except TaskModuleError as e:
        print(f"schedulezero: error: --tasks: {e}", file=sys.stderr)
        return 2
    try:
        keys = node_keys(config)
        http_sec = http_security(config)
    except StartRefused as e:
        print(f"schedulezero: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    gcpause.install()
    try:
        eventloop.run(_serve_frozen(config, keys, http_sec))
    except NodeFailed as e:
        print(
            f"schedulezero: fatal: node {config.node_id} stopped after an internal fault ({e}); "
            f"exit status {EXIT_NODE_FAILED}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_NODE_FAILED
    except OSError as e:
        print(f"schedulezero: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
