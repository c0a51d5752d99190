"""What the integration tests share: a local migration run to its end, the checks of a
completed one, and a migration failed on purpose with the checks every failure must pass."""

from __future__ import annotations

import time

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState

MIB = 1 << 20
SLOW = MigrationConfig().with_options([], ["max-bandwidth=16M"])   # ~2 s for 32 MiB


def migrate(ram=32 * MIB, config=None, state=None, **kw):
    """One migration to its end: (the source's summary, whether the source guest still runs)."""
    with LocalRun(ram, config or MigrationConfig(), state=state or GuestState(), **kw) as lr:
        lr.start()
        summary = lr.finish()
        running = lr.guest_running()
    return summary, running


def assert_completed(summary):
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["verified"] is True
    assert summary["destination"]["status"] == "completed"
    assert summary["ram"]["remaining"] == 0
    assert summary["downtime"] > 0


def run_until(action, *, config=SLOW, ram=32 * MIB, when=lambda st: st["status"] == "active",
              status=("failed", "cancelled"), **kw):
    """Start a migration, call ``action(lr)`` once ``when(stats)`` holds, and check that it
    ended ``status`` (one or a tuple) with a one-line reason, the source guest still running
    and the destination never resumed; the summary."""
    with LocalRun(ram, config, state=GuestState(dirty_rate=4 * MIB), **kw) as lr:
        mig = lr.start()
        deadline = time.monotonic() + 30
        acted = False
        while not mig.done and time.monotonic() < deadline:
            if not acted and when(mig.stats()):
                action(lr)
                acted = True
            mig.finished(0.02)
        if not mig.done:            # stuck: fail the test rather than wait for ever
            mig.cancel()
            assert mig.finished(30), "the migration did not end within 30 s of its cancel"
        summary = lr.finish()
        running = lr.guest_running()
        dest_states = [s for s, _ in lr.dest_states]
    assert "completed" not in dest_states, "the destination resumed"
    assert summary["status"] in ((status,) if isinstance(status, str) else status)
    assert summary.get("error-desc") and "\n" not in summary["error-desc"]
    assert running, "the source guest stopped dirtying memory"
    return summary
