"""vCPU state as bytes: save from a paused vCPU, restore into a fresh one.

The state is the set QEMU migrates for an x86 vCPU without an in-kernel irqchip: CPUID, sregs,
MSRs, XCRs, XSAVE, regs and vCPU events. ``VcpuState.to_bytes`` is a versioned tag-length-value
record (the device-state section of the migration stream); unknown tags are refused.
Restore order matters (kvm-notes): CPUID before sregs (EFER bits need CPUID), sregs before MSRs,
XCRs before XSAVE, regs, then events last.
"""

from __future__ import annotations

import ctypes
import fcntl
import struct
from dataclasses import dataclass

from pipeline.guest.kvm import ioctls as k
from shm.errors import GuestError

MAGIC = b"KVMVCPU\x01"
SECTIONS = ("cpuid", "sregs", "msrs", "xcrs", "xsave", "regs", "events")  # restore order
_TLV = struct.Struct("<4sI")
_MSR_SIZE = ctypes.sizeof(k.MsrEntry)


def get_regs(vcpu) -> k.Regs:
    regs = k.Regs()
    k.ioctl(vcpu.fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
    return regs


def set_regs(vcpu, regs: k.Regs) -> None:
    k.ioctl(vcpu.fd, k.KVM_SET_REGS, regs, "KVM_SET_REGS")


def get_sregs(vcpu) -> k.Sregs:
    sregs = k.Sregs()
    k.ioctl(vcpu.fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
    return sregs


def set_sregs(vcpu, sregs: k.Sregs) -> None:
    k.ioctl(vcpu.fd, k.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")


def set_cpuid(vcpu, cpuid: bytes) -> None:
    """KVM_SET_CPUID2 with a kvm_cpuid2 buffer (header + entries)."""
    buf = ctypes.create_string_buffer(cpuid, len(cpuid))
    k.ioctl(vcpu.fd, k.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")


def get_cpuid(vcpu) -> bytes:
    n = 64
    while True:
        buf = k.variable_buffer(8, k.CpuidEntry2, n)
        try:
            fcntl.ioctl(vcpu.fd, k.KVM_GET_CPUID2, buf)
        except OSError as e:
            if e.errno == k.E2BIG and n < 4096:
                n *= 2
                continue
            raise GuestError(f"KVM_GET_CPUID2 failed: {e.strerror}") from e
        nent = ctypes.c_uint32.from_buffer(buf).value
        return bytes(buf)[: 8 + nent * ctypes.sizeof(k.CpuidEntry2)]


def _msr_call(vcpu, request: int, entries: bytes) -> tuple[bytes, int]:
    """One KVM_GET_MSRS / KVM_SET_MSRS; returns (entries after the call, count processed)."""
    n = len(entries) // _MSR_SIZE
    buf = ctypes.create_string_buffer(struct.pack("<II", n, 0) + entries)
    done = k.ioctl(vcpu.fd, request, buf, "KVM_GET_MSRS" if request == k.KVM_GET_MSRS
                   else "KVM_SET_MSRS")
    return buf.raw[8:8 + len(entries)], done


def get_msrs(vcpu, indices: list[int]) -> bytes:
    """kvm_msr_entry records of every readable MSR in ``indices`` (unreadable ones skipped)."""
    out = []
    pending = b"".join(struct.pack("<IIQ", i, 0, 0) for i in indices)
    while pending:
        got, done = _msr_call(vcpu, k.KVM_GET_MSRS, pending)
        out.append(got[: done * _MSR_SIZE])
        # KVM stops at the first MSR it cannot read: skip that one and go on.
        pending = pending[(done + 1) * _MSR_SIZE:]
    return b"".join(out)


def set_msrs(vcpu, entries: bytes) -> list[int]:
    """Set kvm_msr_entry records; returns the indices KVM refused (they are skipped)."""
    refused = []
    while entries:
        _, done = _msr_call(vcpu, k.KVM_SET_MSRS, entries)
        rest = entries[done * _MSR_SIZE:]
        if rest:
            refused.append(struct.unpack_from("<I", rest)[0])
        entries = rest[_MSR_SIZE:]
    return refused


def _get_blob(vcpu, request: int, size: int, what: str) -> bytes:
    buf = ctypes.create_string_buffer(size)
    k.ioctl(vcpu.fd, request, buf, what)
    return buf.raw


def _set_blob(vcpu, request: int, data: bytes, what: str) -> None:
    k.ioctl(vcpu.fd, request, ctypes.create_string_buffer(data, len(data)), what)


@dataclass(frozen=True, slots=True)
class VcpuState:
    """One vCPU's architectural state, each part in KVM's own binary layout."""

    cpuid: bytes
    sregs: bytes
    msrs: bytes
    xcrs: bytes
    xsave: bytes
    regs: bytes
    events: bytes

    def to_bytes(self) -> bytes:
        parts = [MAGIC, struct.pack("<I", len(SECTIONS))]
        for name in SECTIONS:
            data = getattr(self, name)
            parts += [_TLV.pack(name[:4].encode(), len(data)), data]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> VcpuState:
        if data[:len(MAGIC)] != MAGIC:
            raise GuestError("vCPU state does not start with the expected magic/version")
        try:
            (count,), pos = struct.unpack_from("<I", data, len(MAGIC)), len(MAGIC) + 4
            fields = {}
            for _ in range(count):
                tag, length = _TLV.unpack_from(data, pos)
                pos += _TLV.size
                name = next((s for s in SECTIONS if s[:4].encode() == tag), None)
                if name is None or pos + length > len(data):
                    raise GuestError(f"vCPU state has a bad section {tag!r}")
                fields[name] = data[pos:pos + length]
                pos += length
        except struct.error as e:
            raise GuestError("vCPU state is truncated") from e
        if pos != len(data) or set(fields) != set(SECTIONS):
            raise GuestError("vCPU state is truncated, has junk after it, or misses sections")
        return cls(**fields)

    @property
    def regs_struct(self) -> k.Regs:
        return k.Regs.from_buffer_copy(self.regs)


def save(vcpu, msr_indices: list[int]) -> VcpuState:
    """Read the whole state of a paused vCPU."""
    if vcpu.running:
        raise GuestError("pause the vCPU before saving its state")
    return VcpuState(
        cpuid=get_cpuid(vcpu),
        sregs=bytes(get_sregs(vcpu)),
        msrs=get_msrs(vcpu, msr_indices),
        xcrs=_get_blob(vcpu, k.KVM_GET_XCRS, k.XCRS_SIZE, "KVM_GET_XCRS"),
        xsave=_get_blob(vcpu, k.KVM_GET_XSAVE, k.XSAVE_SIZE, "KVM_GET_XSAVE"),
        regs=bytes(get_regs(vcpu)),
        events=_get_blob(vcpu, k.KVM_GET_VCPU_EVENTS, k.VCPU_EVENTS_SIZE,
                         "KVM_GET_VCPU_EVENTS"),
    )


def restore(vcpu, state: VcpuState) -> list[int]:
    """Load ``state`` into a vCPU that has not run; returns MSR indices KVM refused."""
    set_cpuid(vcpu, state.cpuid)
    set_sregs(vcpu, k.Sregs.from_buffer_copy(state.sregs))
    refused = set_msrs(vcpu, state.msrs)
    _set_blob(vcpu, k.KVM_SET_XCRS, state.xcrs, "KVM_SET_XCRS")
    _set_blob(vcpu, k.KVM_SET_XSAVE, state.xsave, "KVM_SET_XSAVE")
    set_regs(vcpu, k.Regs.from_buffer_copy(state.regs))
    _set_blob(vcpu, k.KVM_SET_VCPU_EVENTS, state.events, "KVM_SET_VCPU_EVENTS")
    return refused
