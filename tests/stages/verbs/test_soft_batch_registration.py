"""Batched registration in the soft provider: ``pd.reg_mrs`` (one MR and key per range, adjacent
ranges pinned together, all or none), ``pd.export_mrs`` (one PD-table write) and the PD
table's ``add_many``."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from verbs_helpers import shm_ram
from verbs_peer import drop_ipc_lock, run_in_child

from shm.errors import TransportError
from shm.memory import PAGE_SIZE
from stages.verbs import Access, open_provider
from stages.verbs.soft import memory
from stages.verbs.soft.pdtable import CAPACITY, FREE, LIVE, PDTable

MiB = 1 << 20


def _locked() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmLck:"))


def _aligned(n: int) -> tuple[np.ndarray, int]:
    buf = np.ones(n + PAGE_SIZE, np.uint8)
    return buf, buf.ctypes.data - buf.ctypes.data % PAGE_SIZE + PAGE_SIZE


@pytest.fixture
def shared_ram():
    """8 MiB of POSIX shared memory (exportable), all ones; unlinked afterwards."""
    with shm_ram(8 * MiB) as (_name, ram):
        ram[:] = 1
        yield ram


def test_reg_mrs_makes_one_mr_per_range_and_each_unpins_alone():
    buf, base = _aligned(8 * MiB)
    ranges = [(base, MiB), (base + MiB, MiB), (base + 2 * MiB, MiB), (base + 6 * MiB, MiB)]
    before = _locked()
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mrs = pd.reg_mrs(ranges, Access.LOCAL_WRITE)
        assert [(mr.addr, mr.length) for mr in mrs] == ranges
        assert len({mr.lkey for mr in mrs}) == 4 and all(mr.lkey == mr.rkey for mr in mrs)
        assert all(pd.lookup(mr.lkey) is mr for mr in mrs)
        assert _locked() - before == 4 * MiB
        mrs[1].close()                 # the middle of a stretch pinned by one call
        assert _locked() - before == 3 * MiB
        mrs[0].slice(base, 1)[0] = 7   # neighbours still registered and usable
        assert buf[base - buf.ctypes.data] == 7
        for mr in mrs:
            mr.close()
        assert _locked() == before and memory.PINS.covered() == []
        assert pd.reg_mrs([], Access.NONE) == []


def test_reg_mrs_keeps_pages_other_registrations_pinned():
    _buf, base = _aligned(4 * MiB)
    before = _locked()
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        whole = pd.reg_mr(base, 4 * MiB, Access.NONE)
        chunks = pd.reg_mrs([(base, MiB), (base + MiB, MiB)], Access.NONE)
        for mr in chunks:
            mr.close()
        assert _locked() - before == 4 * MiB      # the whole-range MR still pins them
        whole.close()
        assert _locked() == before


def test_reg_mrs_refuses_bad_ranges_before_pinning_any():
    _buf, base = _aligned(2 * MiB)
    before = _locked()
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        with pytest.raises(ValueError):
            pd.reg_mrs([(base, MiB), (base + MiB, 0)], Access.NONE)
        assert _locked() == before and pd._mrs == {}


def _pin_many_over_limit(conn) -> None:
    """Child: with a 3 MiB limit, one registration pinned, a batch of 1 + 8 MiB fails whole."""
    import resource

    drop_ipc_lock()
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (3 * MiB, 3 * MiB))
    _buf, base = _aligned(16 * MiB)
    out = {}
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        first = pd.reg_mr(base, MiB, Access.NONE)
        locked = _locked()
        try:
            pd.reg_mrs([(base + MiB, MiB), (base + 4 * MiB, 8 * MiB)], Access.NONE)
        except TransportError as exc:
            out["error"], out["errno"] = str(exc), exc.errno
        out["undone"] = _locked() == locked and len(pd._mrs) == 1
        out["covered"] = memory.PINS.covered() == [(base, base + MiB)]
        first.close()
    conn.send(out)


def test_reg_mrs_over_the_memlock_limit_pins_nothing_and_names_the_limit():
    exitcode, out = run_in_child(_pin_many_over_limit)
    assert exitcode == 0
    assert out["errno"] in (errno.ENOMEM, errno.EPERM)
    assert "RLIMIT_MEMLOCK" in out["error"] and "9.0 MiB" in out["error"]
    assert out["undone"] and out["covered"]


def test_export_mrs_writes_every_entry_and_imports_still_lock_them(shared_ram):
    base = shared_ram.ctypes.data
    with open_provider("soft").open_device() as ctx, \
            open_provider("soft").open_device() as other:
        pd = ctx.alloc_pd()
        pd_handle = pd.export()
        mrs = pd.reg_mrs([(base + k * MiB, MiB) for k in range(4)], Access.NONE)
        handles = pd.export_mrs(mrs)
        assert [h.lkey for h in handles] == [mr.lkey for mr in mrs]
        assert len({h.slot for h in handles}) == 4
        assert [h.file_offset for h in handles] == [k * MiB for k in range(4)]
        assert pd.export_mrs(mrs) == handles and mrs[2].export() == handles[2]
        imported_pd = other.import_pd(pd_handle)
        imported = imported_pd.import_mr(handles[2])
        shared_ram[2 * MiB + 5] = 42
        assert imported.slice(mrs[2].addr + 5, 1)[0] == 42
        with pytest.raises(TransportError) as info:
            mrs[2].close()             # imported elsewhere: EBUSY
        assert info.value.errno == errno.EBUSY and not mrs[2].closed
        mrs[0].close()                 # the others of the batch are free to go
        imported.close()
        for mr in mrs:
            mr.close()
        with pytest.raises(TransportError) as info:
            imported_pd.import_mr(handles[1])
        assert info.value.errno == errno.ENOENT
    assert memory.BACKINGS._spans == []


def test_add_many_fills_free_slots_in_order_and_reuses_freed_ones():
    table = PDTable.create()
    try:
        slots = table.add_many([(k + 1, k + 1, 0, 0x1000 * k, 4096) for k in range(5)])
        assert slots.tolist() == [0, 1, 2, 3, 4]
        assert table._entries["lkey"][:5].tolist() == [1, 2, 3, 4, 5]
        assert (table._entries["state"][:5] == LIVE).all()
        table.remove(1)
        table.remove(3)
        assert table.add(9, 9, 0, 0, 4096) == 5           # from the cursor on first...
        rest = table.add_many([(10 + k, 10 + k, 0, 0, 4096) for k in range(CAPACITY - 4)])
        assert len(rest) == CAPACITY - 4                    # ...then wrapping to 1 and 3
        assert sorted(rest.tolist())[:2] == [1, 3]
        assert (table._entries["state"] != FREE).all()
        with pytest.raises(TransportError) as info:
            table.add_many([(1, 1, 0, 0, 4096)])
        assert info.value.errno == errno.ENOSPC
    finally:
        table.close()


def test_add_many_when_too_few_slots_are_free_adds_none():
    table = PDTable.create()
    try:
        table.add_many([(k + 1, k + 1, 0, 0, 4096) for k in range(CAPACITY - 1)])
        with pytest.raises(TransportError) as info:
            table.add_many([(1, 1, 0, 0, 4096), (2, 2, 0, 0, 4096)])
        assert info.value.errno == errno.ENOSPC
        assert int((table._entries["state"] == LIVE).sum()) == CAPACITY - 1
    finally:
        table.close()
