"""VMDESCRIPTION as QEMU writes it, and the return path's SHUT message."""

import json

import pytest

from pipeline.protocol.records import SectionType, encode_event
from pipeline.protocol.return_path import ReturnPathReader, error_text, shut
from pipeline.protocol.vmdesc import DeviceDescription, Field, framed_fields, vm_description
from shm.errors import RemoteProtocolError


def test_description_lists_devices_with_vmstate_fields():
    dev = DeviceDescription("rdp-synthetic-guest", 0, 1, framed_fields("state", 57))
    ev = vm_description([dev], machine="rdma-pipeline")
    doc = json.loads(ev.json)
    assert list(doc) == ["configuration", "page_size", "devices"]
    assert doc["page_size"] == 4096
    assert doc["devices"] == [{
        "name": "rdp-synthetic-guest", "instance_id": 0, "vmsd_name": "rdp-synthetic-guest",
        "version": 1, "fields": [{"name": "size", "type": "uint32", "size": 4},
                                 {"name": "state", "type": "buffer", "size": 57}]}]
    assert doc["configuration"]["fields"][1] == {"name": "name", "type": "buffer", "size": 13}
    raw = encode_event(ev)
    assert raw[0] == SectionType.VMDESCRIPTION
    assert int.from_bytes(raw[1:5], "big") == len(raw) - 5 and b"\0" not in raw[5:]
    assert dev.size == 61


@pytest.mark.parametrize("field", [("n", "uint64", 4), ("n", "float32", 4), ("n", "buffer", -1)])
def test_fields_are_checked(field):
    with pytest.raises(ValueError):
        Field(*field)


def test_shut_round_trip_in_pieces():
    data = shut(0) + shut(1)
    reader = ReturnPathReader()
    got = []
    for b in data:
        reader.feed(bytes([b]))
        while (msg := reader.next_message()) is not None:
            got.append(msg.shut_status)
    assert data[:8] == bytes.fromhex("0001 0004 00000000")
    assert got == [0, 1]


def test_unknown_return_path_message_is_refused():
    reader = ReturnPathReader()
    reader.feed(bytes.fromhex("0004 0008") + bytes(8))      # REQ_PAGES: not in precopy
    with pytest.raises(RemoteProtocolError, match="type 4"):
        reader.next_message()


def test_error_text_then_shut():
    reader = ReturnPathReader()
    reader.feed(error_text("ram blocks mismatch") + shut(1))
    first, second = reader.next_message(), reader.next_message()
    assert first.type == 0x7E01 and first.data == b"ram blocks mismatch"
    assert second.shut_status == 1 and reader.next_message() is None
