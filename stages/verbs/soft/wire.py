"""Frames of the soft provider's TCP connections.

A connection starts with one connection-manager exchange (REQ, then REP or REJ, each carrying
private data), after which it belongs to one QP pair and carries fixed 28-byte frames in both
directions: requests (WRITE, SEND; the payload follows the header) from each side's requester to
the other side's responder, and ACK / NAK from each responder back. Sequence numbers count each
direction's requests from 0; an ACK is cumulative (everything up to ``seq`` has been placed).
"""

from __future__ import annotations

import struct

from stages.verbs.base import WCStatus

# kind u8, flags u8 (NAK reason), reserved u16, seq u64, remote_addr u64, rkey u32, length u32
FRAME = struct.Struct(">BBHQQII")

WRITE, SEND, ACK, NAK = 1, 2, 3, 4
REQUESTS = (WRITE, SEND)

# NAK reasons and the status the requester's WR completes with.
NAK_RNR, NAK_REM_ACCESS, NAK_REM_INV_REQ, NAK_REM_OP = 1, 2, 3, 4
NAK_STATUS = {
    NAK_REM_ACCESS: WCStatus.REM_ACCESS_ERR,
    NAK_REM_INV_REQ: WCStatus.REM_INV_REQ_ERR,
    NAK_REM_OP: WCStatus.REM_OP_ERR,
}

MAX_MESSAGE = 1 << 31  # as ibv_query_port's max_msg_sz on most devices

# Connection manager: magic, version, kind, private-data length; then the private data.
CM_HEADER = struct.Struct(">4sBBH")
CM_MAGIC = b"RDPS"
CM_VERSION = 1
CM_REQ, CM_REP, CM_REJ = 1, 2, 3


def frame(kind: int, seq: int, *, flags: int = 0, remote_addr: int = 0, rkey: int = 0,
          length: int = 0) -> bytes:
    return FRAME.pack(kind, flags, 0, seq, remote_addr, rkey, length)


def cm_message(kind: int, private_data: bytes) -> bytes:
    return CM_HEADER.pack(CM_MAGIC, CM_VERSION, kind, len(private_data)) + private_data
