"""A KVM guest over RAM blocks: boot it, run, pause, save its device state, restore it elsewhere.

``KvmGuest`` is the in-process VMM object with the surface the migration needs from any guest:
start/resume, pause, close, ``device_state()`` (bytes) and ``fetch_dirty()`` (packed bitmaps,
one per RAM block). Its RAM is any list of blocks with ``offset`` (ram_addr_t, used as the
guest-physical address), ``length``, ``address`` (VA in this process) and ``view`` (uint8): the
``shm.region.RamBlock`` objects of the region the pipeline reads, so the pipeline reads guest RAM
where the guest writes it, with no copy.

Two ways in: ``KvmGuest.boot`` installs the program in RAM and starts it from its first
instruction (the source); ``KvmGuest.incoming`` takes RAM that already holds a running program
(migrated) plus the device state, and continues it (the destination).
"""

from __future__ import annotations

import struct
import threading

import numpy as np

from pipeline.guest.kvm import ioctls as k
from pipeline.guest.kvm import program, state
from pipeline.guest.kvm.dirty import KvmDirtySource
from pipeline.guest.kvm.vm import Kvm
from shm.errors import GuestError
from shm.memory import PAGE_SIZE

DEVICE_MAGIC = b"RDPKVMG\x01"


class KvmGuest:
    """One VM, one memslot per RAM block (dirty-logged), one vCPU running the guest program."""

    def __init__(self, blocks, *, log_dirty: bool = True) -> None:
        self.blocks = list(blocks)
        self.mem = program.GuestMemory(self.blocks)
        self.kvm = Kvm()
        try:
            self.vm = self.kvm.create_vm()
            # Manual protect must be on before the first memslot exists.
            self.vm.enable_manual_dirty_log()
            for b in self.blocks:
                self.vm.add_memslot(b.offset, b.length, b.address, log_dirty=log_dirty)
            self.vcpu = self.vm.create_vcpu()
            self.dirty = KvmDirtySource(self.vm)
            self._msr_indices = self.kvm.msr_indices()
        except BaseException:
            self.close()
            raise
        self.refused_msrs: list[int] = []
        self._host_lock = threading.Lock()
        self._host_dirty: set[int] = set()

    # -- the two ways in -----------------------------------------------------------------

    @classmethod
    def boot(cls, blocks, *, n_pages: int | None = None, stride: int = 1, delay: int = 0,
             log_dirty: bool = True) -> KvmGuest:
        """Install the program in ``blocks`` (n_pages data pages; default all that fit) and set
        the vCPU at its first instruction. The guest is paused: call ``start()``."""
        blocks = list(blocks)
        total = max(b.offset + b.length for b in blocks)
        if n_pages is None:
            n_pages = program.max_data_pages(total, stride)
        layout = program.Layout(n_pages, stride)
        guest = cls(blocks, log_dirty=log_dirty)
        try:
            program.install(guest.mem, layout, delay)
            vcpu = guest.vcpu
            state.set_cpuid(vcpu, guest.kvm.supported_cpuid())
            sregs = state.get_sregs(vcpu)
            program.configure_sregs(sregs)
            state.set_sregs(vcpu, sregs)
            state.set_msrs(vcpu, struct.pack("<IIQ", program.MSR_STAR, 0, program.STAR_VALUE))
            regs = k.Regs(**program.initial_regs(layout))
            state.set_regs(vcpu, regs)
        except BaseException:
            guest.close()
            raise
        return guest

    @classmethod
    def incoming(cls, blocks, device_state: bytes, *, log_dirty: bool = True) -> KvmGuest:
        """A guest on RAM that holds a migrated program, its vCPU restored from
        ``device_state``. Paused: call ``start()`` to resume it."""
        blocks = list(blocks)
        lengths, vcpu_state = parse_device_state(device_state)
        if lengths != [b.length for b in blocks]:
            raise GuestError(f"destination RAM blocks {[b.length for b in blocks]} do not match "
                             f"the source's {lengths}")
        guest = cls(blocks, log_dirty=log_dirty)
        try:
            program.read_layout(guest.mem)  # refuse RAM that holds no program
            guest.refused_msrs = state.restore(guest.vcpu, vcpu_state)
        except BaseException:
            guest.close()
            raise
        return guest

    # -- running -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.vcpu.running

    def start(self) -> None:
        """Run (or resume) the vCPU in its thread."""
        self.vcpu.start()

    resume = start

    def pause(self) -> None:
        """Stop the vCPU at an instruction boundary; GuestError if the guest had failed."""
        self.vcpu.pause()

    def set_delay(self, loops: int) -> None:
        """The dirty-rate knob: delay-loop iterations between page writes (0 = flat out)."""
        program.set_delay(self.mem, loops)
        self._host_wrote(program.CTRL_GPA)

    def _host_wrote(self, gpa: int) -> None:
        """Remember a page the VMM (not the vCPU) wrote: KVM logs only the vCPU's writes, so
        ``fetch_dirty`` adds these, as QEMU marks its own writes to guest RAM."""
        with self._host_lock:
            self._host_dirty.add(gpa // PAGE_SIZE)

    def passes(self) -> int:
        """The pass counter in guest memory (readable while running)."""
        return int(self.mem.u64s(program.CTRL_GPA, 1)[0])

    def check(self, *, full: bool = True) -> program.Progress:
        """Check the invariant (memory vs itself vs registers) on a paused guest; with
        ``full=False`` only at the vCPU's position (``program.check_resume_point``: O(1), for a
        just restored guest, whose RAM was verified)."""
        if self.running:
            raise GuestError("pause the guest before checking its invariant")
        regs = state.get_regs(self.vcpu)
        if not full:
            return program.check_resume_point(self.mem, regs)
        return program.check_invariant(self.mem, regs)

    # -- migration surface ---------------------------------------------------------------

    def device_state(self) -> bytes:
        """The guest's device-state section: RAM geometry and the vCPU state (paused only)."""
        vcpu_state = state.save(self.vcpu, self._msr_indices)
        head = DEVICE_MAGIC + struct.pack(f"<I{len(self.blocks)}Q", len(self.blocks),
                                          *(b.length for b in self.blocks))
        return head + vcpu_state.to_bytes()

    def fetch_dirty(self) -> list[np.ndarray]:
        """Pages written since the last fetch (by the vCPU, as KVM logged them, or by the VMM
        itself), one packed bitmap per RAM block. Safe from another thread than the vCPU's."""
        with self._host_lock:
            host, self._host_dirty = self._host_dirty, set()
        bitmaps = self.dirty.fetch()
        for page in host:  # a handful at most: the control page
            gpa = page * PAGE_SIZE
            for b, blk in enumerate(self.blocks):
                if blk.offset <= gpa < blk.offset + blk.length:
                    i = (gpa - blk.offset) // PAGE_SIZE
                    bitmaps[b][i >> 3] |= 1 << (i & 7)
        return bitmaps

    def set_dirty_logging(self, on: bool) -> None:
        """Arm or disarm KVM dirty logging on every memslot."""
        for slot in list(self.vm.memslots):
            self.vm.set_dirty_logging(slot, on)

    def close(self) -> None:
        """Pause, close the vCPU, the VM and /dev/kvm. RAM belongs to the caller. Idempotent."""
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        self.kvm.close()

    stop = close

    def __enter__(self) -> KvmGuest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_device_state(data: bytes) -> tuple[list[int], state.VcpuState]:
    """(block lengths, vCPU state) from ``KvmGuest.device_state()`` bytes."""
    if data[:len(DEVICE_MAGIC)] != DEVICE_MAGIC:
        raise GuestError("not a KVM guest device state (magic/version mismatch)")
    try:
        (n,) = struct.unpack_from("<I", data, len(DEVICE_MAGIC))
        pos = len(DEVICE_MAGIC) + 4
        lengths = list(struct.unpack_from(f"<{n}Q", data, pos))
    except struct.error as e:
        raise GuestError("KVM guest device state is truncated") from e
    return lengths, state.VcpuState.from_bytes(data[pos + 8 * n:])
