"""A cursor over wire bytes, in network byte order (the aioquic ``Buffer`` idea).

Invariants:
- every integer goes through a precompiled ``struct.Struct`` with a ``>`` format, so byte order
  is decided in one place;
- ``pull_*`` never moves the cursor unless it returns: a short read raises
  :class:`BufferReadError` and leaves ``tell()`` where it was;
- ``push_*`` writes at the cursor and grows the buffer when it must, so an encoder may size it
  exactly (``Buffer(capacity=n)``) or not at all.

``BufferReadError`` is a :class:`~shm.errors.RemoteProtocolError`: bytes that end too soon
came from a peer (or a capture), and the codec lets no other exception out.
"""

from __future__ import annotations

import struct

from shm.errors import RemoteProtocolError

__all__ = ["Buffer", "BufferReadError", "U8", "U16", "U32", "U64"]

U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class BufferReadError(RemoteProtocolError):
    """A pull asked for more bytes than the buffer holds after the cursor."""


class Buffer:
    """Read (``data=``) or write (``capacity=``) wire bytes at a cursor.

    A buffer made from ``data`` reads it without copying; one made with ``capacity`` starts
    empty (zero-filled) and grows on push. ``data`` returns the bytes written so far
    (up to the furthest push, i.e. ``len(buffer)``).
    """

    __slots__ = ("_data", "_pos", "_end", "_writable")

    def __init__(self, data: bytes | bytearray | memoryview | None = None, *,
                 capacity: int = 0) -> None:
        if data is not None:
            if capacity:
                raise ValueError("give data or capacity, not both")
            self._data: bytes | bytearray | memoryview = data
            self._end = len(data)
            self._writable = False
        else:
            if capacity < 0:
                raise ValueError(f"capacity must be >= 0, got {capacity}")
            self._data = bytearray(capacity)
            self._end = 0
            self._writable = True
        self._pos = 0

    # -- cursor ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._end

    def tell(self) -> int:
        """The cursor, in bytes from the start."""
        return self._pos

    def seek(self, pos: int) -> None:
        """Move the cursor to ``pos`` (0 <= pos <= len)."""
        if not 0 <= pos <= self._end:
            raise BufferReadError(f"seek to {pos} outside the buffer of {self._end} bytes")
        self._pos = pos

    @property
    def remaining(self) -> int:
        """Bytes after the cursor."""
        return self._end - self._pos

    def eof(self) -> bool:
        """True when the cursor is at the end."""
        return self._pos >= self._end

    @property
    def data(self) -> bytes:
        """A copy of the bytes of the buffer (written so far, or all of the data read)."""
        if self._end == len(self._data):
            return bytes(self._data)            # one copy, not a slice and a copy
        return bytes(self._data[:self._end])

    # -- pull -----------------------------------------------------------------------------------
    def _need(self, n: int, what: str) -> int:
        pos = self._pos
        if n > self._end - pos:
            raise BufferReadError(
                f"{what}: need {n} bytes at offset {pos}, only {self._end - pos} left")
        return pos

    def pull_struct(self, st: struct.Struct, what: str = "record") -> tuple:
        """Unpack one ``st`` at the cursor and advance past it."""
        pos = self._need(st.size, what)
        values = st.unpack_from(self._data, pos)
        self._pos = pos + st.size
        return values

    def pull_u8(self) -> int:
        return self.pull_struct(U8, "u8")[0]

    def pull_u16(self) -> int:
        return self.pull_struct(U16, "be16")[0]

    def pull_u32(self) -> int:
        return self.pull_struct(U32, "be32")[0]

    def pull_u64(self) -> int:
        return self.pull_struct(U64, "be64")[0]

    def pull_bytes(self, n: int, what: str = "bytes") -> bytes:
        """The next ``n`` bytes, copied."""
        if n < 0:
            raise ValueError(f"cannot pull {n} bytes")
        pos = self._need(n, what)
        self._pos = pos + n
        return bytes(self._data[pos:pos + n])

    # -- push -----------------------------------------------------------------------------------
    def _reserve(self, n: int) -> int:
        if not self._writable:
            raise TypeError("this Buffer was made from data and is read-only")
        pos = self._pos
        need = pos + n - len(self._data)
        if need > 0:
            self._data.extend(bytes(need))  # type: ignore[union-attr]
        self._pos = pos + n
        if self._pos > self._end:
            self._end = self._pos
        return pos

    def push_struct(self, st: struct.Struct, *values: int) -> None:
        """Pack ``values`` with ``st`` at the cursor and advance past them."""
        st.pack_into(self._data, self._reserve(st.size), *values)

    def push_u8(self, value: int) -> None:
        self.push_struct(U8, value)

    def push_u16(self, value: int) -> None:
        self.push_struct(U16, value)

    def push_u32(self, value: int) -> None:
        self.push_struct(U32, value)

    def push_u64(self, value: int) -> None:
        self.push_struct(U64, value)

    def push_bytes(self, value: bytes | bytearray | memoryview) -> None:
        n = len(value)
        pos = self._reserve(n)
        self._data[pos:pos + n] = value  # type: ignore[index]
