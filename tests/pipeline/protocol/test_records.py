import pytest
from stream_samples import EVENTS, STREAM

from pipeline.protocol.records import (
    EOS_RECORD,
    HOOK_RECORD,
    Command,
    Configuration,
    FileHeader,
    MemSize,
    Page,
    RamBlockInfo,
    RamFlag,
    SectionFooter,
    SectionHeader,
    SectionType,
    Subsection,
    VmDescription,
    ZeroPage,
    encode_event,
    mem_size,
)
from shm.errors import RemoteProtocolError


@pytest.mark.parametrize("event, hexed", [
    (FileHeader(), "5145564d 00000003"),
    (Configuration("pc"), "07 00000002 7063"),
    (Configuration("pc", (Subsection("configuration/target-page-bits", 1, bytes(4)),)),
     "07 00000002 7063 05 1e" + b"configuration/target-page-bits".hex() + "00000001 00000000"),
    (SectionHeader(SectionType.SECTION_START, 3, "ram", 0, 4),
     "01 00000003 03 72616d 00000000 00000004"),
    (SectionHeader(SectionType.SECTION_PART, 3, "ram", 0, 4), "02 00000003"),
    (SectionFooter(3), "7e 00000003"),
    (MemSize((RamBlockInfo("a", 0x2000), RamBlockInfo("bc", 0x1000))),
     "0000000000003004 01 61 0000000000002000 02 6263 0000000000001000"),
    (ZeroPage("a", 0x5000), "0000000000005002 01 61 00"),
    (ZeroPage("a", 0x6000, 0, True), "0000000000006022 00"),
    (Command(0x0B), "08 000b 0000"),
])
def test_records_in_qemus_layout(event, hexed):
    assert encode_event(event) == bytes.fromhex(hexed)


def test_hook_and_eos_records():
    assert HOOK_RECORD == bytes.fromhex("0000000000000080")
    assert EOS_RECORD == bytes.fromhex("0000000000000010")
    assert RamFlag.HOOK == 0x80 and RamFlag.CONTINUE == 0x20 and RamFlag.MULTIFD_FLUSH == 0x200


def test_page_record_carries_the_block_name_unless_continued():
    named = encode_event(Page("pc.ram", 0x3000, bytes(4096)))
    assert named[:8] == bytes.fromhex("0000000000003008") and named[8:15] == b"\x06pc.ram"
    assert len(named) == 8 + 7 + 4096
    cont = encode_event(Page("pc.ram", 0x3000, bytes(4096), True))
    assert cont[:8] == bytes.fromhex("0000000000003028") and len(cont) == 8 + 4096


@pytest.mark.parametrize("make", [
    lambda: encode_event(Page("a", 0x1001, bytes(4096))),
    lambda: encode_event(Page("a", 0, bytes(100))),
    lambda: encode_event(Page("", 0, bytes(4096))),
    lambda: encode_event(Page("x" * 256, 0, bytes(4096))),
    lambda: encode_event(ZeroPage("a", 0, 256)),
    lambda: mem_size((RamBlockInfo("a", 100),)),
    lambda: SectionHeader(SectionType.EOF, 0, "x"),
    lambda: SectionHeader(SectionType.SECTION_START, 2**32, "x"),
    lambda: encode_event(Command(1, bytes(70000))),
])
def test_encoders_refuse_bad_values(make):
    with pytest.raises(ValueError):
        make()


def test_encode_event_refuses_non_events():
    with pytest.raises(TypeError):
        encode_event(b"bytes")


def test_vmdescription_parses_or_names_the_fault():
    assert VmDescription(b'{"page_size": 4096}').description() == {"page_size": 4096}
    for bad in (b"{", b"[]", b"\xff"):
        with pytest.raises(RemoteProtocolError, match="VMDESCRIPTION"):
            VmDescription(bad).description()


def test_sample_stream_is_the_concatenation_of_its_records():
    assert STREAM.startswith(bytes.fromhex("5145564d00000003 07 0000000a"))
    assert STREAM == b"".join(map(encode_event, EVENTS))
