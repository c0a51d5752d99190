"""Device sections read through a stream's own VMDESCRIPTION, as analyze-migration.py reads them.

QEMU describes every non-iterable section it saved (vmstate.c, while saving, so the description
lists exactly what this stream holds): per device, ``fields`` in stream order, each with a
``type`` and a ``size`` in bytes; ``array_len`` repeats a field; a ``struct`` field holds its own
``fields`` (and ``subsections``); a device's ``subsections`` follow its fields, each as 0x05, u8
length, name, be32 version, then its own fields. ``capability`` is a u8-length string. So a
section we have no codec for can still be measured (where it ends) and decoded (field by field).

``section_length`` is a parser device codec (None until enough bytes are there);
``decode_section`` gives plain JSON data: integers for the integer types, booleans, hex strings
for everything else. ``find_description`` finds a whole VMDESCRIPTION at the end of a buffer
(the way analyze-migration.py finds it in a file: the last NUL byte, the first '{' after it,
0x06 and the be32 length just before), so a reader can tell that a stream holding sections it
could not measure has ended, without waiting for the connection to close.
"""

from __future__ import annotations

import json

__all__ = ["VmstateError", "section_length", "decode_section", "find_description",
           "describe_devices"]

SUBSECTION = 0x05
VMDESCRIPTION = 0x06
_INT_TYPES = {"int8", "int16", "int32", "int64", "int32 equal", "int32 le", "int64 equal",
              "uint8 equal", "uint16 equal"}
_UINT_TYPES = {"uint8", "uint16", "uint32", "uint64", "uint32 equal"}


class VmstateError(ValueError):
    """The bytes do not follow the description (or the description is not one)."""


class _Short(Exception):
    """More bytes are needed."""


class _Cursor:
    def __init__(self, data, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0:
            raise VmstateError(f"field size {n}")
        end = self.pos + n
        if end > len(self.data):
            raise _Short
        out = bytes(self.data[self.pos:end])
        self.pos = end
        return out


def _field(cur: _Cursor, f: dict):
    kind = f.get("type", "unknown")
    if kind == "struct":
        if not isinstance(f.get("struct"), dict):
            raise VmstateError(f"struct field {f.get('name')!r} without its description")
        return _struct(cur, f["struct"])
    if kind == "capability":
        return cur.take(cur.take(1)[0]).decode(errors="replace")
    raw = cur.take(int(f.get("size", 0)))
    if kind == "int32 le":
        return int.from_bytes(raw, "little", signed=True)
    if kind in _INT_TYPES:
        return int.from_bytes(raw, "big", signed=True)
    if kind in _UINT_TYPES:
        return int.from_bytes(raw, "big")
    if kind == "bool" and len(raw) == 1:
        return raw[0] != 0
    return raw.hex()


def _struct(cur: _Cursor, desc: dict) -> dict:
    out: dict = {}
    fields = desc.get("fields")
    if not isinstance(fields, list):
        raise VmstateError(f"{desc.get('vmsd_name', 'a section')!r} has no field list")
    for f in fields:
        if not isinstance(f, dict):
            raise VmstateError(f"field {f!r} is not an object")
        n = f.get("array_len")
        value = [_field(cur, f) for _ in range(int(n))] if n is not None else _field(cur, f)
        name = str(f.get("name", "?"))
        if name in out:        # QEMU splits arrays around NULL pointers into several fields
            prev = out[name]
            out[name] = (prev if isinstance(prev, list) else [prev]) + (
                value if isinstance(value, list) else [value])
        else:
            out[name] = value
    for sub in desc.get("subsections", ()):
        at = cur.pos
        if cur.take(1)[0] != SUBSECTION:
            raise VmstateError(f"subsection {sub.get('vmsd_name')!r} not found at byte {at}")
        name = cur.take(cur.take(1)[0]).decode(errors="replace")
        cur.take(4)                                          # its version
        out[name] = _struct(cur, sub)
    return out


def section_length(data, desc: dict) -> int | None:
    """Bytes of a section's state that ``desc`` describes, from its start in ``data``; None
    while ``data`` holds less than all of it."""
    cur = _Cursor(data)
    try:
        _struct(cur, desc)
    except _Short:
        return None
    return cur.pos


def decode_section(data, desc: dict) -> dict:
    """The section's state field by field; ``VmstateError`` if it does not fit ``desc``."""
    cur = _Cursor(data)
    try:
        out = _struct(cur, desc)
    except _Short:
        raise VmstateError(f"the section holds {len(data)} bytes, fewer than its "
                           "description") from None
    if cur.pos != len(data):
        raise VmstateError(f"{len(data) - cur.pos} bytes of the section are not described")
    return out


def find_description(buf) -> tuple[int, dict] | None:
    """(offset of its 0x06 byte, the JSON) when ``buf`` ends with a whole VMDESCRIPTION."""
    nul = buf.rfind(b"\0")
    brace = buf.find(b"{", nul + 1)
    if brace < 5 or buf[brace - 5] != VMDESCRIPTION:
        return None
    if int.from_bytes(buf[brace - 4:brace], "big") != len(buf) - brace:
        return None
    try:
        doc = json.loads(bytes(buf[brace:]))
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("devices", []), list):
        return None
    return brace - 5, doc


def describe_devices(doc: dict) -> dict[tuple[str, int], dict]:
    """(name, instance_id) -> description, for every device a VMDESCRIPTION lists."""
    out = {}
    for d in doc.get("devices", ()):
        if isinstance(d, dict) and "name" in d:
            out[(str(d["name"]), int(d.get("instance_id", 0)))] = d
    return out
