"""Registration by proxy (``stages.verbs.proxy``): the registrar decides, the poster registers.

The soft provider can share its PD, so it runs both modes: "share" by default and "proxy" when
``RDMA_PIPELINE_REGISTRATION=proxy`` asks for it; the verbs provider picks "proxy" by itself on
a device that cannot import a PD (see test_verbs_migration_strict)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState
from shm.errors import TransportError
from stages.poster import proxy_writes
from stages.records import WRITE, WRITE_END, WRITE_RING, concat, records
from stages.registrar import proxy_records, registration_mode
from stages.verbs import Access, open_provider
from stages.verbs.proxy import ProxyPD, Registrations

MIB = 1 << 20


def _run(config: MigrationConfig, ram: int = 16 * MIB, **guest) -> dict:
    with LocalRun(ram, config, state=GuestState(**guest)) as lr:
        lr.start()
        summary = lr.finish()
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["verified"] is True
    return summary


@pytest.mark.parametrize("mode", ["share", "proxy"])
def test_a_soft_migration_in_each_registration_mode(monkeypatch, mode):
    monkeypatch.setenv("RDMA_PIPELINE_REGISTRATION", mode)
    summary = _run(MigrationConfig())
    assert summary["stages"]["registrar"]["registration"] == mode


def test_proxy_mode_keeps_the_pin_budget_and_unregisters_through_the_poster(monkeypatch):
    monkeypatch.setenv("RDMA_PIPELINE_REGISTRATION", "proxy")
    config = MigrationConfig().with_options(["x-odp=off"], ["x-pin-budget=4M"])
    summary = _run(config, 32 * MIB, dirty_rate=4 * MIB)
    registrar = summary["stages"]["registrar"]
    assert registrar["registration"] == "proxy" and registrar["chunks-unregistered"] > 0


def test_the_mode_follows_the_pd():
    class Unshareable:
        shareable = False

    assert registration_mode(Unshareable()) == "proxy"
    assert registration_mode(Unshareable(), "proxy") == "proxy"
    with pytest.raises(TransportError, match="cannot share a PD"):
        registration_mode(Unshareable(), "share")
    with open_provider("soft").open_device() as ctx:
        assert registration_mode(ctx.alloc_pd()) == "share"
    with pytest.raises(ValueError):
        registration_mode(Unshareable(), "both")


def test_the_poster_registers_and_rewrites_keys_and_addresses(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(bytes(range(256)) * 64)        # 16 KiB "region file"
    theirs = 0x7F0000000000                          # the registrar's mapping of the file
    mrs = ProxyPD().reg_mrs([(theirs + 4096, 4096), (theirs + 8192, 8192)], Access.NONE)
    assert [m.lkey for m in mrs] == [1, 2]
    recs = proxy_records(mrs, theirs)
    assert recs["file_offset"].tolist() == [4096, 8192] and (recs["pd_slot"] == -1).all()
    with open_provider("soft").open_device() as ctx:
        reg = Registrations(ctx.alloc_pd(), str(path))
        try:
            for r in recs:
                reg.register(int(r["lkey"]), int(r["addr"]), int(r["file_offset"]),
                             int(r["length"]), int(r["access"]))
            writes = records(WRITE, 2, lkey=[2, 1], local_addr=[theirs + 8192 + 100,
                                                                 theirs + 4096])
            out = proxy_writes(reg, concat(WRITE_RING, [writes, records(WRITE_END, 1)]))
            got = out[:2].view(WRITE)
            assert got["lkey"].tolist() == [reg.mrs[2].lkey, reg.mrs[1].lkey]
            assert got["local_addr"].tolist() == [reg.base + 8192 + 100, reg.base + 4096]
            assert (writes["lkey"] == [2, 1]).all()         # the input is left alone
            mine = np.ctypeslib.as_array((ctypes.c_uint8 * 16384).from_address(reg.base))
            assert mine[8192 + 100] == (8192 + 100) % 256      # the file, mapped here
            del mine
            reg.release(1)
            assert list(reg.mrs) == [2]
        finally:
            reg.close()
