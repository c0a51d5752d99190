"""Registration pins memory for real and so meets RLIMIT_MEMLOCK."""

from __future__ import annotations

import errno

import numpy as np
from verbs_peer import drop_ipc_lock, register_over_limit, run_in_child

from shm.memory import PAGE_SIZE
from stages.verbs import Access, open_provider
from stages.verbs.soft import memory

MiB = 1 << 20


def _locked() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmLck:"))


def test_mlock_limit_exceeded_says_how_much_and_how_to_raise_it(provider):
    exitcode, result = run_in_child(register_over_limit, provider, MiB, 8 * MiB)
    assert exitcode == 0
    assert result["cap_ipc_lock"] is False  # otherwise root would ignore the limit
    message = result["error"]
    assert message is not None, "registering 8 MiB under a 1 MiB limit succeeded"
    assert result["errno"] in (errno.ENOMEM, errno.EPERM)
    assert "8.0 MiB" in message and "1.0 MiB" in message and "RLIMIT_MEMLOCK" in message
    assert "ulimit -l" in message and "CAP_IPC_LOCK" in message and "LimitMEMLOCK" in message
    assert "\n" not in message


def test_soft_registration_pins_and_deregistration_unpins():
    region = np.ones(4 * MiB, np.uint8)
    base = region.ctypes.data - region.ctypes.data % PAGE_SIZE + PAGE_SIZE  # page-aligned
    before = _locked()
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(base, 2 * MiB, Access.LOCAL_WRITE)
        assert _locked() - before >= 2 * MiB
        mr.close()
        assert _locked() == before


def test_soft_overlapping_registrations_keep_shared_pages_pinned():
    region = np.ones(4 * MiB, np.uint8)
    base = region.ctypes.data - region.ctypes.data % PAGE_SIZE + PAGE_SIZE
    before = _locked()
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        first = pd.reg_mr(base, 2 * MiB, Access.LOCAL_WRITE)
        second = pd.reg_mr(base + MiB, 2 * MiB, Access.LOCAL_WRITE)  # overlaps 1 MiB
        assert _locked() - before == 3 * MiB
        first.close()  # munlock would also unpin the overlap: it must stay pinned
        assert _locked() - before == 2 * MiB
        second.close()
        assert _locked() == before


def test_soft_unpin_subtracts_every_other_range():
    pins = memory.PinSet()
    region = np.ones(8 * MiB, np.uint8)
    base = region.ctypes.data - region.ctypes.data % PAGE_SIZE + PAGE_SIZE
    before = _locked()
    pins.pin(base + MiB, MiB)
    pins.pin(base + 3 * MiB, MiB)
    pins.pin(base, 5 * MiB)
    pins.unpin(base, 5 * MiB)  # the two inner ranges stay pinned
    assert _locked() - before == 2 * MiB
    pins.unpin(base + MiB, MiB)
    pins.unpin(base + 3 * MiB, MiB)
    assert _locked() == before and pins.covered() == []


def _on_demand_under_limit(conn) -> None:
    """Child: with a 1 MiB limit, register 8 MiB ON_DEMAND, write it, then 2 MiB pinned."""
    import resource

    from shm.errors import TransportError

    drop_ipc_lock()
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (MiB, MiB))
    region = np.zeros(16 * MiB, np.uint8)
    base = region.ctypes.data - region.ctypes.data % PAGE_SIZE + PAGE_SIZE
    out = {}
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        before = _locked()
        odp = pd.reg_mrs([(base, 4 * MiB), (base + 4 * MiB, 4 * MiB)],
                         Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.ON_DEMAND)
        odp[0].prefetch()
        out["odp_locked"] = _locked() - before
        out["covered"] = memory.PINS.covered()
        try:
            pd.reg_mr(base + 8 * MiB, 2 * MiB, Access.LOCAL_WRITE)
            out["error"] = None
        except TransportError as exc:
            out["error"] = str(exc)
        for mr in odp:
            mr.close()
        out["after"] = _locked() - before
    conn.send(out)


def test_soft_on_demand_pins_nothing_and_plain_registration_still_meets_the_limit():
    exitcode, out = run_in_child(_on_demand_under_limit)
    assert exitcode == 0
    assert out["odp_locked"] == 0 and out["covered"] == [] and out["after"] == 0
    assert out["error"] is not None and "RLIMIT_MEMLOCK" in out["error"]
