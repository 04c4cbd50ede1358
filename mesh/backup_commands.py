"""``schedulezero backup -o FILE`` and ``schedulezero restore FILE --data-dir DIR``.

``backup`` is a client command (``--url``, ``--token``: an admin token): it saves
``GET /api/backup`` (mesh.api.backup) to FILE through a temporary file in the same directory,
mode 0600, checks the checksum and only then renames it into place, so FILE is always a whole,
checked backup or is left as it was. A follower answers with the leader's address (421), which
is asked instead. ``restore`` works offline on a new node's data directory (mesh.restore).
docs/deployment.md has the runbook; mesh.backup the file's layout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, BinaryIO

from mesh.backup import BackupError, read_backup
from mesh.client import ApiClient, ApiError, ClientConfigError
from mesh.client_commands import api_client, connection_flags

__all__ = ["add_backup_commands"]

MISDIRECTED = 421  # a follower's answer to GET /api/backup: it names the leader


def add_backup_commands(sub: Any) -> None:
    """Add ``backup`` and ``restore`` to ``sub``, the ``schedulezero`` parser's subparsers."""
    backup = sub.add_parser(
        "backup",
        help="save a consistent backup of the cluster's state to FILE (admin token)",
        description="Save a consistent backup of the replicated state (every schedule, job and "
        "the execution history) to FILE, mode 0600. It holds the schedules' args and kwargs: "
        "keep it as carefully as the API tokens.",
        parents=[connection_flags()],
        allow_abbrev=False,
    )
    backup.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it")
    backup.set_defaults(func=_cmd_backup)

    restore = sub.add_parser(
        "restore",
        help="bootstrap a new cluster's node from a backup FILE (offline)",
        description="Check FILE (checksum, format) and write it into DIR, a new node's empty "
        "data directory, as the node's initial state. Nothing is written if anything is wrong.",
        allow_abbrev=False,
    )
    restore.add_argument("file", metavar="FILE", help="a file written by schedulezero backup")
    restore.add_argument(
        "--data-dir", required=True, metavar="DIR", help="the new node's data directory (empty)"
    )
    restore.add_argument(
        "--node-id",
        action="append",
        default=[],
        metavar="ID",
        help="a voter of the new cluster (repeat for each; default: the backup's voters); "
        "restore every one of them from the same FILE with the same ids, or only one",
    )
    restore.set_defaults(func=_cmd_restore)


def _cmd_backup(ns: argparse.Namespace) -> int:
    target = Path(ns.output)
    directory = target.parent
    if not directory.is_dir():
        raise ClientConfigError(f"-o: {directory} is not a directory")
    client = api_client(ns)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise ClientConfigError(f"-o: cannot write in {directory}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp: mode 0600
            source = _download(client, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            header, _ = read_backup(tmp)
        except BackupError as e:
            raise ApiError(f"the backup {source} sent is not usable: {e}") from None
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    print(
        f"wrote {target}: {header.image_bytes} bytes of state at index {header.index} "
        f"(term {header.term}, leader {header.leader_id}, voters {', '.join(header.voters)}); "
        "checksum verified"
    )
    return 0


def _download(client: ApiClient, f: BinaryIO) -> str:
    """Save ``GET /api/backup`` to ``f``; a follower's 421 names the leader, asked once instead.
    Returns the URL that answered."""
    try:
        client.download("/api/backup", f)
        return client.url
    except ApiError as e:
        leader = _leader_url(client.url, e)
        if leader is None:
            raise
    f.seek(0)
    f.truncate()
    ApiClient(leader, token=client.token, cacert=client.cacert, timeout=client.timeout).download(
        "/api/backup", f
    )
    return leader


def _leader_url(url: str, e: ApiError) -> str | None:
    """The leader's URL from a follower's 421 (same scheme as ``url``), or None."""
    body = e.body
    if e.status != MISDIRECTED or not isinstance(body, dict):
        return None
    address = body.get("leader_http")
    if not isinstance(address, str) or not address:
        raise ApiError(f"{e}; retry once a leader is elected", e.status)
    scheme = urllib.parse.urlsplit(url).scheme
    host = address.removeprefix("http://").removeprefix("https://").rstrip("/")
    leader = f"{scheme}://{host}"
    parsed = urllib.parse.urlsplit(leader)
    if not parsed.hostname or parsed.path or parsed.query or leader == url.rstrip("/"):
        raise ApiError(f"{e} (leader address {address[:80]!r} not usable)", e.status)
    return leader


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cmd_restore(ns: argparse.Namespace) -> int:
    from mesh.restore import restore

    done = restore(ns.file, ns.data_dir, ns.node_id)
    voters = ", ".join(done["voters"])
    print(
        f"restored {done['schedules']} schedules and {done['executions']} executions (index "
        f"{done['index']}, term {done['term']}) into {ns.data_dir}; voters: {voters}. "
        "Start each voter's node on its data directory; other nodes join empty "
        "(docs/deployment.md)."
    )
    return 0
