"""RAM records by the thousand: PAGE and ZERO records as numpy rows, for streams with pages inline.

Where pages travel in the stream (``file:``, ``tcp:``), a round is mostly runs of records of one
block with ``RAM_SAVE_FLAG_CONTINUE``, and such a record has a fixed size: be64
``offset | PAGE | CONTINUE`` and the page (8 + page_size bytes), or be64
``offset | ZERO | CONTINUE`` and the fill byte (9 bytes). So a run of them is a numpy structured
array, one row per record, with no padding: the writer fills the headers with one vectorised
expression and the pages with one gather (``page_records``), and a reader views buffered bytes
as rows and takes the longest prefix of well-formed ones (``count_records``). Nothing here loops
per page in Python.

The first record of a block in a section carries the block's name (QEMU's loader remembers the
last block across records, and a reader starting at a section boundary may not know it):
``page_records(..., named=True)`` writes it as a named record ahead of the rows.

Events: ``PageBatch`` / ``ZeroBatch`` are what a bulk ``StreamParser`` yields for such runs;
``encode()`` gives back the bytes they came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.protocol.records import PAGE_SIZE, U8, U64, BatchEvent, RamFlag, idstr_bytes

__all__ = ["PageBatch", "ZeroBatch", "page_dtype", "ZERO_DTYPE", "page_records",
           "zero_records", "count_records"]

ZERO_DTYPE = np.dtype([("head", ">u8"), ("fill", "u1")])      # 9 bytes, packed
PAGE_CONT = int(RamFlag.PAGE | RamFlag.CONTINUE)
ZERO_CONT = int(RamFlag.ZERO | RamFlag.CONTINUE)
_FIRST_WINDOW = 64
_dtypes: dict[int, np.dtype] = {}


def page_dtype(page_size: int = PAGE_SIZE) -> np.dtype:
    """One PAGE record with CONTINUE: be64 header, then the page (8 + page_size bytes)."""
    dt = _dtypes.get(page_size)
    if dt is None:
        dt = _dtypes[page_size] = np.dtype([("head", ">u8"), ("page", "u1", (page_size,))])
    return dt


@dataclass(frozen=True, slots=True, eq=False)
class PageBatch(BatchEvent):
    """Consecutive PAGE records of ``block``, all with CONTINUE: ``offsets`` (uint64, offsets
    in the block) and ``data`` (uint8, one row of page_size bytes per page)."""

    block: str
    offsets: np.ndarray
    data: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    def encode(self, page_size: int = PAGE_SIZE) -> bytes:
        rows = np.empty(len(self.offsets), page_dtype(page_size))
        rows["head"] = self.offsets.astype(np.uint64) | np.uint64(PAGE_CONT)
        rows["page"] = self.data
        return rows.tobytes()


@dataclass(frozen=True, slots=True, eq=False)
class ZeroBatch(BatchEvent):
    """Consecutive ZERO records (fill 0) of ``block``, all with CONTINUE."""

    block: str
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    def encode(self, page_size: int = PAGE_SIZE) -> bytes:
        rows = np.zeros(len(self.offsets), ZERO_DTYPE)
        rows["head"] = self.offsets.astype(np.uint64) | np.uint64(ZERO_CONT)
        return rows.tobytes()


def _named(flag: RamFlag, block: str, offset: int) -> bytes:
    return U64.pack(offset | flag) + idstr_bytes(block, "RAMBlock idstr")


def page_records(block: str, pages_view: np.ndarray, pages: np.ndarray, *, named: bool,
                 page_size: int = PAGE_SIZE, scratch: np.ndarray | None = None) -> list:
    """PAGE records of ``pages`` (page numbers, ascending or not) of one block whose memory is
    ``pages_view`` (uint8, shape (nb_pages, page_size)): a list of buffers to write in order,
    the named first record (if ``named``) and one structured array of the rest. ``scratch``
    (``page_dtype`` rows, at least one per page) is used instead of a new array: fresh memory
    costs a page fault per 4 KiB, more than the copy."""
    pages = np.asarray(pages, np.int64)
    out: list = []
    if len(pages) == 0:
        return out
    if named:
        first = int(pages[0])
        out.append(_named(RamFlag.PAGE, block, first * page_size) + pages_view[first].tobytes())
        pages = pages[1:]
    if len(pages):
        rows = (np.empty(len(pages), page_dtype(page_size)) if scratch is None
                else scratch[:len(pages)])
        rows["head"] = (pages.astype(np.uint64) * np.uint64(page_size)) | np.uint64(PAGE_CONT)
        # One gather of every page into its row (mode="clip": numpy writes straight into the
        # strided field instead of through a temporary).
        np.take(pages_view, pages, axis=0, out=rows["page"], mode="clip")
        out.append(rows)
    return out


def zero_records(block: str, pages: np.ndarray, *, named: bool,
                 page_size: int = PAGE_SIZE) -> list:
    """ZERO records (fill 0) of ``pages`` of one block, as ``page_records`` returns them."""
    pages = np.asarray(pages, np.int64)
    out: list = []
    if len(pages) == 0:
        return out
    if named:
        out.append(_named(RamFlag.ZERO, block, int(pages[0]) * page_size) + U8.pack(0))
        pages = pages[1:]
    if len(pages):
        rows = np.zeros(len(pages), ZERO_DTYPE)
        rows["head"] = (pages.astype(np.uint64) * np.uint64(page_size)) | np.uint64(ZERO_CONT)
        out.append(rows)
    return out


def count_records(data, start: int, end: int, *, zero: bool, block_length: int,
                  page_size: int = PAGE_SIZE) -> int:
    """How many whole, well-formed CONTINUE records of one kind (ZERO if ``zero``, else PAGE)
    lie back to back in ``data[start:end]``: header flags exactly that kind plus CONTINUE, the
    page inside a block of ``block_length`` bytes, a zero fill. The first record that is not
    one stops the count (a caller parses it alone, with full checks and messages). Windows
    double from 64 rows, so the cost follows the count, not the bytes buffered."""
    dt = ZERO_DTYPE if zero else page_dtype(page_size)
    total = (end - start) // dt.itemsize
    want = np.uint64(ZERO_CONT if zero else PAGE_CONT)
    mask = np.uint64(page_size - 1)
    last = np.uint64(block_length - page_size) if block_length >= page_size else None
    done, window = 0, _FIRST_WINDOW
    while done < total:
        n = min(window, total - done)
        rows = np.frombuffer(data, dt, n, start + done * dt.itemsize)
        head = rows["head"]
        ok = (head & mask) == want
        ok &= (head & ~mask) <= last if last is not None else False
        if zero:
            ok &= rows["fill"] == 0
        del rows, head
        if not ok.all():
            return done + int(np.argmin(ok))
        done += n
        window *= 2
    return done


def batch_from(data, start: int, count: int, block: str, *, zero: bool,
               page_size: int = PAGE_SIZE) -> PageBatch | ZeroBatch:
    """The event for ``count`` records counted by ``count_records`` at ``start``. A PageBatch's
    ``data`` is a view of ``data`` (no copy: the pages are copied once, by whoever stores them),
    so ``data`` must not change while the event lives; a bytearray cannot be resized then."""
    dt = ZERO_DTYPE if zero else page_dtype(page_size)
    # frombuffer over a memoryview keeps the memoryview as the arrays' base: while they live,
    # a bytearray under them cannot be resized (np.ndarray(buffer=...) would not hold it).
    rows = np.frombuffer(memoryview(data), dt, count, start)
    offsets = rows["head"] & ~np.uint64(page_size - 1)
    if zero:
        return ZeroBatch(block, offsets)
    return PageBatch(block, offsets, rows["page"])
