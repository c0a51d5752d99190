"""rdma-pipeline: live migration of VM RAM with QEMU's RDMA migration protocol.

The public API grows here (start, watch, cancel and await a migration); see ``pipeline.api``.
"""

from pipeline.errors import (  # noqa: F401
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

__version__ = "0.1.0"
