"""Frames of the soft provider's TCP connections.

A connection starts with one connection-manager exchange (REQ, then REP or REJ, each carrying
private data), after which it belongs to one QP pair and carries fixed 28-byte frame headers in
both directions: requests (WRITE, SEND, WRITE_BATCH; the payload follows the header) from each
side's requester to the other side's responder, and ACK / NAK from each responder back.
Sequence numbers count each direction's requests (one per work request) from 0; an ACK is
cumulative (everything up to ``seq`` has been placed), a NAK names the request it refuses.

Header (``FRAME``, network byte order)::

    kind u8 | flags u8 (NAK reason) | reserved u16 | seq u64
    | remote_addr u64 | rkey u32 | length u32

WRITE and SEND carry one request: ``length`` payload bytes follow. WRITE_BATCH carries
``count`` RDMA WRITEs with the consecutive sequence numbers ``seq .. seq+count-1``; its header's
``rkey`` field holds ``count`` (1..``MAX_BATCH``), ``length`` the total payload bytes and
``remote_addr`` is 0. Then come ``count`` descriptors (``DESC``: remote_addr u64, rkey u32,
length u32; ``DESC_DTYPE`` reads them all at once), then the payloads back to back in
descriptor order. The descriptors' lengths must add up to the header's ``length``; a frame
that breaks this is not our protocol and ends the connection.
"""

from __future__ import annotations

import struct

import numpy as np

from stages.verbs.base import WCStatus

# kind u8, flags u8 (NAK reason), reserved u16, seq u64, remote_addr u64, rkey u32, length u32
FRAME = struct.Struct(">BBHQQII")

WRITE, SEND, ACK, NAK, WRITE_BATCH = 1, 2, 3, 4, 5
REQUESTS = (WRITE, SEND)  # requests of one work request each

# One WRITE of a WRITE_BATCH: remote_addr u64, rkey u32, length u32.
DESC = struct.Struct(">QII")
DESC_DTYPE = np.dtype([("remote_addr", ">u8"), ("rkey", ">u4"), ("length", ">u4")])
MAX_BATCH = 1024  # writes in one WRITE_BATCH (the responder scatters them in one recvmsg)

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


def batch_header(first_seq: int, count: int, total: int) -> bytes:
    """The header of a WRITE_BATCH of ``count`` writes, ``total`` payload bytes in all."""
    return FRAME.pack(WRITE_BATCH, 0, 0, first_seq, 0, count, total)


def descriptors(remote_addr, rkey, length) -> bytes:
    """The packed descriptors of a WRITE_BATCH, from equal-length arrays (or sequences)."""
    descs = np.empty(len(length), DESC_DTYPE)
    descs["remote_addr"], descs["rkey"], descs["length"] = remote_addr, rkey, length
    return descs.tobytes()


def cm_message(kind: int, private_data: bytes) -> bytes:
    return CM_HEADER.pack(CM_MAGIC, CM_VERSION, kind, len(private_data)) + private_data
