"""Bytes <-> control messages: one pull/push pair per message type, chosen through a table.

``decode`` checks every rule a receiver checks on a single message (protocol.md §2, §3, §5, §13)
and raises ``RemoteProtocolError`` naming the field, the value and the rule. No input of any
length raises anything else (a ``TypeError`` only when the argument is not bytes-like).
Rules that need context (credit, which message may follow which, the RAM BLOCKS RESULT matching
our blocks, a REGISTER RESULT answering what was asked) live in ``channel``.

What ``decode`` accepts, precisely:
- the byte length is exactly ``16 + len`` and ``len <= 512 KiB - 16``; padding is ignored;
- ``type`` is 1..11 (NONE is internal to QEMU and never sent);
- ``repeat <= 4096`` for every type but QEMU FILE, whose repeat QEMU ignores (0 since ~2023,
  garbage before); the value is kept so a capture re-encodes byte for byte;
- ERROR, READY, RAM BLOCKS REQUEST, REGISTER FINISHED: len 0, repeat 1 (what QEMU always sends);
- QEMU FILE: len <= 32768 (RDMA_SEND_INCREMENT);
- RAM BLOCKS RESULT: repeat 1, len a multiple of 32;
- COMPRESS: repeat 1, len 24, value 0;
- REGISTER / UNREGISTER REQUEST: repeat 1..4096, len 24 x repeat;
- REGISTER RESULT: repeat 1..4096 and len 16 (QEMU: one result whatever repeat is) or
  len 16 x repeat (our MULTI_REGISTER: one result per record);
- UNREGISTER FINISHED: len 0, repeat 1..4096.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pipeline.protocol.buffer import Buffer
from pipeline.protocol.messages import (
    COMPRESS_SIZE,
    DEST_BLOCK_SIZE,
    ERROR_REASON_MAX,
    HEADER_SIZE,
    MAX_COMMANDS,
    MAX_PAYLOAD,
    QEMU_FILE_MAX,
    REGISTER_RESULT_SIZE,
    REGISTER_SIZE,
    CommitMessage,
    Compress,
    CompressMessage,
    ControlHeader,
    DestBlock,
    ErrorMessage,
    Message,
    MessageType,
    QemuFileMessage,
    RamBlocksRequestMessage,
    RamBlocksResultMessage,
    ReadyMessage,
    Register,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterFinishedMessage,
    UnregisterRequestMessage,
)
from shm.errors import RemoteProtocolError

__all__ = ["encode", "decode", "decode_header", "header_of", "describe"]

HEADER = struct.Struct(">IIII")          # len, type, repeat, padding
DEST_BLOCK = struct.Struct(">QQQII")      # remote_host_addr, offset, length, rkey, padding
REGISTER = struct.Struct(">QIIQ")         # key, current_index, padding, chunks
REGISTER_RESULT = struct.Struct(">IIQ")   # rkey, padding, host_addr
COMPRESS = struct.Struct(">IIQQ")         # value, block_idx, offset, length
assert (HEADER.size, DEST_BLOCK.size, REGISTER.size, REGISTER_RESULT.size, COMPRESS.size) == (
    HEADER_SIZE, DEST_BLOCK_SIZE, REGISTER_SIZE, REGISTER_RESULT_SIZE, COMPRESS_SIZE)

_QEMU_MAX = MessageType.UNREGISTER_FINISHED
_TYPES = {int(t): t for t in MessageType}


def _fail(name: str, rule: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{name}: {rule}")


# -- payload codecs: (payload size, push payload, pull payload) --------------------------------

def _reason(msg: ErrorMessage) -> bytes:
    return msg.reason.encode()[:ERROR_REASON_MAX]


def _pull_error(buf: Buffer, head: ControlHeader) -> ErrorMessage:
    """QEMU's ERROR is empty; ours may say why (a peer of ours reads it, QEMU never gets it)."""
    if head.repeat != 1:
        raise _fail("ERROR", f"header repeat {head.repeat}, must be 1")
    if head.len > ERROR_REASON_MAX:
        raise _fail("ERROR", f"header len {head.len}: a reason holds at most "
                             f"{ERROR_REASON_MAX} bytes")
    return ErrorMessage(buf.pull_bytes(head.len).decode(errors="replace"))


