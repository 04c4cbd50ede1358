"""ZeroMQ transport: the wire format (``codec``) and the per-process socket set (``zmq``)."""

from mesh.transport.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL,
    FrameError,
    decode,
    encode,
)
from mesh.transport.zmq import Incoming, MeshTransport, pub_address_of, split_address

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "PROTOCOL",
    "FrameError",
    "Incoming",
    "MeshTransport",
    "decode",
    "encode",
    "pub_address_of",
    "split_address",
]
