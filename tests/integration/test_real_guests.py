"""Live migrations of real guests on the soft provider: a running KVM guest (KVM's dirty log or
uffd), and the synthetic guest tracked by the kernel (uffd) instead of its own dirty log."""

import time

import pytest
from faulty_destination import FAULTY

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.guest.factory import GuestSpec
from pipeline.guest.kvm import kvm_unavailable_reason
from pipeline.guest.synthetic import GuestState
from shm.uffd import uffd_unavailable_reason

pytestmark = pytest.mark.slow
MIB = 1 << 20
KVM = kvm_unavailable_reason()
UFFD = uffd_unavailable_reason()
needs_kvm = pytest.mark.skipif(KVM is not None, reason=f"KVM guest: {KVM}")
needs_uffd = pytest.mark.skipif(UFFD is not None, reason=f"uffd tracking: {UFFD}")


def kvm_guest(tracking="kvm", rate=8 * MIB):
    return GuestSpec("kvm", tracking, GuestState(dirty_rate=rate))


def where(p) -> dict:
    return {"passes": p.passes, "pages_written": p.pages_written}


@needs_kvm
@pytest.mark.parametrize("tracking", ["kvm", pytest.param("uffd", marks=needs_uffd)])
def test_running_kvm_guest_migrates_and_continues_on_the_destination(tracking):
    with LocalRun(16 * MIB, MigrationConfig(), state=GuestState(), guest=kvm_guest(tracking),
                  guest_watch=0.3) as lr:
        lr.start()
        summary = lr.finish()
        paused = lr.guest.paused_state
        after = lr.guest.query()          # paused: exact, and the invariant is checked again
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["verified"] is True and summary["ram"]["remaining"] == 0
    assert (summary["guest"], summary["dirty-tracking"]) == ("kvm", tracking)
    # The source stopped at an invariant-checked point and stayed there until completion.
    assert paused is not None and paused.passes >= 1
    assert not after.running and where(after) == where(paused)
    # The destination restored the vCPU at that very point (invariant checked after the
    # restore) and its counters went on from there (checked again when it was stopped).
    report = summary["destination"]["guest"]
    resumed, stopped = report["resumed"], report["stopped"]
    assert resumed["kind"] == "kvm"
    assert (resumed["passes"], resumed["page"], resumed["pages_written"]) == \
        (paused.passes, paused.page, paused.pages_written)
    assert stopped["pages_written"] > resumed["pages_written"]


def _paused(lr) -> bool:
    src = getattr(lr.migration, "source", None)
    return src is not None and src.paused


@needs_kvm
@pytest.mark.parametrize("how", ["destination killed", "verification refused"])
def test_failed_kvm_migration_resumes_the_source_guest(how):
    # A slow link and a generous downtime limit: the final round, with the guest paused,
    # lasts about a second, long enough to kill the destination in it.
    cfg = MigrationConfig().with_options([], ["max-bandwidth=16M", "downtime-limit=3000"])
    faults = {"dest_entry": FAULTY, "dest_options": {"corrupt": (0, 5)}} \
        if how == "verification refused" else {}
    with LocalRun(24 * MIB, cfg, state=GuestState(), guest=kvm_guest(rate=8 * MIB),
                  **faults) as lr:
        mig = lr.start()
        deadline = time.monotonic() + 30
        if how == "destination killed":
            while not mig.done and not _paused(lr) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert _paused(lr), "the source never paused its guest"
            lr.dest.kill()
        summary = lr.finish()
        paused = lr.guest.paused_state
        assert summary["status"] == "failed"
        assert summary.get("error-desc") and "\n" not in summary["error-desc"]
        assert paused is not None, "the failure came before the switchover"
        assert lr.guest_running(), "the source guest did not resume"
        again = lr.guest.pause()          # invariant checked in the VMM; GuestError if broken
    assert again.pages_written > paused.pages_written


@needs_uffd
def test_synthetic_guest_tracked_by_uffd_migrates_and_verifies():
    spec = GuestSpec("synthetic", "uffd", GuestState(dirty_rate=20 * MIB, seed=3))
    with LocalRun(32 * MIB, MigrationConfig(), state=spec.state, guest=spec) as lr:
        lr.start()
        assert lr.guest.log is None       # the guest keeps no dirty log: the kernel tracks it
        summary = lr.finish()
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["verified"] is True
    assert summary["dirty-tracking"] == "uffd"
    pages = summary["ram"]["total"] // 4096
    # Round 1 scans every page; whatever is scanned beyond that, PAGEMAP_SCAN reported.
    assert summary["stages"]["scanner"]["pages-scanned"] > pages
