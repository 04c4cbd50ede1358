"""The leader's scenario runner: executes queued runs, one at a time (docs/scenarios.md).

Why this file is long: the runner (the term's loop, admission, the end of a run) and one run's
execution (steps, loops, actions, checkpoints) are one mechanism, and what makes a run resumable
(deterministic ids, totals counted in iteration order, term-fenced checkpoints) is spread over
both: reading them apart would hide it.

A term task of the leader (started and cancelled with its scheduler, like the alert sender). It
takes the first run of the replicated queue (``SchedulerState.scenarios``), executes its plan
step by step through the same service calls the HTTP API makes, and commits its progress: at
every step boundary and at most every :data:`CHECKPOINT_SECONDS` (``scenario_progress``, fenced
by the term). The result (metrics, assertions, status) is committed once (``scenario_finish``).

Why a run survives a leader change: everything needed to continue is replicated. A new leader
finds the run ``running`` under an older term and either continues at the committed step and
iteration (``on_leader_change: resume``) or ends it ``error`` (``fail``). The actions after the
last checkpoint run again, and each is idempotent: a schedule's id is derived from the run, the
step and the iteration (``scn-{run_id}-{step}-{iteration}``), so creating it again finds it, and
deleting it again finds it gone. The run's totals restart from the checkpoint's, so nothing is
counted twice; its fires are counted by the state machine itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from mesh.api.schema import BadRequest, parse_schedule_body
from mesh.scenarios import format, measure
from mesh.scenarios.library import start_command
from mesh.scenarios.model import Plan, ScenarioError, Step
from mesh.scheduling.scenariobook import MAX_ERRORS, SCHEDULE_PREFIX, observe
from mesh.scheduling.service import ScheduleExists, UnknownSchedule
from mesh.tasks import REGISTRY, job_context, task

if TYPE_CHECKING:
    from mesh.scheduling.service import SchedulingService
    from mesh.scheduling.session import LeaderSession

log = logging.getLogger("mesh.scenarios")

CHECKPOINT_SECONDS = 0.5
WAIT_POLL_SECONDS = 0.05
MEMORY_SECONDS = 2.0  # how often the voters' memory is read during a run
CLEANUP_CHUNK = 1000  # schedules removed per command when a run ends
# The embedded task a scenario schedule (POST /api/tests/schedule) fires: it queues a run.
SCENARIO_TASK = "schedulezero.scenario"
_RUN_NAMESPACE = uuid.UUID("6b0e2a53-1f2c-4c8e-9f8e-5c3a1d0b7e21")

# The runner of the leader whose scheduler runs this task (set for the term's tasks by
# SchedulingService, so that several nodes in one process each find their own).
current_runner: ContextVar[ScenarioRunner] = ContextVar("scenario_runner")


class LocalApi(Protocol):
    """GET on this node's own HTTP API, as a ``read`` caller (``http_get``)."""

    async def get(self, path: str) -> int:
        """The response's status; raises ``OSError``/``aiohttp.ClientError`` when unreachable."""


class NodeMemory(Protocol):
    """The voters' resident memory (``memory_usage``)."""

    async def sample(self) -> dict[str, float]:
        """Node id → MB, for the nodes that answered."""


class ActionFailed(Exception):
    """An action that did not do what it should; the message says which and why."""