def _empty_size(msg: object) -> int:
    return 0


def _push_nothing(buf: Buffer, msg: object) -> None:
    pass


def _pull_fixed(cls: type) -> Callable[[Buffer, ControlHeader], Message]:
    name = cls.TYPE.qemu_name

    def pull(buf: Buffer, head: ControlHeader) -> Message:
        if head.len != 0:
            raise _fail(name, f"header len {head.len}, must be 0")
        if head.repeat != 1:
            raise _fail(name, f"header repeat {head.repeat}, must be 1")
        return cls()
    return pull


def _pull_qemu_file(buf: Buffer, head: ControlHeader) -> Message:
    if head.len > QEMU_FILE_MAX:
        raise _fail("QEMU FILE", f"header len {head.len} exceeds {QEMU_FILE_MAX} "
                                 "(RDMA_SEND_INCREMENT, the largest stream piece)")
    return QemuFileMessage(buf.pull_bytes(head.len, "QEMU FILE payload"), head.repeat)


def _push_qemu_file(buf: Buffer, msg: QemuFileMessage) -> None:
    buf.push_bytes(msg.data)


def _pull_ram_blocks_result(buf: Buffer, head: ControlHeader) -> Message:
    if head.repeat != 1:
        raise _fail("RAM BLOCKS RESULT", f"header repeat {head.repeat}, must be 1")
    if head.len % DEST_BLOCK_SIZE:
        raise _fail("RAM BLOCKS RESULT", f"header len {head.len} is not a multiple of "
                                         f"{DEST_BLOCK_SIZE} (sizeof RDMADestBlock)")
    n = head.len // DEST_BLOCK_SIZE
    blocks = tuple(DestBlock(addr, offset, length, rkey)
                   for addr, offset, length, rkey, _pad in
                   (buf.pull_struct(DEST_BLOCK, "RDMADestBlock") for _ in range(n)))
    return RamBlocksResultMessage(blocks)


def _push_ram_blocks_result(buf: Buffer, msg: RamBlocksResultMessage) -> None:
    for b in msg.blocks:
        buf.push_struct(DEST_BLOCK, b.remote_host_addr, b.offset, b.length, b.remote_rkey, 0)


def _pull_compress(buf: Buffer, head: ControlHeader) -> Message:
    if head.repeat != 1:
        raise _fail("COMPRESS", f"header repeat {head.repeat}, must be 1")
    if head.len != COMPRESS_SIZE:
        raise _fail("COMPRESS", f"header len {head.len}, must be {COMPRESS_SIZE} "
                                "(sizeof RDMACompress)")
    value, block_idx, offset, length = buf.pull_struct(COMPRESS, "RDMACompress")
    if value != 0:
        raise _fail("COMPRESS", f"value {value}, must be 0 (QEMU refuses a non-zero fill)")
    return CompressMessage(Compress(block_idx, offset, length))


def _push_compress(buf: Buffer, msg: CompressMessage) -> None:
    c = msg.compress
    buf.push_struct(COMPRESS, c.value, c.block_idx, c.offset, c.length)


def _pull_registers(cls: type) -> Callable[[Buffer, ControlHeader], Message]:
    name = cls.TYPE.qemu_name

    def pull(buf: Buffer, head: ControlHeader) -> Message:
        if head.repeat < 1:
            raise _fail(name, "header repeat 0, must be at least 1 (one RDMARegister)")
        if head.len != REGISTER_SIZE * head.repeat:
            raise _fail(name, f"header len {head.len} with repeat {head.repeat}, must be "
                              f"{REGISTER_SIZE * head.repeat} ({REGISTER_SIZE} bytes per "
                              "RDMARegister)")
        records = tuple(Register(key, index, chunks) for key, index, _pad, chunks in
                        (buf.pull_struct(REGISTER, "RDMARegister") for _ in range(head.repeat)))
        return cls(records)
    return pull


