"""Records of QEMU's migration stream (savevm.c / ram.c format): constants, events, encoders.

The stream is what travels inside QEMU FILE messages (or in a ``file:``/``tcp:`` stream):

    be32 0x5145564d "QEVM", be32 3
    [0x07 CONFIGURATION  be32 len, machine name, [0x05 subsection]...]
    sections:  0x01 START / 0x04 FULL  be32 section_id, u8 len, idstr, be32 instance, be32 version
               0x02 PART  / 0x03 END   be32 section_id
               ... section data ...
               0x7e FOOTER be32 section_id
    0x08 COMMAND  be16 cmd, be16 len, data
    0x00 EOF
    [0x06 VMDESCRIPTION  be32 len, JSON]

Section ``ram`` (instance 0, version 4) holds be64 ``addr | flags`` records, flags in the bits
below the page size: MEM_SIZE (total, then per block u8 len, idstr, be64 used_length), HOOK
(be64 0x80; RDMA only), EOS (end of this section's RAM data), PAGE (block name unless CONTINUE,
then the page), ZERO (block name unless CONTINUE, then one fill byte, 0). Other sections are
device state whose layout only a per-device codec knows (the stream is not self-describing).

Invariant: for every event ``e`` the parser yields, ``encode_event(e)`` is the bytes it came from.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from shm.errors import RemoteProtocolError

__all__ = [
    "FILE_MAGIC", "FILE_VERSION", "PAGE_SIZE", "RAM_IDSTR", "RAM_VERSION", "SectionType",
    "RamFlag", "FileHeader", "Subsection", "Configuration", "SectionHeader", "SectionFooter",
    "RamBlockInfo",
    "MemSize", "Hook", "EndOfSection", "Page", "ZeroPage", "DeviceState", "Command", "Eof",
    "VmDescription", "BatchEvent", "Event", "encode_event", "HOOK_RECORD", "EOS_RECORD",
    "OPEN_RETURN_PATH", "PING",
]

FILE_MAGIC = 0x5145564D        # QEMU_VM_FILE_MAGIC, "QEVM"
FILE_VERSION = 3               # QEMU_VM_FILE_VERSION
PAGE_SIZE = 4096               # TARGET_PAGE_SIZE on x86
RAM_IDSTR = "ram"
RAM_VERSION = 4
OPEN_RETURN_PATH, PING = 1, 2  # MIG_CMD_*: open the return path; PING (be32), PONG on it

U8, U16, U32, U64 = (struct.Struct(f">{c}") for c in "BHIQ")
HEADER = struct.Struct(">II")                # magic, version


class SectionType(IntEnum):
    """``QEMU_VM_*`` record types at the top level of the stream."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class RamFlag(IntFlag):
    """``RAM_SAVE_FLAG_*``."""

    FULL = 0x01                # obsolete
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80
    COMPRESS_PAGE = 0x100      # removed in QEMU 9.1
    MULTIFD_FLUSH = 0x200


HOOK_RECORD = U64.pack(RamFlag.HOOK)
EOS_RECORD = U64.pack(RamFlag.EOS)


def idstr_bytes(idstr: str, what: str = "idstr") -> bytes:
    raw = idstr.encode()
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"{what} {idstr!r} must be 1..255 bytes")
    return U8.pack(len(raw)) + raw


