import pytest

from pipeline.protocol.buffer import U32, Buffer, BufferReadError
from shm.errors import RemoteProtocolError


def test_push_then_pull_round_trips_in_network_order():
    buf = Buffer(capacity=2)                     # grows past its capacity
    buf.push_u8(0x01)
    buf.push_u16(0x0203)
    buf.push_u32(0x04050607)
    buf.push_u64(0x08090A0B0C0D0E0F)
    buf.push_bytes(b"xy")
    assert buf.data == bytes.fromhex("01 0203 04050607 08090a0b0c0d0e0f") + b"xy"
    reader = Buffer(buf.data)
    assert (reader.pull_u8(), reader.pull_u16(), reader.pull_u32(), reader.pull_u64()) == (
        0x01, 0x0203, 0x04050607, 0x08090A0B0C0D0E0F)
    assert reader.pull_bytes(2) == b"xy"
    assert reader.eof() and reader.remaining == 0


@pytest.mark.parametrize("pull, size", [
    (Buffer.pull_u8, 1), (Buffer.pull_u16, 2), (Buffer.pull_u32, 4), (Buffer.pull_u64, 8),
    (lambda b: b.pull_bytes(5), 5), (lambda b: b.pull_struct(U32), 4)])
def test_short_read_raises_and_leaves_the_cursor(pull, size):
    for have in range(size):
        buf = Buffer(b"\xaa" + bytes(have))
        buf.pull_u8()
        with pytest.raises(BufferReadError) as info:
            pull(buf)
        assert buf.tell() == 1
        assert f"need {size} bytes at offset 1, only {have} left" in str(info.value)
        assert isinstance(info.value, RemoteProtocolError)


def test_push_overwrites_at_the_cursor_and_len_tracks_the_furthest_byte():
    buf = Buffer(capacity=8)
    buf.push_u32(0xFFFFFFFF)
    buf.push_u32(0x11111111)
    buf.seek(0)
    buf.push_u32(0)
    assert len(buf) == 8 and buf.data == bytes(4) + b"\x11" * 4


def test_read_only_and_bad_arguments():
    with pytest.raises(TypeError):
        Buffer(b"ab").push_u8(1)
    with pytest.raises(ValueError):
        Buffer(b"ab", capacity=4)
    with pytest.raises(BufferReadError):
        Buffer(b"ab").seek(3)
    with pytest.raises(ValueError):
        Buffer(b"ab").pull_bytes(-1)


def test_pull_works_on_bytearray_and_memoryview():
    for data in (bytearray(b"\x00\x01"), memoryview(b"\x00\x01")):
        assert Buffer(data).pull_u16() == 1
