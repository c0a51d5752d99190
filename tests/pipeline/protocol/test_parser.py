import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_samples import DEVICES, EVENTS, STREAM

from pipeline.protocol.parser import NEED_DATA, StreamParser
from pipeline.protocol.records import encode_event
from shm.errors import ProtocolError, RemoteProtocolError

HEADER = bytes.fromhex("5145564d 00000003")
RAM_START = bytes.fromhex("01 00000000 03 72616d 00000000 00000004")
MEM_SIZE = (struct.pack(">Q", 0x2000 | 0x04) + b"\x01a" + struct.pack(">Q", 0x2000))


def parse(data, devices=DEVICES, end=True):
    parser = StreamParser(devices)
    parser.feed(data)
    events = list(parser.events())
    if end:
        parser.end_of_stream()
    return events


def test_whole_stream_parses_to_its_events_and_back():
    events = parse(STREAM)
    assert events == EVENTS
    assert b"".join(map(encode_event, events)) == STREAM


def test_one_byte_at_a_time_gives_the_same_events():
    parser = StreamParser(DEVICES)
    events = []
    for i in range(len(STREAM)):
        parser.feed(STREAM[i:i + 1])
        events.extend(parser.events())
    parser.end_of_stream()
    assert events == EVENTS and parser.finished
    assert parser.blocks == {"pc.ram": 1 << 20, "vga.vram": 16384}


def test_truncated_at_every_length_is_refused_at_the_end():
    eof_end = len(STREAM) - len(encode_event(EVENTS[-1]))   # a stream may end after EOF
    for n in set(range(len(STREAM))) - {eof_end}:
        parser = StreamParser(DEVICES)
        parser.feed(STREAM[:n])
        list(parser.events())
        with pytest.raises(RemoteProtocolError, match=f"truncated at offset {n}"):
            parser.end_of_stream()


@pytest.mark.parametrize("junk", [b"\x00", b"\x06", b"garbage"])
def test_trailing_junk_is_refused(junk):
    with pytest.raises(RemoteProtocolError, match="after VMDESCRIPTION"):
        parse(STREAM + junk)


def test_eof_without_vmdescription_is_a_complete_stream():
    end = STREAM.index(bytes([0x00, 0x06]) + struct.pack(">I", len(EVENTS[-1].json)))
    assert parse(STREAM[:end + 1])[-1] == EVENTS[-2]
    with pytest.raises(RemoteProtocolError, match="byte 0x07 after QEMU_VM_EOF"):
        parse(STREAM[:end + 1] + b"\x07")


def ram(*records):
    return HEADER + RAM_START + MEM_SIZE + b"".join(records)


