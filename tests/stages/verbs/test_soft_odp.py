"""Soft provider: on-demand (ODP) registration and exports that do not re-read /proc/self/maps."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from verbs_helpers import shm_ram, wait_for

from shm.memory import mincore
from shm.naming import SHM_DIR
from stages.verbs import Access, SendOpcode, WCStatus, open_provider
from stages.verbs.soft import memory

MiB = 1 << 20


@pytest.fixture
def fresh_ram():
    """8 MiB of never-touched POSIX shared memory, as a destination's RAM is."""
    with shm_ram(8 * MiB) as (name, ram):
        yield name, ram


def resident_pages(ram: np.ndarray) -> int:
    res = mincore(ram.ctypes.data, len(ram))
    assert res is not None
    return int(np.count_nonzero(res))


def test_on_demand_registration_faults_nothing_in_and_writes_land(fresh_ram):
    _name, ram = fresh_ram
    source = np.full(2 * MiB, 7, np.uint8)
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        target = pd.reg_mr(ram.ctypes.data, len(ram),
                           Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.ON_DEMAND)
        assert resident_pages(ram) == 0                 # a plain mlock would fault 8 MiB in
        src = pd.reg_mr(source.ctypes.data, len(source), Access.LOCAL_WRITE)
        cq = ctx.create_cq(16)
        server_qp = pd.create_qp(cq, cq, max_send_wr=4, max_recv_wr=4)
        client_qp = pd.create_qp(cq, cq, max_send_wr=4, max_recv_wr=4)
        listener = ctx.listen("127.0.0.1", 0)
        t = threading.Thread(target=lambda: listener.get_request(10).accept(server_qp))
        t.start()
        ctx.connect(client_qp, "127.0.0.1", listener.port)
        t.join()
        client_qp.post_send(1, SendOpcode.RDMA_WRITE, src.addr, 2 * MiB, src.lkey,
                            remote_addr=target.addr + 4 * MiB, rkey=target.rkey)
        wcs = []
        while not wcs:
            cq.wait(5)
            wcs = [w for w in cq.poll(4) if w.wr_id == 1]
        assert wcs[0].status == WCStatus.SUCCESS
        assert (ram[4 * MiB:6 * MiB] == 7).all()
        # what the write targeted, and (faulting ahead) only memory after it
        assert resident_pages(ram[4 * MiB:6 * MiB]) == 512
        assert resident_pages(ram[:4 * MiB]) == 0
        for qp in (client_qp, server_qp):
            qp.disconnect()


def test_exports_in_one_mapping_read_the_maps_once(fresh_ram, monkeypatch):
    name, ram = fresh_ram
    reads = []
    real = memory._read_maps
    monkeypatch.setattr(memory, "_read_maps", lambda: reads.append(1) or real())
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mrs = [pd.reg_mr(ram.ctypes.data + i * MiB, MiB, Access.NONE) for i in range(8)]
        handles = [mr.export() for mr in mrs]
        assert [h.file_offset for h in handles] == [i * MiB for i in range(8)]
        assert {h.path for h in handles} == {SHM_DIR + name}
        assert len(reads) <= 2                           # not one per MR
        for mr in mrs:
            mr.close()
        assert memory.BACKINGS._spans == []              # released with the last MR


def test_prefetch_faults_an_on_demand_region_in_once(fresh_ram):
    _name, ram = fresh_ram
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(ram.ctypes.data + 2 * MiB, MiB,
                       Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.ON_DEMAND)
        assert resident_pages(ram) == 0 and mr.on_demand
        mr.prefetch()
        assert resident_pages(ram) == 256 and not mr.on_demand   # writes skip faulting now
        mr.close()
        mr.prefetch()                                             # closed: nothing to do


def test_a_stream_of_writes_is_faulted_in_ahead_and_then_stops_faulting(fresh_ram):
    from stages.verbs.soft import faulting

    _name, ram = fresh_ram
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(ram.ctypes.data, len(ram),
                       Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.ON_DEMAND)
        mr.fault_in(mr.local_address, MiB)          # the responder, before a first write lands
        assert resident_pages(ram[:MiB]) == 256     # the target now; the rest by the helper
        assert faulting.AHEAD >= len(ram) - MiB
        assert wait_for(lambda: not mr.on_demand, timeout=30)   # every unit is in now
        assert resident_pages(ram[MiB:]) == (len(ram) - MiB) // 4096
        mr.close()


def test_fault_ahead_never_reaches_before_a_write_or_past_the_region(fresh_ram):
    _name, ram = fresh_ram
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(ram.ctypes.data + 4 * MiB, 2 * MiB,
                       Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.ON_DEMAND)
        mr.fault_in(mr.local_address + MiB - 4096, 4096)
        assert wait_for(lambda: resident_pages(ram) == 1 + 256, timeout=30)
        assert resident_pages(ram[:5 * MiB - 4096]) == 0
        assert resident_pages(ram[6 * MiB:]) == 0
        assert mr.on_demand          # its first unit was never faulted in whole
        mr.close()


def test_a_write_into_memory_already_in_costs_no_fault_and_queues_nothing(monkeypatch):
    from types import SimpleNamespace

    from stages.verbs.soft import faulting

    populated, queued = [], []
    monkeypatch.setattr(memory, "populate", lambda a, n: populated.append((a, n)))
    monkeypatch.setattr(faulting.FAULTER, "submit", lambda fmap, units: queued.append(units))
    mr = SimpleNamespace(length=16 * MiB, local_address=1 << 40, closed=False, on_demand=True)
    fmap = faulting.FaultMap(mr)
    fmap.fault_in(mr.local_address + 3 * MiB, MiB)          # a whole unit: in, the next queued
    assert populated == [(mr.local_address + 3 * MiB, MiB)]
    assert queued[0].tolist() == list(range(4, 12)) and fmap.done[3] and not fmap.done[2]
    populated.clear(), queued.clear()
    fmap.fault_in(mr.local_address + 3 * MiB + 8192, 4096)  # scattered, into that unit
    assert populated == [] and queued == []
    fmap.fault_in(mr.local_address + 2 * MiB + 8192, 4096)  # a unit not in: faulted, and only
    assert populated == [(mr.local_address + 2 * MiB + 8192, 4096)] and queued == []