def _push_registers(buf: Buffer, msg: RegisterRequestMessage | UnregisterRequestMessage) -> None:
    for r in msg.records:
        buf.push_struct(REGISTER, r.key, r.current_index, 0, r.chunks)


def _pull_register_result(buf: Buffer, head: ControlHeader) -> Message:
    if head.repeat < 1:
        raise _fail("REGISTER RESULT", "header repeat 0, must be at least 1")
    if head.len == REGISTER_RESULT_SIZE:
        n = 1
    elif head.len == REGISTER_RESULT_SIZE * head.repeat:
        n = head.repeat
    else:
        raise _fail("REGISTER RESULT", (
            f"header len {head.len} with repeat {head.repeat}, must be {REGISTER_RESULT_SIZE} "
            f"(QEMU: one RDMARegisterResult) or {REGISTER_RESULT_SIZE * head.repeat} "
            "(MULTI_REGISTER: one per record)"))
    results = tuple(RegisterResult(rkey, host_addr) for rkey, _pad, host_addr in
                    (buf.pull_struct(REGISTER_RESULT, "RDMARegisterResult") for _ in range(n)))
    return RegisterResultMessage(results, head.repeat)


def _push_register_result(buf: Buffer, msg: RegisterResultMessage) -> None:
    for r in msg.results:
        buf.push_struct(REGISTER_RESULT, r.rkey, 0, r.host_addr)


def _pull_unregister_finished(buf: Buffer, head: ControlHeader) -> Message:
    if head.len != 0:
        raise _fail("UNREGISTER FINISHED", f"header len {head.len}, must be 0")
    if head.repeat < 1:
        raise _fail("UNREGISTER FINISHED", "header repeat 0, must echo the request (>= 1)")
    return UnregisterFinishedMessage(head.repeat)


_CODECS: dict[MessageType, tuple[Callable, Callable, Callable]] = {
    MessageType.ERROR: (lambda m: len(_reason(m)), lambda buf, m: buf.push_bytes(_reason(m)),
                        _pull_error),
    MessageType.READY: (_empty_size, _push_nothing, _pull_fixed(ReadyMessage)),
    MessageType.QEMU_FILE: (lambda m: len(m.data), _push_qemu_file, _pull_qemu_file),
    MessageType.RAM_BLOCKS_REQUEST: (_empty_size, _push_nothing,
                                     _pull_fixed(RamBlocksRequestMessage)),
    MessageType.RAM_BLOCKS_RESULT: (lambda m: DEST_BLOCK_SIZE * len(m.blocks),
                                    _push_ram_blocks_result, _pull_ram_blocks_result),
    MessageType.COMPRESS: (lambda m: COMPRESS_SIZE, _push_compress, _pull_compress),
    MessageType.REGISTER_REQUEST: (lambda m: REGISTER_SIZE * len(m.records), _push_registers,
                                   _pull_registers(RegisterRequestMessage)),
    MessageType.REGISTER_RESULT: (lambda m: REGISTER_RESULT_SIZE * len(m.results),
                                  _push_register_result, _pull_register_result),
    MessageType.REGISTER_FINISHED: (_empty_size, _push_nothing,
                                    _pull_fixed(RegisterFinishedMessage)),
    MessageType.UNREGISTER_REQUEST: (lambda m: REGISTER_SIZE * len(m.records), _push_registers,
                                     _pull_registers(UnregisterRequestMessage)),
    MessageType.UNREGISTER_FINISHED: (_empty_size, _push_nothing, _pull_unregister_finished),
    MessageType.COMMIT: (_empty_size, _push_nothing, _pull_fixed(CommitMessage)),
}


# -- public API --------------------------------------------------------------------------------

def _codec(msg: object) -> tuple[Callable, Callable, Callable]:
    try:
        return _CODECS[msg.TYPE]  # type: ignore[attr-defined]
    except (AttributeError, KeyError):
        raise TypeError(f"not a control message: {msg!r}") from None


