"""Page hashes: what lets both sides verify RAM incrementally, so that only the final round's
pages are hashed while the guest is paused.

Every page has a 64-bit hash: the sum of its 512 little-endian words times fixed odd multipliers
(``KEYS``), modulo 2^64, computed with numpy over whole slices of RAM (14 GB/s here, faster
than SHA-256's 1.8). A zero page hashes to 0, so pages known to be zero (found by the scanner,
or never faulted in) need no reading at all. It is a check against lost, misplaced or mangled
writes, not against an adversary: a single changed word always changes the hash (the
multipliers are odd), a change of several words goes unseen with probability about 2^-64.

Each side keeps a table of page hashes (8 bytes per 4 KiB page, 0.2% of RAM). The source's
scanner hashes a round's pages as it scans them and takes their zero tags from the same read
(``hash_and_test``: where a probe of the pages' first words finds mostly data, every page is
hashed and only those that hash to 0 are tested word by word; elsewhere the pages are tested
16 at a time as one flat stretch first, and only the data found is hashed: a zero page is read
once and given hash 0 without a hash pass); the destination
hashes the pages of a round once the round's writes have all landed (``PageHasher``, told which
pages by the source). A page written again later is hashed again later, so at the end each
table holds the hashes of the final contents. The digest compared is SHA-256 over each chunk's
slice of the table (``table_digests``), so a mismatch names the chunk.

``PageTable`` is the source's table in shared memory (the coordinator owns it, the scanner
writes it): per block, the page hashes and the packed bitmap of the pages sent in the latest
round.
"""

from __future__ import annotations

import hashlib
import queue
import threading

import numpy as np

from shm.memory import WORDS_PER_PAGE, in_halves, nonzero_rows, resident

WINDOW = 2048                      # pages hashed per numpy call (8 MiB)
STRETCH = 1 << 18                  # pages of a round bitmap unpacked at a time (1 GiB of RAM)
KEYS = np.random.default_rng(0x9A6E_4A54).integers(
    0, 1 << 64, WORDS_PER_PAGE, dtype=np.uint64, endpoint=False) | np.uint64(1)


def hash_rows(rows: np.ndarray) -> np.ndarray:
    """The hash of each row of ``rows`` (uint64, (n, 512))."""
    return np.einsum("ij,j->i", rows, KEYS)


def hash_pages(view: np.ndarray, pages: np.ndarray, table: np.ndarray,
               scratch: np.ndarray | None = None) -> None:
    """``table[pages] = hash`` of those pages of ``view`` (uint64, (n_pages, 512)); ``pages``
    sorted. Dense stretches are hashed in place, scattered pages gathered into ``scratch``
    ((WINDOW, 512) uint64, reused: fresh memory costs a fault per page)."""
    if not len(pages):
        return
    if scratch is None:
        scratch = np.empty((WINDOW, WORDS_PER_PAGE), np.uint64)
    first = int(pages[0]) // WINDOW
    last = int(pages[-1]) // WINDOW
    cuts = np.searchsorted(pages, np.arange(first + 1, last + 1) * WINDOW)
    for w, sel in zip(range(first, last + 1), np.split(pages, cuts), strict=True):
        if not len(sel):
            continue
        w0 = w * WINDOW
        w1 = min(len(view), w0 + WINDOW)
        if len(sel) * 4 >= w1 - w0:
            table[sel] = hash_rows(view[w0:w1])[sel - w0]
        else:
            part = scratch[:len(sel)]
            np.take(view, sel, axis=0, out=part)
            table[sel] = hash_rows(part)


TEST_WINDOW = 1024                 # pages hashed and tested per call when zero tags are wanted
PROBE_STEP = 8                     # every how many rows a first word is probed first


