"""Kernel dirty tracking for any memory: userfaultfd write-protect (async) + PAGEMAP_SCAN.

The writer's code does no dirty bookkeeping at all. Two halves, usually in two processes:

- The writer calls ``arm(address, length)`` once on its own mapping of the RAM: a userfaultfd
  in async write-protect mode (WP_ASYNC, so a write to a protected page never blocks: the kernel
  resolves the fault itself and marks the page written), registered for WP, then the range is
  write-protected. Registration is per address space, so it must happen in the writer's process;
  keep the returned ``WriteProtect`` open for as long as tracking should last.
- A harvester, in any process allowed to ptrace the writer (root here), opens
  ``/proc/<pid>/pagemap`` and calls ``PAGEMAP_SCAN`` with PM_SCAN_WP_MATCHING |
  PM_SCAN_CHECK_WPASYNC and category PAGE_IS_WRITTEN: one call returns the written regions *and*
  write-protects them again, atomically per page table, so a write that lands after a page was
  reported faults again and is reported by the next harvest. No bit is lost. When the region
  vector fills, the kernel stops at ``walk_end``; we continue from there.

Regions become packed little-endian bitmaps per block (the scanner's input, as from
``shm.dirtylog``) with numpy, or page runs; nothing loops per page in Python.
Needs Linux 6.7+ (PAGEMAP_SCAN, WP_ASYNC); ``uffd_unavailable_reason()`` says what is missing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

import numpy as np

from shm.errors import ShmError
from shm.memory import PAGE_SHIFT, PAGE_SIZE, libc
from shm.segment import PeerGone

SYS_USERFAULTFD = 323          # x86_64
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_WRITEPROTECT = 0xC018AA06
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0

PAGEMAP_SCAN = 0xC0606610
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3

VECTOR_REGIONS = 8192          # page_region slots per PAGEMAP_SCAN call (192 KiB)

_u64 = ctypes.c_uint64


class UffdApi(ctypes.Structure):
    _fields_ = [("api", _u64), ("features", _u64), ("ioctls", _u64)]


class UffdRegister(ctypes.Structure):
    _fields_ = [("start", _u64), ("len", _u64), ("mode", _u64), ("ioctls", _u64)]


class UffdWriteprotect(ctypes.Structure):
    _fields_ = [("start", _u64), ("len", _u64), ("mode", _u64)]


class PmScanArg(ctypes.Structure):
    _fields_ = [(n, _u64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


assert ctypes.sizeof(PmScanArg) == 96
REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])


def _userfaultfd() -> int:
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0 and ctypes.get_errno() == errno.EPERM:
        # vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE: user-mode faults only.
        fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if fd < 0:
        err = ctypes.get_errno()
        raise ShmError(f"userfaultfd() failed: {os.strerror(err)}",
                       hint="needs CONFIG_USERFAULTFD and root or vm.unprivileged_userfaultfd=1")
    return fd


def _ioctl(fd: int, request: int, arg, what: str) -> int:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise ShmError(f"{what} failed: {os.strerror(e.errno)}") from e


def uffd_unavailable_reason() -> str | None:
    """None when write-protect tracking works here, else one line saying what is missing."""
    try:
        fd = _userfaultfd()
    except ShmError as e:
        return str(e)
    try:
        api = UffdApi(api=UFFD_API, features=0)
        fcntl.ioctl(fd, UFFDIO_API, api)
    except OSError as e:
        return f"UFFDIO_API failed: {os.strerror(e.errno)}"
    finally:
        os.close(fd)
    missing = FEATURES & ~api.features
    if missing:
        return (f"the kernel's userfaultfd lacks features {missing:#x} (WP_ASYNC needs Linux 6.7,"
                " WP_UNPOPULATED 6.4, WP_HUGETLBFS_SHMEM 5.19)")
    probe = mmap.mmap(-1, PAGE_SIZE)
    try:
        pin = ctypes.c_char.from_buffer(probe)
        start = ctypes.addressof(pin)
        del pin
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            _scan(pagemap.fileno(), start, start + PAGE_SIZE, 0, PAGE_IS_PRESENT,
                  np.zeros(1, REGION_DTYPE))
    except ShmError as e:
        return f"PAGEMAP_SCAN is not usable (needs Linux 6.7): {e}"
    finally:
        probe.close()
    return None


class WriteProtect:
    """The writer's half: a userfaultfd write-protecting ranges of this process (async mode)."""

    def __init__(self) -> None:
        self.fd = _userfaultfd()
        try:
            api = UffdApi(api=UFFD_API, features=FEATURES)
            _ioctl(self.fd, UFFDIO_API, api, "UFFDIO_API (WP_ASYNC)")
        except BaseException:
            self.close()
            raise
        self.ranges: list[tuple[int, int]] = []

    def add(self, address: int, length: int) -> None:
        """Register [address, address+length) for WP and write-protect it (all pages clean)."""
        if address % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise ValueError("uffd ranges must be page-aligned and non-empty")
        _ioctl(self.fd, UFFDIO_REGISTER,
               UffdRegister(start=address, len=length, mode=UFFDIO_REGISTER_MODE_WP),
               "UFFDIO_REGISTER (mode WP)")
        self.ranges.append((address, length))
        self.protect(address, length)

    def protect(self, address: int, length: int) -> None:
        """Write-protect a registered range again: every page counts as not written."""
        _ioctl(self.fd, UFFDIO_WRITEPROTECT,
               UffdWriteprotect(start=address, len=length, mode=UFFDIO_WRITEPROTECT_MODE_WP),
               "UFFDIO_WRITEPROTECT")

    def close(self) -> None:
        """Close the userfaultfd; the kernel unregisters its ranges. Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> WriteProtect:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def arm(address: int, length: int) -> WriteProtect:
    """Start write tracking of [address, address+length) of this process, in one call."""
    wp = WriteProtect()
    try:
        wp.add(address, length)
    except BaseException:
        wp.close()
        raise
    return wp


def _scan(fd: int, start: int, end: int, flags: int, category: int,
          vec: np.ndarray) -> tuple[int, int]:
    """One PAGEMAP_SCAN: fills ``vec`` with regions; returns (count, walk_end)."""
    arg = PmScanArg(size=ctypes.sizeof(PmScanArg), flags=flags, start=start, end=end,
                    vec=vec.ctypes.data, vec_len=len(vec), category_mask=category,
                    return_mask=category)
    try:
        n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise PeerGone("the tracked process exited (PAGEMAP_SCAN: no such process)") from e
        hint = ("the range is not armed with userfaultfd WP_ASYNC" if e.errno == errno.EPERM
                else None)
        raise ShmError(f"PAGEMAP_SCAN failed: {os.strerror(e.errno)}", hint=hint) from e
    return n, arg.walk_end


class PagemapHarvester:
    """The scanner's half: written pages of another process's armed ranges, get-and-reprotect.

    ``blocks`` are (address, length) pairs *in the writer's address space* (a mapping has a
    different address in every process), one per RAM block.
    """

    name = "uffd"

    def __init__(self, pid: int, blocks: list[tuple[int, int]]) -> None:
        self.pid = pid
        self.blocks = [(int(a), int(n)) for a, n in blocks]
        for address, length in self.blocks:
            if address % PAGE_SIZE or length % PAGE_SIZE:
                raise ValueError("harvested blocks must be page-aligned")
        try:
            self._file = open(f"/proc/{pid}/pagemap", "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError as e:
            raise PeerGone(f"process {pid} is gone; nothing to harvest") from e
        except OSError as e:
            raise ShmError(f"cannot open /proc/{pid}/pagemap: {e.strerror}",
                           hint="the harvester needs ptrace rights over the writer (root)") from e
        self._vec = np.zeros(VECTOR_REGIONS, REGION_DTYPE)
        self.calls = 0

    def regions(self, block: int) -> np.ndarray:
        """Written regions (start, end VAs) of one block, re-protected; REGION_DTYPE array."""
        if self._file is None:
            raise ValueError("harvester is closed")
        address, length = self.blocks[block]
        start, end = address, address + length
        parts = []
        flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        while start < end:
            n, walk_end = _scan(self._file.fileno(), start, end, flags, PAGE_IS_WRITTEN,
                                self._vec)
            self.calls += 1
            parts.append(self._vec[:n].copy())
            if walk_end >= end:
                break
            start = walk_end  # the vector filled: continue where the kernel stopped
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def harvest_runs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per block, (first_page, n_pages) int64 arrays of the pages written since last time."""
        out = []
        for b, (address, _) in enumerate(self.blocks):
            r = self.regions(b)
            first = (r["start"].astype(np.int64) - address) >> PAGE_SHIFT
            out.append((first, (r["end"] - r["start"]).astype(np.int64) >> PAGE_SHIFT))
        return out

    def harvest(self) -> list[np.ndarray]:
        """Per block, a packed little-endian bitmap of the pages written since last time."""
        out = []
        for (first, n), (_, length) in zip(self.harvest_runs(), self.blocks, strict=True):
            out.append(runs_to_bitmap(first, n, length >> PAGE_SHIFT))
        return out

    fetch = harvest  # the scanner's name for it

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __enter__(self) -> PagemapHarvester:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def runs_to_bitmap(first: np.ndarray, n: np.ndarray, nb_pages: int) -> np.ndarray:
    """Disjoint page runs -> packed little-endian bitmap of ``nb_pages`` bits (vectorised)."""
    edges = np.bincount(first, minlength=nb_pages + 1)[:nb_pages + 1].astype(np.int64)
    edges -= np.bincount(first + n, minlength=nb_pages + 1)[:nb_pages + 1]
    return np.packbits(np.cumsum(edges[:nb_pages]) > 0, bitorder="little")
