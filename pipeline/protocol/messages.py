"""Control messages of QEMU's RDMA migration protocol, version 1, as values.

Invariants:
- every class is a frozen, slotted dataclass that checks its fields on construction, so a
  message that exists can be encoded; a bad field is ``ValueError``/``TypeError`` (API misuse;
  the codec turns peer input into ``RemoteProtocolError`` before it gets here);
- names and numbers are QEMU's (``RDMA_CONTROL_*``, ``RDMADestBlock``, ``RDMARegister``,
  ``RDMARegisterResult``, ``RDMACompress``); padding never appears in a value;
- a message knows its ``TYPE`` and its header ``repeat``; the header ``len`` follows from the
  payload and is computed by the codec.

Our one extension at this level: REGISTER RESULT may carry one result per record (MULTI_REGISTER,
see ``capabilities``); a QEMU-style result (one result, repeat echoing the request) stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

__all__ = [
    "MessageType", "HEADER_SIZE", "CONTROL_MAX_BUFFER", "MAX_PAYLOAD", "MAX_COMMANDS",
    "QEMU_FILE_MAX", "DEST_BLOCK_SIZE", "REGISTER_SIZE", "REGISTER_RESULT_SIZE", "COMPRESS_SIZE",
    "ControlHeader", "DestBlock", "Register", "RegisterResult", "Compress",
    "ErrorMessage", "ReadyMessage", "CommitMessage", "QemuFileMessage", "RamBlocksRequestMessage",
    "RamBlocksResultMessage", "CompressMessage", "RegisterRequestMessage",
    "RegisterResultMessage", "RegisterFinishedMessage", "UnregisterRequestMessage",
    "UnregisterFinishedMessage", "Message", "MESSAGE_CLASSES",
]

HEADER_SIZE = 16                       # sizeof(RDMAControlHeader)
CONTROL_MAX_BUFFER = 512 * 1024        # RDMA_CONTROL_MAX_BUFFER: one control slot
MAX_PAYLOAD = CONTROL_MAX_BUFFER - HEADER_SIZE
MAX_COMMANDS = 4096                    # RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE
QEMU_FILE_MAX = 32768                  # RDMA_SEND_INCREMENT
DEST_BLOCK_SIZE = 32
REGISTER_SIZE = 24
REGISTER_RESULT_SIZE = 16
COMPRESS_SIZE = 24
U32_MAX = 0xFFFF_FFFF
ERROR_REASON_MAX = 512
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


class MessageType(IntEnum):
    """``RDMA_CONTROL_*``: the ``type`` word of the control header."""

    NONE = 0                # internal "accept any"; never on the wire
    ERROR = 1
    READY = 2
    QEMU_FILE = 3
    RAM_BLOCKS_REQUEST = 4
    RAM_BLOCKS_RESULT = 5
    COMPRESS = 6
    REGISTER_REQUEST = 7
    REGISTER_RESULT = 8
    REGISTER_FINISHED = 9
    UNREGISTER_REQUEST = 10
    UNREGISTER_FINISHED = 11
    COMMIT = 0x100          # ours, with RAM_DIGEST agreed: the source committed (see channel)

    @property
    def qemu_name(self) -> str:
        """The name QEMU prints for this type (``control_desc[]``), e.g. ``QEMU FILE``."""
        return self.name.replace("_", " ")


def _uint(owner: str, name: str, value: object, limit: int, low: int = 0) -> None:
    if value.__class__ is int and low <= value <= limit:   # the common case, fast
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__}")
    if not low <= value <= limit:
        raise ValueError(f"{owner}.{name} = {value} is outside {low}..{limit}")


def _records(owner: str, name: str, value: object, kind: type, low: int, high: int) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"{owner}.{name} must be a tuple of {kind.__name__}")
    if not low <= len(value) <= high:
        raise ValueError(f"{owner}.{name} holds {len(value)} records; allowed {low}..{high}")
    for item in value:
        if not isinstance(item, kind):
            raise TypeError(f"{owner}.{name} holds a {type(item).__name__}, not {kind.__name__}")


# -- the header and the four payload records -------------------------------------------------

@dataclass(frozen=True, slots=True)
class ControlHeader:
    """``RDMAControlHeader``: be32 len, be32 type, be32 repeat, 4 bytes of padding (zero)."""

    len: int
    type: MessageType
    repeat: int

    def __post_init__(self) -> None:
        _uint("ControlHeader", "len", self.len, MAX_PAYLOAD)
        if not isinstance(self.type, MessageType):
            raise TypeError("ControlHeader.type must be a MessageType")
        _uint("ControlHeader", "repeat", self.repeat, U32_MAX)


@dataclass(frozen=True, slots=True)
class DestBlock:
    """``RDMADestBlock`` (32 bytes): where one destination RAM block lives."""

    remote_host_addr: int
    offset: int
    length: int
    remote_rkey: int = 0     # 0 in dynamic mode; the whole-block rkey with pin-all

    def __post_init__(self) -> None:
        for name in ("remote_host_addr", "offset", "length"):
            _uint("DestBlock", name, getattr(self, name), U64_MAX)
        _uint("DestBlock", "remote_rkey", self.remote_rkey, U32_MAX)


@dataclass(frozen=True, slots=True)
class Register:
    """``RDMARegister`` (24 bytes): one chunk range to register (or unregister).

    ``key`` is QEMU's union: ``current_addr`` (a destination ram_addr_t) for REGISTER REQUEST,
    ``chunk`` (a chunk number) for UNREGISTER REQUEST. ``chunks`` counts *additional* chunks.
    """

    key: int
    current_index: int
    chunks: int = 0

    def __post_init__(self) -> None:
        _uint("Register", "key", self.key, U64_MAX)
        _uint("Register", "current_index", self.current_index, U32_MAX)
        _uint("Register", "chunks", self.chunks, U64_MAX)

    @property
    def current_addr(self) -> int:
        return self.key

    @property
    def chunk(self) -> int:
        return self.key


@dataclass(frozen=True, slots=True)
class RegisterResult:
    """``RDMARegisterResult`` (16 bytes): rkey and the destination VA of the *block base*."""

    rkey: int
    host_addr: int

    def __post_init__(self) -> None:
        _uint("RegisterResult", "rkey", self.rkey, U32_MAX)
        _uint("RegisterResult", "host_addr", self.host_addr, U64_MAX)


@dataclass(frozen=True, slots=True)
class Compress:
    """``RDMACompress`` (24 bytes): zero-fill ``length`` bytes at ``offset`` of a block."""

    block_idx: int
    offset: int
    length: int
    value: int = 0           # the fill byte; QEMU's destination refuses anything but 0

    def __post_init__(self) -> None:
        _uint("Compress", "block_idx", self.block_idx, U32_MAX)
        _uint("Compress", "offset", self.offset, U64_MAX)
        _uint("Compress", "length", self.length, U64_MAX)
        if self.value != 0:
            raise ValueError(f"Compress.value = {self.value}: QEMU accepts only 0")


# -- one class per message type ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """ERROR {len 0, repeat 1}: the sender is failing the migration. To a peer of ours (one
    that agreed to RAM_DIGEST) it carries why, UTF-8, up to ``ERROR_REASON_MAX`` bytes."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR

    reason: str = ""

    @property
    def repeat(self) -> int:
        return 1


