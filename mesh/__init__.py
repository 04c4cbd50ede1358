"""ScheduleZero Mesh: a brokerless, leader-elected, replicated job scheduler.

User-facing API::

    import mesh

    @mesh.task
    async def send_notification(message: str) -> str: ...

    ctx = mesh.job_context()  # inside a running task
"""

from mesh.tasks import JobContext, job_context, task

__all__ = ["JobContext", "job_context", "task"]
__version__ = "0.1.0"
