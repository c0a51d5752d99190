"""``--dump DIR``: one file per block (names safe whatever the idstr), blocks.json, and
devices.json decoded by the VMDESCRIPTION or in hex."""

import json

import numpy as np

from pipeline.dump import block_file_name, write_dump
from pipeline.protocol.vmdesc import DeviceDescription, Field, vm_description


def test_block_file_names_are_safe_and_unique():
    assert block_file_name(0, "pc.ram") == "0-pc.ram.bin"
    assert block_file_name(1, "/rom@etc/acpi/tables") == "1-rom_etc_acpi_tables.bin"
    assert block_file_name(2, "..") == "2-block.bin"
    assert block_file_name(3, "0000:00:02.0/vga.vram") == "3-0000_00_02.0_vga.vram.bin"


def test_write_dump(tmp_path):
    ram = np.arange(8192, dtype=np.uint8)
    rom = np.full(4096, 7, np.uint8)
    desc = vm_description([DeviceDescription("timer", 0, 2, (Field("t", "uint32", 4),))])
    sections = [("timer", 0, 2, 0, b"\x00\x00\x01\x00"), ("odd", 0, 1, 3, b"\xff\xee")]
    write_dump(str(tmp_path), [("ram", ram), ("/rom@x", rom)], sections, desc.description())
    listing = json.loads((tmp_path / "blocks.json").read_text())
    assert listing == [{"idstr": "ram", "length": 8192, "file": "0-ram.bin"},
                       {"idstr": "/rom@x", "length": 4096, "file": "1-rom_x.bin"}]
    assert (tmp_path / "0-ram.bin").read_bytes() == ram.tobytes()
    assert (tmp_path / "1-rom_x.bin").read_bytes() == rom.tobytes()
    devices = json.loads((tmp_path / "devices.json").read_text())
    assert devices[0]["fields"] == {"t": 256}
    assert devices[1]["raw"] == "ffee" and devices[1]["undecoded"] == "not described"
    assert not list(tmp_path.glob("*.part"))


def test_a_source_dump_has_no_devices(tmp_path):
    write_dump(str(tmp_path), [("ram", np.zeros(4096, np.uint8))])
    assert not (tmp_path / "devices.json").exists()