class _Stop(Exception):
    """The run must end now: ``status`` and why."""

    def __init__(self, status: str, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def run_id_for_fire(idempotency_key: str) -> str:
    """The run a scenario schedule's fire queues: the same for every attempt of the fire."""
    return uuid.uuid5(_RUN_NAMESPACE, idempotency_key).hex[:16]


def schedule_id(run_id: str, step: int, iteration: int) -> str:
    return f"{SCHEDULE_PREFIX}{run_id}-{step + 1}-{iteration}"


def memory_mb() -> float | None:
    """This process's resident memory in MB (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)


class ScenarioRunner:
    def __init__(
        self,
        service: SchedulingService,
        *,
        local_api: LocalApi | None = None,
        memory: NodeMemory | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.service = service
        self.state = service.state
        self.book = service.state.scenarios
        self.local_api = local_api
        self.memory = memory
        self.clock = clock
        self.wall = wall
        task(name=SCENARIO_TASK)(run_scheduled_scenario)
        if "noop" not in REGISTRY:  # a --tasks module's own noop wins (loaded before)
            task(name="noop")(noop)

    # ------------------------------------------------------------------ the term's loop

    async def lead(self, session: LeaderSession) -> None:
        """Execute queued runs for as long as this node leads in ``session.term``."""
        wake = asyncio.Event()
        stop_watching = self.state.watch(wake.set)
        try:
            await self.service.wait_ready(30.0)
            while True:
                run = self.book.current()
                if run is None:
                    await wake.wait()
                    wake.clear()
                    continue
                await self._execute(run, session.term, wake)
        finally:
            stop_watching()

    async def _propose(self, command: dict[str, Any]) -> Any:
        return await self.service.replica.propose(command)

    async def _execute(self, run: dict[str, Any], term: int, wake: asyncio.Event) -> None:
        run_id = run["run_id"]
        try:
            plan = self._admit(run, term)
        except _Stop as stop:
            await self.clean_up(run_id)
            await self._finish(run, term, stop.status, stop.error, None)
            return
        first = run["status"] == "queued"
        await self._propose(
            {
                "op": "scenario_progress",
                "run_id": run_id,
                "term": term,
                "leader": self.service.replica.node_id,
                "at": self.wall().isoformat(),
            }
        )
        if first:
            log.info("scenario run %s (%s) started", run_id, run["name"])
        else:
            log.info("scenario run %s (%s) continues in term %d", run_id, run["name"], term)
        execution = _Execution(self, run, plan, term)
        try:
            status, error = await execution.execute(wake)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a fault of ours: end the run saying so, never leave it stuck
            log.exception("scenario run %s failed", run_id)
            status, error = "error", f"internal error: {type(e).__name__}: {e}"
        await self._finish(run, term, status, error, execution)

    def _admit(self, run: dict[str, Any], term: int) -> Plan:
        """The run's plan, or ``_Stop`` saying why it cannot (continue to) run."""
        for dep_id in run["depends_on"]:
            dep = self.book.runs.get(dep_id)
            if dep is None or dep["status"] != "passed":
                what = dep["status"] if dep is not None else "unknown"
                name = dep["name"] if dep is not None else dep_id
                raise _Stop("error", f"dependency {name} did not pass (run {dep_id}: {what})")
        if run["cancel"]:
            raise _Stop("cancelled", "cancelled")
        if run["status"] == "running" and run["term"] < term:
            definition = run["definition"] or {}
            if definition.get("on_leader_change") == "fail":
                raise _Stop(
                    "error",
                    f"the leader changed during the run (term {run['term']} → {term}) and the "
                    "scenario says on_leader_change: fail",
                )
        try:
            scenario = format.from_definition(run["definition"], run["version"])
            return format.plan(scenario, run["parameters"], run_id=run["run_id"])
        except ScenarioError as e:
            raise _Stop("error", f"the scenario cannot run: {e}") from None

    async def _finish(
        self,
        run: dict[str, Any],
        term: int,
        status: str,
        error: str | None,
        execution: _Execution | None,
    ) -> None:
        command: dict[str, Any] = {
            "op": "scenario_finish",
            "run_id": run["run_id"],
            "term": term,
            "status": status,
            "error": error,
            "at": self.wall().isoformat(),
        }
        if execution is not None:
            await self.clean_up(run["run_id"])
            command["progress"] = copy.deepcopy(execution.progress)
            report = measure.report(
                {**run, "progress": execution.progress},
                execution.plan.metrics,
                execution.plan.assertions,
            )
            if status == "passed" and not report["passed"]:
                command["status"] = "failed"
            command["result"] = {"metrics": report["metrics"], "assertions": report["assertions"]}
        await self._propose(command)
        log.info("scenario run %s (%s) ended: %s", run["run_id"], run["name"], command["status"])

    async def clean_up(self, run_id: str) -> None:
        """Delete the schedules the run created and did not delete: a finished run leaves
        nothing firing (whatever its status)."""
        prefix = f"{SCHEDULE_PREFIX}{run_id}-"
        left = [sid for sid in self.service.state.schedules if sid.startswith(prefix)]
        if not left:
            return
        scheduler = await self.service.wait_ready(30.0)
        for start in range(0, len(left), CLEANUP_CHUNK):
            await scheduler.data_store.remove_schedules(left[start : start + CLEANUP_CHUNK])
        log.info("scenario run %s: removed the %d schedules it left", run_id, len(left))

    # ------------------------------------------------------------------ scheduled runs

    async def fire(self, name: str, parameters: dict[str, Any] | None, key: str) -> str:
        """A scenario schedule's fire: queue one run of ``name`` (the same for every attempt of
        the fire: its run id comes from the fire's idempotency key)."""
        command = start_command(
            self.book, name, parameters, run_id=run_id_for_fire(key), source="schedule", by=None
        )
        command["at"] = self.wall().isoformat()
        result = await self._propose(command)
        if "refused" in result:
            raise ActionFailed(result["refused"])
        return result["run_id"]


class _Execution:
    """One run's execution on this leader: the plan, the totals, the checkpoints."""

    def __init__(self, runner: ScenarioRunner, run: dict[str, Any], plan: Plan, term: int) -> None:
        self.runner = runner
        self.service = runner.service
        self.run_id: str = run["run_id"]
        self.run = run
        self.plan = plan
        self.term = term
        # The committed totals (a copy: what this leader adds is committed at the checkpoints).
        p = copy.deepcopy(run.get("progress") or {})
        p.setdefault("step", 0)
        p.setdefault("done", 0)
        p.setdefault("deleted", 0)
        p.setdefault("elapsed", 0.0)
        p.setdefault("step_elapsed", 0.0)
        p["steps"] = len(plan.steps)
        p["methods"] = {k: list(v) for k, v in p.get("methods", {}).items()}
        p["errors"] = list(p.get("errors", []))
        self.progress = p
        self._started = runner.clock() - p["elapsed"]
        self._step_started = runner.clock() - p["step_elapsed"]
        self._last_sample = -1.0
        self._memory_at = -MEMORY_SECONDS
        self._memory_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ driving

    async def execute(self, wake: asyncio.Event) -> tuple[str, str | None]:
        """Execute the remaining steps; ``(status, error)``: passed (the assertions are judged
        after), error or cancelled. The voters' memory is read at the start, every
        MEMORY_SECONDS and at the end (a run shorter than a checkpoint has its figure too)."""
        self._sample_memory()
        outcome = await self._execute_steps(wake)
        memory = self.runner.memory
        if memory is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2 * MEMORY_SECONDS):
                    if self._memory_task is not None:
                        await self._memory_task
                    await self._read_memory(memory)
        return outcome

    async def _execute_steps(self, wake: asyncio.Event) -> tuple[str, str | None]:
        steps = asyncio.ensure_future(self._steps())
        watcher = asyncio.ensure_future(self._watch(wake))
        try:
            done, _ = await asyncio.wait({steps, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if steps in done:
                steps.result()
                return "passed", None
            steps.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Stop, ActionFailed):
                await steps
            watcher.result()  # raises the _Stop that ended it
            return "error", "the run stopped"  # not reached: the watcher ends only by raising
        except _Stop as stop:
            return stop.status, stop.error
        finally:
            for task in (steps, watcher):
                task.cancel()
            self._tick()
            await asyncio.gather(steps, watcher, return_exceptions=True)

    async def _watch(self, wake: asyncio.Event) -> None:
        """Checkpoint every CHECKPOINT_SECONDS; end the run when it is cancelled or too long."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), CHECKPOINT_SECONDS)
            wake.clear()
            run = self.runner.book.runs.get(self.run_id)
            if run is None or run["cancel"]:
                raise _Stop("cancelled", "cancelled")
            if self.runner.clock() - self._started > self.plan.timeout:
                raise _Stop("error", f"timed out after {self.plan.timeout:g} s")
            self._sample_memory()
            await self.checkpoint()

    async def checkpoint(self, *, sample: bool = True) -> None:
        self._tick()
        command: dict[str, Any] = {
            "op": "scenario_progress",
            "run_id": self.run_id,
            "term": self.term,
            "leader": self.service.replica.node_id,
            # A copy: the command may be applied as this very object on this node.
            "progress": copy.deepcopy(self.progress),
            "at": self.runner.wall().isoformat(),
        }
        t = self.progress["elapsed"]
        if sample and t - self._last_sample >= max(1.0, t / 60):
            self._last_sample = t
            command["sample"] = measure.sample(
                {**self.runner.book.runs.get(self.run_id, self.run), "progress": self.progress}, t
            )
        await self.runner._propose(command)

    def _sample_memory(self) -> None:
        """Every MEMORY_SECONDS, read the voters' memory in the background (a slow node must
        not hold up the checkpoints); the peaks go into the next checkpoint."""
        now = self.runner.clock()
        if self.runner.memory is None or now - self._memory_at < MEMORY_SECONDS:
            return
        if self._memory_task is not None and not self._memory_task.done():
            return
        self._memory_at = now
        self._memory_task = asyncio.ensure_future(self._read_memory(self.runner.memory))

    async def _read_memory(self, memory: NodeMemory) -> None:
        try:
            sampled = await memory.sample()
        except Exception:  # unreachable nodes are left out by sample(); anything else too
            log.debug("scenario run %s: memory sample failed", self.run_id, exc_info=True)
            return
        peaks = self.progress.setdefault("memory_nodes", {})
        for node_id, mb in sampled.items():
            peaks[node_id] = max(peaks.get(node_id, 0.0), mb)
        if peaks:
            self.progress["memory_mb"] = max(self.progress.get("memory_mb") or 0.0, *peaks.values())

    def _tick(self) -> None:
        now = self.runner.clock()
        self.progress["elapsed"] = now - self._started
        self.progress["step_elapsed"] = now - self._step_started
        mb = memory_mb() if self.runner.memory is None else None  # else: every voter's
        if mb is not None:
            self.progress["memory_mb"] = max(self.progress.get("memory_mb") or 0.0, mb)

    def _enter(self, index: int) -> None:
        """Say which step the run is in (what the checkpoints show), None past the last."""
        p = self.progress
        step = self.plan.steps[index] if index < len(self.plan.steps) else None
        p["method"] = step.action.method if step is not None and step.action else None
        p["step_name"] = step.name if step is not None else None
        p["of"] = {"loop": step.iterations, "action": 1}.get(step.type) if step else None

    async def _steps(self) -> None:
        p = self.progress
        self._enter(p["step"])
        while p["step"] < len(self.plan.steps):
            step = self.plan.steps[p["step"]]
            await self._step(p["step"], step)
            self._tick()
            self._count_time(step)
            if step.action is not None and step.action.method == "delete_schedule":
                if "schedule_id" not in step.action.args:
                    p["deleted"] += p["done"]
            p["step"] += 1
            p["done"] = 0
            p["step_elapsed"] = 0.0
            self._enter(p["step"])
            self._step_started = self.runner.clock()
            await self.checkpoint(sample=False)

    def _count_time(self, step: Step) -> None:
        """A step's wall time is what its method's rate divides by."""
        if step.action is not None:
            self._method(step.action.method)[2] += self.progress["step_elapsed"]

    def _method(self, method: str) -> list[Any]:
        return self.progress["methods"].setdefault(method, [0, 0, 0.0])

    async def _step(self, index: int, step: Step) -> None:
        if step.type == "sleep":
            remaining = step.duration - self.progress["step_elapsed"]
            if remaining > 0:
                await asyncio.sleep(remaining)
            return
        assert step.action is not None
        targets = self._live_targets(index, step)
        if step.type == "action":
            if self.progress["done"] == 0:
                ms, error = await self._one(index, step, 0, targets, every=True)
                self._count(step, 0, ms, error)
                self.progress["done"] = 1
            return
        await self._loop(index, step, targets)

    async def _loop(self, index: int, step: Step, targets: list[str]) -> None:
        """A loop's iterations from the checkpoint on, ``concurrency`` at a time. ``done`` is the
        number of iterations finished in order, and only those are counted in the totals: what
        a new leader continues after, with totals that hold each iteration once."""
        p = self.progress
        finished: dict[int, tuple[float, str | None]] = {}
        pending: set[asyncio.Task[None]] = set()
        next_i = p["done"]

        async def one(i: int) -> None:
            finished[i] = await self._one(index, step, i, targets)

        try:
            while next_i < step.iterations or pending:
                while next_i < step.iterations and len(pending) < step.concurrency:
                    pending.add(asyncio.ensure_future(one(next_i)))
                    next_i += 1
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                while p["done"] in finished:
                    ms, error = finished.pop(p["done"])
                    self._count(step, p["done"], ms, error)  # raises _Stop on a failure
                    p["done"] += 1
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _one(
        self, index: int, step: Step, i: int, targets: list[str], *, every: bool = False
    ) -> tuple[float, str | None]:
        """One action, timed: ``(milliseconds, error or None)``."""
        assert step.action is not None
        args = format.expand(step.action.args, iteration=i)
        t0 = self.runner.clock()
        try:
            await self._act(step.action.method, args, index, i, targets, every)
            error = None
        except (ActionFailed, BadRequest, ScenarioError) as e:
            error = str(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the service's refusals: not ready, backpressure, no quorum
            error = f"{type(e).__name__}: {e}"
        return (self.runner.clock() - t0) * 1000.0, error

    def _count(self, step: Step, i: int, ms: float, error: str | None) -> None:
        """Add an action to the totals; a failure ends the run unless ``on_error: continue``."""
        assert step.action is not None
        method = step.action.method
        counts = self._method(method)
        counts[0] += 1
        observe(self.progress.setdefault("latency", {}), ms)
        if method == "http_get":
            observe(self.progress.setdefault("http", {}), ms)
        if error is None:
            return
        counts[1] += 1
        if method == "http_get":
            self.progress["http_errors"] = self.progress.get("http_errors", 0) + 1
        where = f"step {step.name!r} iteration {i}: {method}: {error}"
        if len(self.progress["errors"]) < MAX_ERRORS:
            self.progress["errors"].append(where[:500])
        if step.on_error == "fail":
            raise _Stop("error", where[:500])

    # ------------------------------------------------------------------ the actions

    def _created(self) -> list[str]:
        """Every schedule id this run's create steps made so far, in creation order."""
        out: list[str] = []
        for s, step in enumerate(self.plan.steps[: self.progress["step"] + 1]):
            if step.action is None or step.action.method != "create_schedule":
                continue
            n = step.iterations if s < self.progress["step"] else self.progress["done"]
            out.extend(schedule_id(self.run_id, s, i) for i in range(n))
        return out

    def _live_targets(self, index: int, step: Step) -> list[str]:
        """The run's schedules an id-less pause/resume/run_job acts on (at the step's start)."""
        assert step.action is not None
        if step.action.method not in ("pause_schedule", "resume_schedule", "run_job"):
            return []
        schedules = self.service.state.schedules
        return [sid for sid in self._created() if sid in schedules]

    async def _act(
        self, method: str, args: dict[str, Any], index: int, i: int, targets: list[str], every: bool
    ) -> None:
        service = self.service
        if method == "create_schedule":
            sid = schedule_id(self.run_id, index, i)
            spec = parse_schedule_body(format.schedule_body(args, sid))
            with contextlib.suppress(ScheduleExists):  # made before the last checkpoint
                await service.put_schedule(spec, replace=False)
        elif method == "delete_schedule":
            await self._delete(args.get("schedule_id"), i)
        elif method in ("pause_schedule", "resume_schedule"):
            paused = method == "pause_schedule"
            for sid in self._targets(args, targets, i, every):
                try:
                    await service.set_paused(sid, paused, note=args.get("note"))
                except UnknownSchedule:
                    raise ActionFailed(f"no schedule {sid!r}") from None
        elif method == "run_job":
            if "task" in args:
                await service.run_now(
                    args["task"], tuple(args.get("args", ())), args.get("kwargs", {})
                )
            else:
                for sid in self._targets(args, targets, i, every):
                    try:
                        await service.trigger(sid, self.runner.wall())
                    except UnknownSchedule:
                        raise ActionFailed(f"no schedule {sid!r}") from None
        elif method == "wait_for_fires":
            await self._wait_for_fires(args)
        elif method == "http_get":
            await self._http_get(args)
        else:  # the format refuses other methods
            raise ActionFailed(f"unknown method {method!r}")

    def _targets(self, args: dict[str, Any], targets: list[str], i: int, every: bool) -> list[str]:
        if "schedule_id" in args:
            return [args["schedule_id"]]
        if not targets:
            raise ActionFailed("the run has no schedules to act on (none created, or all deleted)")
        return list(targets) if every else [targets[i % len(targets)]]

    async def _delete(self, sid: str | None, i: int) -> None:
        if sid is None:
            created = self._created()
            k = self.progress["deleted"] + i
            if k >= len(created):
                raise ActionFailed(
                    f"the run has created {len(created)} schedules: none left to delete"
                )
            sid = created[k]
        try:
            await self.service.remove_schedule(sid)
        except UnknownSchedule:
            if not sid.startswith(f"{SCHEDULE_PREFIX}{self.run_id}-"):
                raise ActionFailed(f"no schedule {sid!r}") from None
            # The run's own schedule, deleted before the last checkpoint (or never created
            # because its create failed under on_error: continue).

    async def _wait_for_fires(self, args: dict[str, Any]) -> None:
        count, timeout, outcome = args["count"], args.get("timeout", 60.0), args.get("outcome")
        deadline = self.runner.clock() + timeout
        while True:
            run = self.runner.book.runs.get(self.run_id) or {}
            fires = run.get("fires", {})
            seen = fires.get(outcome, 0) if outcome else sum(fires.values())
            if seen >= count:
                return
            if self.runner.clock() >= deadline:
                what = f"{outcome} fires" if outcome else "fires"
                raise ActionFailed(f"{seen} of {count} {what} within {timeout:g} s")
            await asyncio.sleep(WAIT_POLL_SECONDS)

    async def _http_get(self, args: dict[str, Any]) -> None:
        if self.runner.local_api is None:
            raise ActionFailed("this node has no local API to query")
        status = await self.runner.local_api.get(args["path"])
        expected = args.get("expect_status", 200)
        if status != expected:
            raise ActionFailed(f"GET {args['path']}: status {status}, expected {expected}")


async def noop(*_args: Any, **_kwargs: Any) -> None:
    """The built-in task that does nothing: what load scenarios schedule by default."""


def scenario_task_runner() -> ScenarioRunner:
    try:
        return current_runner.get()
    except LookupError:
        raise ActionFailed("scenario schedules run only on a leader with scenarios") from None


async def run_scheduled_scenario(name: str, parameters: dict[str, Any] | None = None) -> str:
    """The embedded task of scenario schedules: queue one run; returns its id."""
    return await scenario_task_runner().fire(name, parameters, job_context().idempotency_key)
