"""The QEMUFile layer over RDMA, sans-IO: the stream cut into QEMU FILE payloads and put back.

``StreamWriter`` buffers stream bytes and ``flush()`` cuts them into payloads of at most 32768
bytes (RDMA_SEND_INCREMENT). ``StreamReader`` takes payloads as they arrive and parses them
(``parser.StreamParser``) into ``records`` events.

Invariants:
- a HOOK record always ends its payload: after ``hook()`` nothing may be written until
  ``flush()`` has cut the payload that ends with it;
- no other payload ends with the 8 bytes of a HOOK record (a cut that would is moved one byte
  earlier), so "the payload ends with be64(0x80)" is exactly "it ends with a HOOK": the source's
  ``ControlChannel`` opens the registration window on it;
- the reader refuses a HOOK that does not end its payload (bytes after it would be read by the
  stream while the destination sits in its registration loop).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping

from pipeline.protocol.messages import QEMU_FILE_MAX
from pipeline.protocol.parser import NEED_DATA, DeviceCodec, StreamParser
from pipeline.protocol.records import (
    HOOK_RECORD,
    PAGE_SIZE,
    Event,
    Hook,
    Page,
    ZeroPage,
    encode_event,
)
from shm.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["StreamWriter", "StreamReader"]


class StreamWriter:
    """Buffer migration-stream bytes; ``flush()`` returns them as QEMU FILE payloads."""

    def __init__(self, *, max_payload: int = QEMU_FILE_MAX, page_size: int = PAGE_SIZE) -> None:
        if not len(HOOK_RECORD) < max_payload <= QEMU_FILE_MAX:
            raise ValueError(f"max_payload {max_payload}: must be 9..{QEMU_FILE_MAX}")
        self.max_payload = max_payload
        self.page_size = page_size
        self._buf = bytearray()
        self._hooked = False
        self._last_block: str | None = None
        self.bytes_written = 0

    @property
    def pending(self) -> int:
        """Bytes written and not flushed yet."""
        return len(self._buf)

    @property
    def hook_pending(self) -> bool:
        """A HOOK was written; ``flush()`` must come before anything else."""
        return self._hooked

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append raw stream bytes."""
        if self._hooked:
            raise LocalProtocolError(
                "StreamWriter cannot write after hook() before flush(): the HOOK record must "
                "end its QEMU FILE message")
        self._buf += data
        self.bytes_written += len(data)

    def write_event(self, event: Event) -> None:
        """Append the bytes of one record (``Hook()`` is the same as ``hook()``)."""
        if isinstance(event, Hook):
            self.hook()
        else:
            self.write(encode_event(event, self.page_size))

    def hook(self) -> None:
        """Write RAM_SAVE_FLAG_HOOK: the next ``flush()`` ends a payload right after it."""
        self.write(HOOK_RECORD)
        self._hooked = True

    def page(self, block: str, offset: int, data: bytes) -> None:
        """A PAGE record, with CONTINUE when ``block`` is the block of the previous page."""
        self.write(encode_event(Page(block, offset, bytes(data), block == self._last_block),
                                self.page_size))
        self._last_block = block

    def zero_page(self, block: str, offset: int) -> None:
        """A ZERO record (fill 0), with CONTINUE like ``page``."""
        self.write(encode_event(ZeroPage(block, offset, 0, block == self._last_block),
                                self.page_size))
        self._last_block = block

    def flush(self) -> list[bytes]:
        """Everything buffered, cut into payloads of at most ``max_payload`` bytes."""
        buf, out, start, end = self._buf, [], 0, len(self._buf)
        hook_len = len(HOOK_RECORD)
        while start < end:
            stop = min(start + self.max_payload, end)
            if self._hooked and stop < end and end - stop < hook_len:
                stop = end - hook_len          # the HOOK stays whole, in the last payload
            is_hook = self._hooked and stop == end
            # Only a HOOK may end a payload with the HOOK's 8 bytes (see the invariants).
            tail = buf[stop - hook_len:stop] if stop - start >= hook_len else b""
            if not is_hook and tail == HOOK_RECORD:
                stop -= 1
            out.append(bytes(buf[start:stop]))
            start = stop
        self._buf = bytearray()
        self._hooked = False
        return out


class StreamReader:
    """Reassemble QEMU FILE payloads into the stream and parse it into events (``describe``:
    device sections no codec knows are read by the stream's VMDESCRIPTION, see the parser)."""

    def __init__(self, devices: Mapping[str, DeviceCodec] | None = None, *,
                 page_size: int = PAGE_SIZE, describe: bool = False) -> None:
        self.parser = StreamParser(devices, page_size=page_size, describe=describe)
        self._ends: deque[int] = deque()      # stream offsets where fed payloads end
        self._error: RemoteProtocolError | None = None
        self.bytes_received = 0
        self.payloads = 0

    def feed(self, payload: bytes | bytearray | memoryview) -> None:
        """One QEMU FILE payload, in arrival order."""
        self._check()
        if not payload:
            return
        self.parser.feed(payload)
        self.bytes_received += len(payload)
        self.payloads += 1
        self._ends.append(self.bytes_received)

    def next_event(self):
        """The next event, or ``parser.NEED_DATA`` until the next payload."""
        self._check()
        event = self.parser.next_event()
        if isinstance(event, Hook):
            at = self.parser.offset
            while self._ends and self._ends[0] < at:
                self._ends.popleft()
            if not self._ends or self._ends[0] != at:
                left = (self._ends[0] - at) if self._ends else 0
                self._error = RemoteProtocolError(
                    f"HOOK record ending at stream offset {at} is followed by {left} more "
                    "bytes in its QEMU FILE message: HOOK must end its message")
                raise self._error
        return event

    def events(self) -> Iterator[Event]:
        """Every event parseable from the payloads fed so far."""
        while (event := self.next_event()) is not NEED_DATA:
            yield event

    def end_of_stream(self) -> None:
        """No more payloads will come: refuse a stream cut short."""
        self._check()
        self.parser.end_of_stream()

    def _check(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(str(self._error))
