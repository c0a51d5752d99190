"""The shared table of an exported soft PD: which MRs exist, and who holds imports of them.

One POSIX shared-memory segment per exported PD, named ``/rdp-<id>-<ownerpid>-verbs.pd`` (so
``shm.naming.sweep`` removes it once the owner is dead); the owner unlinks it when the PD closes.
It holds a header and a fixed array of MR entries (state, keys, address, length, access).

Import counts are kernel byte-range locks: an importer holds an open-file-description (OFD) read
lock on the bytes of each MR entry it imported; the registrant frees an entry only after taking
a non-blocking write lock on it, so a deregistration while any process holds an import fails
with EBUSY, and an importer that dies releases its hold without help. Entry allocation is
serialised by a write lock on the header. Every ``PDTable`` opens its own file description, so
the locks also separate an exporter from an importer living in the same process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

import numpy as np

from shm.errors import TransportError
from shm.naming import SHM_DIR, new_run_id, segment_name
from stages.verbs.soft.memory import FileMapping, view

MAGIC = b"RDPVPD01"
HEADER = struct.Struct("<8sIII")  # magic, layout version, capacity, owner pid
LAYOUT = 1
CAPACITY = 1 << 16  # MRs per exported PD; the file is sparse, so unused entries cost nothing
ENTRIES = 4096  # byte offset of entry 0
ENTRY = np.dtype([("state", "<u4"), ("lkey", "<u4"), ("rkey", "<u4"), ("access", "<u4"),
                  ("addr", "<u8"), ("length", "<u8"), ("pid", "<u4"), ("gen", "<u4"),
                  ("pad", "<u8", 3)])
FREE, LIVE = 0, 1
_FLOCK = "hhqqi4x"


def _lock(fd: int, kind: int, start: int, length: int, *, wait: bool) -> bool:
    """Take (or with F_UNLCK drop) an OFD lock; False if ``wait`` is off and it is held."""
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class PDTable:
    """One process's view of a PD table (its own file description, its own holds)."""

    def __init__(self, name: str, fd: int, owner: bool) -> None:
        self.name = name
        self.owner = owner
        self._fd = fd
        self._mutex = threading.Lock()
        self._holds: dict[int, int] = {}
        self._cursor = 0  # where the search for a free entry starts (see _free_slots)
        # A raw mapping (not mmap.mmap): numpy views of it can never block the unmap in close().
        self._map = FileMapping(SHM_DIR + name, 0, ENTRIES + CAPACITY * ENTRY.itemsize)
        raw = view(self._map.address, ENTRIES + CAPACITY * ENTRY.itemsize)
        self._entries = np.frombuffer(raw, ENTRY, CAPACITY, ENTRIES)
        self.owner_pid = HEADER.unpack_from(raw)[3]

    @classmethod
    def create(cls) -> PDTable:
        name = segment_name(new_run_id(), "verbs.pd")
        path = SHM_DIR + name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, ENTRIES + CAPACITY * ENTRY.itemsize)
            os.pwrite(fd, HEADER.pack(MAGIC, LAYOUT, CAPACITY, os.getpid()), 0)
            return cls(name, fd, owner=True)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise

    @classmethod
    def open(cls, name: str) -> PDTable:
        try:
            fd = os.open(SHM_DIR + name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TransportError(f"exported PD {name} does not exist (its owner closed it or "
                                 "died)", errno=errno.ENOENT) from None
        head = os.pread(fd, HEADER.size, 0)
        if len(head) < HEADER.size or HEADER.unpack(head)[:3] != (MAGIC, LAYOUT, CAPACITY):
            os.close(fd)
            raise TransportError(f"{name} is not a soft-provider PD table", errno=errno.EINVAL)
        return cls(name, fd, owner=False)

    def _entry_range(self, slot: int) -> tuple[int, int]:
        return ENTRIES + slot * ENTRY.itemsize, ENTRY.itemsize

    def _check(self) -> None:
        if self._fd < 0:
            raise TransportError(f"PD table {self.name} is closed", errno=errno.EBADF)

    def add(self, lkey: int, rkey: int, access: int, addr: int, length: int) -> int:
        """Record a live MR; returns its slot."""
        return int(self.add_many([(lkey, rkey, access, addr, length)])[0])

    def add_many(self, mrs: list[tuple[int, int, int, int, int]]) -> np.ndarray:
        """Record live MRs, each ``(lkey, rkey, access, addr, length)``, under one header lock;
        returns their slots (in order). All or none: ENOSPC leaves the table as it was."""
        with self._mutex:
            self._check()
            _lock(self._fd, fcntl.F_WRLCK, 0, 1, wait=True)
            try:
                slots = self._free_slots(len(mrs))
                if len(slots) < len(mrs):
                    raise TransportError(f"PD table {self.name} is full ({CAPACITY} MRs)",
                                         errno=errno.ENOSPC)
                rows = np.array(mrs, dtype=np.uint64).reshape(len(mrs), 5)
                entries = self._entries
                entries["lkey"][slots] = rows[:, 0]
                entries["rkey"][slots] = rows[:, 1]
                entries["access"][slots] = rows[:, 2]
                entries["addr"][slots] = rows[:, 3]
                entries["length"][slots] = rows[:, 4]
                entries["pid"][slots] = os.getpid()
                entries["gen"][slots] += 1
                entries["state"][slots] = LIVE     # last: an entry is read only once LIVE
                if len(slots):
                    self._cursor = int(slots[-1]) + 1
                return slots
            finally:
                _lock(self._fd, fcntl.F_UNLCK, 0, 1, wait=True)

    def _free_slots(self, n: int) -> np.ndarray:
        """Up to ``n`` FREE slots, from this view's cursor on and wrapping once (the header
        lock is held). Slots are taken in order, so the next free one is usually right at the
        cursor: a search reads a window near it instead of the whole table."""
        state = self._entries["state"]
        found: list[np.ndarray] = []
        have, pos, scanned = 0, self._cursor % CAPACITY, 0
        while have < n and scanned < CAPACITY:
            width = min(max(256, 2 * (n - have)), CAPACITY - pos, CAPACITY - scanned)
            free = np.flatnonzero(state[pos:pos + width] == FREE)[:n - have] + pos
            found.append(free)
            have += len(free)
            scanned += width
            pos = (pos + width) % CAPACITY
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def remove(self, slot: int) -> None:
        """Free a slot, unless some process holds an import of it (TransportError EBUSY)."""
        start, length = self._entry_range(slot)
        with self._mutex:
            self._check()
            if not _lock(self._fd, fcntl.F_WRLCK, start, length, wait=False):
                raise TransportError(
                    "cannot deregister the MR: another process still holds an import of it",
                    errno=errno.EBUSY, hint="close the importer's MR (un-import) first")
            self._entries[slot]["state"] = FREE
            _lock(self._fd, fcntl.F_UNLCK, start, length, wait=True)

    def hold(self, slot: int, lkey: int, rkey: int, addr: int, length: int) -> None:
        """Hold an import of ``slot``, checking it still is the MR the handle describes."""
        if not 0 <= slot < CAPACITY:
            raise TransportError(f"MR slot {slot} out of range", errno=errno.EINVAL)
        start, size = self._entry_range(slot)
        with self._mutex:
            self._check()
            if self._holds.get(slot, 0) == 0:
                _lock(self._fd, fcntl.F_RDLCK, start, size, wait=True)
            entry = self._entries[slot]
            if (int(entry["state"]), int(entry["lkey"]), int(entry["rkey"]), int(entry["addr"]),
                    int(entry["length"])) != (LIVE, lkey, rkey, addr, length):
                if self._holds.get(slot, 0) == 0:
                    _lock(self._fd, fcntl.F_UNLCK, start, size, wait=True)
                raise TransportError("the exported MR was deregistered", errno=errno.ENOENT)
            self._holds[slot] = self._holds.get(slot, 0) + 1

    def release(self, slot: int) -> None:
        """Drop one hold taken by ``hold``."""
        with self._mutex:
            if self._fd < 0:
                return  # closing the file already dropped every hold
            left = self._holds.get(slot, 0) - 1
            if left > 0:
                self._holds[slot] = left
                return
            self._holds.pop(slot, None)
            start, size = self._entry_range(slot)
            _lock(self._fd, fcntl.F_UNLCK, start, size, wait=True)

    def close(self) -> None:
        """Close this view; the owner also unlinks the segment. Idempotent."""
        with self._mutex:
            if self._fd < 0:
                return
            self._entries = None
            self._map.close()
            os.close(self._fd)  # drops every lock of this file description
            self._fd = -1
            if self.owner:
                try:
                    os.unlink(SHM_DIR + self.name)
                except FileNotFoundError:
                    pass
