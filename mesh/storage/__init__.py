"""Durable state: the Raft log store on the node's ``broker_state.db``."""

from mesh.storage.raft_store import RaftStore
from mesh.storage.sqlite import DB_FILENAME

__all__ = ["DB_FILENAME", "RaftStore"]
