"""``--dump DIR``: the RAM as it stands at the end, one file per block, and the device sections.

    DIR/blocks.json    [{"idstr": "pc.ram", "length": 33554432, "file": "0-pc.ram.bin"}, ...]
    DIR/<i>-<name>.bin the block's bytes (the name sanitised: idstrs such as
                       "/rom@etc/acpi/tables" hold '/'; the index keeps names unique)
    DIR/devices.json   (a destination) every device section in stream order: idstr, instance,
                       version, section id, and its fields as the stream's VMDESCRIPTION
                       describes them, or its bytes in hex where nothing describes them

A file is written under a temporary name and renamed, so a file present is whole.
"""

from __future__ import annotations

import json
import os
import re

from pipeline.protocol.vmstate import VmstateError, decode_section, describe_devices

__all__ = ["write_dump", "block_file_name", "device_entries"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SLICE = 64 << 20


def block_file_name(index: int, idstr: str) -> str:
    """A file name for block ``index`` named ``idstr``, safe on any file system."""
    return f"{index}-{_UNSAFE.sub('_', idstr).strip('._') or 'block'}.bin"


def device_entries(sections, description: dict | None) -> list[dict]:
    """``sections``: (idstr, instance_id, version_id, section_id, data) in stream order."""
    described = describe_devices(description or {})
    out = []
    for idstr, instance, version, sid, data in sections:
        entry: dict = {"idstr": idstr, "instance_id": instance, "version_id": version,
                       "section_id": sid}
        desc = described.get((idstr, instance))
        try:
            if desc is None:
                raise VmstateError("not described")
            entry["fields"] = decode_section(data, desc)
        except VmstateError as exc:
            entry["raw"] = bytes(data).hex()
            entry["undecoded"] = str(exc)
        out.append(entry)
    return out


def _write_json(path: str, value) -> None:
    with open(path + ".part", "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(path + ".part", path)


def write_dump(directory: str, blocks, sections=None, description: dict | None = None) -> None:
    """``blocks``: (idstr, a uint8 view of its RAM) in order; ``sections`` (a destination's
    device sections, see ``device_entries``) also writes devices.json."""
    os.makedirs(directory, exist_ok=True)
    listing = []
    for i, (idstr, view) in enumerate(blocks):
        name = block_file_name(i, idstr)
        path = os.path.join(directory, name)
        mem = memoryview(view).cast("B")
        with open(path + ".part", "wb") as f:
            for at in range(0, len(mem), _SLICE):
                f.write(mem[at:at + _SLICE])
        os.replace(path + ".part", path)
        listing.append({"idstr": idstr, "length": len(mem), "file": name})
    _write_json(os.path.join(directory, "blocks.json"), listing)
    if sections is not None:
        _write_json(os.path.join(directory, "devices.json"),
                    device_entries(sections, description))
