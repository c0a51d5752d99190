"""The source's convergence rule, with no I/O and no clock.

Convergence follows QEMU: after each round, the bytes still dirty (measured by a dirty-log
sync) divided by the bandwidth measured over that round is the expected downtime; when it fits
in ``downtime-limit`` the source switches over. A guest that dirties faster than we send never
gets there: after ``max_rounds`` rounds the decision is ``GIVE_UP`` unless ``keep_going``.
``AutoConverge`` is QEMU's auto-converge: it throttles such a guest until it does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


class AutoConverge:
    """QEMU's auto-converge (migration_trigger_throttle, mig_throttle_guest_down): after
    each round, when the bytes the guest dirtied exceed ``threshold`` % of the bytes sent,
    for the second time since the throttle last changed, the guest is throttled: to
    ``initial`` % the first time, then ``increment`` % more each time (with ``tailslow``, only
    as much more as should bring the dirtied bytes down to the threshold), at most
    ``maximum`` %. ``percentage`` is the throttle now (0: none)."""

    def __init__(self, initial: int = 20, increment: int = 10, maximum: int = 99,
                 threshold: int = 50, tailslow: bool = False) -> None:
        self.initial = initial
        self.increment = increment
        self.maximum = maximum
        self.threshold = threshold
        self.tailslow = tailslow
        self.percentage = 0
        self._high = 0                # rounds over the threshold since the last change

    def after_round(self, dirtied: int, sent: int) -> int | None:
        """The new throttle percentage after a round that dirtied ``dirtied`` bytes while it
        sent ``sent``, or None when it stays as it is."""
        limit = sent * self.threshold // 100
        if dirtied <= limit:
            return None
        self._high += 1
        if self._high < 2:
            return None
        self._high = 0
        if not self.percentage:
            new = min(self.initial, self.maximum)
        else:
            step = self.increment
            if self.tailslow:
                now = 100 - self.percentage          # the share the guest runs now
                ideal = now * limit / dirtied
                step = min(int(now - ideal), self.increment)
            new = min(self.percentage + step, self.maximum)
        if new == self.percentage:
            return None
        self.percentage = new
        return new
