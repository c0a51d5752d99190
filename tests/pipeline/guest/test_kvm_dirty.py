"""KVM's dirty log as a source: every written page reported, no bit lost, empty when idle."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.guest.kvm import kvm_unavailable_reason, program
from pipeline.guest.kvm.guest import KvmGuest
from shm.memory import PAGE_SIZE
from shm.naming import new_run_id
from shm.region import RamBlockSpec, RamRegion

REASON = kvm_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"KVM guest: {REASON}")

MiB = 1 << 20


@pytest.fixture
def region():
    specs = [RamBlockSpec("pc.ram", 4 * MiB), RamBlockSpec("extra", 2 * MiB)]
    with RamRegion.create(new_run_id(), specs) as r:
        yield r


def unpack(region: RamRegion, bitmaps: list[np.ndarray]) -> np.ndarray:
    """Per-block packed bitmaps -> one bool per page of the whole region (GPA order)."""
    assert len(bitmaps) == len(region.blocks)
    parts = []
    for block, bm in zip(region.blocks, bitmaps, strict=True):
        assert bm.dtype == np.uint8 and len(bm) == -(-block.nb_pages // 8)
        parts.append(np.unpackbits(bm, bitorder="little")[:block.nb_pages].astype(bool))
    return np.concatenate(parts)


def data_pages(guest: KvmGuest) -> np.ndarray:
    """Region page numbers of the program's data pages."""
    return (program.read_layout(guest.mem).page_gpas() // PAGE_SIZE).astype(np.int64)


def counters(guest: KvmGuest) -> np.ndarray:
    return guest.mem.gather_u64(program.read_layout(guest.mem).page_gpas())


def run_passes(guest: KvmGuest, n: int, timeout: float = 10.0) -> None:
    """Run until ``n`` more passes are done (however loaded the machine), then pause."""
    target = guest.passes() + n
    guest.start()
    deadline = time.monotonic() + timeout
    while guest.passes() < target and time.monotonic() < deadline:
        time.sleep(0.005)
    guest.pause()
    assert guest.passes() >= target, "guest made no progress"


def test_every_written_page_is_reported(region):
    # Stride 2: half of the data range is never written, so over-reporting would show.
    with KvmGuest.boot(region.blocks, stride=2) as guest:
        guest.fetch_dirty()
        run_passes(guest, 2)
        dirty = unpack(region, guest.fetch_dirty())
        written = data_pages(guest)
        assert dirty[written].all()
        skipped = written[:-1] + 1
        assert not dirty[skipped].any(), "pages the guest never wrote were reported"
        # Beyond the data pages only the system area (page tables, control page) may show.
        others = np.flatnonzero(dirty)
        others = others[~np.isin(others, written)]
        assert (others < program.SYSTEM_BYTES // PAGE_SIZE).all()
        assert dirty[program.CTRL_GPA // PAGE_SIZE]


def test_fetch_right_after_fetch_is_empty(region):
    with KvmGuest.boot(region.blocks) as guest:
        run_passes(guest, 1)
        assert unpack(region, guest.fetch_dirty()).any()
        assert not unpack(region, guest.fetch_dirty()).any()
        assert not unpack(region, guest.fetch_dirty()).any()


def test_no_bit_lost_between_fetches(region):
    """Across many short runs, every page whose counter changed is in that interval's fetch."""
    rng = np.random.default_rng(7)
    with KvmGuest.boot(region.blocks) as guest:
        pages = data_pages(guest)
        guest.set_delay(5000)  # a pass takes ~2 ms, so many intervals end mid-pass
        guest.fetch_dirty()
        before = counters(guest)
        partial = 0
        for _ in range(30):
            guest.start()
            time.sleep(float(rng.uniform(0, 0.003)))
            guest.pause()
            after = counters(guest)
            dirty = unpack(region, guest.fetch_dirty())
            changed = pages[after != before]
            assert dirty[changed].all(), "a page written in this interval was not reported"
            partial += 0 < len(changed) < len(pages)
            before = after
            guest.check()
        assert partial > 0, "no interval ended mid-pass; the test proved nothing"


def test_classic_mode_reports_the_same(region, monkeypatch):
    """Without manual protect (GET_DIRTY_LOG clears by itself) the source behaves the same."""
    from pipeline.guest.kvm import vm as vm_module
    monkeypatch.setattr(vm_module.Vm, "enable_manual_dirty_log", lambda self: False)
    with KvmGuest.boot(region.blocks, stride=2) as guest:
        assert not guest.vm.manual_protect
        guest.fetch_dirty()
        run_passes(guest, 2)
        dirty = unpack(region, guest.fetch_dirty())
        assert dirty[data_pages(guest)].all()
        assert not unpack(region, guest.fetch_dirty()).any()


def test_disarmed_logging_reports_nothing(region):
    with KvmGuest.boot(region.blocks, log_dirty=False) as guest:
        run_passes(guest, 1)
        guest.check()
        guest.set_dirty_logging(True)
        assert not unpack(region, guest.fetch_dirty()).any()
        run_passes(guest, 1)
        assert unpack(region, guest.fetch_dirty())[data_pages(guest)].any()


def test_uffd_on_the_vmm_mapping_catches_guest_writes_across_harvests(region):
    """KVM logging off; userfaultfd WP on the VMM's mapping sees the guest's writes, and after
    each get-and-reprotect it sees the next ones (KVM drops its writable mappings)."""
    import os

    from shm.uffd import PagemapHarvester, arm, uffd_unavailable_reason
    if uffd_unavailable_reason():
        pytest.skip(uffd_unavailable_reason())
    first, last = region.blocks[0], region.blocks[-1]
    with KvmGuest.boot(region.blocks, log_dirty=False) as guest, \
            arm(first.address, last.address + last.length - first.address), \
            PagemapHarvester(os.getpid(), [(b.address, b.length) for b in region.blocks]) as h:
        pages = data_pages(guest)
        guest.set_delay(5000)
        before = counters(guest)
        for i in range(10):
            guest.start()
            time.sleep(0.002 * (i % 3))
            guest.pause()
            after = counters(guest)
            dirty = unpack(region, h.harvest())
            assert dirty[pages[after != before]].all(), "a guest write escaped uffd"
            before = after
        guest.check()
