"""A dirty log: one bit per page per RAM block, fetched and cleared without losing a bit.

Scheme (two bitmaps and an epoch, flipped by the writer on request):
- Each block has bitmaps 0 and 1. The writer (the guest) marks only into bitmap[epoch].
- To fetch, the reader bumps the request counter and posts ``<name>.req``. The writer answers at
  a safe point, between two marks: it flips epoch, stores done = request, posts ``<name>.ack``.
  Marks and flips hold one lock in the writer, so a flip never lands inside a mark; a writer
  that is not marking answers from ``service()`` or from the thread of ``start_service()``.
- Once done >= its request, the reader alone owns bitmap[epoch ^ 1]: the writer will not touch it
  until the next request, which only the reader makes. The reader copies it and zeroes it.
- No bit is lost: a mark lands in the bitmap of the epoch it saw; that bitmap is copied only
  after the writer flipped away from it, i.e. after the mark finished. A bit set after the flip
  lands in the other bitmap and is returned by a later fetch.
- Ordering: the writer's marks precede its ack post and the reader's zeroing precedes its next
  request post; semaphores synchronise memory (POSIX), and x86_64 keeps stores in order.
- A writer that never attached has marked nothing: fetch returns empty bitmaps and touches
  nothing. A writer that closed (detached) never marks again: fetch takes both bitmaps. A dead
  writer makes fetch raise ``PeerGone`` within about POLL_INTERVAL. One writer per log.
Mark a page after writing it, so that a fetched bit never predates the write it stands for.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np
import posix_ipc

from shm.errors import ShmError
from shm.memory import PAGE_SIZE
from shm.naming import pid_alive, segment_name
from shm.region import RamRegion
from shm.runs import RUN_DTYPE, dirty_pages, dirty_runs, expand_runs  # noqa: F401 (re-export)
from shm.segment import PeerGone, Segment, ShmTimeout
from shm.semaphores import (
    SemaphoreSegment,
    attach_semaphores,
    close_semaphores,
    create_semaphores,
    unlink_semaphores,
)
from shm.semaphores import wait as wait_semaphore

KIND = b"dirty"
POLL_INTERVAL = 0.1
_TOKEN_CAP = 1 << 20
_BITMAPS_OFFSET = 4096
_EPOCH, _REQUEST, _DONE = 8, 16, 24
_WRITER_PID, _WRITER_STATE, _READER_PID = 32, 33, 40
_OPEN, _DETACHED = 0, 1
_BIT = np.array([1 << k for k in range(8)], np.uint8)


_SEMAPHORES = ("req", "ack")


class DirtyLog(SemaphoreSegment):
    """Dirty bitmaps of a region's blocks in one segment. Use ``create`` or ``attach``."""

    SEMAPHORES = _SEMAPHORES

    def __init__(self, segment: Segment, request: posix_ipc.Semaphore,
                 ack: posix_ipc.Semaphore) -> None:
        geo = segment.geometry
        if len(geo) < 3 or geo[0] != PAGE_SIZE or len(geo) != 2 + geo[1]:
            raise ShmError(f"dirty log {segment.name} has a bad geometry {geo}")
        self.segment = segment
        self.block_pages: tuple[int, ...] = geo[2:]
        self._request, self._ack = request, ack
        self._hdr = memoryview(segment.payload[:_BITMAPS_OFFSET]).cast("Q")
        self._words: list[tuple[np.ndarray, np.ndarray]] = []
        offset = _BITMAPS_OFFSET
        for pages in self.block_pages:
            n = -(-pages // 64)
            self._words.append((segment.ndarray("<u8", offset, n),
                                segment.ndarray("<u8", offset + 8 * n, n)))
            offset += 16 * n
        self._bytes = [(a.view(np.uint8), b.view(np.uint8)) for a, b in self._words]
        self._pid = os.getpid()
        self._writer = self._reader = False
        self._lock = threading.Lock()
        self._epoch = self._done = 0
        self._thread: threading.Thread | None = None
        self._collect: Callable[[], list[np.ndarray]] | None = None
        self.service_error: BaseException | None = None
        self._stop = False
        self._closed = False
        self._pending = 0  # a request whose fetch timed out, not yet collected
        self._carry: list[np.ndarray] | None = None  # bits taken, not yet handed out

    @property
    def name(self) -> str:
        return self.segment.name

    @classmethod
    def create(cls, run_id: str, region: RamRegion, *, kind: str = "dirty") -> DirtyLog:
        """Create the log for ``region``'s blocks as ``/rdp-<run_id>-<pid>-<kind>``."""
        pages = [b.nb_pages for b in region.blocks]
        name = segment_name(run_id, kind)
        size = _BITMAPS_OFFSET + sum(16 * -(-p // 64) for p in pages)
        segment = Segment.create(name, size, kind=KIND,
                                 geometry=(PAGE_SIZE, len(pages), *pages))
        sems = []
        try:
            sems = create_semaphores(name, _SEMAPHORES)
            return cls(segment, *sems)
        except BaseException:
            if sems:
                close_semaphores(sems)
                unlink_semaphores(name, _SEMAPHORES)
            segment.close()
            segment.unlink()
            raise

    @classmethod
    def attach(cls, name: str, region: RamRegion | None = None) -> DirtyLog:
        """Attach log ``name``; ``ShmError`` if ``region`` is given and its blocks differ."""
        segment = Segment.attach(name, kind=KIND)
        sems = []
        try:
            sems = attach_semaphores(name, _SEMAPHORES, "dirty log")
            log = cls(segment, *sems)
            if region is not None and log.block_pages != tuple(b.nb_pages for b in
                                                               region.blocks):
                raise ShmError(f"dirty log {name} covers blocks of {log.block_pages} pages, "
                               f"region {region.name} has other blocks")
            return log
        except BaseException:
            close_semaphores(sems)
            segment.close()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"dirty log {self.name} is closed")

    # -- writer ------------------------------------------------------------------------------

    def _claim_writer(self) -> None:
        if self._writer:
            return
        self._check_open()
        hdr = self._hdr
        if hdr[_WRITER_STATE] != _OPEN:
            raise ShmError(f"dirty log {self.name} had a writer that left; one writer per log")
        current = hdr[_WRITER_PID]
        if current not in (0, self._pid) and pid_alive(current):
            raise ShmError(f"dirty log {self.name} already has a writer (pid {current})")
        self._epoch, self._done = hdr[_EPOCH], hdr[_DONE]
        hdr[_WRITER_PID] = self._pid  # before the first mark: the reader's "no writer" test
        self._writer = True

    def _serve_locked(self) -> bool:
        request = self._hdr[_REQUEST]
        if request == self._done:
            return False
        self._epoch ^= 1
        self._hdr[_EPOCH] = self._epoch
        self._hdr[_DONE] = self._done = request
        self._ack.release()
        return True

    def _block(self, block: int) -> tuple[np.ndarray, int]:
        if not 0 <= block < len(self.block_pages):
            raise IndexError(f"dirty log {self.name} has no block {block}")
        return self._bytes[block][self._epoch], self.block_pages[block]

    def mark(self, block: int, pages: np.ndarray) -> None:
        """Set the bits of ``pages`` (an integer array; duplicates fine) in ``block``."""
        pages = np.asarray(pages).reshape(-1)
        if pages.dtype.kind not in "iu":
            raise TypeError(f"pages must be integers, not {pages.dtype}")
        if pages.size == 0:
            return
        pages = pages.astype(np.intp, copy=False)
        self._claim_writer()
        with self._lock:
            self._check_open()
            self._serve_locked()
            bitmap, nb_pages = self._block(block)
            if pages.min() < 0 or pages.max() >= nb_pages:
                raise IndexError(f"pages outside block {block} ({nb_pages} pages)")
            index, bits = pages >> 3, _BIT[pages & 7]
            # Within one bit position, duplicate indices all store the same value, so a plain
            # fancy-index OR is exact; eight passes, one per bit, beat ufunc.at on large batches.
            for k in range(8):
                sel = index[bits == _BIT[k]]
                if sel.size:
                    bitmap[sel] |= _BIT[k]

    def mark_range(self, block: int, first: int, n: int) -> None:
        """Set the bits of pages ``first`` .. ``first + n - 1`` in ``block``."""
        if n <= 0:
            return
        self._claim_writer()
        with self._lock:
            self._check_open()
            self._serve_locked()
            bitmap, nb_pages = self._block(block)
            last = first + n - 1
            if first < 0 or last >= nb_pages:
                raise IndexError(f"pages {first}+{n} outside block {block} ({nb_pages} pages)")
            b0, b1 = first >> 3, last >> 3
            head = (0xFF << (first & 7)) & 0xFF
            tail = 0xFF >> (7 - (last & 7))
            if b0 == b1:
                bitmap[b0] |= head & tail
            else:
                bitmap[b0] |= head
                bitmap[b0 + 1:b1] = 0xFF
                bitmap[b1] |= tail

    def service(self) -> bool:
        """Answer a pending fetch request now (a paused writer must, or run
        ``start_service``); True if it flipped."""
        self._claim_writer()
        with self._lock:
            self._check_open()
            return self._serve_locked()

    def start_service(self, collect: Callable[[], list[np.ndarray]] | None = None) -> None:
        """Answer fetch requests from a thread of this (writer) process until ``close``.

        ``collect``, if given, runs in that thread on each request, before the flip: it returns
        one packed little-endian bitmap per block (or None) of pages written since its previous
        call, ORed into the log under the lock and handed out by this very fetch. A writer whose
        writes are logged elsewhere (KVM's dirty log) so answers on request with no bit lost:
        what ``collect`` took is in the fetched bitmap, what it did not take it returns next
        time. An exception in ``collect`` stops the service (``service_error`` holds it): the
        reader's fetch then times out, or sees the writer die."""
        self._claim_writer()
        if self._thread is not None:
            return
        self._collect = collect
        self._thread = threading.Thread(target=self._serve_forever, daemon=True,
                                        name=f"dirtylog-{self.name}")
        self._thread.start()

    def _serve_forever(self) -> None:
        while not self._stop:
            if not wait_semaphore(self._request, 1.0):  # close() posts to wake us; a guard
                continue
            if self._stop:
                return
            bitmaps = None
            if self._collect is not None and self._hdr[_REQUEST] != self._done:
                try:
                    bitmaps = self._collect()
                except BaseException as exc:  # noqa: BLE001 - the owner reports it
                    self.service_error = exc
                    return
            with self._lock:
                if not self._closed:
                    if bitmaps is not None:
                        self._or_locked(bitmaps)
                    self._serve_locked()

    def _or_locked(self, bitmaps: list[np.ndarray]) -> None:
        for block, bm in enumerate(bitmaps):
            bm = np.asarray(bm).view(np.uint8)
            if bm.any():
                target = self._block(block)[0]
                n = min(len(bm), len(target))
                target[:n] |= bm[:n]

    # -- reader ------------------------------------------------------------------------------

    def fetch(self, timeout: float | None = None) -> list[np.ndarray]:
        """Take and clear the dirty bits of every block: one packed little-endian bitmap
        (uint8, padded to whole u64 words) per block. ``ShmTimeout`` if the writer does not
        answer in ``timeout`` seconds (no bit is lost: the next fetch returns it), ``PeerGone``
        if it died."""
        self._check_open()
        hdr = self._hdr
        if not self._reader:
            current = hdr[_READER_PID]
            if current not in (0, self._pid) and pid_alive(current):
                raise ShmError(f"dirty log {self.name} already has a reader (pid {current})")
            hdr[_READER_PID] = self._pid
            self._reader = True
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._writer:  # writer and reader in one object: flip here, between marks
            with self._lock:
                self._epoch ^= 1
                hdr[_EPOCH] = self._epoch
                self._take(self._epoch ^ 1)
        elif hdr[_WRITER_STATE] == _DETACHED:
            self._take(0, 1)
            self._pending = 0
        elif hdr[_WRITER_PID] != 0:  # (no writer yet means no mark yet: nothing to take)
            self._check_writer()
            served = True
            if self._pending:
                # An earlier fetch timed out and its flip may have happened since: take the
                # bitmap it freed, then flip again for the marks made after that flip.
                served = self._await(self._pending, deadline, timeout)
                self._take(hdr[_EPOCH] ^ 1) if served else self._take(0, 1)
                self._pending = 0
            if served:
                self._pending = hdr[_REQUEST] + 1
                hdr[_REQUEST] = self._pending
                if self._request.value < _TOKEN_CAP:
                    self._request.release()
                served = self._await(self._pending, deadline, timeout)
                self._take(hdr[_EPOCH] ^ 1) if served else self._take(0, 1)
                self._pending = 0
        taken, self._carry = self._carry, None
        if taken is None:
            return [np.zeros(8 * len(w[0]), np.uint8) for w in self._words]
        return [t.view(np.uint8) for t in taken]

    def _await(self, request: int, deadline: float | None, timeout: float | None) -> bool:
        """Wait until the writer served ``request`` (True) or detached (False)."""
        hdr = self._hdr
        while hdr[_DONE] < request:
            if hdr[_WRITER_STATE] == _DETACHED:
                return False
            wait = POLL_INTERVAL
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    self._check_writer()
                    raise ShmTimeout(f"the writer of dirty log {self.name} did not answer a "
                                     f"fetch in {timeout} s",
                                     hint="a paused writer must call service() or "
                                          "start_service()")
            if not wait_semaphore(self._ack, wait):   # a handler's exception ends the wait
                self._check_writer()
        return True

    def _check_writer(self) -> None:
        pid = self._hdr[_WRITER_PID]
        if pid and self._hdr[_WRITER_STATE] == _OPEN and not pid_alive(pid):
            raise PeerGone(f"the writer of dirty log {self.name} (pid {pid}) died")

    def _take(self, *epochs: int) -> None:
        """Move the bits of bitmaps ``epochs`` (the caller owns them alone now) into the
        carry that the fetch hands out, and zero those bitmaps."""
        carry = self._carry or [np.zeros(len(w[0]), "<u8") for w in self._words]
        for acc, words in zip(carry, self._words, strict=True):
            for e in epochs:
                acc |= words[e]
                words[e].fill(0)
        self._carry = carry

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Detach (idempotent). A writer stops its service thread and marks itself gone: a
        later fetch collects every bit it left."""
        if self._closed:
            return
        if self._thread is not None:
            self._stop = True
            self._request.release()
            self._thread.join()
            self._thread = None
        with self._lock:
            self._closed = True
            if self._writer:
                self._hdr[_WRITER_STATE] = _DETACHED
                self._ack.release()  # wake a reader waiting for a flip
        self._hdr.release()
        self._words, self._bytes = [], []
        self._request.close()
        self._ack.close()
        self.segment.close()

    def __repr__(self) -> str:
        return f"<DirtyLog {self.name} blocks {self.block_pages}>"


__all__ = ["DirtyLog", "RUN_DTYPE", "dirty_pages", "dirty_runs", "expand_runs"]
