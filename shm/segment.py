"""Named POSIX shared-memory segments with a checked header.

A segment is ``posix_ipc.SharedMemory`` mapped with ``mmap``; the file descriptor is closed right
after mapping. It starts with a 4096-byte header so that the payload is page-aligned:

    0   magic        8s   b"RDPSHM\\0\\1", written last so a half-made header never matches
    8   version      u32  LAYOUT_VERSION
    12  header size  u32  HEADER_SIZE
    16  kind         16s  what the payload is (b"ram", b"ring", ...), NUL-padded
    32  owner pid    u64  the creating process, which alone unlinks
    40  payload size u64  bytes after the header
    48  n_geometry   u32  then n_geometry little-endian u64 at offset 56
    56  geometry     the numbers that fix the payload's layout (ring capacity, block sizes, ...)

Invariants: one owner (the creator) unlinks; attachers only close. posix_ipc registers nothing
with multiprocessing's resource tracker, so an attaching process never unlinks a segment at exit
(Python 3.11's ``shared_memory.SharedMemory`` would). Creation only ftruncates: no page of the
payload is touched, so an 8 GiB guest costs nothing until it is written. ``close`` unmaps when
no numpy view of the mapping is alive; otherwise the mapping stays until the last view dies
(unmapping under a live view would crash the process).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

import numpy as np
import posix_ipc

from shm.errors import ShmError
from shm.memory import PAGE_SIZE
from shm.naming import SHM_DIR

MAGIC = b"RDPSHM\x00\x01"
LAYOUT_VERSION = 1
HEADER_SIZE = PAGE_SIZE      # so that the payload is page-aligned
_FIXED = struct.Struct("<8sII16sQQI4x")
MAX_GEOMETRY = (HEADER_SIZE - _FIXED.size) // 8


class PeerGone(ShmError):
    """The process at the other end of a ring or dirty log died or left."""


class ShmTimeout(ShmError):
    """A blocking shared-memory call reached its timeout."""


def _kind_bytes(kind: bytes) -> bytes:
    if not isinstance(kind, bytes) or not 0 < len(kind) <= 16 or b"\x00" in kind:
        raise ValueError(f"kind must be 1-16 bytes without NUL, not {kind!r}")
    return kind


class Segment:
    """One named shared-memory segment: header plus payload. Use ``create`` or ``attach``."""

    def __init__(self, name: str, shm_mmap: mmap.mmap, *, owner: bool, kind: bytes,
                 geometry: tuple[int, ...], payload_size: int, owner_pid: int) -> None:
        self.name = name
        self.owner = owner
        self.kind = kind
        self.geometry = geometry
        self.owner_pid = owner_pid
        self.size = payload_size
        self._mmap: mmap.mmap | None = shm_mmap
        self.payload: memoryview | None = memoryview(shm_mmap)[HEADER_SIZE:HEADER_SIZE
                                                                 + payload_size]
        # The VA of the mapping; the ctypes object pins the buffer, so drop it at once.
        pin = ctypes.c_char.from_buffer(shm_mmap)
        self.address = ctypes.addressof(pin) + HEADER_SIZE
        del pin
        self._unlinked = False

    @property
    def path(self) -> str:
        """Where the segment shows in the file system."""
        return os.path.join(SHM_DIR, self.name.lstrip("/"))

    @property
    def closed(self) -> bool:
        return self._mmap is None

    @classmethod
    def create(cls, name: str, size: int, *, kind: bytes,
               geometry: tuple[int, ...] = ()) -> Segment:
        """Create segment ``name`` with ``size`` payload bytes; the caller becomes its owner."""
        kind = _kind_bytes(kind)
        geometry = tuple(int(g) for g in geometry)
        if len(geometry) > MAX_GEOMETRY or any(not 0 <= g < 1 << 64 for g in geometry):
            raise ValueError(f"geometry must be at most {MAX_GEOMETRY} u64 values")
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        total = HEADER_SIZE + size
        _check_capacity(name, total)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=total)
        except posix_ipc.ExistentialError as exc:
            raise ShmError(f"shared-memory segment {name} already exists",
                           hint="another run uses this name; `rdma-pipeline cleanup` "
                                "removes those of dead runs") from exc
        except (OSError, posix_ipc.Error) as exc:
            raise ShmError(f"cannot create shared-memory segment {name}: {exc}") from exc
        try:
            mm = mmap.mmap(shm.fd, total)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        shm.close_fd()
        pid = os.getpid()
        _FIXED.pack_into(mm, 0, b"\x00" * 8, LAYOUT_VERSION, HEADER_SIZE, kind, pid, size,
                         len(geometry))
        struct.pack_into(f"<{len(geometry)}Q", mm, _FIXED.size, *geometry)
        mm[0:8] = MAGIC
        return cls(name, mm, owner=True, kind=kind, geometry=geometry, payload_size=size,
                   owner_pid=pid)

    @classmethod
    def attach(cls, name: str, *, kind: bytes,
               geometry: tuple[int, ...] | None = None) -> Segment:
        """Map an existing segment; ``ShmError`` unless its header says ``kind`` (and
        ``geometry``, when given)."""
        kind = _kind_bytes(kind)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise ShmError(f"no shared-memory segment {name}",
                           hint="its owner may have exited and unlinked it") from exc
        except (OSError, posix_ipc.Error) as exc:
            raise ShmError(f"cannot open shared-memory segment {name}: {exc}") from exc
        try:
            if shm.size < HEADER_SIZE:
                raise ShmError(f"{name} is {shm.size} bytes, too small for an rdma-pipeline "
                               "segment header")
            mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        try:
            return cls._check(name, mm, kind, geometry)
        except BaseException:
            mm.close()
            raise

    @classmethod
    def _check(cls, name: str, mm: mmap.mmap, kind: bytes,
               geometry: tuple[int, ...] | None) -> Segment:
        magic, version, hsize, got_kind, pid, size, n_geo = _FIXED.unpack_from(mm, 0)
        if magic != MAGIC:
            raise ShmError(f"{name} is not an rdma-pipeline segment (magic {magic!r})")
        if version != LAYOUT_VERSION or hsize != HEADER_SIZE:
            raise ShmError(f"{name} has layout version {version} (header {hsize} bytes); this "
                           f"build reads version {LAYOUT_VERSION}",
                           hint="run the same rdma-pipeline version in every process")
        got_kind = got_kind.rstrip(b"\x00")
        if got_kind != kind:
            raise ShmError(f"{name} holds {got_kind.decode(errors='replace')!r}, "
                           f"expected {kind.decode()!r}")
        if n_geo > MAX_GEOMETRY or HEADER_SIZE + size > len(mm):
            raise ShmError(f"{name} has a corrupt header: payload {size} bytes, "
                           f"{n_geo} geometry values, file {len(mm)} bytes")
        got = struct.unpack_from(f"<{n_geo}Q", mm, _FIXED.size)
        if geometry is not None and tuple(geometry) != got:
            raise ShmError(f"{name} has geometry {got}, expected {tuple(geometry)}")
        return cls(name, mm, owner=False, kind=kind, geometry=got, payload_size=size,
                   owner_pid=pid)

    def ndarray(self, dtype: np.dtype | str, offset: int = 0, count: int = -1) -> np.ndarray:
        """A numpy view of ``count`` items of ``dtype`` at payload byte ``offset``."""
        if self._mmap is None:
            raise ValueError(f"segment {self.name} is closed")
        dtype = np.dtype(dtype)
        if count < 0:
            count = (self.size - offset) // dtype.itemsize
        if offset < 0 or offset + count * dtype.itemsize > self.size:
            raise ValueError(f"{count} x {dtype} at {offset} exceeds the {self.size}-byte "
                             f"payload of {self.name}")
        return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=HEADER_SIZE + offset)

    def close(self) -> None:
        """Unmap (idempotent). The segment stays in /dev/shm until its owner unlinks it."""
        if self._mmap is None:
            return
        mm, self._mmap = self._mmap, None
        payload, self.payload = self.payload, None
        try:
            payload.release()
            mm.close()
        except BufferError:
            pass  # a numpy view still maps it: the mapping goes when the last view dies

    def unlink(self) -> None:
        """Remove the name from /dev/shm (owner only, idempotent). Mappings stay valid."""
        if not self.owner:
            raise ValueError(f"only the owner (pid {self.owner_pid}) unlinks {self.name}")
        if self._unlinked:
            return
        self._unlinked = True
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass  # swept already

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc) -> None:
        """Close, and for the owner also unlink: the ``with`` block is the segment's life."""
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.size} bytes"
        role = "owner" if self.owner else "attached"
        return f"<Segment {self.name} {self.kind.decode()} {state} {role}>"


def _check_capacity(name: str, total: int) -> None:
    """Refuse a segment larger than /dev/shm can ever hold: touching it would raise SIGBUS."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return
    capacity = st.f_blocks * st.f_frsize
    if capacity and total > capacity:
        raise ShmError(f"segment {name} needs {total} bytes but {SHM_DIR} holds at most "
                       f"{capacity}", hint=f"enlarge the tmpfs: mount -o remount,size=... "
                                            f"{SHM_DIR}")