@dataclass(frozen=True, slots=True)
class ReadyMessage:
    """READY {len 0, repeat 1}: one credit, the receiver may take exactly one message."""

    TYPE: ClassVar[MessageType] = MessageType.READY

    @property
    def repeat(self) -> int:
        return 1


@dataclass(frozen=True, slots=True)
class CommitMessage:
    """COMMIT {len 0, repeat 1} (rdma-pipeline's, never to QEMU): the source took the
    destination's READY after EOF as the commit point; the destination may run the guest."""

    TYPE: ClassVar[MessageType] = MessageType.COMMIT

    @property
    def repeat(self) -> int:
        return 1


@dataclass(frozen=True, slots=True)
class QemuFileMessage:
    """QEMU FILE: up to 32768 bytes of the migration stream.

    ``repeat`` is carried only so that a capture re-encodes byte for byte: QEMU sends 0 (older
    trees sent garbage) and every receiver ignores it.
    """

    TYPE: ClassVar[MessageType] = MessageType.QEMU_FILE
    data: bytes
    repeat: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes):
            raise TypeError("QemuFileMessage.data must be bytes")
        if len(self.data) > QEMU_FILE_MAX:
            raise ValueError(
                f"QemuFileMessage.data is {len(self.data)} bytes; at most {QEMU_FILE_MAX}")
        _uint("QemuFileMessage", "repeat", self.repeat, U32_MAX)


@dataclass(frozen=True, slots=True)
class RamBlocksRequestMessage:
    """RAM BLOCKS REQUEST {len 0, repeat 1}: asks for the destination's block list."""

    TYPE: ClassVar[MessageType] = MessageType.RAM_BLOCKS_REQUEST

    @property
    def repeat(self) -> int:
        return 1


