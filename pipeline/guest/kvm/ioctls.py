"""KVM ioctl numbers, capability numbers and the ctypes layouts of the structures we pass.

x86_64 only. Numbers and sizes are those of <linux/kvm.h>, checked on this machine (see
../shared/kvm-notes.md). For variable-length structures (kvm_msrs, kvm_cpuid2, kvm_msr_list)
the size encoded in the ioctl number is the header's only; the caller allocates the tail.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from shm.errors import GuestError

KVM_API_VERSION = 12

# System ioctls (on the /dev/kvm fd).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_MSR_INDEX_LIST = 0xC004AE02
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05

# VM ioctls.
KVM_CREATE_VCPU = 0xAE41
KVM_GET_DIRTY_LOG = 0x4010AE42
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_ENABLE_CAP = 0x4068AEA3
KVM_CLEAR_DIRTY_LOG = 0xC018AEC0

# vCPU ioctls.
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_GET_MSRS = 0xC008AE88
KVM_SET_MSRS = 0x4008AE89
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_CPUID2 = 0xC008AE91
KVM_GET_VCPU_EVENTS = 0x8040AE9F
KVM_SET_VCPU_EVENTS = 0x4040AEA0
KVM_GET_XSAVE = 0x9000AEA4
KVM_SET_XSAVE = 0x5000AEA5
KVM_GET_XCRS = 0x8188AEA6
KVM_SET_XCRS = 0x4188AEA7

# Capabilities.
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

# Exit reasons (kvm_run.exit_reason).
EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
}
KVM_EXIT_MMIO = 6
KVM_EXIT_INTR = 10

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding", u32), ("bitmap", u64)]


class ClearDirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("bitmap", u64)]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class Regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = ([(name, Segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", DTable), ("idt", DTable)]
                + [(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                            "apic_base")]
                + [("interrupt_bitmap", u64 * 4)])


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class RunHeader(ctypes.Structure):
    """The fixed head of the mmap'd kvm_run page; the exit union starts at offset 32."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64)]


class MmioExit(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class InternalErrorExit(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


SIZES = {Regs: 144, Segment: 24, Sregs: 312, UserspaceMemoryRegion: 32, DirtyLog: 16,
         ClearDirtyLog: 24, EnableCap: 104, MsrEntry: 16, CpuidEntry2: 40, RunHeader: 32}
for _struct, _size in SIZES.items():
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct))

XSAVE_SIZE = 4096
XCRS_SIZE = 392
VCPU_EVENTS_SIZE = 64


def ioctl(fd: int, request: int, arg=0, what: str = "") -> int:
    """fcntl.ioctl that turns OSError into GuestError naming the call (EINTR passes through)."""
    try:
        return fcntl.ioctl(fd, request, arg)
    except InterruptedError:
        raise
    except OSError as e:
        name = what or hex(request)
        raise GuestError(f"KVM ioctl {name} failed: {os.strerror(e.errno)}") from e


def variable_buffer(header: int, entry, n: int) -> ctypes.Array:
    """A zeroed buffer for a {u32 n; u32 pad; entry[n]} structure, with n filled in."""
    buf = (ctypes.c_char * (header + ctypes.sizeof(entry) * n))()
    ctypes.c_uint32.from_buffer(buf).value = n
    return buf


def entries(buf: ctypes.Array, header: int, entry, n: int) -> ctypes.Array:
    """The n entries that follow a header in a variable-length buffer (a view, not a copy)."""
    return (entry * n).from_buffer(buf, header)


E2BIG = errno.E2BIG
