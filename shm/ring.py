"""A single-producer single-consumer ring of fixed-size records in shared memory.

Layout of the payload (u64 little-endian words; counters on their own cache lines):

    0     capacity, itemsize, crc32 of the dtype's descr
    64    head: records ever pushed (written by the producer only)
    128   tail: records ever popped (written by the consumer only)
    192   producer pid, producer state (OPEN, CLOSED = end of stream, ABORTED = left early),
          producer's note (a counter the producer publishes for onlookers, ``note``)
    256   consumer pid, consumer state (OPEN, ABORTED = left)
    512   the dtype's descr as text, for error messages
    1024  capacity records of the user's numpy structured dtype

Invariants and why they hold without locks:
- Each counter has one writer. The producer copies records into the ring and only then stores
  head; the consumer copies records out and only then stores tail. Counters are items of a
  memoryview cast to "Q" at 8-byte-aligned offsets: CPython stores each with one 8-byte memcpy,
  a single mov on x86_64, so it is atomic; x86_64 keeps stores in program order and does not
  reorder loads with loads or with later stores (TSO), so a counter never runs ahead of the
  records it covers. This relies on x86_64's ordering; a weakly ordered CPU would need barriers.
- Waiting uses two POSIX semaphores, ``<name>.items`` and ``<name>.spaces``, as doorbells: after
  every publish the publisher posts one token, and a side that finds nothing to do sleeps on its
  semaphore. A token is never lost, so a sleeper always wakes after a publish that followed its
  check (semaphore operations synchronise memory, per POSIX). Stale tokens only cause a recheck.
  Posting stops while _TOKEN_CAP tokens are pending (a consumer that never runs dry), so the count
  cannot overflow; the sleeper then has that many wake-ups ahead, and the poll below bounds any
  delay anyway.
- A sleeper wakes at least every POLL_INTERVAL to look at the peer's state and pid and at the
  ring owner's pid, so a dead peer is reported within POLL_INTERVAL plus one /proc read. What a
  signal handler raises ends the wait (``shm.semaphores.wait``): no signal is swallowed.
The semaphores are named like the segment, so ``naming.sweep`` removes them with it.
"""

from __future__ import annotations

import os
import time
import zlib

import numpy as np
import posix_ipc

from shm.errors import ShmError
from shm.naming import pid_alive
from shm.segment import PeerGone, Segment, ShmTimeout
from shm.semaphores import (
    SemaphoreSegment,
    attach_semaphores,
    close_semaphores,
    create_semaphores,
    unlink_semaphores,
)
from shm.semaphores import wait as wait_semaphore

KIND = b"ring"
POLL_INTERVAL = 0.1
_TOKEN_CAP = 1 << 20
_CAPACITY, _ITEMSIZE, _DTYPE_CRC = 0, 1, 2
_HEAD, _TAIL = 8, 16
_PRODUCER_PID, _PRODUCER_STATE, _PRODUCER_NOTE = 24, 25, 26
_CONSUMER_PID, _CONSUMER_STATE = 32, 33
_DESCR_OFFSET, _RECORDS_OFFSET = 512, 1024
OPEN, CLOSED, ABORTED = 0, 1, 2
PRODUCER, CONSUMER = "producer", "consumer"
_SLOTS = {PRODUCER: (_PRODUCER_PID, _PRODUCER_STATE), CONSUMER: (_CONSUMER_PID, _CONSUMER_STATE)}


class RingTimeout(ShmTimeout):
    """A ring call reached its timeout; ``done`` records were pushed before it did."""

    def __init__(self, message: str, *, done: int = 0) -> None:
        super().__init__(message)
        self.done = done


def _dtype_crc(dtype: np.dtype) -> int:
    return zlib.crc32(repr(dtype.descr).encode())


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.itemsize == 0:
        raise TypeError(f"ring records need a fixed-size dtype without objects, not {dtype}")
    return dtype


_SEMAPHORES = ("items", "spaces")