def header_of(msg: Message) -> ControlHeader:
    """The header ``encode`` writes for ``msg``."""
    size, _, _ = _codec(msg)
    return ControlHeader(size(msg), msg.TYPE, msg.repeat)


def encode(msg: Message) -> bytes:
    """Header and payload of ``msg``, padding zero, ready for one SEND."""
    size, push, _ = _codec(msg)
    n = size(msg)
    buf = Buffer(capacity=HEADER_SIZE + n)
    buf.push_struct(HEADER, n, msg.TYPE, msg.repeat, 0)
    push(buf, msg)
    return buf.data


def decode_header(data: bytes | bytearray | memoryview) -> ControlHeader:
    """The header at the start of ``data``, with the checks that need no payload.

    Checks: at least 16 bytes, ``len <= 512 KiB - 16``, a known type other than NONE, and
    ``repeat <= 4096`` for every type but QEMU FILE. Does not check the byte length.
    """
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(
            f"control message of {len(data)} bytes: shorter than the {HEADER_SIZE}-byte header")
    length, mtype, repeat, _pad = HEADER.unpack_from(data, 0)
    if length > MAX_PAYLOAD:
        raise RemoteProtocolError(
            f"header len {length} exceeds {MAX_PAYLOAD} (512 KiB control buffer - 16)")
    if mtype not in _TYPES or mtype == 0:
        what = "NONE, never sent on the wire" if mtype == 0 else "unknown"
        raise RemoteProtocolError(f"header type {mtype} ({what}): must be 1..{int(_QEMU_MAX)} "
                                  f"or our COMMIT ({int(MessageType.COMMIT)})")
    mtype = _TYPES[mtype]
    if repeat > MAX_COMMANDS and mtype is not MessageType.QEMU_FILE:
        raise RemoteProtocolError(
            f"{mtype.qemu_name}: header repeat {repeat} exceeds {MAX_COMMANDS} "
            "(RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE)")
    return ControlHeader(length, mtype, repeat)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The one control message that is exactly ``data`` (one RECV completion's bytes)."""
    head = decode_header(data)
    if HEADER_SIZE + head.len != len(data):
        raise RemoteProtocolError(
            f"{head.type.qemu_name}: header len {head.len} but the message is {len(data)} "
            f"bytes; byte_len must equal 16 + len = {HEADER_SIZE + head.len}")
    buf = Buffer(data)
    buf.seek(HEADER_SIZE)
    try:
        return _CODECS[head.type][2](buf, head)
    except (ValueError, TypeError) as exc:  # a record refused a value the checks let through
        raise RemoteProtocolError(f"{head.type.qemu_name}: {exc}") from None


def describe(msg: Message) -> dict:
    """``msg`` as plain data: ``type`` by QEMU name, header fields, payload fields by name."""
    head = header_of(msg)
    out: dict = {"type": head.type.name, "len": head.len, "repeat": head.repeat}
    if isinstance(msg, QemuFileMessage):
        out["data"] = msg.data.hex()
    elif isinstance(msg, RamBlocksResultMessage):
        out["blocks"] = [{"remote_host_addr": b.remote_host_addr, "offset": b.offset,
                          "length": b.length, "remote_rkey": b.remote_rkey} for b in msg.blocks]
    elif isinstance(msg, CompressMessage):
        c = msg.compress
        out.update(value=c.value, block_idx=c.block_idx, offset=c.offset, length=c.length)
    elif isinstance(msg, RegisterRequestMessage | UnregisterRequestMessage):
        key = "current_addr" if isinstance(msg, RegisterRequestMessage) else "chunk"
        out["records"] = [{key: r.key, "current_index": r.current_index, "chunks": r.chunks}
                          for r in msg.records]
    elif isinstance(msg, RegisterResultMessage):
        out["results"] = [{"rkey": r.rkey, "host_addr": r.host_addr} for r in msg.results]
    return out
