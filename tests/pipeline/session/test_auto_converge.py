"""Auto-converge in the sans-IO source session: a guest dirtying at 90 % of the link, on a
simulated clock (no process, no time measured)."""

import pytest
from source_world import SourceWorld

from pipeline.config import MigrationConfig
from pipeline.session import actions as act
from pipeline.session import events as ev
from stages.records import DRAINED_REQUEST

LINK = 1_000_000            # bytes/s the simulated link sends
GUEST = 900_000             # bytes/s the simulated guest dirties, unthrottled
PAGE = 4096


class BusyWorld(SourceWorld):
    """Each round takes its pages' bytes / LINK on the world's clock; each sync finds what
    the guest dirtied meanwhile at its throttled rate (at most all of RAM)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.total_pages = sum(n for _, n in self.blocks) // PAGE
        self.pending = self.total_pages
        self.throttle = 0
        self.throttles: list[int] = []
        self.round_t0 = 0.0

    def requests(self, r: int):
        out = super().requests(r)
        drained = out[-1:].view(DRAINED_REQUEST)
        drained["bytes_written"] = self.pending * PAGE
        drained["dirty_pages"] = self.pending
        self.round_t0 = self.now
        self.now += self.pending * PAGE / LINK          # the round's time on the link
        return out

    def carry_out(self, action):
        if isinstance(action, act.ThrottleGuest):
            self.throttle = action.percentage
            self.throttles.append(action.percentage)
            return None
        if isinstance(action, act.SyncDirtyLog):
            rate = GUEST * (100 - self.throttle) / 100
            self.pending = min(self.total_pages, int(rate * (self.now - self.round_t0) / PAGE))
            return ev.Synced(self.pending)
        return super().carry_out(action)


def busy(auto_converge: bool) -> BusyWorld:
    cfg = MigrationConfig(max_rounds=15).with_options(
        [f"auto-converge={'on' if auto_converge else 'off'}"], [])
    w = BusyWorld(config=cfg, rounds=[[(0, c) for c in range(8)]] + [[(0, 0)]] * 40,
                  zero_chunks=frozenset())
    w.run()
    return w


def test_a_guest_dirtying_at_90_percent_of_the_link_converges_only_with_auto_converge():
    w = busy(auto_converge=False)
    assert w.states()[-1] == "failed" and not w.throttles
    assert "did not converge after 15 rounds" in w.session.stats.error
    assert "cpu-throttle-percentage" not in w.session.stats.snapshot(w.now)

    w = busy(auto_converge=True)
    assert w.states()[-1] == "completed"
    assert w.throttles == [20, 30, 40, 50]           # every second round over 50 %
    assert w.session.stats.snapshot(w.now)["cpu-throttle-percentage"] == 50
    assert len(w.of(act.CommandScanner)) < 15


def test_a_throttled_guest_that_fails_to_migrate_runs_on_unthrottled():
    cfg = MigrationConfig(max_rounds=6).with_options(["auto-converge=on"], [])
    w = BusyWorld(config=cfg, rounds=[[(0, c) for c in range(8)]] + [[(0, 0)]] * 40,
                  zero_chunks=frozenset())
    w.run()
    assert w.states()[-1] == "failed"
    assert w.throttles == [20, 30, 0]                # given up: the throttle is lifted
    assert w.guest_running


def test_auto_converge_parameters_read_as_qemu_spells_them():
    cfg = MigrationConfig().with_options(["auto-converge=on"], [
        "cpu-throttle-initial=30", "cpu-throttle-increment=5", "max-cpu-throttle=60",
        "throttle-trigger-threshold=80", "cpu-throttle-tailslow=on"])
    assert (cfg.auto_converge, cfg.throttle_initial, cfg.throttle_increment, cfg.throttle_max,
            cfg.throttle_threshold, cfg.throttle_tailslow) == (True, 30, 5, 60, 80, True)
    with pytest.raises(ValueError, match="max-cpu-throttle must be between 1 and 99"):
        MigrationConfig().with_options([], ["max-cpu-throttle=100"])
