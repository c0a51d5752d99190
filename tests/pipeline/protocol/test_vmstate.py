"""Device sections read by a VMDESCRIPTION (fields, arrays, structs, subsections,
capabilities), the description found at a buffer's end, and the parser holding sections no
codec knows until that description has arrived."""

import json
import struct

import pytest

from pipeline.protocol.parser import NEED_DATA, StreamParser
from pipeline.protocol.records import (
    Configuration,
    DeviceState,
    Eof,
    FileHeader,
    SectionFooter,
    SectionHeader,
    SectionType,
    VmDescription,
    encode_event,
)
from pipeline.protocol.vmstate import (
    VmstateError,
    decode_section,
    describe_devices,
    find_description,
    section_length,
)
from shm.errors import RemoteProtocolError

# A device as QEMU describes one: an int, an array of two u16, a struct with a bool, a
# buffer, and a subsection with one u32.
DEVICE = {
    "name": "dev", "instance_id": 1, "vmsd_name": "dev", "version": 3,
    "fields": [
        {"name": "a", "type": "int32", "size": 4},
        {"name": "b", "type": "uint16", "size": 2, "array_len": 2},
        {"name": "s", "type": "struct", "size": 3,
         "struct": {"vmsd_name": "s", "version": 1,
                    "fields": [{"name": "on", "type": "bool", "size": 1},
                               {"name": "raw", "type": "buffer", "size": 2}]}},
        {"name": "cap", "type": "capability", "size": 0},
    ],
    "subsections": [{"vmsd_name": "dev/sub", "version": 1,
                     "fields": [{"name": "x", "type": "uint32", "size": 4}]}],
}
BODY = (struct.pack(">i", -2) + struct.pack(">HH", 7, 8) + b"\x01\xab\xcd" + b"\x03abc"
        + b"\x05" + bytes([7]) + b"dev/sub" + struct.pack(">I", 1) + struct.pack(">I", 9))
FIELDS = {"a": -2, "b": [7, 8], "s": {"on": True, "raw": "abcd"}, "cap": "abc",
          "dev/sub": {"x": 9}}


def test_decode_and_measure():
    assert decode_section(BODY, DEVICE) == FIELDS
    assert section_length(BODY + b"more", DEVICE) == len(BODY)
    for cut in range(len(BODY)):
        assert section_length(BODY[:cut], DEVICE) is None


@pytest.mark.parametrize("body, words", [
    (BODY[:-1], "fewer than its description"), (BODY + b"x", "1 bytes of the section"),
    (BODY.replace(b"\x05\x07dev", b"\x06\x07dev"), "subsection 'dev/sub' not found")])
def test_bytes_that_do_not_fit_are_refused(body, words):
    with pytest.raises(VmstateError, match=words):
        decode_section(body, DEVICE)


def description_record(devices) -> bytes:
    raw = json.dumps({"page_size": 4096, "devices": devices}).encode()
    return encode_event(VmDescription(raw))


def test_find_description_only_when_whole():
    tail = b"\x7e\x00\x00\x00\x05\x00" + description_record([DEVICE])
    at, doc = find_description(tail)
    assert at == 6 and doc["devices"][0]["name"] == "dev"
    for cut in (1, 10, len(tail) - 1):
        assert find_description(tail[:cut]) is None
    assert find_description(tail + b"x") is None
    assert describe_devices(doc) == {("dev", 1): DEVICE}


def stream() -> bytes:
    full = SectionType.SECTION_FULL
    return b"".join(encode_event(e) for e in (
        FileHeader(), Configuration("pc"), SectionHeader(full, 5, "dev", 1, 3),
        DeviceState(5, "dev", BODY), SectionFooter(5), Eof())) + description_record([DEVICE])


def parse(data: bytes, step: int) -> list:
    p = StreamParser(describe=True)
    out = []
    for i in range(0, len(data), step):
        p.feed(data[i:i + step])
        while (e := p.next_event()) is not NEED_DATA:
            out.append(e)
    p.end_of_stream()
    return out


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_the_parser_holds_an_unknown_section_until_its_description(step):
    events = parse(stream(), step)
    assert DeviceState(5, "dev", BODY) in events
    assert isinstance(events[-1], VmDescription) and isinstance(events[-2], Eof)


def test_without_describe_an_unknown_section_is_refused():
    p = StreamParser()
    p.feed(stream())
    with pytest.raises(RemoteProtocolError, match="'dev' .instance 1.: no device codec"):
        list(p.events())


def test_a_stream_that_ends_before_its_description_is_refused():
    data = stream()
    p = StreamParser(describe=True)
    p.feed(data[:-10])
    assert list(p.events())[-1] == SectionHeader(SectionType.SECTION_FULL, 5, "dev", 1, 3)
    with pytest.raises(RemoteProtocolError, match="expected the VMDESCRIPTION that describes"):
        p.end_of_stream()


def test_a_section_the_description_lacks_is_refused():
    data = stream().replace(b'"instance_id": 1', b'"instance_id": 2')
    p = StreamParser(describe=True)
    p.feed(data)
    with pytest.raises(RemoteProtocolError, match="VMDESCRIPTION does not describe it"):
        list(p.events())


def test_only_device_state_is_held():
    """An iterable section no codec reads (START) is refused at once: its description never
    comes, and holding the rest would hold all of RAM."""
    data = stream().replace(bytes([SectionType.SECTION_FULL, 0, 0, 0, 5]),
                            bytes([SectionType.SECTION_START, 0, 0, 0, 5]))
    p = StreamParser(describe=True)
    p.feed(data)
    with pytest.raises(RemoteProtocolError, match="no device codec is registered"):
        list(p.events())


def test_holding_is_bounded(monkeypatch):
    import pipeline.protocol.parser as parser_module

    monkeypatch.setattr(parser_module, "HOLD_MAX", 8)
    p = StreamParser(describe=True)
    p.feed(stream()[:-20])
    with pytest.raises(RemoteProtocolError, match="still no VMDESCRIPTION to read it by"):
        list(p.events())
