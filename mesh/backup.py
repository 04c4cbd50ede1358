"""The backup file: a consistent image of the replicated state, its metadata and a checksum.

``GET /api/backup`` (mesh.api.backup) writes one and ``schedulezero backup`` saves it;
``schedulezero restore`` (mesh.restore) checks it and bootstraps a new cluster from it
(docs/deployment.md, "Backup and restore"). The layout is three parts, so that a file of any size
is written and checked as a stream, never held in memory::

    {"format": "schedulezero-backup", "format_version": 1, ...}\\n   one line of JSON: the header
    <image_bytes bytes>                                              StateMachine.snapshot()
    sha256:<64 hex digits>\\n                                         the trailer

The SHA-256 covers the header line and the image, so a flipped bit, a truncated copy or an
edited header (another index, other voters) is refused. It is a checksum, not a signature:
whoever can write the file can recompute it. Keep backups where only administrators can write
(and read: the image holds every schedule's args and kwargs and the jobs' results).

Standard library only: the API layer and the CLI both use it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "BackupError",
    "BackupHeader",
    "header_line",
    "image_chunks",
    "read_backup",
    "trailer",
]

FORMAT = "schedulezero-backup"
FORMAT_VERSION = 1
STATE_FORMAT = "scheduler-state"  # what the image is: SchedulerState.snapshot()
MAX_HEADER_BYTES = 64 * 1024  # a header names a few voters; anything longer is not one
TRAILER_PREFIX = b"sha256:"
TRAILER_BYTES = len(TRAILER_PREFIX) + 64 + 1
READ_BYTES = 1 << 20
_NODE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_HEX = re.compile(rb"[0-9a-f]{64}")


class BackupError(ValueError):
    """A file that is not a usable backup; the message says which and why, in one line."""


@attrs.frozen
class BackupHeader:
    """What a backup says about itself (the header line)."""

    index: int  # the applied entry the image is the state of
    term: int  # the leader's term when it was taken: the restored cluster starts there
    snapshot_term: int  # the term of the entry at ``index``
    voters: tuple[str, ...]  # the voters at ``index``: restore's default first configuration
    image_bytes: int
    created_at: str
    created_by: dict[str, Any]  # {"node_id", "version"} of the leader that wrote it
    leader_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "state_format": STATE_FORMAT,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "cluster": {
                "leader_id": self.leader_id,
                "term": self.term,
                "index": self.index,
                "snapshot_term": self.snapshot_term,
                "voters": list(self.voters),
            },
            "image_bytes": self.image_bytes,
        }


def header_line(header: BackupHeader) -> bytes:
    return json.dumps(header.to_json(), separators=(",", ":"), sort_keys=True).encode() + b"\n"


def trailer(sha256_hex: str) -> bytes:
    """The last line: ``sha256_hex``, the SHA-256 of everything before it."""
    return TRAILER_PREFIX + sha256_hex.encode() + b"\n"


def read_backup(path: str | os.PathLike[str]) -> tuple[BackupHeader, int]:
    """Check the backup at ``path`` end to end (format, version, sizes, checksum), reading it in
    pieces; return its header and the offset of the image in the file. BackupError otherwise."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            line = f.readline(MAX_HEADER_BYTES + 1)
            try:
                header = _parse_header(line)
            except BackupError as e:
                raise BackupError(f"{p}: {e}") from None
            expected = len(line) + header.image_bytes + TRAILER_BYTES
            if size != expected:
                what = "truncated" if size < expected else "longer than its header says"
                raise BackupError(
                    f"{p}: {what} ({size} bytes; the header says {expected}): not a whole backup"
                )
            digest = hashlib.sha256(line)
            left = header.image_bytes
            while left:
                piece = f.read(min(READ_BYTES, left))
                if not piece:
                    raise BackupError(f"{p}: truncated while reading the image")
                digest.update(piece)
                left -= len(piece)
            last = f.read(TRAILER_BYTES)
    except OSError as e:
        raise BackupError(f"{p}: cannot read: {e.strerror or e}") from None
    if not (last.startswith(TRAILER_PREFIX) and last.endswith(b"\n")):
        raise BackupError(f"{p}: no checksum line at the end: not a whole backup")
    stored = last[len(TRAILER_PREFIX) : -1]
    if not _HEX.fullmatch(stored) or not hmac.compare_digest(stored, digest.hexdigest().encode()):
        raise BackupError(f"{p}: checksum mismatch: the file is corrupt or was modified")
    return header, len(line)


def image_chunks(f: BinaryIO, offset: int, size: int) -> Iterator[bytes]:
    """The image of an open backup file (checked by ``read_backup``), a piece at a time."""
    f.seek(offset)
    while size:
        piece = f.read(min(READ_BYTES, size))
        if not piece:
            raise BackupError("the backup file shrank while it was read")
        size -= len(piece)
        yield piece


def _parse_header(line: bytes) -> BackupHeader:
    if not line.endswith(b"\n") or len(line) > MAX_HEADER_BYTES:
        raise BackupError("not a ScheduleZero backup (no header line)")
    try:
        d = json.loads(line)
    except (ValueError, RecursionError):
        raise BackupError("not a ScheduleZero backup (the header is not JSON)") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise BackupError("not a ScheduleZero backup (no 'format: schedulezero-backup')")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise BackupError(
            f"backup format version {version!r}; this version of schedulezero reads "
            f"version {FORMAT_VERSION} only"
        )
    if d.get("state_format") != STATE_FORMAT:
        raise BackupError(f"the image is {d.get('state_format')!r}, not {STATE_FORMAT!r}")
    cluster = d.get("cluster")
    created_by = d.get("created_by")
    if not isinstance(cluster, dict) or not isinstance(created_by, dict):
        raise BackupError("backup header: 'cluster' and 'created_by' must be objects")
    numbers = {k: cluster.get(k) for k in ("term", "index", "snapshot_term")}
    numbers["image_bytes"] = d.get("image_bytes")
    for name, value in numbers.items():
        if type(value) is not int or value < 0:
            raise BackupError(f"backup header: {name} must be a non-negative integer")
    voters = cluster.get("voters")
    if (
        not isinstance(voters, list)
        or not voters
        or not all(isinstance(v, str) and _NODE_ID.fullmatch(v) for v in voters)
    ):
        raise BackupError("backup header: voters must be a non-empty list of node ids")
    if numbers["snapshot_term"] > numbers["term"]:
        raise BackupError("backup header: snapshot_term is later than term")
    return BackupHeader(
        index=numbers["index"],
        term=numbers["term"],
        snapshot_term=numbers["snapshot_term"],
        voters=tuple(voters),
        image_bytes=numbers["image_bytes"],
        created_at=str(d.get("created_at", "")),
        created_by=created_by,
        leader_id=str(cluster.get("leader_id", "")),
    )
