"""The destination answers a REGISTER REQUEST of several records with one MR and rkey per
chunk, all registered by one ``reg_mrs`` call (``IncomingMigration._register``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.incoming import RW, IncomingMigration
from pipeline.protocol.messages import Register, RegisterResult
from shm.errors import RemoteProtocolError
from stages.verbs import Access

MiB = 1 << 20


class FakePD:
    def __init__(self):
        self.calls, self.next_key = [], 0x100

    def reg_mrs(self, ranges, access):
        self.calls.append((list(ranges), access))
        out = []
        for a, n in ranges:
            self.next_key += 1
            out.append(SimpleNamespace(addr=a, length=n, rkey=self.next_key))
        return out


def _incoming(pd):
    mig = object.__new__(IncomingMigration)       # only what _register reads
    blocks = [SimpleNamespace(idstr="pc.ram", index=0, offset=0, address=0x7F0000000000,
                              length=8 * MiB, chunk_size=MiB),
              SimpleNamespace(idstr="vga", index=1, offset=8 * MiB, address=0x7E0000000000,
                              length=MiB // 2, chunk_size=MiB)]
    mig.order, mig.chunk_mrs, mig.pd = blocks, {}, pd
    mig.populated = []
    mig._populate_ahead = mig.populated.append
    return mig


def test_a_batch_registers_its_new_chunks_with_one_call_one_mr_each():
    pd = FakePD()
    mig = _incoming(pd)
    first = mig._register([Register(3 * MiB, 0)])
    results = mig._register([Register(0, 0), Register(MiB + 4096, 0), Register(3 * MiB, 0),
                             Register(8 * MiB, 1), Register(MiB, 0)])
    base = 0x7F0000000000
    assert pd.calls[1] == ([(base, MiB), (base + MiB, MiB), (0x7E0000000000, MiB // 2)],
                           RW | Access.ON_DEMAND)
    assert len(pd.calls) == 2
    keys = [r.rkey for r in results]
    assert keys[2] == first[0].rkey                  # registered before: same MR
    assert keys[1] == keys[4]                        # asked twice in one batch: one MR
    assert len({keys[0], keys[1], keys[2], keys[3]}) == 4
    assert [r.host_addr for r in results] == [base] * 3 + [0x7E0000000000, base]
    assert all(isinstance(r, RegisterResult) for r in results)
    assert len(mig.populated) == 4 and set(mig.chunk_mrs) == {(0, 0), (0, 1), (0, 3), (1, 0)}


def test_a_bad_record_fails_the_batch_before_anything_is_registered():
    pd = FakePD()
    mig = _incoming(pd)
    with pytest.raises(RemoteProtocolError):
        mig._register([Register(0, 0), Register(9 * MiB, 0)])
    with pytest.raises(RemoteProtocolError):
        mig._register([Register(0, 0), Register(0, 7)])
    assert pd.calls == [] and mig.chunk_mrs == {}


def test_chunks_after_the_first_extend_the_range():
    pd = FakePD()
    mig = _incoming(pd)
    mig._register([Register(2 * MiB, 0, chunks=1), Register(7 * MiB, 0, chunks=3)])
    base = 0x7F0000000000
    assert pd.calls[0][0] == [(base + 2 * MiB, 2 * MiB), (base + 7 * MiB, MiB)]