def _u(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{name} = {value!r} is not a u{bits}")


# -- events -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FileHeader:
    version: int = FILE_VERSION


@dataclass(frozen=True, slots=True)
class Subsection:
    """A vmstate subsection (0x05, u8 len, idstr, be32 version, data) of the configuration."""

    idstr: str
    version_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Configuration:
    """QEMU_VM_CONFIGURATION: the machine type name, and the subsections QEMU adds when a
    capability asks for them (``configuration/target-page-bits``, ``/capabilities``,
    ``/uuid``)."""

    name: str
    subsections: tuple[Subsection, ...] = ()


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """START / FULL carry idstr, instance and version; PART / END only the id (the parser
    fills the rest in from the section's START)."""

    section_type: SectionType
    section_id: int
    idstr: str
    instance_id: int = 0
    version_id: int = 0

    def __post_init__(self) -> None:
        if self.section_type not in (SectionType.SECTION_START, SectionType.SECTION_PART,
                                     SectionType.SECTION_END, SectionType.SECTION_FULL):
            raise ValueError(f"SectionHeader.section_type {self.section_type!r}")
        _u("section_id", self.section_id, 32)
        _u("instance_id", self.instance_id, 32)
        _u("version_id", self.version_id, 32)

    @property
    def opens(self) -> bool:
        """START or FULL: the header that names the section."""
        return self.section_type in (SectionType.SECTION_START, SectionType.SECTION_FULL)


@dataclass(frozen=True, slots=True)
class SectionFooter:
    section_id: int


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    idstr: str
    length: int      # used_length


@dataclass(frozen=True, slots=True)
class MemSize:
    """RAM_SAVE_FLAG_MEM_SIZE: the RAM block list; ``total`` is the sum of the lengths."""

    blocks: tuple[RamBlockInfo, ...]

    @property
    def total(self) -> int:
        return sum(b.length for b in self.blocks)


@dataclass(frozen=True, slots=True)
class Hook:
    """RAM_SAVE_FLAG_HOOK: over RDMA, a registration window follows; it ends its message."""


@dataclass(frozen=True, slots=True)
class EndOfSection:
    """RAM_SAVE_FLAG_EOS: the end of this section's RAM data."""


@dataclass(frozen=True, slots=True)
class Page:
    """RAM_SAVE_FLAG_PAGE: one page inline; ``continued`` = CONTINUE (block name omitted)."""

    block: str
    offset: int
    data: bytes
    continued: bool = False


@dataclass(frozen=True, slots=True)
class ZeroPage:
    """RAM_SAVE_FLAG_ZERO: one page of ``fill`` bytes (QEMU accepts only 0)."""

    block: str
    offset: int
    fill: int = 0
    continued: bool = False


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The data of a non-RAM section, as bytes (its codec told the parser how many)."""

    section_id: int
    idstr: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Command:
    """QEMU_VM_COMMAND (e.g. SWITCHOVER_START 0x0b)."""

    cmd: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Eof:
    """QEMU_VM_EOF: the end of the device state."""


@dataclass(frozen=True, slots=True)
class VmDescription:
    """QEMU_VM_VMDESCRIPTION: the JSON description of the device sections."""

    json: bytes

    def description(self) -> dict:
        """The parsed JSON; ``RemoteProtocolError`` if it is not a JSON object."""
        try:
            value = json.loads(self.json)
        except (ValueError, RecursionError) as exc:
            raise RemoteProtocolError(f"VMDESCRIPTION is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise RemoteProtocolError("VMDESCRIPTION JSON is not an object")
        return value


class BatchEvent:
    """Records of one kind by the thousand, as a bulk parser yields them (``ram_batch``'s
    ``PageBatch`` and ``ZeroBatch``): each knows its own bytes, so ``encode_event`` needs no
    numpy and this module nothing of ``ram_batch``."""

    __slots__ = ()

    def encode(self, page_size: int = PAGE_SIZE) -> bytes:
        raise NotImplementedError


Event = (FileHeader | Configuration | SectionHeader | SectionFooter | MemSize | Hook
         | EndOfSection | Page | ZeroPage | DeviceState | Command | Eof | VmDescription
         | BatchEvent)


# -- encoders -----------------------------------------------------------------------------------

def _page_head(flag: RamFlag, block: str, offset: int, continued: bool, page_size: int) -> bytes:
    if offset % page_size or not 0 <= offset < 1 << 64:
        raise ValueError(f"page offset {offset:#x} is not page-aligned")
    if continued:
        return U64.pack(offset | flag | RamFlag.CONTINUE)
    return U64.pack(offset | flag) + idstr_bytes(block, "RAMBlock idstr")


def mem_size(blocks: Iterable[RamBlockInfo], page_size: int = PAGE_SIZE) -> bytes:
    blocks = tuple(blocks)
    total = sum(b.length for b in blocks)
    if total % page_size:
        raise ValueError(f"total RAM {total} is not a multiple of the page size")
    out = [U64.pack(total | RamFlag.MEM_SIZE)]
    for b in blocks:
        _u("RAMBlock length", b.length, 64)
        out.append(idstr_bytes(b.idstr, "RAMBlock idstr") + U64.pack(b.length))
    return b"".join(out)


def encode_event(event: Event, page_size: int = PAGE_SIZE) -> bytes:
    """The stream bytes of one record."""
    match event:
        case FileHeader(version):
            return HEADER.pack(FILE_MAGIC, version)
        case Configuration(name, subsections):
            raw = name.encode()
            return U8.pack(SectionType.CONFIGURATION) + U32.pack(len(raw)) + raw + b"".join(
                U8.pack(SectionType.SUBSECTION) + idstr_bytes(sub.idstr) + U32.pack(
                    sub.version_id) + sub.data for sub in subsections)
        case SectionHeader(stype, sid, idstr, instance, version) if event.opens:
            return (U8.pack(stype) + U32.pack(sid) + idstr_bytes(idstr)
                    + U32.pack(instance) + U32.pack(version))
        case SectionHeader(stype, sid):
            return U8.pack(stype) + U32.pack(sid)
        case SectionFooter(sid):
            return U8.pack(SectionType.SECTION_FOOTER) + U32.pack(sid)
        case MemSize(blocks):
            return mem_size(blocks, page_size)
        case Hook():
            return HOOK_RECORD
        case EndOfSection():
            return EOS_RECORD
        case Page(block, offset, data, continued):
            if len(data) != page_size:
                raise ValueError(f"a page is {page_size} bytes, got {len(data)}")
            return _page_head(RamFlag.PAGE, block, offset, continued, page_size) + bytes(data)
        case ZeroPage(block, offset, fill, continued):
            _u("fill", fill, 8)
            return _page_head(RamFlag.ZERO, block, offset, continued, page_size) + U8.pack(fill)
        case DeviceState(_sid, _idstr, data):
            return bytes(data)
        case Command(cmd, data):
            _u("command", cmd, 16)
            _u("command length", len(data), 16)
            return U8.pack(SectionType.COMMAND) + U16.pack(cmd) + U16.pack(len(data)) + data
        case Eof():
            return U8.pack(SectionType.EOF)
        case VmDescription(raw):
            return U8.pack(SectionType.VMDESCRIPTION) + U32.pack(len(raw)) + raw
    if isinstance(event, BatchEvent):
        return event.encode(page_size)
    raise TypeError(f"not a stream event: {event!r}")