def _hash_and_test_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of ``rows`` and whether each row is non-zero, reading each row once from memory.
    The first word of each row is the probe (one cache line a page): a row led by a non-zero
    word is data. Every PROBE_STEP-th row is probed first, and all of them only where those
    suggest data (a window of zeros then costs a cache line per 8 pages; in a window of data
    the full probe also walks the page tables ahead of the hash, 4% faster here than without
    it). Most rows led by a zero word: test them all first (``nonzero_rows``: zero rows
    need no hashing, they hash to 0) and hash only the others; else hash them all and test
    only those that hash to 0 (zero rows, or rarely data), still in cache."""
    if (np.count_nonzero(rows[::PROBE_STEP, 0]) * 2 * PROBE_STEP >= len(rows)
            and np.count_nonzero(rows[:, 0]) * 2 >= len(rows)):
        h = hash_rows(rows)
        nonzero = h != 0
        unsure = np.flatnonzero(~nonzero)
        if len(unsure) * 4 >= len(rows):
            nonzero = np.bitwise_or.reduce(rows, axis=1) != 0     # in place, no gather
        elif len(unsure):
            nonzero[unsure] = np.bitwise_or.reduce(rows[unsure], axis=1) != 0
        return h, nonzero
    nonzero = nonzero_rows(rows)
    data = np.flatnonzero(nonzero)
    if len(data) * 2 >= len(rows):
        return hash_rows(rows), nonzero
    h = np.zeros(len(rows), np.uint64)
    if len(data):
        h[data] = hash_rows(rows[data])
    return h, nonzero


def hash_and_test(view: np.ndarray, pages: np.ndarray, table: np.ndarray,
                  held: np.ndarray | None = None,
                  scratch: np.ndarray | None = None) -> np.ndarray:
    """``table[pages] = hash`` of those pages of ``view`` (uint64, (n_pages, 512)), and per
    page whether it is non-zero, reading each page once. ``pages`` sorted. ``held`` (per page
    of ``view``, as ``shm.memory.resident`` gives it) marks the pages in memory: the others
    are zero, hash to 0 and are not read (reading a hole of shared memory allocates it).
    Windows of TEST_WINDOW pages that are dense enough are read in place (clean pages
    between dirty ones too, if in memory); the other pages are gathered into ``scratch``
    ((TEST_WINDOW, 512) uint64, reused) TEST_WINDOW at a time, wherever they lie."""
    nonzero = np.zeros(len(pages), bool)
    if not len(pages):
        return nonzero
    if held is not None:
        inside = held[pages]
        if not inside.all():
            table[pages[~inside]] = 0
            idx = np.flatnonzero(inside)
            nonzero[idx] = hash_and_test(view, pages[idx], table, held, scratch)
            return nonzero
    if scratch is None:
        scratch = np.empty((TEST_WINDOW, WORDS_PER_PAGE), np.uint64)
    window = pages // TEST_WINDOW
    starts = np.flatnonzero(np.diff(window, prepend=-1))       # each window's first page
    ends = np.append(starts[1:], len(pages))
    lo = pages[starts].astype(np.int64)
    hi = pages[ends - 1].astype(np.int64) + 1
    dense = (ends - starts) * 4 >= hi - lo
    if held is not None:
        absent = np.concatenate([[0], np.cumsum(~held)])
        dense &= absent[hi] == absent[lo]           # a window read in place: all in memory
    for s, e, a, z in zip(starts[dense].tolist(), ends[dense].tolist(), lo[dense].tolist(),
                          hi[dense].tolist(), strict=True):
        sel = pages[s:e]
        h, nz = _hash_and_test_rows(view[a:z])
        if e - s != z - a:
            h, nz = h[sel - a], nz[sel - a]
        table[sel] = h
        nonzero[s:e] = nz
    loose = np.flatnonzero(np.repeat(~dense, ends - starts))
    for i in range(0, len(loose), TEST_WINDOW):
        idx = loose[i:i + TEST_WINDOW]
        sel = pages[idx]
        part = scratch[:len(sel)]
        np.take(view, sel, axis=0, out=part)
        h, nz = _hash_and_test_rows(part)
        table[sel] = h
        nonzero[idx] = nz
    return nonzero


def table_digests(tables: list[np.ndarray], chunk_pages: int) -> bytes:
    """SHA-256 of each chunk's slice of the page-hash tables, blocks then chunks in order.
    A slice of zeros (a chunk of zero pages: most of an idle guest) has one digest, known
    beforehand: only the others are hashed (8 GiB of zeros: 1 ms rather than 14)."""
    zero = np.frombuffer(hashlib.sha256(bytes(chunk_pages * 8)).digest(), np.uint8)
    out = []
    for t in tables:
        t = np.ascontiguousarray(t, "<u8")
        full = len(t) // chunk_pages
        digests = np.empty((-(-len(t) // chunk_pages), 32), np.uint8)
        digests[:] = zero
        busy = np.ones(len(digests), bool)
        busy[:full] = t[:full * chunk_pages].reshape(full, chunk_pages).any(axis=1)
        raw = memoryview(t).cast("B")
        step = chunk_pages * 8
        for i in np.flatnonzero(busy).tolist():
            digests[i] = np.frombuffer(hashlib.sha256(raw[i * step:(i + 1) * step]).digest(),
                                       np.uint8)
        out.append(digests.tobytes())
    return b"".join(out)


def pack_round(bitmaps: list[np.ndarray]) -> bytes:
    """The packed per-block bitmaps of a round's pages, as stream bytes (zlib): the body of the
    stream's round section (its name and id are ``pipeline.sections``')."""
    import zlib

    return zlib.compress(b"".join(np.asarray(b, np.uint8).tobytes() for b in bitmaps), 1)


def unpack_round(data: bytes, block_pages: list[int]) -> list[np.ndarray]:
    """``pack_round``'s inverse: the page numbers of each block (ValueError if it does not fit
    blocks of ``block_pages`` pages)."""
    import zlib

    raw = np.frombuffer(zlib.decompress(data), np.uint8)
    sizes = [-(-n // 8) for n in block_pages]
    if len(raw) != sum(sizes):
        raise ValueError(f"round page bitmap of {len(raw)} bytes for blocks of {block_pages} "
                         "pages")
    out, at = [], 0
    for n, size in zip(block_pages, sizes, strict=True):
        bits = np.unpackbits(raw[at:at + size], bitorder="little")[:n]
        out.append(np.flatnonzero(bits).astype(np.int32 if n < 1 << 31 else np.int64))
        at += size
    return out


class PageHasher:
    """The destination's table, kept by a thread: ``submit(pages per block)`` once a round's
    writes have landed, ``wait()`` before comparing. Pages not in memory (never written) are
    zero and hash to 0 without being read (reading would fault them in)."""

    def __init__(self, views: list[np.ndarray]) -> None:
        self.views = views
        self.tables = [np.zeros(len(v), np.uint64) for v in views]
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="page-hasher", daemon=True)
        self._thread.start()

    def submit(self, pages: list[np.ndarray] | bytes) -> None:
        """Pages per block to hash, or a ``pack_round`` body (unpacked by the thread: a
        queued round then costs its packed size, not 8 bytes a page)."""
        self._queue.put(pages)

    def _loop(self) -> None:
        scratch = [np.empty((WINDOW, WORDS_PER_PAGE), np.uint64) for _ in range(2)]
        while (job := self._queue.get()) is not None:
            try:
                if isinstance(job, bytes):          # a round section's body
                    self._hash_packed(job, scratch)
                else:
                    for view, table, pages in zip(self.views, self.tables, job, strict=True):
                        self._hash(view, table, np.asarray(pages), scratch)
            except BaseException as exc:  # noqa: BLE001 - reported by wait()
                self._error = exc
            finally:
                self._queue.task_done()

    def _hash_packed(self, body: bytes, scratch: list[np.ndarray]) -> None:
        """A round's packed bitmap, a stretch of pages at a time: one entry per page of the
        whole round at once would cost more memory than the page table itself."""
        import zlib

        raw = np.frombuffer(zlib.decompress(body), np.uint8)
        at = 0
        for view, table in zip(self.views, self.tables, strict=True):
            n = len(view)
            for p0 in range(0, n, STRETCH):
                p1 = min(n, p0 + STRETCH)
                bits = np.unpackbits(raw[at + p0 // 8:at + -(-p1 // 8)], bitorder="little")
                pages = np.flatnonzero(bits[:p1 - p0]).astype(np.int32)
                self._hash(view[p0:p1], table[p0:p1], pages, scratch)
            at += -(-n // 8)

    @staticmethod
    def _hash(view: np.ndarray, table: np.ndarray, pages: np.ndarray,
              scratch: list[np.ndarray]) -> None:
        """Hash ``pages`` of ``view`` into ``table``, on two threads when there are many (the
        final round's pages are hashed inside the downtime)."""
        if not len(pages):
            return
        res = resident(view)
        if res is not None:
            # A page not in memory never was (shared memory is not swapped, and COMPRESS
            # zero-fills in place): its entry is still the 0 it began as.
            pages = pages[res[pages]]
        in_halves(lambda lo, hi: hash_pages(view, pages[lo:hi], table, scratch[lo > 0]),
                  len(pages))

    def wait(self) -> list[np.ndarray]:
        """Block until every submitted round is hashed; the tables."""
        self._queue.join()
        if self._error is not None:
            raise self._error
        return self.tables

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(5.0)


class PageTable:
    """The source's page hashes and latest-round bitmaps in one shared segment (owner: the
    coordinator; the scanner attaches and writes)."""

    KIND = b"pagehash"

    def __init__(self, segment, block_pages: list[int]) -> None:
        self.segment = segment
        self.block_pages = list(block_pages)
        self.hashes: list[np.ndarray] = []
        self.sent: list[np.ndarray] = []
        at = 0
        for n in self.block_pages:
            self.hashes.append(segment.ndarray(np.uint64, at, n))
            at += n * 8
        for n in self.block_pages:
            size = -(-n // 8)
            self.sent.append(segment.ndarray(np.uint8, at, size))
            at += size

    @staticmethod
    def _size(block_pages: list[int]) -> int:
        return sum(n * 8 + -(-n // 8) for n in block_pages)

    @classmethod
    def create(cls, name: str, block_pages: list[int]) -> PageTable:
        from shm.segment import Segment

        seg = Segment.create(name, cls._size(block_pages), kind=cls.KIND,
                             geometry=tuple(block_pages))
        return cls(seg, block_pages)

    @classmethod
    def attach(cls, name: str) -> PageTable:
        from shm.segment import Segment

        seg = Segment.attach(name, kind=cls.KIND)
        return cls(seg, list(seg.geometry))

    @property
    def name(self) -> str:
        return self.segment.name

    def close(self) -> None:
        self.hashes, self.sent = [], []
        self.segment.close()

    def unlink(self) -> None:
        self.segment.unlink()
