"""Raw memory for the soft provider: views over integer addresses, pinning, shared backings.

A registration without ON_DEMAND pins with mlock(2), so it meets RLIMIT_MEMLOCK exactly as
ibv_reg_mr does; an ON_DEMAND one (ODP) pins nothing and is not charged to the limit, as on a
NIC with on-demand paging (its pages are faulted in as writes reach them). mlock does not
count: unlocking a range unlocks it for every region that overlaps it. The
process-wide ``PINS`` therefore keeps a multiset of pinned page ranges and, on deregistration,
unlocks only the pages no other registration still covers.

An MR is shared between processes through the file that backs its memory (POSIX shm): the
exporter finds that file and offset in /proc/self/maps, the importer maps the same pages.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import itertools
import mmap
import os
import resource
import threading

from shm.errors import TransportError
from shm.memory import PAGE_SIZE, Madv, libc, madvise

_MAP_FAILED = ctypes.c_void_p(-1).value


def view(address: int, length: int) -> memoryview:
    """A writable byte view of ``length`` bytes at ``address`` (memory the caller keeps mapped)."""
    if length == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * length).from_address(address)).cast("B")


def human(n: int) -> str:
    """Bytes for people: 64.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def _locked_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pin_error(length: int, err: int) -> TransportError:
    """The error for a failed pin of ``length`` bytes, naming RLIMIT_MEMLOCK when it is why."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    locked = _locked_bytes()
    if err in (errno.ENOMEM, errno.EPERM) and soft != resource.RLIM_INFINITY \
            and locked + length > soft:
        limit = human(soft)
        return TransportError(
            f"cannot pin {human(length)} for a memory registration: RLIMIT_MEMLOCK allows "
            f"{limit} per process and {human(locked)} is already pinned",
            errno=err,
            hint="raise the limit with `ulimit -l unlimited`, LimitMEMLOCK=infinity in the "
                 "systemd unit, or grant CAP_IPC_LOCK",
        )
    if err == errno.ENOMEM:
        return TransportError(f"cannot pin {human(length)}: the range is not mapped", errno=err)
    return TransportError(f"cannot pin {human(length)}: {os.strerror(err)}", errno=err)


class PinSet:
    """Page ranges pinned by registrations in this process, counted per registration."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (first page address, end address), sorted, one entry per registration; _longest
        # bounds how far before a range another one that overlaps it can start
        self._ranges: list[tuple[int, int]] = []
        self._longest = 0

    @staticmethod
    def _pages(address: int, length: int) -> tuple[int, int]:
        start = address - address % PAGE_SIZE
        end = -(-(address + length) // PAGE_SIZE) * PAGE_SIZE
        return start, end

    @staticmethod
    def _lock_range(start: int, end: int) -> int:
        """mlock one page range; 0 or the errno."""
        failed = libc.mlock(start, end - start) != 0
        return ctypes.get_errno() if failed else 0

    def pin(self, address: int, length: int) -> None:
        """mlock the pages of ``[address, address+length)``; TransportError over the limit."""
        start, end = self._pages(address, length)
        with self._lock:
            err = self._lock_range(start, end)
            if err:
                raise pin_error(end - start, err)
            bisect.insort(self._ranges, (start, end))
            self._longest = max(self._longest, end - start)

    def pin_many(self, ranges: list[tuple[int, int]]) -> None:
        """``pin`` each ``(address, length)`` of ``ranges``, all or none: each stretch of
        adjacent or overlapping ranges is locked with one call (mlock costs per page, plus a
        VMA split and merge per call), and each range is still counted on its own, so each
        is unpinned on its own."""
        pages = [self._pages(a, n) for a, n in ranges]
        with self._lock:
            done: list[tuple[int, int]] = []
            for start, end in _stretches(pages):
                err = self._lock_range(start, end)
                if err:
                    for d_start, d_end in done:      # undo, sparing pages others pinned
                        self._unlock_uncovered(d_start, d_end)
                    raise pin_error(sum(e - s for s, e in _stretches(pages)), err)
                done.append((start, end))
            self._ranges.extend(pages)
            self._ranges.sort()            # timsort: a sorted list plus a sorted run is cheap
            self._longest = max([self._longest] + [e - s for s, e in pages])

    def unpin(self, address: int, length: int) -> None:
        """Undo one ``pin``; pages another registration still covers stay locked."""
        start, end = self._pages(address, length)
        with self._lock:
            i = bisect.bisect_left(self._ranges, (start, end))
            if i == len(self._ranges) or self._ranges[i] != (start, end):
                raise ValueError(f"{start:#x}-{end:#x} is not pinned")
            del self._ranges[i]
            self._unlock_uncovered(start, end)

    def _unlock_uncovered(self, start: int, end: int) -> None:
        """munlock the pages of ``[start, end)`` that no range in ``_ranges`` covers."""
        pieces = [(start, end)]
        ranges = self._ranges
        first = bisect.bisect_left(ranges, (start - self._longest, 0))
        for o_start, o_end in itertools.islice(ranges, first, None):
            if o_start >= end:
                break
            if o_end <= start:
                continue
            cut = []
            for p_start, p_end in pieces:
                if o_start > p_start:
                    cut.append((p_start, min(p_end, o_start)))
                if o_end < p_end:
                    cut.append((max(p_start, o_end), p_end))
            pieces = [(s, e) for s, e in cut if s < e]
            if not pieces:
                return
        for p_start, p_end in pieces:
            libc.munlock(p_start, p_end - p_start)

    def covered(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._ranges)


def _stretches(pages: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of page ranges as maximal stretches, in address order."""
    out: list[list[int]] = []
    for start, end in sorted(pages):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


PINS = PinSet()


def populate(address: int, length: int) -> None:
    """Fault ``[address, address+length)`` in for writing, in one call (best effort): what an
    ODP device's page-fault handler does for the range a write targets. In bulk this costs a
    quarter of what faulting page by page inside a socket receive does."""
    start = address - address % PAGE_SIZE
    madvise(start, address + length - start, Madv.POPULATE_WRITE)


class BackingCache:
    """Shared file mappings already found in /proc/self/maps, each kept while an exported MR
    lies in it. Memory stays mapped while it is registered (the registration contract), so a
    mapping that holds a live exported MR cannot have been replaced: a hit needs no re-read,
    and exporting n MRs costs one read of the maps instead of n (each read grows with the
    mappings mlock splits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[list] = []   # [lo, hi, path, file offset at lo, live MRs]

    def find(self, address: int, length: int) -> tuple[str, int]:
        """``find_backing``, from a cached mapping when one holds the range; holds it."""
        with self._lock:
            for span in self._spans:
                if span[0] <= address and address + length <= span[1]:
                    span[4] += 1
                    return span[2], span[3] + (address - span[0])
        path, offset = find_backing(address, length)
        lo, hi, base = _extent(address, length, path, offset)
        with self._lock:
            self._spans.append([lo, hi, path, base, 1])
        return path, offset

    def release(self, address: int, length: int) -> None:
        """An MR exported through ``find`` was deregistered."""
        with self._lock:
            for i, span in enumerate(self._spans):
                if span[0] <= address and address + length <= span[1]:
                    span[4] -= 1
                    if span[4] <= 0:
                        del self._spans[i]
                    return


def _extent(address: int, length: int, path: str, offset: int) -> tuple[int, int, int]:
    """The range, around ``[address, address+length)``, that the segment file ``path`` maps
    contiguously here, and the file offset at its start: the whole file's size from where the
    range's offset says the mapping starts, clamped to the range itself when in doubt."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return address, address + length, offset
    lo = address - offset             # where offset 0 of the file would be
    # Only the range itself is certain to be mapped; the rest of the file is trusted only
    # when /proc/self/maps shows it mapped contiguously.
    found = _backing(_read_maps(), lo, size) if lo > 0 else None
    if found == (path, 0):
        return lo, lo + size, 0
    return address, address + length, offset


BACKINGS = BackingCache()


def _read_maps() -> str:
    """/proc/self/maps in as few reads as possible (one, normally)."""
    fd = os.open("/proc/self/maps", os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 22):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="surrogateescape")
    finally:
        os.close(fd)


def _backing(maps: str, address: int, length: int) -> tuple[str, int] | None:
    end = address + length
    path, offset, cursor = "", 0, address
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if hi <= cursor or lo > cursor:
            continue
        name = fields[5].strip() if len(fields) > 5 else ""
        file_off = int(fields[2], 16) + (cursor - lo)
        if fields[1][3] != "s" or not name.startswith("/") or name.endswith("(deleted)"):
            return None
        if cursor == address:
            path, offset = name, file_off
        elif name != path or file_off != offset + (cursor - address):
            return None  # a neighbouring mapping, but not the continuation of the same file
        cursor = hi
        if cursor >= end:
            return path, offset
    return None


def find_backing(address: int, length: int) -> tuple[str, int]:
    """The file and file offset that back ``[address, address+length)`` in a shared mapping.

    TransportError when the range is anonymous, private or spans unrelated mappings: such memory
    cannot be mapped by another process. /proc/self/maps is not a snapshot: while another thread
    maps or unmaps memory, a read can miss a line, so a miss is read again a few times.
    """
    for _ in range(8):
        found = _backing(_read_maps(), address, length)
        if found is not None:
            return found
    raise TransportError(
        f"cannot export the memory at {address:#x}+{length}: it is not a shared file mapping",
        errno=errno.EINVAL,
        hint="register memory from POSIX shared memory (/dev/shm) to share it with other "
             "processes",
    )


class FileMapping:
    """A shared mapping of ``length`` bytes of ``path`` from ``offset``; ``address`` is local."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        aligned = offset - offset % PAGE_SIZE
        self._size = length + (offset - aligned)
        fd = os.open(path, os.O_RDWR)
        try:
            base = libc.mmap(None, self._size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_SHARED, fd, aligned)
            if base in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                raise TransportError(f"cannot map {path}: {os.strerror(err)}", errno=err)
        finally:
            os.close(fd)
        self._base = base
        self.address = base + (offset - aligned)

    def close(self) -> None:
        if self._base is not None:
            libc.munmap(self._base, self._size)
            self._base = None
