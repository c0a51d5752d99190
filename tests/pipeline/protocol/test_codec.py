import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_strategies import messages

from pipeline.protocol.codec import decode, decode_header, describe, encode, header_of
from pipeline.protocol.messages import (
    MAX_PAYLOAD,
    Compress,
    CompressMessage,
    ControlHeader,
    DestBlock,
    ErrorMessage,
    MessageType,
    QemuFileMessage,
    RamBlocksRequestMessage,
    RamBlocksResultMessage,
    ReadyMessage,
    Register,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterFinishedMessage,
    UnregisterRequestMessage,
)
from shm.errors import ProtocolError, RemoteProtocolError

# protocol.md §12 B-H, byte for byte.
VECTORS = {
    "B READY": ("00000000 00000002 00000001 00000000", ReadyMessage()),
    "B ERROR": ("00000000 00000001 00000001 00000000", ErrorMessage()),
    "ours: ERROR with its reason": ("00000003 00000001 00000001 00000000 626f6f",
                                    ErrorMessage("boo")),
    "B RAM BLOCKS REQUEST": ("00000000 00000004 00000001 00000000", RamBlocksRequestMessage()),
    "B REGISTER FINISHED": ("00000000 00000009 00000001 00000000", RegisterFinishedMessage()),
    "B UNREGISTER FINISHED": ("00000000 0000000b 00000001 00000000",
                              UnregisterFinishedMessage(1)),
    "C QEMU FILE": ("0000000d 00000003 00000000 00000000 02 00000003 0000000000000080",
                    QemuFileMessage(bytes.fromhex("02 00000003 0000000000000080"), 0)),
    "D REGISTER REQUEST": (
        "00000018 00000007 00000001 00000000 0000000012345000 00000000 00000000 "
        "0000000000000000", RegisterRequestMessage((Register(0x12345000, 0, 0),))),
    "E REGISTER RESULT": (
        "00000010 00000008 00000001 00000000 00001234 00000000 00007f1234500000",
        RegisterResultMessage((RegisterResult(0x1234, 0x7F1234500000),))),
    "F COMPRESS": (
        "00000018 00000006 00000001 00000000 00000000 00000000 0000000012345000 "
        "00000000000bb000", CompressMessage(Compress(0, 0x12345000, 0xBB000))),
    "G RAM BLOCKS RESULT": (
        "00000040 00000005 00000001 00000000 "
        "00007f1234500000 0000000000000000 0000000008000000 00abcdef 00000000 "
        "00007f1200000000 0000000008000000 0000000000040000 00abce01 00000000",
        RamBlocksResultMessage((DestBlock(0x7F1234500000, 0, 128 << 20, 0x00ABCDEF),
                                DestBlock(0x7F1200000000, 0x8000000, 256 << 10, 0x00ABCE01)))),
    "H UNREGISTER REQUEST": (
        "00000018 0000000a 00000001 00000000 0000000000000123 00000000 00000000 "
        "0000000000000000", UnregisterRequestMessage((Register(0x123, 0, 0),))),
}


@pytest.mark.parametrize("name", VECTORS)
def test_vectors_decode_to_fields_and_reencode_identically(name):
    hexed, expected = VECTORS[name]
    data = bytes.fromhex(hexed)
    assert decode(data) == expected
    assert encode(expected) == data
    assert decode(bytearray(data)) == decode(memoryview(data)) == expected


def test_vector_c_is_29_bytes_and_g_in_dynamic_mode_has_zero_rkeys():
    assert len(encode(VECTORS["C QEMU FILE"][1])) == 29
    dynamic = RamBlocksResultMessage(tuple(DestBlock(b.remote_host_addr, b.offset, b.length)
                                           for b in VECTORS["G RAM BLOCKS RESULT"][1].blocks))
    assert encode(dynamic)[16 + 24:16 + 28] == bytes(4)


@pytest.mark.parametrize("name", VECTORS)
def test_every_truncation_and_trailing_junk_is_refused(name):
    data = bytes.fromhex(VECTORS[name][0])
    for n in range(len(data)):                       # grown one byte at a time
        with pytest.raises(RemoteProtocolError):
            decode(data[:n])
    for junk in (b"\x00", b"\xff" * 7, bytes(16)):
        with pytest.raises(RemoteProtocolError, match="byte_len must equal 16 \\+ len"):
            decode(data + junk)


def test_padding_is_ignored_on_decode_and_written_as_zero():
    data = bytearray(encode(RegisterRequestMessage((Register(5, 6, 7),))))
    data[12:16] = b"\xde\xad\xbe\xef"                # header padding: stack garbage
    data[16 + 12:16 + 16] = b"\xca\xfe\xba\xbe"      # RDMARegister padding
    msg = decode(bytes(data))
    assert msg == RegisterRequestMessage((Register(5, 6, 7),))
    assert encode(msg)[12:16] == bytes(4) and encode(msg)[28:32] == bytes(4)


def header(length, mtype, repeat, pad=0):
    return struct.pack(">IIII", length, mtype, repeat, pad)


