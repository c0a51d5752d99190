"""The source's migration state machine and convergence rule, with no I/O and no clock.

States and their QEMU names: ``setup`` -> ``active`` -> ``device`` -> ``completed``, and from
any non-final state ``failed`` or ``cancelled``. ``MigrationStateMachine.to(state)`` refuses
transitions not in ``TRANSITIONS`` with ``LocalProtocolError`` and stays put.

Convergence follows QEMU: after each round, the bytes still dirty (measured by a dirty-log
sync) divided by the bandwidth measured over that round is the expected downtime; when it fits
in ``downtime-limit`` the source switches over. A guest that dirties faster than we send never
gets there: after ``max_rounds`` rounds the decision is ``GIVE_UP`` unless ``keep_going``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shm.errors import LocalProtocolError


class State(enum.StrEnum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.NONE: frozenset({State.SETUP, State.FAILED, State.CANCELLED}),
    State.SETUP: frozenset({State.ACTIVE, State.FAILED, State.CANCELLED}),
    State.ACTIVE: frozenset({State.DEVICE, State.FAILED, State.CANCELLED}),
    State.DEVICE: frozenset({State.COMPLETED, State.FAILED, State.CANCELLED}),
    State.COMPLETED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}


class MigrationStateMachine:
    """Current state plus the time of each transition (``now`` is passed in, in seconds)."""

    def __init__(self) -> None:
        self.state = State.NONE
        self.entered: dict[State, float] = {}
        self.reason: str = ""

    def to(self, state: State, now: float, reason: str = "") -> None:
        if state not in TRANSITIONS[self.state]:
            raise LocalProtocolError(
                f"migration state {self.state.value} cannot go to {state.value}")
        self.state = state
        self.entered[state] = now
        if reason:
            self.reason = reason

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class Decision(enum.Enum):
    ITERATE = "iterate"
    SWITCHOVER = "switchover"
    GIVE_UP = "give-up"


@dataclass
class RoundResult:
    """What one finished round measured."""

    round: int
    bytes_sent: int          # RDMA-written plus control bytes of the round
    seconds: float           # from the round's HOOK to its REGISTER FINISHED
    dirty_bytes_now: int     # dirty after the round (a sync), still to send


class Convergence:
    """QEMU's rule: switch over once dirty bytes / last round's bandwidth <= downtime-limit."""

    def __init__(self, downtime_limit_ms: int, max_rounds: int, keep_going: bool = False):
        self.limit_s = downtime_limit_ms / 1000.0
        self.max_rounds = max_rounds
        self.keep_going = keep_going
        self.bandwidth = 0.0          # bytes/s measured over the last round with data
        self.expected_downtime_s = 0.0
        self.rounds = 0

    def after_round(self, result: RoundResult) -> Decision:
        self.rounds += 1
        if result.bytes_sent > 0 and result.seconds > 0:
            self.bandwidth = result.bytes_sent / result.seconds
        if result.dirty_bytes_now == 0:
            self.expected_downtime_s = 0.0
            return Decision.SWITCHOVER
        if self.bandwidth <= 0:
            # Nothing measured yet: no evidence either way, send another round.
            self.expected_downtime_s = float("inf")
        else:
            self.expected_downtime_s = result.dirty_bytes_now / self.bandwidth
        if self.expected_downtime_s <= self.limit_s:
            return Decision.SWITCHOVER
        if self.rounds >= self.max_rounds and not self.keep_going:
            return Decision.GIVE_UP
        return Decision.ITERATE

    def explain(self, dirty_rate: float) -> str:
        """One line for a migration that gave up."""
        return (f"did not converge after {self.rounds} rounds: expected downtime "
                f"{self.expected_downtime_s * 1000:.0f} ms > downtime-limit "
                f"{self.limit_s * 1000:.0f} ms (sending {self.bandwidth / 1e6:.0f} MB/s, "
                f"guest dirtying {dirty_rate / 1e6:.0f} MB/s); raise downtime-limit or "
                "max-bandwidth, or set x-keep-going=on")
