"""The strict pyverbs double against the real thing: Debian's python3-pyverbs 44, where it is
installed, for everything that works without a device (enum values, constructors' defaults,
the errors of misuse). Skipped where pyverbs is not installed."""

from __future__ import annotations

import importlib

import pytest
import strict_pyverbs

SUBMODULES = ("cm_enums", "cq", "enums", "pyverbs_error", "qp", "wr")


@pytest.fixture(scope="module")
def real():
    pyverbs = pytest.importorskip("pyverbs", reason="python3-pyverbs is not installed here")
    for name in SUBMODULES:
        importlib.import_module(f"pyverbs.{name}")
    return pyverbs


@pytest.fixture
def double(real):
    with strict_pyverbs.installed() as module:
        for name in SUBMODULES:
            importlib.import_module(f"pyverbs.{name}")
        yield module


def _values(module) -> dict:
    return {k: int(v) for k, v in vars(module).items()
            if k.lstrip("_").startswith(("IBV_", "RDMA_", "RAI_"))}


@pytest.mark.parametrize("name", ["enums", "cm_enums"])
def test_every_enum_of_the_double_has_the_real_value(real, double, name):
    mine = _values(getattr(double, name))
    theirs = _values(getattr(real, name))
    assert mine and {k: theirs.get(k) for k in mine} == mine


def test_defaults_of_the_attribute_classes(real, double):
    for p in (real, double):
        init, attr, cap = p.qp.QPInitAttr(), p.qp.QPAttr(), p.qp.QPCap()
        assert (init.qp_type, init.sq_sig_all) == (4, 1)     # UD, and every WR signaled
        assert (attr.qp_state, attr.cur_qp_state, attr.port_num, attr.path_mtu) == (1, 0, 1, 3)
        assert (attr.rnr_retry, attr.pkey_index, attr.qp_access_flags) == (0, 0, 0)
        assert (cap.max_send_wr, cap.max_recv_wr, cap.max_send_sge, cap.max_recv_sge) == (
            1, 10, 1, 1)
        wr = p.wr.SendWR(num_sge=1, sg=[p.wr.SGE(1, 2, 3)])
        assert (wr.opcode, wr.send_flags, wr.wr_id) == (2, 2, 0)   # SEND, SIGNALED
        wc = p.cq.WC(wr_id=1, status=2, opcode=3)
        assert (wc.wr_id, wc.status, wc.opcode) == (1, 2, 3)


def test_misuse_fails_the_same_way(real, double):
    for p in (real, double):
        with pytest.raises(p.pyverbs_error.PyverbsUserError, match="at least one SGE"):
            p.wr.SendWR()
        wr = p.wr.SendWR(num_sge=1, sg=[p.wr.SGE(1, 2, 3)])
        with pytest.raises(TypeError):
            wr.next_wr = None
        err = p.pyverbs_error.PyverbsRDMAError("Failed to post send", 12)
        assert err.error_code == 12 and "Failed to post send" in str(err)
        assert p.pyverbs_error.PyverbsRDMAError("x").error_code == -1     # no errno
        assert not hasattr(p.pyverbs_error.PyverbsError("x"), "error_code")
