"""The defects of issue 17, each shown on the strict pyverbs double (``strict_pyverbs``).

Every test here runs ``stages/verbs/rdmacore*.py`` unmodified against the double; the numbers
in the names are the issue's.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
import strict_pyverbs
from verbs_helpers import Pair, wait_for, wait_wcs

from shm.errors import TransportError
from stages.verbs import Access, QPState, WCStatus, open_provider
from stages.verbs.base import MRHandle

MiB = 1 << 20
RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE


@pytest.fixture
def pair(strict):
    pairs = []

    def make(**options) -> Pair:
        pairs.append(Pair("verbs", **options))
        return pairs[-1]

    yield make
    for p in pairs:
        p.close()


# -- 1: the MR import record -------------------------------------------------------------
def test_1_import_record_carries_the_verbs_mr_handle(monkeypatch):
    from stages import registrar
    from stages.poster import mr_handle_of

    handle = MRHandle("verbs", "mlx5_0", 0x11, 0x22, 0x7000, 4096, int(RW), mr_handle=77)
    monkeypatch.setattr(registrar, "_export", lambda mrs: [handle])
    rec = registrar.import_records([object()])[0]       # slot -1 fitted an unsigned field
    back = mr_handle_of(rec, handle.provider, handle.pd_name, "")
    assert back.mr_handle == 77 and back.slot == -1 and back.lkey == 0x11


def test_1_an_mr_import_needs_the_real_handle(strict):
    mem = np.zeros(MiB, np.uint8)
    with open_provider("verbs").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(mem.ctypes.data, MiB, RW)
        with pytest.raises(TransportError):
            pd.import_mr(MRHandle("verbs", ctx.name, mr.lkey, mr.rkey, mr.addr, MiB,
                                  int(RW), mr_handle=0))


# -- 2: ODP on the destination -----------------------------------------------------------
def test_2_a_write_into_an_unprefetched_odp_page_is_rnr(pair):
    p = pair(access_b=RW | Access.ON_DEMAND)
    p.write(1, 0, 4096, 0)
    assert wait_wcs(p.cq_a, 1)[0].status == WCStatus.RNR_RETRY_EXC_ERR


def test_2_prefetch_maps_odp_pages_for_writes(pair):
    p = pair(access_b=RW | Access.ON_DEMAND)
    p.mr_b.prefetch()                   # ibv_advise_mr(PREFETCH_WRITE); was a no-op
    p.mem_a[:4096] = 7
    p.write(1, 0, 4096, 0)
    assert wait_wcs(p.cq_a, 1)[0].status == WCStatus.SUCCESS
    assert (p.mem_b[:4096] == 7).all()


def test_2_the_posters_rnr_retry_survives_a_page_fault(pair):
    from stages.poster import RNR_RETRY

    p = pair(access_b=RW | Access.ON_DEMAND, rnr_retry=RNR_RETRY)
    p.mem_a[:8192] = 3
    p.write(1, 0, 8192, 0)
    assert wait_wcs(p.cq_a, 1)[0].status == WCStatus.SUCCESS
    assert (p.mem_b[:8192] == 3).all()


def test_2_odp_capabilities_are_queried(strict):
    with open_provider("verbs").open_device("mlx5_0") as ctx:
        assert ctx.odp_write
    with open_provider("verbs").open_device("rxe0") as ctx:
        assert not ctx.odp_write
        mem = np.zeros(MiB, np.uint8)
        mr = ctx.alloc_pd().reg_mr(mem.ctypes.data, MiB, RW | Access.ON_DEMAND)
        assert not mr.access & Access.ON_DEMAND       # pinned instead


# -- 3: a wildcard listener ---------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_3_listening_on_a_wildcard_address_works(pair, host):
    p = pair(listen_host=host)
    assert p.qp_a.state == QPState.RTS and p.qp_b.state == QPState.RTS


def test_3_a_wildcard_id_has_no_device_and_nothing_asks_it(strict):
    provider = open_provider("verbs")
    with provider.open_device(peer="0.0.0.0") as ctx:      # the destination's open_device
        listener = ctx.listen("0.0.0.0", 29998)
        with pytest.raises(SystemError, match="NULL"):     # pyverbs would segfault here
            _ = listener.cmid.dev_name


# -- 4: registration across processes on any device ----------------------------------------
def test_4_pd_sharing_is_probed_not_assumed(strict):
    with open_provider("verbs").open_device("mlx5_0") as ctx:
        assert ctx.alloc_pd().shareable
    with open_provider("verbs").open_device("rxe0") as ctx:
        assert not ctx.alloc_pd().shareable


def test_4_the_command_fd_travels_by_scm_rights(strict, monkeypatch):
    """No pidfd_getfd (Yama's ptrace_scope=1 refuses it between siblings): the importer gets
    the command fd over a unix socket from the exporter."""
    import os

    from stages.verbs import rdmacore

    monkeypatch.setattr(rdmacore, "_SYS_pidfd_getfd", -1, raising=False)
    monkeypatch.setattr(os, "pidfd_open", lambda *a: (_ for _ in ()).throw(
        PermissionError(errno.EPERM, "ptrace_scope")))
    with open_provider("verbs").open_device("mlx5_0") as exporter, \
            open_provider("verbs").open_device("mlx5_0") as importer:
        pd = exporter.alloc_pd()
        handle = pd.export()
        assert importer.import_pd(handle).imported


# -- 5: the device follows the connection ---------------------------------------------------
def test_5_open_device_for_a_peer_picks_the_device_of_the_route(strict):
    provider = open_provider("verbs")
    with provider.open_device(peer="127.0.0.2") as ctx:
        assert ctx.name == "rxe0"
    with provider.open_device(peer="127.0.0.1") as ctx:
        assert ctx.name == "mlx5_0"


def test_5_device_named_in_the_environment(strict, monkeypatch):
    monkeypatch.setenv("RDMA_PIPELINE_DEVICE", "rxe0")
    with open_provider("verbs").open_device() as ctx:
        assert ctx.name == "rxe0"


def test_5_a_connection_on_another_device_says_which(strict):
    with open_provider("verbs").open_device("mlx5_0") as ctx:
        cq = ctx.create_cq(8)
        qp = ctx.alloc_pd().create_qp(cq, cq, max_send_wr=4, max_recv_wr=4)
        with pytest.raises(TransportError, match="through RDMA device rxe0") as info:
            ctx.connect(qp, "127.0.0.2", 29999, b"", timeout=5)
        assert info.value.errno == errno.EXDEV and "--device rxe0" in info.value.hint


# -- 6: signaled semantics ------------------------------------------------------------------
def test_6_unsignaled_writes_make_no_completion(pair):
    p = pair()
    p.write(1, 0, 4096, 0, signaled=False)
    p.write(2, 0, 4096, 0, signaled=False)
    p.write(3, 0, 4096, 0)
    assert [wc.wr_id for wc in wait_wcs(p.cq_a, 3, timeout=1.0)] == [3]


# -- 7: reject ------------------------------------------------------------------------------
def test_7_reject_uses_the_real_signature(strict):
    import threading

    from verbs_helpers import port

    with open_provider("verbs").open_device() as ctx_b, \
            open_provider("verbs").open_device() as ctx_a:
        listener = ctx_b.listen("127.0.0.1", port("verbs"))
        cq = ctx_a.create_cq(8)
        qp = ctx_a.alloc_pd().create_qp(cq, cq, max_send_wr=4, max_recv_wr=4)
        failure = []

        def reject():
            try:
                listener.get_request(10).reject(b"no")
            except BaseException as exc:  # noqa: BLE001
                failure.append(exc)

        t = threading.Thread(target=reject)
        t.start()
        with pytest.raises(TransportError) as info:
            ctx_a.connect(qp, "127.0.0.1", listener.port, b"hi", timeout=10)
        t.join()
        assert not failure and info.value.errno == errno.ECONNREFUSED


# -- 8: RTR/RTS before accept ---------------------------------------------------------------
def test_8_the_passive_qp_is_ready_before_accept(pair):
    p = pair()
    assert p.qp_b.state == QPState.RTS


# -- 9: teardown, error completions, QP state, errno, WR reuse ------------------------------
def test_9_teardown_closes_accepted_ids_before_their_listener(strict):
    p = Pair("verbs")
    p.close()       # the strict double raises on a listener destroyed before its children


def test_9_an_error_completion_with_no_opcode_is_reported(pair):
    p = pair(access_b=Access.LOCAL_WRITE)
    p.write(1, 0, 4096, 0)
    wc = wait_wcs(p.cq_a, 1)[0]
    assert wc.status == WCStatus.REM_ACCESS_ERR


def test_9_qp_state_comes_from_query(pair):
    p = pair()
    p.qp_b.disconnect()
    assert wait_for(lambda: p.qp_a.state == QPState.ERR)   # asynchronous: not a modify of ours


def test_9_errno_minus_one_is_no_errno(strict):
    from pyverbs.pyverbs_error import PyverbsRDMAError

    from stages.verbs.rdmacore_base import errors

    with pytest.raises(TransportError) as info:
        with errors("cannot do it"):
            raise PyverbsRDMAError("Failed to do it")      # error_code -1: none known
    assert info.value.errno is None                          # not EPERM
    with pytest.raises(TransportError) as info:
        with errors("cannot do it"):
            raise PyverbsRDMAError("Failed to do it", -12)  # some calls report -errno
    assert info.value.errno == 12


def test_9_work_requests_are_reused(pair):
    p = pair(max_send_wr=16)
    before = dict(strict_pyverbs_allocated())
    for round_ in range(8):
        wrs = p.write_wrs(16, first_id=round_ * 16)
        p.qp_a.post_writes(wrs)
        wait_wcs(p.cq_a, 16)
    made = {k: strict_pyverbs_allocated()[k] - before[k] for k in before}
    assert made["SendWR"] <= 16 and made["SGE"] <= 16


def strict_pyverbs_allocated() -> dict:
    import pyverbs.wr

    return pyverbs.wr.ALLOCATED


assert strict_pyverbs.STRICT_DIR
