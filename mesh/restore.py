"""``schedulezero restore FILE --data-dir DIR``: bootstrap a new cluster from a backup.

The backup's image becomes the node's stored Raft snapshot (mesh.storage.raft_store), at the
backup's index, with the hard state at the backup's term: the node starts with every schedule,
job and the execution history, exactly as a follower does after installing a leader's snapshot.
Its voters are the first configuration of the new cluster (``--node-id``, by default the backup's
voters). Run it for each of them with the same FILE and the same ids, or for one and let the
others join empty: the leader adds them (``membership.auto_join``, or ``cluster add-member``)
and sends them the image by snapshot install (docs/deployment.md, "Backup and restore").

Why the restored term is the backup's: jobs and results carry the term that leased them, and a
handler's answer is fenced by term; a new cluster counting from term 1 would let fences of the
old one look newer than its own leaders.

Everything is checked before anything is written (checksum, format, that the image loads as the
scheduler's state, that DIR holds nothing), so a bad file changes nothing: ``RestoreError``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh.backup import BackupError, BackupHeader, image_chunks, read_backup
from mesh.consensus.messages import HardState
from mesh.scheduling.state import SchedulerState
from mesh.storage.raft_store import RaftStore, write_snapshot_file

STATE_DB = "broker_state.db"  # the node's database (mesh.config.Config.state_db_path)
_NODE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


class RestoreError(BackupError):
    """A restore that cannot be done; one line saying why. Nothing was written."""


def restore(
    backup: str | os.PathLike[str], data_dir: str | os.PathLike[str], voters: Sequence[str] = ()
) -> dict[str, Any]:
    """Write the backup into the empty (or absent) ``data_dir`` as the node's initial snapshot;
    return what was restored (index, term, voters, schedules, executions)."""
    target = Path(data_dir)
    _check_empty(target)
    try:
        header, offset = read_backup(backup)
    except BackupError as e:
        raise RestoreError(str(e)) from None
    first = _voters(voters or header.voters)
    counts = _check_image(backup, header, offset)
    created = not target.exists()
    try:
        _write(target, backup, header, offset, first)
    except BaseException as e:
        _undo(target, created)
        if isinstance(e, OSError):
            raise RestoreError(f"cannot write {target}: {e.strerror or e}") from None
        raise
    return {"index": header.index, "term": header.term, "voters": list(first), **counts}


def _check_empty(target: Path) -> None:
    if target.is_dir():
        try:
            entries = any(target.iterdir())
        except OSError as e:
            raise RestoreError(f"--data-dir {target}: cannot read: {e.strerror or e}") from None
        if entries:
            raise RestoreError(
                f"--data-dir {target} is not empty: restore only into a new node's empty data "
                "directory (a running cluster's state is never overwritten)"
            )
    elif target.exists():
        raise RestoreError(f"--data-dir {target} exists and is not a directory")


def _voters(ids: Sequence[str]) -> tuple[str, ...]:
    for node_id in ids:
        if not _NODE_ID.fullmatch(node_id):
            raise RestoreError(f"--node-id: {node_id!r} is not a node id ([A-Za-z0-9_.-], 1-128)")
    return tuple(sorted(set(ids)))


def _check_image(
    backup: str | os.PathLike[str], header: BackupHeader, offset: int
) -> dict[str, int]:
    """Load the image as the node will at its start: a file whose checksum is right but whose
    image is not the scheduler's state (written by hand) is refused here, not by a node that
    then cannot start."""
    with open(backup, "rb") as f:
        data = b"".join(image_chunks(f, offset, header.image_bytes))
    state = SchedulerState()
    try:
        state.restore(data)
    except Exception as e:
        raise RestoreError(
            f"{backup}: the image is not a scheduler state this version reads "
            f"({type(e).__name__}: {str(e)[:100]})"
        ) from None
    return {"schedules": len(state.schedules), "executions": len(state.executions)}


def _write(
    target: Path,
    backup: str | os.PathLike[str],
    header: BackupHeader,
    offset: int,
    voters: tuple[str, ...],
) -> None:
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = RaftStore(target / STATE_DB)
    try:
        with open(backup, "rb") as f:
            name = write_snapshot_file(
                store.snapshot_dir,
                header.index,
                header.snapshot_term,
                image_chunks(f, offset, header.image_bytes),
            )
        store.record_snapshot(header.index, header.snapshot_term, voters, name)
        store.save(hard_state=HardState(term=header.term, voted_for=None, commit=header.index))
    finally:
        store.close()


def _undo(target: Path, created: bool) -> None:
    """Leave ``target`` as it was: absent, or empty."""
    if created:
        shutil.rmtree(target, ignore_errors=True)
        return
    for p in target.iterdir():
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
