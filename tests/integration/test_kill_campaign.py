"""The kill campaign (issue 13): each process of a local rdma: migration killed at each step of
the dialogue, with SIGKILL and with SIGTERM. Whatever dies, the guest never runs on both hosts;
it runs on exactly one unless the process killed was the guest that was to run (a VM killed
with its QEMU); and the summary's ``guest-runs-on`` says which.

Steps are reached by watching the source's figures: setup, round 1, a later round, the
switchover before the stream's end, and the wait for the destination's confirmation (widened to
a second by a destination that takes that long to confirm). A step already gone when the test
looks is killed at the next one: the step actually hit is part of each failure's message. The
coordinator itself is the test process here; its SIGKILL is `test_signals`' case.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from faulty_destination import FAULTY
from migration_helpers import MIB
from proc_tree import children

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState

pytestmark = pytest.mark.slow

CONFIG = MigrationConfig().with_options([], ["max-bandwidth=16M"])
STEPS = {
    "setup": lambda st, src: st["status"] == "setup",
    "round 1": lambda st, src: st["status"] == "active" and st["round"] <= 1,
    "round 2+": lambda st, src: st["status"] == "active" and st["round"] >= 2,
    "switchover": lambda st, src: st["status"] == "device" and not src.confirming,
    "confirming": lambda st, src: src.confirming,
}
ORDER = list(STEPS)
KINDS = ["scanner", "registrar", "poster", "guest", "destination", "dst-guest"]


def victim(lr: LocalRun, kind: str) -> int | None:
    if kind in ("scanner", "registrar", "poster"):
        stage = getattr(lr.migration.source.pipeline, kind, None)
        return None if stage is None else stage.pid
    if kind == "guest":
        return lr.guest.pid
    if kind == "destination":
        return lr.dest.pid
    kids = children(lr.dest.pid)
    return kids[0] if kids else None


def step_now(lr: LocalRun) -> str | None:
    """The latest step the migration is in (None once it ended)."""
    mig = lr.migration
    if mig.done:
        return None
    st = mig.stats()
    source = mig.source
    for name in reversed(ORDER):
        if source is not None and STEPS[name](st, source):
            return name
    return "setup"


def kill_at(kind: str, step: str, sig: signal.Signals) -> tuple[dict, bool, str]:
    with LocalRun(16 * MIB, CONFIG, state=GuestState(dirty_rate=4 * MIB), dest_entry=FAULTY,
                  dest_options={"slow_confirm": 1.0}) as lr:
        mig = lr.start()
        hit = None
        deadline = time.monotonic() + 30
        while hit is None and time.monotonic() < deadline:
            now = step_now(lr)
            if now is None:
                break
            pid = victim(lr, kind)
            if pid is not None and ORDER.index(now) >= ORDER.index(step):
                os.kill(pid, sig)
                hit = now
                break
            mig.finished(0.005)
        assert hit is not None, f"the migration ended before {kind} could be killed at {step}"
        summary = lr.finish()
        source_runs = lr.guest_running()
    return summary, source_runs, hit


# SIGKILL at every step; SIGTERM (a stage unwinds the same way at every step) at one step
# before the commit point and at it.
CASES = ([(signal.SIGKILL, kind, step) for kind in KINDS for step in ORDER]
         + [(signal.SIGTERM, kind, step) for kind in KINDS for step in ("round 1", "confirming")])


@pytest.mark.parametrize(("sig", "kind", "step"), CASES,
                         ids=[f"{sig.name}-{kind}-{step}" for sig, kind, step in CASES])
def test_a_kill_at_any_step_never_leaves_two_guests(sig, kind, step):
    summary, source_runs, hit = kill_at(kind, step, sig)
    dest_runs = summary["destination"]["status"] == "completed"
    where = (kind, hit, summary["status"], summary.get("error-desc"), summary.get("warning"))
    assert not (source_runs and dest_runs), where                     # never two guests
    if dest_runs:
        assert summary["status"] == "completed", where
        assert summary["guest-runs-on"] == "destination", where
    else:
        assert summary["status"] in ("failed", "cancelled"), where
        assert summary["guest-runs-on"] == "source", where
        # the source guest runs on, unless it was the process killed
        assert source_runs == (kind != "guest"), where
    if hit == "confirming" and kind in ("scanner", "registrar", "poster", "guest"):
        assert dest_runs, where          # everything was out: a source process dying is moot
