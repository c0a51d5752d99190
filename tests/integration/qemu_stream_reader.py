"""An independent reader of QEMU's migration stream, for tests: written from QEMU's format
(migration/savevm.c, ram.c, vmstate.c and the way scripts/analyze-migration.py reads a file),
sharing no code with pipeline.protocol, so a bug in our writer cannot hide in a shared parser.

``read_stream(data)`` walks the whole stream and returns a ``Dump``: the sections in order
(with their byte ranges), every RAM block rebuilt byte for byte from MEM_SIZE, PAGE and ZERO
records, the RAM records of each ram section (kinds, for checks), and the device sections
decoded field by field through the trailing VMDESCRIPTION, which it locates as
analyze-migration.py does: the last NUL byte of the file, the first '{' after it, then a
0x06 and a be32 length just before. ``rdma=True`` accepts RAM_SAVE_FLAG_HOOK (pages then
travel outside the stream); analyze-migration.py refuses it in files, and so does this reader
by default.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
EOF_, START, PART, END, FULL, SUBSECTION, VMDESCRIPTION, CONFIGURATION = range(8)
FOOTER = 0x7E
ZERO, MEM_SIZE, PAGE, EOS, CONTINUE, XBZRLE, HOOK = 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80


class StreamFormatError(Exception):
    pass


@dataclass
class Section:
    kind: int                 # START, PART, END or FULL
    section_id: int
    name: str
    instance_id: int
    version_id: int
    start: int                # offset of the section-type byte
    end: int = 0              # offset just after its footer
    records: list = field(default_factory=list)   # RAM: ("mem_size"|"page"|"zero"|...)
    fields: dict = field(default_factory=dict)    # device: decoded through VMDESCRIPTION


@dataclass
class Dump:
    machine: str = ""
    sections: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)        # name -> bytearray
    description: dict = field(default_factory=dict)
    eof_at: int = -1


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise StreamFormatError(f"stream ends at {len(self.data)}, needed {n} bytes at "
                                    f"{self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def be64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def string(self) -> str:
        return self.take(self.u8()).decode()


def find_vmdescription(data: bytes) -> dict:
    """The VMDESCRIPTION JSON, found from the end of the stream."""
    tail_start = max(0, len(data) - (10 << 20))
    tail = data[tail_start:]
    nul = tail.rfind(b"\0")
    brace = tail.find(b"{", nul)
    if brace < 5 or tail[brace - 5] != VMDESCRIPTION:
        raise StreamFormatError("no VMDESCRIPTION at the end of the stream")
    length = struct.unpack(">I", tail[brace - 4:brace])[0]
    if length != len(tail) - brace:
        raise StreamFormatError("VMDESCRIPTION length does not match the end of the stream")
    return json.loads(tail[brace:])


def _field(r: _Reader, f: dict):
    raw = r.take(f["size"])
    kind = f["type"]
    if kind in ("uint8", "uint16", "uint32", "uint64"):
        return int.from_bytes(raw, "big")
    if kind in ("int8", "int16", "int32", "int64"):
        return int.from_bytes(raw, "big", signed=True)
    if kind == "bool":
        return bool(raw[0])
    return raw                                   # buffer and the rest: the bytes


def read_stream(data: bytes, *, rdma: bool = False, page_size: int | None = None) -> Dump:
    desc = find_vmdescription(data)
    page_size = page_size or desc["page_size"]
    devices = {(d["name"], d["instance_id"]): d for d in desc["devices"]}
    dump = Dump(description=desc)
    r = _Reader(data)
    if r.be32() != QEMU_VM_FILE_MAGIC or r.be32() != QEMU_VM_FILE_VERSION:
        raise StreamFormatError("not a QEMU migration stream, version 3")
    open_sections: dict[int, Section] = {}
    sizes: dict[str, int] = {}
    last_block = None
    while True:
        at = r.pos
        kind = r.u8()
        if kind == EOF_:
            dump.eof_at = at
            break
        if kind == CONFIGURATION:
            dump.machine = r.take(r.be32()).decode()
            continue
        if kind in (START, FULL):
            sid, name = r.be32(), r.string()
            sec = Section(kind, sid, name, r.be32(), r.be32(), at)
            open_sections[sid] = sec
        elif kind in (PART, END):
            sid = r.be32()
            first = open_sections[sid]
            sec = Section(kind, sid, first.name, first.instance_id, first.version_id, at)
        else:
            raise StreamFormatError(f"section type {kind:#x} at offset {at}")
        if sec.name == "ram":
            if sec.version_id != 4:
                raise StreamFormatError("ram section version must be 4")
            last_block = _ram(r, sec, dump, sizes, page_size, last_block, rdma)
        else:
            d = devices[(sec.name, sec.instance_id)]
            for f in d["fields"]:
                sec.fields[f["name"]] = _field(r, f)
        if r.u8() != FOOTER or r.be32() != sec.section_id:
            raise StreamFormatError(f"missing footer of section {sec.section_id} at {r.pos - 5}")
        sec.end = r.pos
        dump.sections.append(sec)
    if r.u8() != VMDESCRIPTION:
        raise StreamFormatError("QEMU_VM_EOF is not followed by VMDESCRIPTION")
    r.take(r.be32())
    if r.pos != len(data):
        raise StreamFormatError(f"{len(data) - r.pos} bytes after VMDESCRIPTION")
    return dump


def _ram(r: _Reader, sec: Section, dump: Dump, sizes: dict, page_size: int, last_block,
         rdma: bool):
    while True:
        header = r.be64()
        flags, addr = header & (page_size - 1), header & ~(page_size - 1)
        if flags & MEM_SIZE:
            left = addr
            while left:
                name = r.string()
                length = r.be64()
                sizes[name] = length
                dump.blocks.setdefault(name, bytearray(length))
                left -= length
            sec.records.append(("mem_size", addr))
            continue
        if flags & (PAGE | ZERO):
            if flags & CONTINUE:
                if last_block is None:
                    raise StreamFormatError("CONTINUE before any block")
            else:
                last_block = r.string()
            mem = dump.blocks[last_block]
            if addr + page_size > len(mem):
                raise StreamFormatError(f"page {addr:#x} outside {last_block}")
            if flags & PAGE:
                sec.records.append(("page", last_block, addr, r.pos))   # where its data is
                mem[addr:addr + page_size] = r.take(page_size)
            else:
                fill = r.u8()
                mem[addr:addr + page_size] = bytes([fill]) * page_size
                sec.records.append(("zero", last_block, addr))
            continue
        if flags & HOOK:
            if not rdma:
                raise StreamFormatError("RAM hooks don't make sense with files")
            sec.records.append(("hook",))
            continue
        if flags & XBZRLE:
            raise StreamFormatError("XBZRLE is not supported")
        if flags == EOS:
            sec.records.append(("eos",))
            return last_block
        raise StreamFormatError(f"unknown RAM flags {flags:#x}")