@pytest.mark.parametrize("data, words", [
    (header(MAX_PAYLOAD + 1, 3, 0), ["len 524273", "exceeds 524272"]),
    (header(0, 0, 1), ["type 0", "NONE"]),
    (header(0, 12, 1), ["type 12", "unknown"]),
    (header(0, 7, 4097), ["REGISTER REQUEST", "repeat 4097", "4096"]),
    (header(0, 2, 0), ["READY", "repeat 0", "must be 1"]),
    (header(513, 1, 1) + bytes(513), ["ERROR", "len 513", "at most 512"]),
    (header(32769, 3, 0) + bytes(32769), ["QEMU FILE", "len 32769", "32768"]),
    (header(33, 5, 1) + bytes(33), ["RAM BLOCKS RESULT", "len 33", "multiple of 32"]),
    (header(32, 5, 2) + bytes(32), ["RAM BLOCKS RESULT", "repeat 2"]),
    (header(24, 6, 1) + struct.pack(">IIQQ", 1, 0, 0, 0), ["COMPRESS", "value 1", "must be 0"]),
    (header(16, 6, 1) + bytes(16), ["COMPRESS", "len 16", "must be 24"]),
    (header(24, 7, 2) + bytes(24), ["REGISTER REQUEST", "len 24 with repeat 2", "48"]),
    (header(0, 10, 0), ["UNREGISTER REQUEST", "repeat 0"]),
    (header(32, 8, 3) + bytes(32), ["REGISTER RESULT", "len 32 with repeat 3", "16", "48"]),
    (header(0, 11, 0), ["UNREGISTER FINISHED", "repeat 0"]),
    (header(8, 11, 1) + bytes(8), ["UNREGISTER FINISHED", "len 8"]),
])
def test_each_rule_names_field_value_and_rule(data, words):
    with pytest.raises(RemoteProtocolError) as info:
        decode(data)
    for word in words:
        assert word in str(info.value)


def test_qemu_file_repeat_is_kept_not_checked():
    # Older QEMU left repeat uninitialised: receivers ignore it; we keep it for re-encoding.
    data = header(3, 3, 0xDEADBEEF) + b"abc"
    msg = decode(data)
    assert msg == QemuFileMessage(b"abc", 0xDEADBEEF) and encode(msg) == data


def test_register_result_shapes():
    one = RegisterResult(9, 0x1000)
    # QEMU's shape: len 16 with repeat n (its destination hard-codes len 16).
    qemu = header(16, 8, 3) + struct.pack(">IIQ", 9, 0, 0x1000)
    assert decode(qemu) == RegisterResultMessage((one,), 3)
    # MULTI_REGISTER: n results, len 16 n.
    multi = RegisterResultMessage((one, RegisterResult(10, 0x2000), RegisterResult(11, 0)))
    assert decode(encode(multi)) == multi
    assert header_of(multi) == ControlHeader(48, MessageType.REGISTER_RESULT, 3)


def test_decode_header_checks_without_the_payload():
    assert decode_header(header(24, 7, 1)) == ControlHeader(24, MessageType.REGISTER_REQUEST, 1)
    with pytest.raises(RemoteProtocolError):
        decode_header(b"\x00" * 15)


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        encode(Register(0, 0))
    with pytest.raises(TypeError):
        decode("00" * 16)


def test_describe_names_every_field():
    assert describe(VECTORS["D REGISTER REQUEST"][1]) == {
        "type": "REGISTER_REQUEST", "len": 24, "repeat": 1,
        "records": [{"current_addr": 0x12345000, "current_index": 0, "chunks": 0}]}
    assert describe(VECTORS["H UNREGISTER REQUEST"][1])["records"][0]["chunk"] == 0x123
    assert describe(VECTORS["F COMPRESS"][1]) == {
        "type": "COMPRESS", "len": 24, "repeat": 1, "value": 0, "block_idx": 0,
        "offset": 0x12345000, "length": 0xBB000}
    g = describe(VECTORS["G RAM BLOCKS RESULT"][1])
    assert g["blocks"][1] == {"remote_host_addr": 0x7F1200000000, "offset": 0x8000000,
                              "length": 256 << 10, "remote_rkey": 0x00ABCE01}


@settings(max_examples=300)
@given(messages)
def test_valid_messages_round_trip(msg):
    data = encode(msg)
    assert decode(data) == msg
    assert encode(decode(data)) == data
    assert len(data) == 16 + header_of(msg).len


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_errors(data):
    try:
        decode(data)
    except ProtocolError:
        pass


@settings(max_examples=500)
@given(st.integers(0, 12), st.integers(0, 5000), st.integers(0, 2**32 - 1),
       st.binary(max_size=200), st.booleans())
def test_random_headers_with_payloads_raise_only_protocol_errors(mtype, repeat, pad, payload,
                                                                   honest_len):
    length = len(payload) if honest_len else (len(payload) * 7) % 300
    try:
        decode(header(length, mtype, repeat, pad) + payload)
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(messages, st.data())
def test_mutated_valid_messages_raise_only_protocol_errors(msg, data):
    raw = bytearray(encode(msg))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        decode(bytes(raw))
    except ProtocolError:
        pass
