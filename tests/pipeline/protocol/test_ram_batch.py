"""RAM records as numpy rows: the writer's bytes are QEMU's records, and a bulk parser reads them
back as batches equal to what the record-by-record parser reads."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.protocol.parser import StreamParser
from pipeline.protocol.ram_batch import (
    PageBatch,
    ZeroBatch,
    count_records,
    page_dtype,
    page_records,
    zero_records,
)
from pipeline.protocol.records import (
    EndOfSection,
    Eof,
    FileHeader,
    MemSize,
    Page,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
    ZeroPage,
    encode_event,
)
from shm.errors import RemoteProtocolError

PAGES = 64
BLOCK = RamBlockInfo("pc.ram", PAGES * 4096)
HEAD = b"".join(encode_event(e) for e in (
    FileHeader(), SectionHeader(SectionType.SECTION_START, 2, "ram", 0, 4),
    MemSize((BLOCK, RamBlockInfo("vga.vram", 8192)))))
TAIL = b"".join(encode_event(e) for e in (EndOfSection(), SectionFooter(2), Eof()))


def ram(seed=1):
    return np.random.default_rng(seed).integers(0, 256, (PAGES, 4096), dtype=np.uint8)


def as_bytes(buffers):
    return b"".join(b.tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in buffers)


def test_page_records_are_qemu_page_records():
    view = ram()
    out = as_bytes(page_records("pc.ram", view, np.array([3, 4, 9]), named=True))
    expected = b"".join(encode_event(e) for e in (
        Page("pc.ram", 3 * 4096, view[3].tobytes()),
        Page("pc.ram", 4 * 4096, view[4].tobytes(), True),
        Page("pc.ram", 9 * 4096, view[9].tobytes(), True)))
    assert out == expected
    unnamed = as_bytes(page_records("pc.ram", view, np.array([5]), named=False))
    assert unnamed == struct.pack(">Q", 5 * 4096 | 0x28) + view[5].tobytes()


def test_zero_records_are_qemu_zero_records():
    out = as_bytes(zero_records("vga.vram", np.array([0, 1]), named=True))
    assert out == (encode_event(ZeroPage("vga.vram", 0))
                   + encode_event(ZeroPage("vga.vram", 4096, 0, True)))
    assert out[-9:] == bytes.fromhex("0000000000001022 00")


def test_scratch_rows_are_reused():
    scratch = np.empty(8, page_dtype())
    out = page_records("pc.ram", ram(), np.arange(1, 6), named=False, scratch=scratch)
    assert out[0].base is scratch or np.shares_memory(out[0], scratch)


def stream(view, pages, zeros):
    return HEAD + as_bytes(
        zero_records("pc.ram", zeros, named=True)
        + page_records("pc.ram", view, pages, named=False)) + TAIL


def events(data, bulk, step=None):
    parser = StreamParser(bulk=bulk)
    out = []
    step = step or len(data)
    for i in range(0, len(data), step):
        parser.feed(data[i:i + step])
        out.extend(parser.events())
    parser.end_of_stream()
    return out


def flatten(evs):
    """Batches spelled out as single records, to compare bulk with record-by-record parsing."""
    out = []
    for e in evs:
        if isinstance(e, PageBatch):
            out += [("page", e.block, int(o), e.data[i].tobytes())
                    for i, o in enumerate(e.offsets)]
        elif isinstance(e, ZeroBatch):
            out += [("zero", e.block, int(o)) for o in e.offsets]
        elif isinstance(e, Page):
            out.append(("page", e.block, e.offset, e.data))
        elif isinstance(e, ZeroPage):
            out.append(("zero", e.block, e.offset))
        else:
            out.append(e)
    return out


@pytest.mark.parametrize("step", [None, 1, 4095, 4104, 65536])
def test_bulk_parser_reads_what_the_record_parser_reads(step):
    view = ram()
    data = stream(view, np.arange(10, 60), np.arange(0, 10))
    bulk = events(data, True, step)
    assert any(isinstance(e, PageBatch) for e in bulk)
    assert flatten(bulk) == flatten(events(data, False))
    assert b"".join(encode_event(e) for e in bulk) == data


def test_batch_views_survive_later_feeds():
    view = ram()
    data = stream(view, np.arange(1, 40), np.arange(0, 1))
    parser = StreamParser(bulk=True)
    parser.feed(data[:100_000])
    kept = [e for e in parser.events() if isinstance(e, PageBatch)]
    parser.feed(data[100_000:])            # the parser's buffer cannot move under the views
    list(parser.events())
    first = kept[0]
    for i, off in enumerate(first.offsets):
        assert first.data[i].tobytes() == view[int(off) // 4096].tobytes()


def test_a_bad_record_inside_a_run_is_refused_with_its_offset():
    view = ram()
    data = bytearray(stream(view, np.arange(1, 20), np.arange(0, 1)))
    bad = len(HEAD) + len(encode_event(ZeroPage("pc.ram", 0))) + 5 * 4104
    data[bad:bad + 8] = struct.pack(">Q", (PAGES + 3) * 4096 | 0x28)    # outside the block
    parser = StreamParser(bulk=True)
    parser.feed(bytes(data))
    with pytest.raises(RemoteProtocolError) as info:
        list(parser.events())
    msg = str(info.value)
    assert f"offset {bad}" in msg and "outside RAMBlock 'pc.ram'" in msg
    assert "section 'ram' START (id 2)" in msg


def test_count_records_stops_at_the_first_misfit():
    rows = np.zeros(200, np.dtype([("head", ">u8"), ("fill", "u1")]))
    rows["head"] = (np.arange(200, dtype=np.uint64) * 4096) | 0x22
    rows["fill"][150] = 7
    data = rows.tobytes()
    assert count_records(data, 0, len(data), zero=True, block_length=1 << 30) == 150
    assert count_records(data, 0, len(data) - 1, zero=True, block_length=1 << 30) == 150
    assert count_records(data, 0, len(data), zero=True, block_length=100 * 4096) == 100
    assert count_records(data, 0, len(data), zero=False, block_length=1 << 30) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=30, unique=True),
       st.integers(0, PAGES - 1), st.integers(1, 9000))
def test_any_split_of_any_page_set_parses_alike(pages, zero, step):
    view = ram(7)
    pages = np.array(pages)
    data = stream(view, pages, np.array([zero]))
    assert flatten(events(data, True, step)) == flatten(events(data, False))
