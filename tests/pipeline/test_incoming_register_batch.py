"""The destination answers a REGISTER REQUEST of several records with one MR and rkey per
chunk, all registered by one ``reg_mrs`` call: the session decides which chunks are new
(``DestinationSession``), the driver registers them (``RdmaDestination``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.config import MigrationConfig
from pipeline.drivers.rdma_destination import RW, RdmaDestination
from pipeline.protocol.capabilities import negotiate
from pipeline.protocol.messages import (
    QemuFileMessage,
    Register,
    RegisterRequestMessage,
    RegisterResult,
    UnregisterRequestMessage,
)
from pipeline.protocol.records import MemSize, RamBlockInfo, SectionHeader, SectionType
from pipeline.protocol.stream import StreamWriter
from pipeline.section_writer import write_header
from pipeline.sections import RAM_SID
from pipeline.session import destination_events as de
from pipeline.session.policy import PeerPolicy
from pipeline.session.states import DestinationState
from pipeline.uri import URI
from stages.verbs import Access

MiB = 1 << 20
BLOCKS = (("pc.ram", 8 * MiB), ("vga", MiB // 2))
BASES = (0x7F0000000000, 0x7E0000000000)


class FakePD:
    def __init__(self):
        self.calls, self.next_key, self.closed = [], 0x100, []

    def reg_mrs(self, ranges, access):
        self.calls.append((list(ranges), access))
        out = []
        for a, n in ranges:
            self.next_key += 1
            out.append(SimpleNamespace(addr=a, length=n, rkey=self.next_key,
                                       close=lambda k=self.next_key: self.closed.append(k)))
        return out


class Wired:
    """An rdma: destination driver's session in a registration window, its PD fake."""

    def __init__(self):
        self.pd = FakePD()
        self.drv = RdmaDestination(URI("rdma", "127.0.0.1", 0), MigrationConfig(),
                                   run_id="test")
        self.drv.pd = self.pd
        self.drv.populated = []
        self.drv._populate_ahead = self.drv.populated.append
        s = self.drv.session
        s.start(0.0)
        request = PeerPolicy.request(pin_all=False, chunk_size=MiB)
        s.handle(de.Accepted(negotiate(request, PeerPolicy.supported(
            chunk_size=MiB, session_token=1))), 0.0)
        w = StreamWriter()
        write_header(w)
        w.write_event(SectionHeader(SectionType.SECTION_START, RAM_SID, "ram", 0, 4))
        w.write_event(MemSize(tuple(RamBlockInfo(n, x) for n, x in BLOCKS)))
        w.hook()
        s.handle(de.ControlReceived(QemuFileMessage(w.flush()[0])), 0.0)
        offsets = (0, BLOCKS[0][1])
        region = tuple(de.RegionBlock(n, o, x, a)
                       for (n, x), o, a in zip(BLOCKS, offsets, BASES, strict=True))
        out = s.handle(de.RegionCreated(region), 0.0)
        assert isinstance(out[-1], de.AwaitMessage) and s.window

    def request(self, message):
        """The session's answer to ``message``, registrations carried out by the driver."""
        s = self.drv.session
        out = s.handle(de.ControlReceived(message), 0.0)
        if out and isinstance(out[-1], de.RegisterChunks):
            out = s.handle(self.drv._register_chunks(out[-1]), 0.0)
        for action in out:
            if isinstance(action, de.DeregisterChunks):
                self.drv._deregister_chunks(action)
        return out

    def register(self, records):
        out = self.request(RegisterRequestMessage(tuple(records)))
        if self.drv.session.state is DestinationState.FAILED:
            raise AssertionError(self.drv.session.reason)
        return next(a for a in out if isinstance(a, de.Reply)).message.results


def test_a_batch_registers_its_new_chunks_with_one_call_one_mr_each():
    w = Wired()
    first = w.register([Register(3 * MiB, 0)])
    results = w.register([Register(0, 0), Register(MiB + 4096, 0), Register(3 * MiB, 0),
                          Register(8 * MiB, 1), Register(MiB, 0)])
    base = BASES[0]
    assert w.pd.calls[1] == ([(base, MiB), (base + MiB, MiB), (BASES[1], MiB // 2)],
                             RW | Access.ON_DEMAND)
    assert len(w.pd.calls) == 2
    keys = [r.rkey for r in results]
    assert keys[2] == first[0].rkey                  # registered before: same MR
    assert keys[1] == keys[4]                        # asked twice in one batch: one MR
    assert len({keys[0], keys[1], keys[2], keys[3]}) == 4
    assert [r.host_addr for r in results] == [base] * 3 + [BASES[1], base]
    assert all(isinstance(r, RegisterResult) for r in results)
    assert len(w.drv.populated) == 4
    assert set(w.drv.chunk_mrs) == {(0, 0), (0, 1), (0, 3), (1, 0)}


@pytest.mark.parametrize("bad", [Register(9 * MiB, 0), Register(0, 7)])
def test_a_bad_record_fails_the_batch_before_anything_is_registered(bad):
    w = Wired()
    with pytest.raises(AssertionError, match="outside block|out of range"):
        w.register([Register(0, 0), bad])
    assert w.pd.calls == [] and w.drv.chunk_mrs == {}


def test_chunks_after_the_first_extend_the_range():
    w = Wired()
    w.register([Register(2 * MiB, 0, chunks=1), Register(7 * MiB, 0, chunks=3)])
    base = BASES[0]
    assert w.pd.calls[0][0] == [(base + 2 * MiB, 2 * MiB), (base + 7 * MiB, MiB)]


def test_unregister_closes_the_mr_register_made():
    w = Wired()
    rkey = w.register([Register(8 * MiB, 1)])[0].rkey
    w.request(UnregisterRequestMessage((Register(0, 1), Register(5, 0))))
    assert w.pd.closed == [rkey] and w.drv.chunk_mrs == {}
    assert w.register([Register(8 * MiB, 1)])[0].rkey != rkey   # registered anew
