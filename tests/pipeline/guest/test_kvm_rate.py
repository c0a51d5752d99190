"""The KVM guest at a given dirty rate: progress read while it runs, and the VMM's own writes
to guest RAM (the rate knob) reach the dirty log like the vCPU's, so no byte is lost."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.guest.kvm import kvm_unavailable_reason, program
from pipeline.guest.kvm.guest import KvmGuest
from pipeline.guest.kvm.process import RateController, pages_written_now
from shm.dirtylog import DirtyLog
from shm.memory import PAGE_SIZE
from shm.naming import new_run_id
from shm.region import RamBlockSpec, RamRegion
from stages.harness import StageProcess

REASON = kvm_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"KVM guest: {REASON}")
MiB = 1 << 20


def test_progress_read_while_running_agrees_with_the_invariant_when_paused():
    with RamRegion.create(new_run_id(), [RamBlockSpec("pc.ram", 4 * MiB)]) as region, \
            KvmGuest.boot(region.blocks, delay=200) as guest:
        layout = program.read_layout(guest.mem)
        seen = []
        for _ in range(6):
            guest.start()
            time.sleep(0.01)
            seen.append(pages_written_now(guest.mem, layout))   # vCPU running
            guest.pause()
            assert pages_written_now(guest.mem, layout) == guest.check().pages_written
        assert seen == sorted(seen) and seen[-1] > 0


def test_the_controller_writes_the_knob_and_marks_its_page():
    with RamRegion.create(new_run_id(), [RamBlockSpec("pc.ram", 4 * MiB)]) as region, \
            KvmGuest.boot(region.blocks) as guest:
        guest.fetch_dirty()
        rate = RateController(guest, 1000.0)
        ctrl = program.CTRL_GPA // PAGE_SIZE
        assert int(guest.mem.u64s(program.CTRL_GPA, 8)[program.CTRL_DELAY]) == rate.delay > 0
        bits = np.unpackbits(guest.fetch_dirty()[0], bitorder="little")
        assert np.flatnonzero(bits).tolist() == [ctrl]       # the VMM's write, and only it
        assert not np.unpackbits(guest.fetch_dirty()[0]).any()   # taken once
        assert RateController(guest, 0).delay > rate.delay   # 0 = idle: longest delay


def _copy_dirty(shadow, region, bitmaps) -> None:
    for blk, bm in zip(region.blocks, bitmaps, strict=True):
        pages = np.flatnonzero(np.unpackbits(bm, bitorder="little")[:blk.nb_pages])
        shadow[blk.index][pages] = blk.view.reshape(-1, 4096)[pages]


def test_copying_what_the_log_reports_reproduces_ram_with_the_rate_knob_moving():
    """What a migration does: copy all, then only the pages each fetch reports; after the
    pause and a last fetch the copy must equal RAM byte for byte, the control page included
    (the controller rewrites the delay in it several times a second, from the VMM)."""
    run = new_run_id()
    specs = [RamBlockSpec("pc.ram", 8 * MiB), RamBlockSpec("vga.vram", 256 * 1024)]
    with RamRegion.create(run, specs) as region, DirtyLog.create(run, region) as log:
        guest = StageProcess("guest", "pipeline.guest.kvm.process:kvm_guest_main", {
            "region": region.name, "dirtylog": log.name, "dirty_rate": 16 * MiB}).start()
        try:
            guest.wait_ready(30)
            shadow = [blk.view.reshape(-1, 4096).copy() for blk in region.blocks]
            for _ in range(8):
                time.sleep(0.06)   # the controller adjusts every 0.1 s
                _copy_dirty(shadow, region, log.fetch(timeout=5))
            guest.send("pause")
            assert guest.recv(10)[0] == "paused"
            _copy_dirty(shadow, region, log.fetch(timeout=5))
            for blk in region.blocks:
                differ = np.flatnonzero((shadow[blk.index] != blk.view.reshape(-1, 4096))
                                        .any(axis=1))
                assert not len(differ), f"{blk.idstr} pages {differ[:8]} changed unreported"
            guest.send("stop")
            assert guest.recv(10)[0] == "stopped"
            assert guest.stop(5) == 0
        finally:
            guest.close()


def test_the_resume_point_check_agrees_with_the_full_check_and_catches_a_break():
    from pipeline.guest.kvm import state
    from shm.errors import GuestError

    with RamRegion.create(new_run_id(), [RamBlockSpec("pc.ram", 4 * MiB)]) as region, \
            KvmGuest.boot(region.blocks, delay=100) as guest:
        assert guest.check(full=False) == guest.check()          # pass 0, fresh boot
        for _ in range(12):
            guest.start()
            time.sleep(0.003)
            guest.pause()
            assert guest.check(full=False) == guest.check()
        at = guest.check()
        gpas = program.read_layout(guest.mem).page_gpas()
        if at.page < len(gpas):
            word = guest.mem.u64s(int(gpas[at.page]), 1)
            word[0] += 1                                         # the next page is ahead
            with pytest.raises(GuestError, match="invariant"):
                guest.check(full=False)
            word[0] -= 1
        regs = state.get_regs(guest.vcpu)
        regs.r12 += 1
        state.set_regs(guest.vcpu, regs)
        with pytest.raises(GuestError, match="registers"):
            guest.check(full=False)
