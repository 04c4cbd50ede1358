"""``LeaderSession``: everything that belongs to one term of leadership on this node.

A node that wins an election starts a session; when it loses leadership (or the term ends) the
session is dropped with everything in it. Nothing per-term is stored on long-lived objects and
reset: the data store of the term, its identity (``node@term``, the fencing token's owner) and
the record of which handler ran each job live here and are handed to whoever needs them.
"""

from __future__ import annotations

from uuid import UUID

from mesh.contracts import Replica, term_identity
from mesh.scheduling.state import SchedulerState
from mesh.scheduling.store import ReplicatedDataStore


class LeaderSession:
    def __init__(self, replica: Replica, state: SchedulerState, term: int) -> None:
        self.node_id = replica.node_id
        self.term = term
        self.identity = term_identity(replica.node_id, term)
        self.state = state
        self.propose = replica.propose  # commands of the term's own tasks (the alert sender)
        self._runners: dict[UUID, str] = {}
        self.store = ReplicatedDataStore(
            propose=replica.propose,
            propose_nowait=replica.propose_nowait,
            state=state,
            term=term,
            runner_of=self.take_runner,
        )

    @property
    def fencing_token(self) -> int:
        """The term: handlers refuse work carrying a lower token than one they have seen."""
        return self.term

    def ran_on(self, job_id: UUID, runner: str) -> None:
        """Record where a job ran (a handler id, or ``embedded:<node>``) for its result."""
        self._runners[job_id] = runner

    def take_runner(self, job_id: UUID) -> str | None:
        """Where the job ran, once: the data store records it with the job's result."""
        return self._runners.pop(job_id, None)

    async def assign(self, job_id: UUID, handler_id: str) -> bool:
        """Commit that the job goes to ``handler_id`` under this term (before dispatching it);
        False when the job is no longer this leader's."""
        return await self.store.assign_job(self.identity, job_id, handler_id)
