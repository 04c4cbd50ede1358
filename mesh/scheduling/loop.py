"""``MeshScheduler``: APScheduler's ``AsyncScheduler`` with the mesh's schedule loop.

Everything but the schedule loop is APScheduler's: the API (add, pause, remove schedules), the
job loop, the executors, the events. The schedule loop is replaced by fire rounds
(mesh.scheduling.rounds): each iteration fires every due schedule, up to ``ROUND_LIMIT``, in one
Raft entry through ``ReplicatedDataStore.fire_round``, then sleeps until the next fire time of
the replicated due index or until a schedule is added or changed, as APScheduler's loop does.

It overrides a private method of the pinned APScheduler (4.0.0a6, ``_process_schedules``): the
wake-up rules are copied from it, and the data store and event broker test suites of that
version still pass against the mesh's store and broker.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime
from typing import Any, cast

import anyio
from anyio import move_on_after
from anyio.abc import TaskStatus
from apscheduler import AsyncScheduler, RunState, ScheduleAdded, SchedulerStarted, ScheduleUpdated

from mesh.scheduling.rounds import ROUND_LIMIT

log = logging.getLogger("mesh.scheduling.loop")

RETRY_SECONDS = 0.5  # a schedule that was due but could not fire is tried again after this
MAX_BACKLOG = ROUND_LIMIT  # queued, not yet started jobs above which no new round is fired
BACKLOG_WAIT = 0.01


class MeshScheduler(AsyncScheduler):
    """``AsyncScheduler`` whose schedule loop fires rounds (needs a ``ReplicatedDataStore``)."""

    round_rng: random.Random | None = None  # the jitter's RNG (tests seed it)

    async def _process_schedules(self, *, task_status: TaskStatus[None]) -> None:
        store: Any = self.data_store
        wakeup = anyio.Event()
        wakeup_deadline: datetime | None = None

        async def schedule_added_or_modified(event: Any) -> None:
            event_ = cast("ScheduleAdded | ScheduleUpdated", event)
            if wakeup_deadline is None or (
                event_.next_fire_time is not None and event_.next_fire_time < wakeup_deadline
            ):
                wakeup.set()

        with self.event_broker.subscribe(
            schedule_added_or_modified, {ScheduleAdded, ScheduleUpdated}
        ):
            task_status.started()
            await self.get_next_event(SchedulerStarted)
            while self._state is RunState.started:
                if store.state.pending_jobs() >= MAX_BACKLOG:
                    # The job side is behind: fire later, and let the schedules' coalesce
                    # policy merge what is missed meanwhile, as APScheduler's loop would when it
                    # cannot keep up (a queue growing without bound helps nobody).
                    await anyio.sleep(BACKLOG_WAIT)
                    continue
                due, planned_at = await store.fire_round(
                    self.identity, ROUND_LIMIT, rng=self.round_rng
                )
                if due >= ROUND_LIMIT:
                    continue  # more are due: the next round at once
                wakeup_deadline = await store.get_next_schedule_run_time()
                wait = None
                if wakeup_deadline is not None:
                    wait = (wakeup_deadline - store.clock()).total_seconds()
                    if wakeup_deadline <= planned_at:
                        # Due when the round was planned, yet still there: it could not fire
                        # (its trigger failed, or a lease holds it). Retry, without spinning.
                        wait = max(wait, RETRY_SECONDS)
                with move_on_after(wait):
                    await wakeup.wait()
                wakeup = anyio.Event()
