"""The one exception tree of rdma-pipeline.

    MigrationError                 anything that ends or refuses a migration
    ├── ProtocolError              a rule of QEMU's RDMA protocol was broken
    │   ├── LocalProtocolError     ... by us: we tried to send something out of order
    │   └── RemoteProtocolError    ... by the peer: malformed or out-of-order input
    ├── TransportError             the verbs layer failed (carries errno when there is one)
    │   └── TransportUnsupported   the transport cannot run here (no RDMA device, no pyverbs)
    ├── ShmError                   a shared-memory segment, ring or dirty log failed
    ├── StageFailed                a stage process died or exited with an error
    ├── GuestError                 the guest (synthetic or KVM) failed or refused
    └── MigrationCancelled         the user cancelled

ValueError and TypeError are kept for misuse of the API. Every error carries a message meant for
a person: what went wrong and, where there is one, what to do (``hint``). The CLI prints
``str(error)`` on one line, never a traceback unless ``--debug``.

The tree lives in the bottom layer so that every layer can raise it; library users import it
from ``pipeline.errors`` (or ``pipeline``), which re-exports these same classes.
"""

from __future__ import annotations

__all__ = [
    "MigrationError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "TransportError", "TransportUnsupported", "ShmError", "StageFailed", "GuestError",
    "MigrationCancelled",
]


class MigrationError(Exception):
    """Base of every error that ends or refuses a migration."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ProtocolError(MigrationError):
    """A rule of the RDMA migration protocol was broken."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order."""


class TransportError(MigrationError):
    """The verbs transport failed; ``errno`` is set when the OS gave one."""

    def __init__(self, message: str, *, errno: int | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.errno = errno


class TransportUnsupported(TransportError):
    """The requested transport cannot run on this machine."""


class ShmError(MigrationError):
    """A shared-memory segment, ring or dirty log failed or did not match."""


class StageFailed(MigrationError):
    """A stage process died or exited with an error."""

    def __init__(self, stage: str, exitcode: int | None, detail: str = "") -> None:
        how = "did not exit" if exitcode is None else (
            f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}")
        msg = f"stage {stage} {how}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
        self.stage = stage
        self.exitcode = exitcode


class GuestError(MigrationError):
    """The guest failed, or refused what was asked of it."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled on request."""
