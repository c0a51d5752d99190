"""What a source session is told: the inputs of ``SourceSession.handle``.

Each event is what the driver saw when it carried out the session's last asking action (see
``actions``): a connection made, a control message decoded, records a stage pushed, a dirty-log
sync, the guest paused. ``Cancel`` and ``SetParameter`` are a user's requests and may come at
any time; ``Failed`` is the driver's report that something under it broke.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.protocol.capabilities import Capabilities
from pipeline.protocol.messages import Message


@dataclass(frozen=True, slots=True)
class Connected:
    """The peer accepted; ``capabilities`` are the effective ones (None: a stream carrier)."""

    capabilities: Capabilities | None = None


@dataclass(frozen=True, slots=True)
class ControlReceived:
    """A control message from the peer, already checked by the control channel."""

    message: Message


@dataclass(frozen=True, slots=True)
class CreditGranted:
    """The destination granted READY for the next message."""


@dataclass(frozen=True, slots=True)
class StageRecords:
    """Request records the registrar pushed (REGISTER, COMPRESS, UNREGISTER, DRAINED)."""

    records: np.ndarray


@dataclass(frozen=True, slots=True)
class RoundPages:
    """The bitmap of the pages the round just drained sent, packed for the stream."""

    body: bytes


@dataclass(frozen=True, slots=True)
class PagesSent:
    """A stream carrier sent one round's pages inline."""

    pages: int               # dirty pages sent
    zero_pages: int          # of them, sent as ZERO records
    scan_s: float            # time spent finding and zero-testing them


@dataclass(frozen=True, slots=True)
class Synced:
    """A dirty-log sync: pages dirty now, not yet sent."""

    dirty_pages: int


@dataclass(frozen=True, slots=True)
class GuestPaused:
    """The guest is paused; ``state`` is its device section's body."""

    device_section: str
    state: bytes


@dataclass(frozen=True, slots=True)
class DigestReady:
    """The RAM digest of the paused guest, one SHA-256 per chunk."""

    digest: bytes


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A stream destination confirmed (``tcp:`` SHUT(0)) or a file was closed whole."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """The user asked to stop."""


@dataclass(frozen=True, slots=True)
class SetParameter:
    """The user changed a migration parameter while it runs (QEMU spelling)."""

    name: str
    value: int


@dataclass(frozen=True, slots=True)
class Failed:
    """Something under the session broke; ``reason`` is one line for a person."""

    reason: str
