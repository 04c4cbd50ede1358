"""``GET /api/backup``: the leader streams a consistent backup of the replicated state.

Admin only (``mesh.api.auth.ADMIN_PREFIXES``), and audited although it is a read: the file holds
every schedule's args and kwargs and the jobs' results. The leader answers (its image covers
every entry committed before the request: ``ImageSource.state_image``); a follower answers 421
with the leader's HTTP address, which ``schedulezero backup`` then asks. The file's layout and
checksum are mesh.backup's; the image is read from an unlinked file in 1 MiB pieces, so the
answer costs no more memory than that, whatever the size of the state.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime

from aiohttp import web

import mesh
from mesh.backup import READ_BYTES, TRAILER_BYTES, BackupHeader, header_line, trailer
from mesh.contracts import ImageSource, NodeView, Replica

MISDIRECTED = 421  # "not this node": the answer names the leader


def add_backup_route(
    app: web.Application, replica: Replica, view: NodeView, images: ImageSource
) -> None:
    async def backup(request: web.Request) -> web.StreamResponse:
        if request.query:
            raise web.HTTPBadRequest(reason="GET /api/backup takes no query parameters")
        if not replica.is_leader:
            leader = view.leader_http()
            return web.json_response(
                {
                    "error": f"{replica.node_id} is not the leader: ask the leader "
                    f"({leader or 'none known yet'}) for a backup",
                    "leader_id": replica.leader_id,
                    "leader_http": leader,
                },
                status=MISDIRECTED,
            )
        image = await images.state_image()
        try:
            header = header_line(
                BackupHeader(
                    index=image.index,
                    term=image.term,
                    snapshot_term=image.snapshot_term,
                    voters=image.voters,
                    image_bytes=image.size,
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    created_by={"node_id": replica.node_id, "version": mesh.__version__},
                    leader_id=replica.node_id,
                )
            )
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Disposition": f'attachment; filename="schedulezero-{image.index}.szb"',
                    "Cache-Control": "no-store",
                }
            )
            response.content_length = len(header) + image.size + TRAILER_BYTES
            await response.prepare(request)
            digest = hashlib.sha256(header)
            await response.write(header)
            offset = 0
            while offset < image.size:
                piece = await asyncio.to_thread(os.pread, image.fd, READ_BYTES, offset)
                if not piece:
                    raise OSError(f"backup image ended at {offset} of {image.size} bytes")
                digest.update(piece)
                await response.write(piece)
                offset += len(piece)
            await response.write(trailer(digest.hexdigest()))
            await response.write_eof()
            return response
        finally:
            os.close(image.fd)

    app.router.add_get("/api/backup", backup)
