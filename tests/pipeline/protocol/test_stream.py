import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_samples import DEVICES, EVENTS, STREAM

from pipeline.protocol.messages import QEMU_FILE_MAX
from pipeline.protocol.records import (
    HOOK_RECORD,
    EndOfSection,
    Hook,
    MemSize,
    Page,
    SectionHeader,
    encode_event,
)
from pipeline.protocol.stream import StreamReader, StreamWriter
from shm.errors import LocalProtocolError, RemoteProtocolError


def written(events):
    """The sample stream through a StreamWriter, flushing after each HOOK and at the end."""
    writer = StreamWriter()
    payloads = []
    for event in events:
        writer.write_event(event)
        if isinstance(event, Hook):
            payloads.extend(writer.flush())
    return payloads + writer.flush()


def test_writer_and_reader_round_trip_the_sample_stream():
    payloads = written(EVENTS)
    assert b"".join(payloads) == STREAM
    reader = StreamReader(DEVICES)
    events = []
    for payload in payloads:
        reader.feed(payload)
        events.extend(reader.events())
    reader.end_of_stream()
    assert events == EVENTS
    assert reader.bytes_received == len(STREAM) and reader.payloads == len(payloads)


def test_hook_always_ends_its_payload():
    payloads = written(EVENTS)
    hooks = [p for p in payloads if p.endswith(HOOK_RECORD)]
    assert len(hooks) == 2 == sum(isinstance(e, Hook) for e in EVENTS)
    # The section header before the HOOK travels in the same payload (QEMU does the same).
    assert hooks[1].endswith(encode_event(EVENTS[10]) + HOOK_RECORD)
    assert isinstance(EVENTS[10], SectionHeader)


def test_writer_cuts_at_32768_bytes():
    writer = StreamWriter()
    writer.write(bytes(range(256)) * 300)         # 76800 bytes
    payloads = writer.flush()
    assert [len(p) for p in payloads] == [32768, 32768, 11264]
    assert writer.flush() == [] and writer.pending == 0 and writer.bytes_written == 76800


def test_no_other_payload_ends_like_a_hook():
    writer = StreamWriter()
    writer.write(bytes(QEMU_FILE_MAX - 8) + HOOK_RECORD + b"tail" + bytes(7) + b"\x80")
    payloads = writer.flush()
    assert [len(p) for p in payloads] == [QEMU_FILE_MAX - 1, 12, 1]
    assert not any(p.endswith(HOOK_RECORD) for p in payloads)
    assert b"".join(payloads) == bytes(QEMU_FILE_MAX - 8) + HOOK_RECORD + b"tail" + bytes(7) + \
        b"\x80"


def test_nothing_may_follow_a_hook_before_flush():
    writer = StreamWriter()
    writer.hook()
    assert writer.hook_pending
    with pytest.raises(LocalProtocolError, match="HOOK record must end its QEMU FILE message"):
        writer.write_event(EndOfSection())
    assert writer.flush() == [HOOK_RECORD] and not writer.hook_pending
    writer.write_event(EndOfSection())


def test_writer_page_uses_continue_for_the_same_block():
    writer = StreamWriter()
    writer.page("a", 0, bytes(4096))
    writer.page("a", 4096, bytes(4096))
    writer.zero_page("b", 0)
    writer.zero_page("a", 8192)
    data = writer.flush()[0]
    assert data[7] == 0x08 and data[8 + 2 + 4096 + 7] == 0x28
    assert data.endswith(bytes.fromhex("0000000000002002 01 61 00"))


def test_reader_refuses_a_hook_that_does_not_end_its_payload():
    head = b"".join(encode_event(e) for e in EVENTS[:4])
    reader = StreamReader(DEVICES)
    reader.feed(head + HOOK_RECORD + encode_event(EndOfSection()))
    with pytest.raises(RemoteProtocolError, match="followed by 8 more bytes"):
        list(reader.events())
    with pytest.raises(RemoteProtocolError, match="HOOK must end its message"):
        reader.feed(b"")
    # The same bytes cut after the HOOK are fine.
    reader = StreamReader(DEVICES)
    reader.feed(head + HOOK_RECORD)
    reader.feed(encode_event(EndOfSection()))
    assert [type(e) for e in reader.events()][-2:] == [Hook, EndOfSection]


def test_reader_fed_one_byte_per_payload():
    # A hook must end a payload, so split there; everything else byte by byte.
    reader = StreamReader(DEVICES)
    events = []
    i = 0
    while i < len(STREAM):
        n = 8 if STREAM[i:i + 8] == HOOK_RECORD and STREAM[i - 1:i] != b"" else 1
        reader.feed(STREAM[i:i + n])
        events.extend(reader.events())
        i += n
    reader.end_of_stream()
    assert events == EVENTS


def test_reader_end_of_stream_refuses_a_cut_stream():
    reader = StreamReader(DEVICES)
    for payload in written(EVENTS)[:-1]:
        reader.feed(payload)
        list(reader.events())
    with pytest.raises(RemoteProtocolError, match="truncated"):
        reader.end_of_stream()


@settings(max_examples=200)
@given(st.lists(st.one_of(st.binary(max_size=40000), st.just(None)), max_size=12),
       st.integers(9, QEMU_FILE_MAX))
def test_writer_invariants(writes, max_payload):
    writer = StreamWriter(max_payload=max_payload)
    expected, payloads = b"", []
    for item in writes:
        if item is None:                             # a HOOK, then the flush it needs
            writer.hook()
            expected += HOOK_RECORD
            batch = writer.flush()
            assert batch[-1].endswith(HOOK_RECORD)
            assert not any(p.endswith(HOOK_RECORD) for p in batch[:-1])
        else:
            writer.write(item)
            expected += item
            batch = writer.flush() if len(item) % 3 == 0 else []
            assert not any(p.endswith(HOOK_RECORD) for p in batch)
        payloads += batch
    payloads += writer.flush()
    assert b"".join(payloads) == expected
    assert all(0 < len(p) <= max_payload for p in payloads)


def test_mem_size_and_pages_reassemble_across_payloads():
    blocks = EVENTS[3]
    assert isinstance(blocks, MemSize)
    writer = StreamWriter()
    for event in EVENTS[:4]:
        writer.write_event(event)
    for i in range(20):
        writer.write_event(Page("pc.ram", i * 4096, bytes([i]) * 4096))
    payloads = writer.flush()
    assert len(payloads) == 3
    reader = StreamReader(DEVICES)
    pages = []
    for payload in payloads:
        reader.feed(payload)
        pages += [e for e in reader.events() if isinstance(e, Page)]
    assert [p.data[0] for p in pages] == list(range(20))