class Ring(SemaphoreSegment):
    """SPSC ring of numpy records in one segment. Use ``create`` or ``attach``."""

    SEMAPHORES = _SEMAPHORES

    def __init__(self, segment: Segment, dtype: np.dtype, items: posix_ipc.Semaphore,
                 spaces: posix_ipc.Semaphore, role: str | None) -> None:
        self.segment = segment
        self.dtype = dtype
        self.capacity = segment.geometry[0]
        self._items, self._spaces = items, spaces
        self._hdr = memoryview(segment.payload[:_DESCR_OFFSET]).cast("Q")
        # Records move as raw bytes (a void dtype copies with memcpy, padding included).
        self._void = np.dtype((np.void, dtype.itemsize))
        self._records = segment.ndarray(self._void, _RECORDS_OFFSET, self.capacity)
        self._role: str | None = None
        self._pid = os.getpid()
        self._closed = False
        if role is not None:
            self._claim(role)

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def role(self) -> str | None:
        return self._role

    @classmethod
    def create(cls, name: str, dtype, capacity: int, *, role: str | None = None) -> Ring:
        """Create ring ``name`` for ``capacity`` records of ``dtype``; the caller owns it."""
        dtype = _check_dtype(dtype)
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ring capacity must be a positive int, not {capacity!r}")
        descr = repr(dtype.descr).encode()[:_RECORDS_OFFSET - _DESCR_OFFSET]
        segment = Segment.create(name, _RECORDS_OFFSET + capacity * dtype.itemsize, kind=KIND,
                                 geometry=(capacity, dtype.itemsize, _dtype_crc(dtype)))
        sems = []
        try:
            hdr = segment.ndarray("<u8", 0, 3)
            hdr[:] = segment.geometry
            del hdr
            segment.payload[_DESCR_OFFSET:_DESCR_OFFSET + len(descr)] = descr
            sems = create_semaphores(name, _SEMAPHORES)
            return cls(segment, dtype, *sems, role)
        except BaseException:
            if sems:
                close_semaphores(sems)
                unlink_semaphores(name, _SEMAPHORES)
            segment.close()
            segment.unlink()
            raise

    @classmethod
    def attach(cls, name: str, dtype, *, role: str | None = None) -> Ring:
        """Attach ring ``name``; ``ShmError`` unless it carries records of exactly ``dtype``."""
        dtype = _check_dtype(dtype)
        segment = Segment.attach(name, kind=KIND)
        sems = []
        try:
            geo = segment.geometry
            if len(geo) != 3 or geo[1:] != (dtype.itemsize, _dtype_crc(dtype)):
                raw = bytes(segment.payload[_DESCR_OFFSET:_RECORDS_OFFSET])
                theirs = raw.rstrip(b"\x00").decode(errors="replace")
                raise ShmError(f"ring {name} carries records {theirs}, not {dtype.descr}",
                               hint="both ends must use the same record dtype")
            sems = attach_semaphores(name, _SEMAPHORES, "ring")
            return cls(segment, dtype, *sems, role)
        except BaseException:
            close_semaphores(sems)
            segment.close()
            raise

    # -- roles and peers ---------------------------------------------------------------------

    def _claim(self, role: str) -> None:
        if role not in _SLOTS:
            raise ValueError(f"role must be {PRODUCER!r} or {CONSUMER!r}, not {role!r}")
        if self._role is not None:
            if self._role != role:
                raise ValueError(f"this end of ring {self.name} is the {self._role}")
            return
        pid_slot, state_slot = _SLOTS[role]
        current = self._hdr[pid_slot]
        if self._hdr[state_slot] != OPEN:
            raise ShmError(f"the {role} of ring {self.name} has already left")
        if current not in (0, self._pid) and pid_alive(current):
            raise ShmError(f"ring {self.name} already has a {role} (pid {current})")
        self._hdr[pid_slot] = self._pid
        self._role = role

    def _check_peer(self) -> None:
        """Raise PeerGone if the other end left or died, or the ring's owner died."""
        peer = CONSUMER if self._role == PRODUCER else PRODUCER
        pid_slot, state_slot = _SLOTS[peer]
        if self._hdr[state_slot] == ABORTED:
            raise PeerGone(f"the {peer} of ring {self.name} left before the end of the stream")
        pid = self._hdr[pid_slot]
        if pid and pid != self._pid and not pid_alive(pid):
            raise PeerGone(f"the {peer} of ring {self.name} (pid {pid}) died")
        owner = self.segment.owner_pid
        if owner != self._pid and not pid_alive(owner):
            raise PeerGone(f"the owner of ring {self.name} (pid {owner}) died")

    def _wait(self, sem: posix_ipc.Semaphore, deadline: float | None, what: str,
              done: int = 0) -> None:
        """Sleep until a token arrives or POLL_INTERVAL passes; check the peer on timeouts."""
        wait = POLL_INTERVAL
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                self._check_peer()
                raise RingTimeout(f"timed out waiting for {what} on ring {self.name}", done=done)
        if not wait_semaphore(sem, wait):   # a timeout, or a signal whose handler returned
            self._check_peer()

    @staticmethod
    def _post(sem: posix_ipc.Semaphore) -> None:
        if sem.value < _TOKEN_CAP:
            sem.release()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"ring {self.name} is closed")

    # -- data --------------------------------------------------------------------------------

    def push(self, records: np.ndarray, timeout: float | None = None) -> None:
        """Append all ``records`` (an array of the ring's dtype), blocking while the ring is
        full. ``RingTimeout`` (with ``done``) at ``timeout``; ``PeerGone`` if the consumer left.
        """
        self._check_open()
        self._claim(PRODUCER)
        records = np.asarray(records)
        if records.dtype != self.dtype:
            raise TypeError(f"ring {self.name} carries {self.dtype}, not {records.dtype}")
        records = np.ascontiguousarray(records.reshape(-1)).view(self._void)
        if self._hdr[_PRODUCER_STATE] != OPEN:
            raise ValueError(f"push after close_write on ring {self.name}")
        hdr, ring, cap = self._hdr, self._records, self.capacity
        deadline = None if timeout is None else time.monotonic() + timeout
        total, done = len(records), 0
        head = hdr[_HEAD]
        while done < total:
            if hdr[_CONSUMER_STATE] != OPEN:
                raise PeerGone(f"the consumer of ring {self.name} left")
            free = cap - (head - hdr[_TAIL])
            if free == 0:
                self._wait(self._spaces, deadline, "space", done)
                continue
            n = min(free, total - done)
            start = head % cap
            first = min(n, cap - start)
            ring[start:start + first] = records[done:done + first]
            if first < n:
                ring[:n - first] = records[done + first:done + n]
            head += n
            hdr[_HEAD] = head  # publish only after the records are in place
            self._post(self._items)
            done += n

    def pop(self, max_n: int, timeout: float | None = None) -> np.ndarray:
        """Take 1 to ``max_n`` records (a copy), blocking while the ring is empty; an empty array
        once the producer closed the stream and the ring is drained."""
        self._check_open()
        self._claim(CONSUMER)
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, not {max_n}")
        hdr, ring, cap = self._hdr, self._records, self.capacity
        deadline = None if timeout is None else time.monotonic() + timeout
        tail = hdr[_TAIL]
        while True:
            available = hdr[_HEAD] - tail
            if available:
                break
            state = hdr[_PRODUCER_STATE]
            if state == CLOSED:
                if hdr[_HEAD] - tail:  # records published just before the close
                    continue
                return np.empty(0, self.dtype)
            if state == ABORTED:
                self._check_peer()
            self._wait(self._items, deadline, "records")
        n = min(available, max_n)
        start = tail % cap
        first = min(n, cap - start)
        if first == n:
            out = ring[start:start + n].copy()
        else:
            out = np.concatenate((ring[start:], ring[:n - first]))
        hdr[_TAIL] = tail + n  # release the slots only after copying them out
        self._post(self._spaces)
        return out.view(self.dtype)

    def note(self, value: int) -> None:
        """Publish a counter beside the records (the producer's, e.g. bytes done so far), for
        anyone who ``peek_note``s: one 8-byte store, one writer, read without a wait."""
        self._check_open()
        self._hdr[_PRODUCER_NOTE] = value

    def peek_note(self) -> int:
        """The producer's last ``note`` (0 before any)."""
        self._check_open()
        return self._hdr[_PRODUCER_NOTE]

    def close_write(self) -> None:
        """End the stream: the consumer drains what is left, then pops empty arrays."""
        self._check_open()
        self._claim(PRODUCER)
        self._hdr[_PRODUCER_STATE] = CLOSED
        self._items.release()

    @property
    def readable(self) -> int:
        """Records waiting in the ring."""
        self._check_open()
        return self._hdr[_HEAD] - self._hdr[_TAIL]

    @property
    def writable(self) -> int:
        """Free record slots."""
        return self.capacity - self.readable

    @property
    def at_end(self) -> bool:
        """True once the producer closed the stream and every record was popped."""
        self._check_open()
        return self._hdr[_PRODUCER_STATE] == CLOSED and self.readable == 0

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Detach (idempotent). A producer that did not ``close_write``, or any consumer, marks
        itself gone so that the peer gets ``PeerGone`` instead of waiting."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._role == PRODUCER and self._hdr[_PRODUCER_STATE] == OPEN:
                self._hdr[_PRODUCER_STATE] = ABORTED
                self._items.release()
            elif self._role == CONSUMER:
                self._hdr[_CONSUMER_STATE] = ABORTED
                self._spaces.release()
        finally:
            self._hdr.release()
            self._records = None
            self._items.close()
            self._spaces.close()
            self.segment.close()

    def __repr__(self) -> str:
        return f"<Ring {self.name} {self.capacity} x {self.dtype} {self._role or 'unclaimed'}>"
