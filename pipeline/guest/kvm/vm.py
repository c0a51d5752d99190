"""A minimal KVM VMM: the /dev/kvm handle, a VM with dirty-logged memslots, and a vCPU whose
run loop lives in a thread.

Pausing a running vCPU: set ``kvm_run.immediate_exit`` and signal the vCPU thread. A vCPU inside
KVM_RUN returns EINTR on the signal; one about to enter returns EINTR at once because of
immediate_exit; the loop checks the pause request between runs. Python installs handlers
without SA_RESTART and ``fcntl.ioctl`` does not retry, so EINTR reaches us as InterruptedError.
Each resume starts a fresh thread: a paused vCPU has no thread at all.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import signal
import threading
from dataclasses import dataclass

from pipeline.guest.kvm import ioctls as k
from shm.errors import GuestError
from shm.memory import PAGE_SIZE

KVM_PATH = "/dev/kvm"
PAUSE_SIGNAL = signal.SIGUSR1


def kvm_unavailable_reason() -> str | None:
    """None when /dev/kvm can run our guest here, else one line saying why not."""
    if not os.path.exists(KVM_PATH):
        return f"{KVM_PATH} does not exist (no KVM on this machine)"
    try:
        fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {KVM_PATH}: {e.strerror}"
    try:
        version = k.ioctl(fd, k.KVM_GET_API_VERSION)
        if version != k.KVM_API_VERSION:
            return f"KVM API version {version}, expected {k.KVM_API_VERSION}"
        if not k.ioctl(fd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_IMMEDIATE_EXIT):
            return "KVM lacks KVM_CAP_IMMEDIATE_EXIT (needed to pause the vCPU)"
    except GuestError as e:
        return str(e)
    finally:
        os.close(fd)
    return None


class Kvm:
    """The /dev/kvm system handle: capabilities, supported CPUID, MSR list, VM creation."""

    def __init__(self) -> None:
        reason = kvm_unavailable_reason()
        if reason:
            raise GuestError(reason, hint="the KVM guest needs a usable /dev/kvm")
        self.fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
        self.vcpu_mmap_size = k.ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> bytes:
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 buffer (header + entries), as bytes."""
        n = 64
        while True:
            buf = k.variable_buffer(8, k.CpuidEntry2, n)
            try:
                fcntl.ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == k.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise GuestError(f"KVM_GET_SUPPORTED_CPUID failed: {e.strerror}") from e
            nent = ctypes.c_uint32.from_buffer(buf).value
            return bytes(buf)[: 8 + nent * ctypes.sizeof(k.CpuidEntry2)]

    def msr_indices(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        n = 256
        while True:
            buf = (ctypes.c_uint32 * (1 + n))(n)
            try:
                fcntl.ioctl(self.fd, k.KVM_GET_MSR_INDEX_LIST, buf)
            except OSError as e:
                if e.errno == k.E2BIG and n < 65536:
                    n = max(n * 2, buf[0])
                    continue
                raise GuestError(f"KVM_GET_MSR_INDEX_LIST failed: {e.strerror}") from e
            return list(buf[1:1 + buf[0]])

    def create_vm(self) -> Vm:
        return Vm(self)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Memslot:
    """One KVM memslot: guest-physical [gpa, gpa+size) backed by host VA ``address``."""

    slot: int
    gpa: int
    size: int
    address: int
    log_dirty: bool

    @property
    def nb_pages(self) -> int:
        return self.size // PAGE_SIZE


class Vm:
    """A KVM VM: memslots (with dirty logging, manual-protect mode when offered) and vCPUs."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = k.ioctl(kvm.fd, k.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        self.memslots: list[Memslot] = []
        self.vcpus: list[Vcpu] = []
        self.manual_protect = False

    def enable_manual_dirty_log(self) -> bool:
        """Enable MANUAL_DIRTY_LOG_PROTECT2 (before any memslot); False if KVM lacks it."""
        if self.memslots:
            raise ValueError("enable manual dirty-log protection before adding memslots")
        caps = self.kvm.check_extension(k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        if not caps & k.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            return False
        cap = k.EnableCap(cap=k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        cap.args[0] = k.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        k.ioctl(self.fd, k.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)")
        self.manual_protect = True
        return True

    def add_memslot(self, gpa: int, size: int, address: int, *, log_dirty: bool = True) -> Memslot:
        """Map host memory at ``address`` into the guest at ``gpa``."""
        if gpa % PAGE_SIZE or size % PAGE_SIZE or address % PAGE_SIZE:
            raise ValueError("memslot gpa, size and address must be page-aligned")
        slot = Memslot(len(self.memslots), gpa, size, address, log_dirty)
        self._set_region(slot, k.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        self.memslots.append(slot)
        return slot

    def set_dirty_logging(self, slot: Memslot, on: bool) -> Memslot:
        """Turn dirty logging of a memslot on or off (KVM_SET_USER_MEMORY_REGION flags)."""
        new = Memslot(slot.slot, slot.gpa, slot.size, slot.address, on)
        self._set_region(new, k.KVM_MEM_LOG_DIRTY_PAGES if on else 0)
        self.memslots[slot.slot] = new
        return new

    def _set_region(self, slot: Memslot, flags: int) -> None:
        region = k.UserspaceMemoryRegion(slot=slot.slot, flags=flags, guest_phys_addr=slot.gpa,
                                         memory_size=slot.size, userspace_addr=slot.address)
        k.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def create_vcpu(self) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close vCPUs (pausing them first), then the VM. Idempotent."""
        for vcpu in self.vcpus:
            vcpu.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ensure_pause_signal() -> None:
    """Make PAUSE_SIGNAL interrupt syscalls (a handler, not SIG_DFL/SIG_IGN)."""
    current = signal.getsignal(PAUSE_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise GuestError(f"create the first KVM vCPU in the main thread (it installs a "
                         f"{PAUSE_SIGNAL.name} handler used to pause vCPUs)")
    signal.signal(PAUSE_SIGNAL, lambda signum, frame: None)


class Vcpu:
    """A vCPU: its fd, the mmap'd kvm_run page, and a run loop in a thread."""

    def __init__(self, vm: Vm, index: int) -> None:
        _ensure_pause_signal()
        self.vm = vm
        self.index = index
        self.fd = k.ioctl(vm.fd, k.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        self._map = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size)
        self._run: k.RunHeader | None = k.RunHeader.from_buffer(self._map)
        self._thread: threading.Thread | None = None
        self._pause = threading.Event()
        self._lock = threading.Lock()
        self.error: GuestError | None = None
        self.exits = 0  # KVM_RUN returns that were not pauses

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the vCPU in a new thread until pause() or a fatal exit."""
        with self._lock:
            if self.fd < 0:
                raise GuestError("vCPU is closed")
            if self.error:
                raise self.error
            if self.running:
                return
            self._pause.clear()
            self._run.immediate_exit = 0
            self._thread = threading.Thread(target=self._loop, name=f"kvm-vcpu{self.index}",
                                            daemon=True)
            self._thread.start()

    def pause(self, timeout: float = 5.0) -> None:
        """Stop the vCPU at an instruction boundary and wait for its thread to end."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._pause.set()
            self._run.immediate_exit = 1
            for _ in range(max(1, int(timeout / 0.1))):
                if not thread.is_alive():
                    break
                try:
                    signal.pthread_kill(thread.ident, PAUSE_SIGNAL)
                except ProcessLookupError:
                    break
                thread.join(0.1)  # re-signal if the first one landed outside KVM_RUN
            thread.join(0)
            if thread.is_alive():
                raise GuestError(f"vCPU {self.index} did not pause within {timeout} s")
            self._thread = None
        if self.error:
            raise self.error

    def _loop(self) -> None:
        while not self._pause.is_set():
            try:
                fcntl.ioctl(self.fd, k.KVM_RUN, 0)
            except InterruptedError:
                continue
            except OSError as e:
                self.error = GuestError(f"KVM_RUN failed: {os.strerror(e.errno)}")
                return
            reason = self._run.exit_reason
            if reason == k.KVM_EXIT_INTR:
                continue
            self.exits += 1
            self.error = GuestError(f"vCPU {self.index} stopped: {self._describe_exit(reason)}")
            return

    def _describe_exit(self, reason: int) -> str:
        name = k.EXIT_NAMES.get(reason, str(reason))
        if reason == k.KVM_EXIT_MMIO:
            mmio = k.MmioExit.from_buffer(self._map, 32)
            what = f"write to unbacked GPA {mmio.phys_addr:#x}" if mmio.is_write else \
                f"read of unbacked GPA {mmio.phys_addr:#x}"
            del mmio
            return f"exit {name} ({what})"
        if reason == 17:
            err = k.InternalErrorExit.from_buffer(self._map, 32)
            text = f"exit {name} (suberror {err.suberror})"
            del err
            return text
        return f"exit {name}; a CPL3 guest has no handler, so any exception ends the run"

    def close(self) -> None:
        """Pause if running, then release kvm_run and the fd. Idempotent."""
        if self.fd < 0:
            return
        try:
            self.pause()
        except GuestError:
            pass  # a failed vCPU still gets closed
        self._run = None
        self._map.close()
        os.close(self.fd)
        self.fd = -1
