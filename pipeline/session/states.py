"""The states of a migration, as QEMU names them, and the table of moves between them.

    source       none -> setup -> active -> device -> completed
                 any state not final -> failed;  setup/active/device -> cancelling -> cancelled
    destination  none -> setup -> active -> completed
                 any state not final -> failed or cancelled

``StateMachine.to`` refuses a move that is not in its table with ``LocalProtocolError``,
naming the side and both states, and stays where it was (h11's rule). ``now`` is passed in.
"""

from __future__ import annotations

import enum

from shm.errors import LocalProtocolError


class SourceState(enum.StrEnum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class DestinationState(enum.StrEnum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


S, D = SourceState, DestinationState

SOURCE_TRANSITIONS: dict[SourceState, frozenset[SourceState]] = {
    S.NONE: frozenset({S.SETUP, S.FAILED, S.CANCELLED}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING}),
    S.ACTIVE: frozenset({S.DEVICE, S.FAILED, S.CANCELLING}),
    S.DEVICE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

DESTINATION_TRANSITIONS: dict[DestinationState, frozenset[DestinationState]] = {
    D.NONE: frozenset({D.SETUP, D.FAILED, D.CANCELLED}),
    D.SETUP: frozenset({D.ACTIVE, D.FAILED, D.CANCELLED}),
    D.ACTIVE: frozenset({D.COMPLETED, D.FAILED, D.CANCELLED}),
    D.COMPLETED: frozenset(),
    D.FAILED: frozenset(),
    D.CANCELLED: frozenset(),
}

FINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, D.COMPLETED, D.FAILED, D.CANCELLED})


class StateMachine:
    """The current state of one side, when each state was entered, and why it ended."""

    def __init__(self, side: str, table: dict) -> None:
        self.side = side
        self.table = table
        self.state = next(iter(table))
        self.entered: dict = {self.state: 0.0}
        self.reason = ""

    def to(self, state, now: float, reason: str = "") -> None:
        if state not in self.table[self.state]:
            raise LocalProtocolError(
                f"{self.side} migration state {self.state.value} cannot go to {state.value}")
        self.state = state
        self.entered[state] = now
        if reason:
            self.reason = reason

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def figures(self, now: float) -> dict:
        """What the statistics say of the current state: status, and how and when it ended."""
        out: dict = {"status": self.state.value}
        if self.final:
            out["end_time"] = now
        if self.reason and self.state in (S.FAILED, S.CANCELLED, D.FAILED, D.CANCELLED):
            out["error"] = self.reason
        return out
