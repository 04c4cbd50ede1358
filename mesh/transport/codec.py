"""Wire format of every mesh message, and its validation.

A message is exactly four ZeroMQ frames (after the ROUTER routing id, if any)::

    [PROTOCOL, kind, rid, payload]

* ``PROTOCOL`` is ``b"SZ1"``; bumping it is how an incompatible format announces itself.
* ``kind`` is 1..32 ASCII chars of ``[a-z0-9_.-]`` (``raft``, ``ping``, ``reply``...).
* ``rid`` is empty for a one-way message, else a request id of at most 32 bytes that the
  reply (``kind == "reply"``) carries back.
* ``payload`` is a UTF-8 JSON object.

Anything else raises :class:`FrameError`; receivers count it by ``reason`` and drop it, so a
confused or hostile peer can never crash a node.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

PROTOCOL = b"SZ1"
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_RID_BYTES = 32
FRAME_COUNT = 4

# Reasons a message is rejected; also the suffixes of the "dropped_frames.<reason>" counters.
REASONS = ("shape", "version", "kind", "size", "json")

_NAME_RE = re.compile(rb"[a-z0-9_.\-]{1,32}")
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.JSONDecoder().decode


class FrameError(ValueError):
    """A received message that breaks the wire format; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@lru_cache(maxsize=512)
def _name_from_bytes(raw: bytes) -> str:
    # Cached: a node sees a handful of kinds millions of times; skip the regex for those.
    if _NAME_RE.fullmatch(raw) is None:
        raise FrameError("kind", f"invalid kind {raw[:40]!r}")
    return raw.decode("ascii")


@lru_cache(maxsize=512)
def name_to_bytes(name: str) -> bytes:
    """Validate a kind (or pub/sub topic) and return its wire bytes; raises FrameError("kind")."""
    if not isinstance(name, str):
        raise FrameError("kind", f"kind must be a str, got {type(name).__name__}")
    raw = name.encode("utf-8")
    _name_from_bytes(raw)
    return raw


def name_from_bytes(raw: bytes) -> str:
    """Validate a kind (or topic) frame and return it as str; raises FrameError("kind")."""
    return _name_from_bytes(raw)


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Serialise a payload dict to compact UTF-8 JSON (raises TypeError for non-dicts)."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    return _dumps(payload).encode("utf-8")


def encode_json(kind: str, body: bytes, rid: bytes = b"") -> list[bytes]:
    """The frames of one message whose payload is already JSON (a JSON object, UTF-8): for
    senders that encode their own structs in one pass (Raft messages)."""
    if len(rid) > MAX_RID_BYTES:
        raise FrameError("shape", f"rid is {len(rid)} bytes, max {MAX_RID_BYTES}")
    if not body.startswith(b"{"):
        raise TypeError("payload must be a JSON object")
    return [PROTOCOL, name_to_bytes(kind), rid, body]


def encode(kind: str, payload: dict[str, Any], rid: bytes = b"") -> list[bytes]:
    """Build the four frames of one message.

    Raises FrameError("kind") for an invalid kind, FrameError("shape") for a too-long rid and
    TypeError for a payload that is not a JSON-able dict: a sender bug should fail loudly here
    rather than be dropped silently by the receiver.
    """
    if len(rid) > MAX_RID_BYTES:
        raise FrameError("shape", f"rid is {len(rid)} bytes, max {MAX_RID_BYTES}")
    return [PROTOCOL, name_to_bytes(kind), rid, encode_payload(payload)]


def decode(
    frames: list[bytes], max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[str, bytes, dict[str, Any]]:
    """Validate four received frames and return ``(kind, rid, payload)``.

    Checks run cheapest-first and the size check precedes JSON parsing, so an oversized or
    garbage frame costs no parsing work. An over-long rid is a "shape" error.
    """
    if len(frames) != FRAME_COUNT:
        raise FrameError("shape", f"expected {FRAME_COUNT} frames, got {len(frames)}")
    version, kind_raw, rid, body = frames
    for frame in frames:
        if len(frame) > max_bytes:
            raise FrameError("size", f"frame of {len(frame)} bytes exceeds {max_bytes}")
    if version != PROTOCOL:
        raise FrameError("version", f"expected {PROTOCOL!r}, got {bytes(version[:16])!r}")
    kind = name_from_bytes(kind_raw)
    if len(rid) > MAX_RID_BYTES:
        raise FrameError("shape", f"rid is {len(rid)} bytes, max {MAX_RID_BYTES}")
    try:
        # Decode UTF-8 explicitly: json.loads(bytes) would also accept UTF-16/32.
        payload = _loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError("json", f"payload is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise FrameError("json", "payload JSON nested too deeply") from None
    if type(payload) is not dict:
        raise FrameError("json", f"payload must be a JSON object, got {type(payload).__name__}")
    return kind, rid, payload
