"""Stopping the runs that the overlap policy ``cancel_other`` flagged (``JobState.cancel``).

The state machine decides, when a newer fire of the schedule is committed, which runs must stop;
the leader carries that out: an embedded async run on this leader is cancelled, a run on a
handler gets a ``cancel_job`` message (mesh.dispatch.protocol), sent again every
``RESEND_SECONDS`` until its release is committed (a message can be lost, or arrive before the
dispatch it cancels). The flag is replicated, so a new leader finds the flagged jobs in its own
state and sends their cancels again. A sync task cannot be stopped: the newer run waits, held,
until it returns.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from mesh.scheduling.executor import Dispatcher, MeshJobExecutor
    from mesh.scheduling.session import LeaderSession

SWEEP_SECONDS = 0.25  # how often the leader looks at the flagged jobs
RESEND_SECONDS = 1.0  # a handler's cancel is sent again this often until the job is released


async def cancel_flagged(
    session: LeaderSession, executor: MeshJobExecutor, dispatcher: Dispatcher | None
) -> None:
    """For as long as this leader's term lasts: stop every run flagged ``cancel``."""
    sent: dict[UUID, float] = {}
    wake = asyncio.Event()
    unwatch = session.state.watch(wake.set)
    try:
        while True:
            sweep(session, executor, dispatcher, sent, time.monotonic())
            if session.state.cancelling:
                await asyncio.sleep(SWEEP_SECONDS)
            else:  # nothing flagged: sleep until the state machine flags a run
                wake.clear()
                await wake.wait()
    finally:
        unwatch()


def sweep(
    session: LeaderSession,
    executor: MeshJobExecutor,
    dispatcher: Dispatcher | None,
    sent: dict[UUID, float],
    now: float,
) -> None:
    """One look at the flagged jobs; ``sent`` remembers when each handler's cancel went out."""
    state = session.state
    for job_id in [j for j in sent if j not in state.cancelling]:
        del sent[job_id]
    for job_id in list(state.cancelling):
        js = state.jobs.get(job_id)
        if js is None or executor.stop(job_id):
            continue
        if (
            dispatcher is None
            or js.handler is None
            or js.job.acquired_by != session.identity
            or now - sent.get(job_id, -RESEND_SECONDS) < RESEND_SECONDS
        ):
            continue  # not started by this leader yet: it is cancelled when it starts
        if dispatcher.cancel(js.handler, js.job, session.fencing_token):
            sent[job_id] = now
