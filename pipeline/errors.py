"""The exception tree, for library users: ``from pipeline.errors import MigrationError``.

The tree and its documentation live in ``shm.errors`` (the bottom layer, so that every layer can
raise them); these are the same classes, re-exported. Code of this project imports ``shm.errors``.
"""

from shm.errors import (
    GuestError,
    LocalProtocolError,
    MigrationCancelled,
    MigrationError,
    ProtocolError,
    RemoteProtocolError,
    ShmError,
    StageFailed,
    TransportError,
    TransportUnsupported,
)

__all__ = [
    "MigrationError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "TransportError", "TransportUnsupported", "ShmError", "StageFailed", "GuestError",
    "MigrationCancelled",
]
