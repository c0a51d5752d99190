"""The return path of a stream migration (``tcp:``): the destination's messages to the source.

QEMU's destination answers on the same connection (migration.c ``migrate_send_rp_message``):
be16 message type, be16 length, then the data. We use QEMU's message for "done":
``MIG_RP_MSG_SHUT`` (1) with a be32 that is 0 when the migration completed (for us: the RAM
verified and the guest resumed) and non-zero when it failed; and, on failure only, just before
it, our ``X_ERROR`` (0x7e01: the reason, UTF-8), so the source can say why in its one line
(QEMU's source would refuse the unknown type, on a migration that is failing anyway).
``ReturnPathReader`` is sans-IO: feed bytes, take messages.

A source of ours answers SHUT(0) with ``COMMIT_TOKEN`` on the stream's own direction, after the
VMDESCRIPTION: our destination confirms a verified stream, then runs the guest only once that
token arrives (two-phase; QEMU's destination resumes, then confirms, and reads nothing more).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from shm.errors import RemoteProtocolError

__all__ = ["RpMessageType", "RpMessage", "shut", "error_text", "ReturnPathReader", "SHUT_OK",
           "SHUT_FAILED", "COMMIT_TOKEN"]

HEAD = struct.Struct(">HH")
SHUT_OK, SHUT_FAILED = 0, 1
COMMIT_TOKEN = b"RDPCOMIT"      # the source committed: the destination may run the guest
MAX_LEN = 512


class RpMessageType(IntEnum):
    """``MIG_RP_MSG_*`` (the ones a precopy destination may send)."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    X_ERROR = 0x7E01          # ours: why the destination failed


@dataclass(frozen=True, slots=True)
class RpMessage:
    type: int
    data: bytes

    @property
    def shut_status(self) -> int:
        """The be32 of a SHUT message."""
        if self.type != RpMessageType.SHUT or len(self.data) != 4:
            raise RemoteProtocolError(f"not a SHUT message: {self!r}")
        return struct.unpack(">I", self.data)[0]


def shut(status: int) -> bytes:
    """MIG_RP_MSG_SHUT with ``status`` (0: completed, 1: failed)."""
    return HEAD.pack(RpMessageType.SHUT, 4) + struct.pack(">I", status)


def error_text(reason: str) -> bytes:
    """X_ERROR: the destination's one-line reason, cut to MAX_LEN bytes."""
    raw = reason.encode()[:MAX_LEN]
    return HEAD.pack(RpMessageType.X_ERROR, len(raw)) + raw


class ReturnPathReader:
    """Return-path messages from bytes fed in any pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> RpMessage | None:
        """The next whole message, or None until more bytes come."""
        if len(self._buf) < HEAD.size:
            return None
        kind, n = HEAD.unpack_from(self._buf)
        if kind not in (RpMessageType.SHUT, RpMessageType.PONG, RpMessageType.X_ERROR) \
                or n > MAX_LEN:
            raise RemoteProtocolError(f"return path: message type {kind} of {n} bytes is not "
                                      "one a precopy destination sends")
        if kind == RpMessageType.SHUT and n != 4:
            raise RemoteProtocolError(f"return path: SHUT with {n} bytes, must be 4")
        if len(self._buf) < HEAD.size + n:
            return None
        data = bytes(self._buf[HEAD.size:HEAD.size + n])
        del self._buf[:HEAD.size + n]
        return RpMessage(kind, data)
