"""What a source session asks of its driver: the outputs of ``SourceSession.handle``.

Most actions are orders the driver carries out in sequence (send, push, pause, resume). An
*asking* action (``ASKING``) waits for something the session needs to go on; the driver
carries it out and hands the session the event it produced. A session puts at most one asking
action in one answer, and last, so a driver's loop is:

    actions = deque(session.start(now))
    while actions:
        event = driver.carry_out(actions.popleft())
        if event is not None:
            actions.extend(session.handle(event, now()))

When carrying out an action fails, the actions still queued are dropped and the session is
told (``Failed`` or ``Cancel``); it answers with what ending takes (AbortPeer, ResumeGuest,
the final state).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.protocol.capabilities import Capabilities
from pipeline.protocol.messages import Message


# -- orders ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StateChanged:
    state: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SendStream:
    """Migration-stream bytes: QEMU FILE messages on ``rdma:``, the stream itself otherwise."""

    payloads: tuple


@dataclass(frozen=True, slots=True)
class SendControl:
    """One control message (READY credit is the control channel's business)."""

    message: Message


@dataclass(frozen=True, slots=True)
class ConnectDataPath:
    """Connect the poster's data QP, presenting the destination's ``session_token``; 0: the
    destination granted none (QEMU's protocol version 1), the writes go on the control QP."""

    session_token: int


@dataclass(frozen=True, slots=True)
class PushAnswers:
    """Answer records for the registrar (rkeys of registered chunks or pinned blocks)."""

    records: np.ndarray


@dataclass(frozen=True, slots=True)
class CommandScanner:
    """Start round ``round`` on the scanner (``final``: the last one, guest paused)."""

    round: int
    final: bool = False


@dataclass(frozen=True, slots=True)
class ThrottleGuest:
    """Auto-converge: let the guest run ``100 - percentage`` % of the time (0: unthrottled)."""

    percentage: int


@dataclass(frozen=True, slots=True)
class ResumeGuest:
    """Before the commit point only: the migration did not complete."""


@dataclass(frozen=True, slots=True)
class AbortPeer:
    """Tell the peer the migration failed (best effort: ERROR, or SHUT the stream)."""


# -- asking actions ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Connect:
    """Connect to the peer asking ``capabilities`` (None: open the stream) -> Connected."""

    capabilities: Capabilities | None
    block_lengths: tuple = ()


@dataclass(frozen=True, slots=True)
class ReceiveControl:
    """Wait for the next control message -> ControlReceived."""

    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class AwaitCredit:
    """Wait until the destination grants READY -> CreditGranted."""

    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class AwaitStage:
    """Wait for the registrar's next requests -> StageRecords."""


@dataclass(frozen=True, slots=True)
class SyncDirtyLog:
    """Sync the dirty log after round ``round`` -> Synced."""

    round: int


@dataclass(frozen=True, slots=True)
class ReadRoundPages:
    """Pack the bitmap of the pages round ``round`` sent -> RoundPages."""

    round: int


@dataclass(frozen=True, slots=True)
class SendPages:
    """A stream carrier sends round ``round``'s dirty pages inline -> PagesSent."""

    round: int


@dataclass(frozen=True, slots=True)
class PauseGuest:
    """-> GuestPaused."""


@dataclass(frozen=True, slots=True)
class ComputeDigest:
    """The RAM digest of the paused guest -> DigestReady."""


@dataclass(frozen=True, slots=True)
class AwaitConfirmation:
    """Wait for the destination's verdict on a complete stream (READY after EOF on rdma:,
    SHUT(0) on tcp:, the file closed whole) -> Confirmed. Everything has been sent: a stage
    or the paused guest ending meanwhile changes nothing, and a cancel is too late."""

    timeout: float


@dataclass(frozen=True, slots=True)
class SendCommit:
    """Tell a two-phase destination it may run the guest: the source has committed (COMMIT
    on rdma:, the commit token after the stream on tcp:). Sent once the session is final: a
    failure to send it is a warning, and the guest then runs nowhere until someone decides,
    never on both hosts."""


ASKING = (Connect, ReceiveControl, AwaitCredit, AwaitStage, SyncDirtyLog, ReadRoundPages,
          SendPages, PauseGuest, ComputeDigest, AwaitConfirmation)
