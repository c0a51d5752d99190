"""QEMU_VM_VMDESCRIPTION: the JSON that lets a reader that knows nothing of a device read it.

QEMU ends a stream with ``0x06``, a be32 length and a JSON object describing every
non-iterable section it wrote (savevm.c, vmstate.c), which ``scripts/analyze-migration.py``
uses to print device state and to find the page size:

    {"configuration": {"vmsd_name": "configuration", "version": 1, "fields": [...]},
     "page_size": 4096,
     "devices": [{"name": idstr, "instance_id": n, "vmsd_name": name, "version": v,
                  "fields": [{"name": ..., "type": "uint32" | "uint64" | "buffer" | ...,
                              "size": bytes}, ...]}, ...]}

Fields are big-endian and back to back in the section's data, in the order listed; a
``buffer`` field's ``size`` is its length in this stream. Iterable sections (``ram``) are not
described: their records describe themselves. The JSON holds no NUL byte, which
analyze-migration.py relies on to find it from the end of a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.protocol.records import PAGE_SIZE, VmDescription

__all__ = ["Field", "DeviceDescription", "framed_fields", "configuration_description",
           "vm_description"]

FIELD_SIZES = {"bool": 1, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4,
               "int32": 4, "uint64": 8, "int64": 8, "float64": 8}


@dataclass(frozen=True, slots=True)
class Field:
    """One vmstate field: ``type`` as QEMU names it, ``size`` in bytes."""

    name: str
    type: str
    size: int

    def __post_init__(self) -> None:
        fixed = FIELD_SIZES.get(self.type)
        if fixed is not None and fixed != self.size:
            raise ValueError(f"field {self.name}: a {self.type} is {fixed} bytes, not {self.size}")
        if self.type != "buffer" and fixed is None:
            raise ValueError(f"field {self.name}: type {self.type!r} is not one we write")
        if self.size < 0:
            raise ValueError(f"field {self.name}: size {self.size}")

    def as_json(self) -> dict:
        return {"name": self.name, "type": self.type, "size": self.size}


@dataclass(frozen=True, slots=True)
class DeviceDescription:
    """A device section as VMDESCRIPTION lists it."""

    name: str
    instance_id: int
    version: int
    fields: tuple[Field, ...]
    vmsd_name: str = ""

    @property
    def size(self) -> int:
        """Bytes of the section's data."""
        return sum(f.size for f in self.fields)

    def as_json(self) -> dict:
        return {"name": self.name, "instance_id": self.instance_id,
                "vmsd_name": self.vmsd_name or self.name, "version": self.version,
                "fields": [f.as_json() for f in self.fields]}


def framed_fields(payload: str, length: int) -> tuple[Field, ...]:
    """A length-prefixed body (be32 length, then the bytes), QEMU's VBUFFER_UINT32 shape."""
    return (Field("size", "uint32", 4), Field(payload, "buffer", length))


def configuration_description(machine: str) -> dict:
    """The ``configuration`` entry of a stream whose CONFIGURATION holds only the machine
    name (be32 length, name)."""
    return {"vmsd_name": "configuration", "version": 1,
            "fields": [f.as_json() for f in (Field("len", "uint32", 4),
                                             Field("name", "buffer", len(machine.encode())))]}


def vm_description(devices: Iterable[DeviceDescription], *, machine: str | None = None,
                   page_size: int = PAGE_SIZE) -> VmDescription:
    """The VMDESCRIPTION record for ``devices`` (in stream order)."""
    doc: dict = {}
    if machine is not None:
        doc["configuration"] = configuration_description(machine)
    doc["page_size"] = page_size
    doc["devices"] = [d.as_json() for d in devices]
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if b"\0" in raw:
        raise ValueError("a VMDESCRIPTION must not hold a NUL byte")
    return VmDescription(raw)
