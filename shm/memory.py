"""Pages of RAM and the libc calls on them: page size, residency, zero tests, bulk faulting.

``PAGE_SIZE`` is the page of guest RAM (QEMU's TARGET_PAGE_SIZE on x86) and of this host, so a
dirty bit, a mincore entry and an madvise granule all cover the same 4 KiB. numpy sees RAM as
uint64 rows of ``WORDS_PER_PAGE`` words, one row per page.

``libc`` is the process's one ctypes binding of the C library (errno kept, argument types set
here for every call made through it). A page of a shared-memory segment that is not resident
was never written (our segments are not swapped), so it reads as zero, and reading it would
allocate it: ``resident`` asks mincore which pages are in memory, and ``nonzero_pages`` and
``map_in`` leave the others alone. Big passes run on ``THREADS`` threads (numpy and madvise
release the GIL); no Python loop runs per page.

numpy and the threads load on first use: ``pipeline.config`` and so the CLI's ``--help`` import
the page size from here and stay as light as before.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

PAGE_SIZE = 4096
PAGE_SHIFT = 12
WORDS_PER_PAGE = PAGE_SIZE // 8     # uint64 words per page: a RAM view's row

libc = ctypes.CDLL(None, use_errno=True)
libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.syscall.restype = ctypes.c_long
if hasattr(libc, "mlock2"):                 # glibc 2.27+
    libc.mlock2.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)


class Madv(IntEnum):
    """madvise(2) advice, as <linux/mman.h> names it (MADV_*)."""

    POPULATE_READ = 22      # map pages already in memory into this process (Linux 5.14)
    POPULATE_WRITE = 23     # fault pages in for writing, allocating them (Linux 5.14)


def madvise(address: int, length: int, advice: Madv) -> bool:
    """Whether the kernel took ``advice`` for ``[address, address+length)`` (an older kernel
    refuses the POPULATE ones: then page faults do their work later)."""
    return libc.madvise(address, length, advice) == 0


def mincore(address: int, length: int) -> np.ndarray | None:
    """Per page of ``[address, address+length)`` (page-aligned), whether it is in memory; None
    if the kernel will not say."""
    import numpy as np

    vec = np.zeros(-(-length // PAGE_SIZE), np.uint8)
    if libc.mincore(address, length, vec.ctypes.data) != 0:
        return None
    return (vec & 1).astype(bool)


def resident(view: np.ndarray) -> np.ndarray | None:
    """Per page of ``view`` (page-aligned, one row per page), whether it is in memory
    (mincore); None if unknown."""
    return mincore(view.ctypes.data, len(view) * PAGE_SIZE)


THREADS = 2
SLICE_PAGES = 2048          # 8 MiB: the unit of the resident / non-resident split
FULL_SCAN_SHARE = 8         # zero-test the whole view when more than 1/8 of it is asked about
_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """The THREADS threads that big passes over RAM share (made on first use)."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="scan")
    return _pool


def in_halves(work: Callable[[int, int], None], n: int) -> None:
    """``work(lo, hi)`` over [0, n), split across THREADS threads when n is large."""
    if THREADS < 2 or n < 16 * SLICE_PAGES:
        work(0, n)
        return
    step = -(-n // THREADS // SLICE_PAGES) * SLICE_PAGES
    futures = [pool().submit(work, lo, min(n, lo + step)) for lo in range(0, n, step)]
    for f in futures:
        f.result()


ZERO_BLOCK = 16                    # pages tested as one flat stretch (64 KiB)


def nonzero_rows(rows: np.ndarray) -> np.ndarray:
    """Whether each row of ``rows`` (uint64, (n, WORDS_PER_PAGE)) is non-zero, reading it once:
    ZERO_BLOCK rows at a time as one flat stretch (a max over 8192 words runs at the memory's
    speed, 14 GB/s a core here; a reduce per 512-word row at 11), and row by row only inside
    the blocks that hold data, still in cache (or throughout, when most blocks do)."""
    import numpy as np

    n = len(rows) - len(rows) % ZERO_BLOCK
    nonzero = np.zeros(len(rows), bool)
    if n:
        busy = np.flatnonzero(rows[:n].reshape(-1, ZERO_BLOCK * WORDS_PER_PAGE).max(axis=1))
        if len(busy) * 4 >= n // ZERO_BLOCK:
            return np.bitwise_or.reduce(rows, axis=1) != 0      # 1.4x faster than any()
        if len(busy):
            idx = (busy[:, None] * ZERO_BLOCK + np.arange(ZERO_BLOCK)).ravel()
            nonzero[idx] = np.bitwise_or.reduce(rows[idx], axis=1) != 0
    if n < len(rows):
        nonzero[n:] = np.bitwise_or.reduce(rows[n:], axis=1) != 0
    return nonzero


def nonzero_pages(view: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """For each page number, whether the page (a row of ``view``, uint64 (pages,
    WORDS_PER_PAGE)) is non-zero. Pages not resident are zero without being read; few pages
    are read one by one (fancy indexing), many are read a slice of the view at a time."""
    import numpy as np

    res = resident(view)
    if len(pages) * FULL_SCAN_SHARE <= len(view):
        out = np.zeros(len(pages), bool)
        sel = pages if res is None else pages[res[pages]]
        if len(sel):
            hit = view[sel].any(axis=1)
            if res is None:
                return hit
            out[res[pages]] = hit
        return out
    whole = np.zeros(len(view), bool)

    def part(lo: int, hi: int) -> None:
        for p0 in range(lo, hi, SLICE_PAGES):
            p1 = min(hi, p0 + SLICE_PAGES)
            r = None if res is None else res[p0:p1]
            if r is not None and not r.any():
                continue
            if r is None or r.all():
                whole[p0:p1] = nonzero_rows(view[p0:p1])
            else:
                idx = np.flatnonzero(r) + p0
                whole[idx] = view[idx].any(axis=1)

    in_halves(part, len(view))
    return whole[pages]


def map_in(view: np.ndarray, piece: int = 1 << 14) -> None:
    """Map this process's page tables onto the pages of ``view`` already in memory
    (MADV_POPULATE_READ, in bulk): a first pass over RAM another process wrote would otherwise
    take a page fault per 64 KiB, 0.1 s per GiB here. Pages not in memory are left alone:
    mapping them would allocate them. ``piece`` pages at a time, each asked about residency
    on its own: mincore over pages not mapped yet looks each one up (0.1 s for 8 GiB here),
    so THREADS threads share that work as well as the mapping."""
    import numpy as np

    base = view.ctypes.data
    refused = False

    def part(lo: int, hi: int) -> None:
        nonlocal refused
        for p0 in range(lo, hi, piece):
            res = resident(view[p0:min(hi, p0 + piece)])
            if refused or res is None or not res.any():
                continue
            if res.all():
                edges = [0, len(res)]
            else:
                edges = np.flatnonzero(np.diff(np.concatenate([[False], res, [False]])
                                               .astype(np.int8))).tolist()
            for a, b in zip(edges[::2], edges[1::2], strict=True):
                if not madvise(base + (p0 + a) * PAGE_SIZE, (b - a) * PAGE_SIZE,
                               Madv.POPULATE_READ):
                    refused = True                       # older kernel: faults do it
                    return

    n = len(view)
    if THREADS < 2 or n <= piece:
        part(0, n)
        return
    from concurrent.futures import ThreadPoolExecutor

    step = -(-n // THREADS // piece) * piece
    with ThreadPoolExecutor(THREADS) as workers:
        list(workers.map(lambda lo: part(lo, min(n, lo + step)), range(0, n, step)))
