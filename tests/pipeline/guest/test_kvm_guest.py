"""The KVM guest: boot, invariant at every pause, vCPU state round trip, restore on a second VM."""

from __future__ import annotations

import time

import pytest

from pipeline.guest.kvm import kvm_unavailable_reason, program, state
from pipeline.guest.kvm.guest import KvmGuest, parse_device_state
from shm.errors import GuestError
from shm.naming import new_run_id
from shm.region import RamBlockSpec, RamRegion

REASON = kvm_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"KVM guest: {REASON}")

MiB = 1 << 20


@pytest.fixture
def regions():
    """A source and a destination region: two blocks, so the data pages span two memslots."""
    run = new_run_id()
    specs = [RamBlockSpec("pc.ram", 4 * MiB), RamBlockSpec("extra", 2 * MiB)]
    with RamRegion.create(run, specs) as src, RamRegion.create(run, specs, kind="dst") as dst:
        yield src, dst


def run_until(guest: KvmGuest, passes: int, timeout: float = 10.0) -> None:
    """Run the guest until its pass counter reaches ``passes``, then pause it."""
    guest.start()
    deadline = time.monotonic() + timeout
    while guest.passes() < passes and time.monotonic() < deadline:
        time.sleep(0.01)
    guest.pause()
    assert guest.passes() >= passes, "guest made no progress"


def copy_ram(src: RamRegion, dst: RamRegion) -> None:
    for a, b in zip(src.blocks, dst.blocks, strict=True):
        b.view[:] = a.view


def test_fresh_guest_is_at_pass_zero(regions):
    src, _ = regions
    with KvmGuest.boot(src.blocks) as guest:
        progress = guest.check()
    assert (progress.passes, progress.pages_written) == (0, 0)


def test_invariant_holds_at_every_pause_and_progress_grows(regions):
    src, _ = regions
    with KvmGuest.boot(src.blocks) as guest:
        seen = [guest.check()]
        for _ in range(8):
            guest.start()
            time.sleep(0.005)
            guest.pause()
            seen.append(guest.check())
        run_until(guest, seen[-1].passes + 1)
        seen.append(guest.check())
    written = [p.pages_written for p in seen]
    assert written == sorted(written) and written[-1] > written[0]


def test_check_catches_a_broken_invariant(regions):
    src, _ = regions
    with KvmGuest.boot(src.blocks) as guest:
        run_until(guest, 2)
        guest.check()
        layout = program.read_layout(guest.mem)
        first = guest.mem.u64s(int(layout.page_gpas()[-1]), 1)
        first[0] += 5  # a page claims a pass that never happened
        with pytest.raises(GuestError, match="invariant"):
            guest.check()
        first[0] -= 5
        regs = state.get_regs(guest.vcpu)
        regs.r12 += 1
        state.set_regs(guest.vcpu, regs)
        with pytest.raises(GuestError, match="registers disagree"):
            guest.check()


def test_delay_knob_is_read_by_the_guest(regions):
    src, _ = regions
    # With an endless delay the guest writes page 0 of pass 1 and then spins in the delay loop.
    with KvmGuest.boot(src.blocks, delay=1 << 62) as guest:
        run_until(guest, 1)
        progress = guest.check()
    assert (progress.passes, progress.page) == (1, 1)


def test_vcpu_state_round_trips_through_bytes(regions):
    src, _ = regions
    with KvmGuest.boot(src.blocks) as guest:
        run_until(guest, 2)
        saved = state.save(guest.vcpu, guest.kvm.msr_indices())
        blob = saved.to_bytes()
        assert state.VcpuState.from_bytes(blob) == saved
        # Clobber the registers, restore everything into the same vCPU: all but the running
        # TSC reads back the same, and the invariant holds again.
        state.set_regs(guest.vcpu, type(saved.regs_struct)())
        state.restore(guest.vcpu, saved)
        again = state.save(guest.vcpu, guest.kvm.msr_indices())
        for name in ("regs", "sregs", "xsave", "xcrs", "events", "cpuid"):
            assert getattr(again, name) == getattr(saved, name), name
        guest.check()
    for bad in (blob[:-1], blob + b"\0", b"junk" + blob[4:], blob[:20]):
        with pytest.raises(GuestError):
            state.VcpuState.from_bytes(bad)


def test_restore_on_a_second_vm_continues_the_guest(regions):
    src, dst = regions
    with KvmGuest.boot(src.blocks) as source:
        run_until(source, 3)
        at_pause = source.check()
        device = source.device_state()
        copy_ram(src, dst)  # what the migration carries
        lengths, _ = parse_device_state(device)
        assert lengths == [b.length for b in src.blocks]
        with KvmGuest.incoming(dst.blocks, device) as dest:
            assert dest.check() == at_pause  # continues exactly where the source stopped
            run_until(dest, at_pause.passes + 3)
            after = dest.check()
        assert after.pages_written > at_pause.pages_written
        assert source.check() == at_pause  # the source stayed paused and intact
        source.start()
        source.pause()
        assert source.check().pages_written >= at_pause.pages_written


def test_incoming_refuses_mismatched_ram(regions):
    src, _ = regions
    with KvmGuest.boot(src.blocks) as source:
        device = source.device_state()
    run = new_run_id()
    with RamRegion.create(run, [RamBlockSpec("pc.ram", 4 * MiB)]) as other:
        with pytest.raises(GuestError, match="do not match"):
            KvmGuest.incoming(other.blocks, device)
    with RamRegion.create(run, src.specs(), kind="empty") as empty:
        with pytest.raises(GuestError, match="no KVM guest program"):
            KvmGuest.incoming(empty.blocks, device)


def test_a_guest_fault_surfaces_as_guest_error(regions):
    src, _ = regions
    with KvmGuest.boot(src.blocks) as guest:
        regs = state.get_regs(guest.vcpu)
        total = sum(b.length for b in src.blocks)
        regs.rsi = regs.rbx = total + 4096  # mapped by the page tables, backed by no memslot
        regs.r13 = 0
        regs.rip = program.CODE_GPA + program.LABELS["page"]
        state.set_regs(guest.vcpu, regs)
        guest.start()
        deadline = time.monotonic() + 5
        while guest.running and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(GuestError, match="unbacked GPA"):
            guest.pause()
        with pytest.raises(GuestError):
            guest.start()
