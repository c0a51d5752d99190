"""A sample migration stream with every record kind (shared by the stream tests)."""

import json

from pipeline.protocol.records import (
    Command,
    Configuration,
    DeviceState,
    EndOfSection,
    Eof,
    FileHeader,
    Hook,
    MemSize,
    Page,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
    Subsection,
    VmDescription,
    ZeroPage,
    encode_event,
)

START, PART, END, FULL = (SectionType.SECTION_START, SectionType.SECTION_PART,
                          SectionType.SECTION_END, SectionType.SECTION_FULL)
BLOCKS = (RamBlockInfo("pc.ram", 1 << 20), RamBlockInfo("vga.vram", 16384))


def cpu_state_length(data: bytes, version_id: int):
    """A device whose state says its own length: be32 n, then n bytes."""
    return None if len(data) < 4 else 4 + int.from_bytes(data[:4], "big")


DEVICES = {"dev": 16, "cpu": cpu_state_length}
DESCRIPTION = json.dumps({"page_size": 4096, "devices": [
    {"name": "dev", "instance_id": 0, "version": 1,
     "fields": [{"name": "counter", "type": "uint64", "size": 8},
                {"name": "blob", "type": "buffer", "size": 8}]}]}).encode()

EVENTS = [
    FileHeader(), Configuration("pc-q35-9.2", (
        Subsection("configuration/capabilities", 1,
                   b"\0\0\0\2" + b"\x0fx-ignore-shared" + b"\x0amapped-ram"),
        Subsection("configuration/uuid", 1, bytes(range(16))))),
    SectionHeader(START, 0, "ram", 0, 4), MemSize(BLOCKS), Hook(), EndOfSection(),
    SectionFooter(0),
    SectionHeader(FULL, 1, "dev", 0, 1), DeviceState(1, "dev", bytes(range(16))),
    SectionFooter(1),
    SectionHeader(PART, 0, "ram", 0, 4), Hook(),
    Page("pc.ram", 0, b"\x11" * 4096), Page("pc.ram", 4096, b"\x22" * 4096, True),
    ZeroPage("vga.vram", 8192), ZeroPage("vga.vram", 12288, 0, True),
    Page("pc.ram", (1 << 20) - 4096, bytes(4095) + b"\x80"), EndOfSection(), SectionFooter(0),
    Command(0x0B),
    SectionHeader(END, 0, "ram", 0, 4), EndOfSection(), SectionFooter(0),
    SectionHeader(FULL, 2, "cpu", 0, 3), DeviceState(2, "cpu", b"\0\0\0\x05hello"),
    SectionFooter(2),
    Eof(), VmDescription(DESCRIPTION),
]
STREAM = b"".join(encode_event(e) for e in EVENTS)