@dataclass(frozen=True, slots=True)
class RamBlocksResultMessage:
    """RAM BLOCKS RESULT {len 32 x n, repeat 1}: the destination's blocks in source order."""

    TYPE: ClassVar[MessageType] = MessageType.RAM_BLOCKS_RESULT
    blocks: tuple[DestBlock, ...]

    def __post_init__(self) -> None:
        _records("RamBlocksResultMessage", "blocks", self.blocks, DestBlock,
                 0, MAX_PAYLOAD // DEST_BLOCK_SIZE)

    @property
    def repeat(self) -> int:
        return 1


@dataclass(frozen=True, slots=True)
class CompressMessage:
    """COMPRESS {len 24, repeat 1}: a zero range of a chunk that is not registered."""

    TYPE: ClassVar[MessageType] = MessageType.COMPRESS
    compress: Compress

    def __post_init__(self) -> None:
        if not isinstance(self.compress, Compress):
            raise TypeError("CompressMessage.compress must be a Compress")

    @property
    def repeat(self) -> int:
        return 1


@dataclass(frozen=True, slots=True)
class RegisterRequestMessage:
    """REGISTER REQUEST {len 24 x n, repeat n}; QEMU sends n = 1, n > 1 is MULTI_REGISTER."""

    TYPE: ClassVar[MessageType] = MessageType.REGISTER_REQUEST
    records: tuple[Register, ...]

    def __post_init__(self) -> None:
        _records("RegisterRequestMessage", "records", self.records, Register, 1, MAX_COMMANDS)

    @property
    def repeat(self) -> int:
        return len(self.records)


@dataclass(frozen=True, slots=True)
class RegisterResultMessage:
    """REGISTER RESULT {repeat n}: the answer to a REGISTER REQUEST of n records.

    Two shapes are valid, told apart by the number of results:
    - QEMU's: one result (len 16) whatever ``repeat`` is (QEMU hard-codes len 16);
    - MULTI_REGISTER: one result per record (len 16 x n). For n = 1 both are the same bytes.
    ``repeat`` defaults to the number of results.
    """

    TYPE: ClassVar[MessageType] = MessageType.REGISTER_RESULT
    results: tuple[RegisterResult, ...]
    repeat: int = -1

    def __post_init__(self) -> None:
        _records("RegisterResultMessage", "results", self.results, RegisterResult,
                 1, MAX_COMMANDS)
        if self.repeat == -1:
            object.__setattr__(self, "repeat", len(self.results))
        _uint("RegisterResultMessage", "repeat", self.repeat, MAX_COMMANDS, 1)
        if len(self.results) not in (1, self.repeat):
            raise ValueError(
                f"RegisterResultMessage holds {len(self.results)} results for repeat "
                f"{self.repeat}: give one result (QEMU) or one per record (MULTI_REGISTER)")


@dataclass(frozen=True, slots=True)
class RegisterFinishedMessage:
    """REGISTER FINISHED {len 0, repeat 1}: closes a registration window."""

    TYPE: ClassVar[MessageType] = MessageType.REGISTER_FINISHED

    @property
    def repeat(self) -> int:
        return 1


@dataclass(frozen=True, slots=True)
class UnregisterRequestMessage:
    """UNREGISTER REQUEST {len 24 x n, repeat n}: ``Register.key`` holds the chunk number."""

    TYPE: ClassVar[MessageType] = MessageType.UNREGISTER_REQUEST
    records: tuple[Register, ...]

    def __post_init__(self) -> None:
        _records("UnregisterRequestMessage", "records", self.records, Register, 1, MAX_COMMANDS)

    @property
    def repeat(self) -> int:
        return len(self.records)


@dataclass(frozen=True, slots=True)
class UnregisterFinishedMessage:
    """UNREGISTER FINISHED {len 0, repeat n}: repeat echoes the request's."""

    TYPE: ClassVar[MessageType] = MessageType.UNREGISTER_FINISHED
    repeat: int = 1

    def __post_init__(self) -> None:
        _uint("UnregisterFinishedMessage", "repeat", self.repeat, MAX_COMMANDS, 1)


Message = (ErrorMessage | ReadyMessage | QemuFileMessage | RamBlocksRequestMessage
           | RamBlocksResultMessage | CompressMessage | RegisterRequestMessage
           | RegisterResultMessage | RegisterFinishedMessage | UnregisterRequestMessage
           | UnregisterFinishedMessage | CommitMessage)

MESSAGE_CLASSES: dict[MessageType, type] = {
    cls.TYPE: cls for cls in (
        ErrorMessage, ReadyMessage, QemuFileMessage, RamBlocksRequestMessage,
        RamBlocksResultMessage, CompressMessage, RegisterRequestMessage, RegisterResultMessage,
        RegisterFinishedMessage, UnregisterRequestMessage, UnregisterFinishedMessage,
        CommitMessage)
}
