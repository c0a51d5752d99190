"""``--machine``: a stream source as QEMU's -M none (one block, nothing of ours, the return
path opened over tcp:), and a destination that takes any machine type (recorded, unverified,
no guest) unless told one, which it then holds the stream to."""

import pytest
from destination_world import DestinationWorld
from source_world import SourceWorld

from pipeline.config import MigrationConfig
from pipeline.protocol.parser import NEED_DATA, StreamParser
from pipeline.protocol.records import (
    OPEN_RETURN_PATH,
    Command,
    Configuration,
    DeviceState,
    EndOfSection,
    Eof,
    FileHeader,
    MemSize,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
)
from pipeline.protocol.vmdesc import DeviceDescription, Field, vm_description
from pipeline.session import actions as act
from pipeline.session import destination_events as de
from pipeline.session.states import DestinationState as D

MIB = 1 << 20


def stream_events(world: SourceWorld) -> list:
    parser = StreamParser(describe=True)
    for a in world.of(act.SendStream):
        for payload in a.payloads:
            parser.feed(payload)
    out = []
    while (e := parser.next_event()) is not NEED_DATA:
        out.append(e)
    parser.end_of_stream()
    return out


@pytest.mark.parametrize("snapshot", [False, True], ids=["tcp", "file"])
def test_a_none_source_writes_qemus_stream_only(snapshot):
    w = SourceWorld(config=MigrationConfig(machine="none"), blocks=(("ram", 4 * MIB),),
                    inline=True, snapshot=snapshot)
    w.run()
    assert w.states()[-1] == "completed" and w.session.stats.verified is None
    assert "machine type 'none' carries no RAM digest" in w.session.stats.verification
    assert not w.of(act.ComputeDigest)
    events = stream_events(w)
    assert events[1] == Configuration("none")
    assert (events[2] == Command(OPEN_RETURN_PATH)) is not snapshot   # tcp: only
    assert not [e for e in events if isinstance(e, DeviceState)]
    assert [e.blocks for e in events if isinstance(e, MemSize)] == [(RamBlockInfo("ram",
                                                                                  4 * MIB),)]
    assert events[-1].description()["devices"] == []


def test_our_tcp_source_opens_the_return_path_too():
    w = SourceWorld(inline=True)
    w.run()
    events = stream_events(w)
    assert events[1] == Configuration("rdma-pipeline") and events[2] == Command(OPEN_RETURN_PATH)


def test_a_source_refuses_a_machine_it_cannot_be():
    with pytest.raises(ValueError, match="a source is one of rdma-pipeline, none"):
        SourceWorld(config=MigrationConfig(machine="pc"), inline=True)


TIMER = DeviceDescription("timer", 0, 2, (Field("cpu_ticks_offset", "int64", 8),
                                          Field("cpu_clock_offset", "int64", 8)))


def qemu_stream(machine: str = "none", return_path: bool = True) -> list:
    """A QEMU -M none stream's records, as the stream driver hands them over."""
    start = SectionType.SECTION_START
    events = [FileHeader(), Configuration(machine)]
    if return_path:
        events.append(Command(OPEN_RETURN_PATH))
    events += [SectionHeader(start, 2, "ram", 0, 4), MemSize((RamBlockInfo("ram", 4 * MIB),)),
               EndOfSection(), SectionFooter(2),
               SectionHeader(SectionType.SECTION_FULL, 0, "timer", 0, 2),
               DeviceState(0, "timer", bytes(16)), SectionFooter(0), Eof(),
               vm_description([TIMER])]
    return [de.StreamRecord(e, i) for i, e in enumerate(events)]


@pytest.mark.parametrize("carrier", ["tcp", "file"])
def test_any_machine_type_is_recorded_unverified_and_no_guest_runs(carrier):
    world = DestinationWorld(carrier).start()
    world.feed(*qemu_stream())
    if carrier == "file":
        world.feed(de.StreamEnded(100))
    s = world.session
    assert s.state is D.COMPLETED, s.reason
    assert s.machine == "none" and s.return_path and not s.ours
    assert world.of(de.CreateRegion)[0].blocks == (("ram", 4 * MIB),)
    assert not world.of(de.StartGuest) and not world.of(de.LoadGuest)
    assert not world.of(de.HashRam) and world.of(de.Confirm)
    assert s.verified is None and "no RAM digest" in s.stats.verification
    assert "machine type 'none'" in s.stats.verification


def test_a_stream_without_a_return_path_is_noted():
    world = DestinationWorld("tcp").start()
    world.feed(*qemu_stream(return_path=False))
    assert world.session.state is D.COMPLETED and not world.session.return_path


def test_given_a_machine_type_another_is_refused_in_one_line():
    world = DestinationWorld("tcp", config=MigrationConfig(machine="rdma-pipeline")).start()
    world.feed(*qemu_stream("pc-i440fx-7.2"))
    s = world.session
    assert s.state is D.FAILED
    assert s.reason.startswith("Machine type received is 'pc-i440fx-7.2' and local is "
                               "'rdma-pipeline'") and "\n" not in s.reason
    assert not world.of(de.CreateRegion) and not world.of(de.Confirm)


def test_given_the_machine_type_it_is_taken():
    world = DestinationWorld("tcp", config=MigrationConfig(machine="none")).start()
    world.feed(*qemu_stream())
    assert world.session.state is D.COMPLETED

