"""Raw memory for the soft provider: views over integer addresses, pinning, shared backings.

Registration pins with mlock(2), so it meets RLIMIT_MEMLOCK exactly as ibv_reg_mr does.
mlock does not count: unlocking a range unlocks it for every region that overlaps it. The
process-wide ``PINS`` therefore keeps a multiset of pinned page ranges and, on deregistration,
unlocks only the pages no other registration still covers.

An MR is shared between processes through the file that backs its memory (POSIX shm): the
exporter finds that file and offset in /proc/self/maps, the importer maps the same pages.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import threading

from pipeline.errors import TransportError

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mlock2 = getattr(_libc, "mlock2", None)
if _mlock2 is not None:
    _mlock2.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
MLOCK_ONFAULT = 1
MADV_POPULATE_WRITE = 23
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
        self._ranges: list[tuple[int, int]] = []  # (first page address, end address)

    @staticmethod
    def _pages(address: int, length: int) -> tuple[int, int]:
        start = address - address % PAGE
        end = -(-(address + length) // PAGE) * PAGE
        return start, end

    def pin(self, address: int, length: int, *, on_demand: bool = False) -> None:
        """mlock the pages of ``[address, address+length)``; TransportError over the limit.

        ``on_demand`` (an ODP registration) locks the pages present now and every other page
        when it is first touched (mlock2 MLOCK_ONFAULT), without faulting the range in: memory
        never written costs nothing. RLIMIT_MEMLOCK counts the whole range either way."""
        start, end = self._pages(address, length)
        with self._lock:
            if on_demand and _mlock2 is not None:
                failed = _mlock2(start, end - start, MLOCK_ONFAULT) != 0
            else:
                failed = _libc.mlock(start, end - start) != 0
            if failed:
                raise pin_error(end - start, ctypes.get_errno())
            self._ranges.append((start, end))

    def unpin(self, address: int, length: int) -> None:
        """Undo one ``pin``; pages another registration still covers stay locked."""
        start, end = self._pages(address, length)
        with self._lock:
            self._ranges.remove((start, end))
            pieces = [(start, end)]
            for o_start, o_end in self._ranges:
                if o_end <= start or o_start >= end:
                    continue
                cut = []
                for p_start, p_end in pieces:
                    if o_start > p_start:
                        cut.append((p_start, min(p_end, o_start)))
                    if o_end < p_end:
                        cut.append((max(p_start, o_end), p_end))
                pieces = [(s, e) for s, e in cut if s < e]
            for p_start, p_end in pieces:
                _libc.munlock(p_start, p_end - p_start)

    def covered(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._ranges)


PINS = PinSet()


def populate(address: int, length: int) -> None:
    """Fault ``[address, address+length)`` in for writing, in one call (best effort): what an
    ODP device's page-fault handler does for the range a write targets. In bulk this costs a
    quarter of what faulting page by page inside a socket receive does."""
    start = address - address % PAGE
    _libc.madvise(start, address + length - start, MADV_POPULATE_WRITE)


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
        aligned = offset - offset % PAGE
        self._size = length + (offset - aligned)
        fd = os.open(path, os.O_RDWR)
        try:
            base = _libc.mmap(None, self._size, mmap.PROT_READ | mmap.PROT_WRITE,
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
            _libc.munmap(self._base, self._size)
            self._base = None