@pytest.mark.parametrize("data, words", [
    (b"QEMU\x00\x00\x00\x03", ["offset 0", "file magic 0x51454d55, must be 0x5145564d"]),
    (HEADER[:4] + b"\x00\x00\x00\x02", ["file version 2"]),
    (HEADER + b"\x09", ["offset 8", "section type 0x09"]),
    (HEADER + b"\x05", ["0x05 (SUBSECTION)"]),
    (HEADER + b"\x02\x00\x00\x00\x07", ["SECTION_PART of section 7", "no SECTION_START"]),
    (HEADER + bytes.fromhex("08 000b 0000 07 00000001 61"),
     ["offset 13", "QEMU_VM_CONFIGURATION must follow the file header"]),
    (HEADER + bytes.fromhex("01 00000000 03 72616d 00000000 00000003"),
     ["section ram version 3"]),
    (HEADER + bytes.fromhex("01 00000000 00 00000000 00000001"), ["empty section idstr"]),
    (HEADER + bytes.fromhex("01 00000001 03 646576 00000000 00000001"),
     ["offset 25", "section 1 'dev'", "no device codec"]),
    (HEADER + bytes.fromhex("04 00000001 01 61 00000000 00000001") + bytes(4) + b"\x7e\0\0\0\2",
     ["footer of section 2, expected 1"]),
    (HEADER + bytes.fromhex("04 00000001 01 61 00000000 00000001") + bytes(4) + bytes(5),
     ["byte 0x00 where the footer of section 1"]),
    (ram(struct.pack(">Q", 0x28)), ["CONTINUE before any block"]),
    (ram(struct.pack(">Q", 0x08) + b"\x01b"), ["RAMBlock 'b' not found"]),
    (ram(struct.pack(">Q", 0x2008) + b"\x01a"), ["page at 0x2000 lies outside RAMBlock 'a'"]),
    (ram(struct.pack(">Q", 0x02) + b"\x01a\x07"), ["fill 7, must be 0"]),
    (ram(struct.pack(">Q", 0x40)), ["flags 0x40 (XBZRLE)"]),
    (ram(struct.pack(">Q", 0x200)), ["MULTIFD_FLUSH"]),
    (ram(struct.pack(">Q", 0x0A)), ["flags 0xa (ZERO|PAGE)"]),
    (ram(struct.pack(">Q", 0x14)), ["flags 0x14"]),
    (ram(struct.pack(">Q", 0x1080)), ["HOOK record with address 0x1000"]),
    (HEADER + RAM_START + struct.pack(">Q", 0x1000 | 4) + b"\x01a" + struct.pack(">Q", 0x2000),
     ["RAMBlock 'a' length 0x2000", "0x1000 bytes left"]),
    (HEADER + RAM_START + struct.pack(">Q", 0x2000 | 4) + b"\x01a" + struct.pack(">Q", 0x1000)
     + b"\x01a" + struct.pack(">Q", 0x1000), ["'a' listed twice"]),
    (HEADER + RAM_START + struct.pack(">Q", 0x2000 | 4) + b"\x01\xff" + struct.pack(">Q", 8),
     ["not UTF-8"]),
    (HEADER + b"\x00\x06\x00\x00\x00\x01{", ["VMDESCRIPTION is not valid JSON"]),
    (HEADER + bytes.fromhex("07 00000001 61 05 03 616263 00000001"),
     ["offset 14", "configuration subsection 'abc' is unknown"]),
])
def test_bad_input_names_what_and_where(data, words):
    with pytest.raises(RemoteProtocolError) as info:
        parse(data, {"a": 4}, end=False)
    assert "migration stream offset" in str(info.value) or "VMDESCRIPTION" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_a_failed_parser_stays_failed():
    parser = StreamParser()
    parser.feed(b"XXXXXXXX")
    with pytest.raises(RemoteProtocolError):
        parser.next_event()
    for call in (parser.next_event, parser.end_of_stream, lambda: parser.feed(HEADER)):
        with pytest.raises(RemoteProtocolError, match="file magic"):
            call()


def test_need_data_and_offsets():
    parser = StreamParser()
    assert parser.next_event() is NEED_DATA
    parser.feed(HEADER[:5])
    assert parser.next_event() is NEED_DATA and parser.offset == 0
    parser.feed(HEADER[5:])
    parser.next_event()
    assert parser.offset == 8 and not parser.finished


def test_device_codec_may_ask_for_more_bytes():
    calls = []

    def codec(data, version):
        calls.append((len(data), version))
        return None if len(data) < 4 else 4 + data[3]

    body = HEADER + bytes.fromhex("04 00000001 01 63 00000000 00000009") + b"\0\0\0\2xy"
    parser = StreamParser({"c": codec})
    parser.feed(body[:-3])
    assert [type(e).__name__ for e in parser.events()] == ["FileHeader", "SectionHeader"]
    parser.feed(body[-3:] + b"\x7e\0\0\0\1\0")
    events = list(parser.events())
    assert events[0].data == b"\0\0\0\2xy" and calls[-1][1] == 9
    parser.end_of_stream()


def test_large_streams_are_compacted_as_they_go():
    pages = b"".join(struct.pack(">Q", 0x28 | (i << 12)) + bytes(4096) for i in range(1, 300))
    data = (HEADER + RAM_START + struct.pack(">Q", 0x200000 | 4) + b"\x01a"
            + struct.pack(">Q", 0x200000) + struct.pack(">Q", 0x08) + b"\x01a" + bytes(4096)
            + pages + struct.pack(">Q", 0x10) + b"\x7e\0\0\0\0\0")
    parser = StreamParser()
    n = 0
    for i in range(0, len(data), 1000):
        parser.feed(data[i:i + 1000])
        n += sum(1 for _ in parser.events())
    parser.end_of_stream()
    assert n == 1 + 1 + 1 + 300 + 1 + 1 + 1
    assert len(parser._buf) < 70_000          # consumed bytes do not pile up


@settings(max_examples=300)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_raise_only_protocol_errors(data, with_header):
    parser = StreamParser(DEVICES)
    try:
        parser.feed((HEADER if with_header else b"") + data)
        list(parser.events())
        parser.end_of_stream()
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.data())
def test_mutated_sample_raises_only_protocol_errors(data):
    raw = bytearray(STREAM)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    parser = StreamParser(DEVICES)
    try:
        parser.feed(bytes(raw[:cut]))
        list(parser.events())
        parser.end_of_stream()
    except ProtocolError:
        pass
