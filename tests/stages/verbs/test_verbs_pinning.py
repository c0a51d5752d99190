"""Registration pins memory for real and so meets RLIMIT_MEMLOCK."""

from __future__ import annotations

import errno

import numpy as np
from verbs_peer import register_over_limit, run_in_child

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
