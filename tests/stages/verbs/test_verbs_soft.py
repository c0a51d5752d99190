"""Soft-provider specifics: object lifetimes, local errors, CQ invariants, both directions."""

from __future__ import annotations

import errno
import select
import threading
import time

import numpy as np
import pytest
from verbs_helpers import Pair, wait_wcs

from shm.errors import TransportError
from stages.verbs import Access, QPState, WCStatus, open_provider
from stages.verbs.soft import wire

MiB = 1 << 20


@pytest.fixture
def pair():
    p = Pair("soft")
    yield p
    p.close()


def test_close_is_idempotent_and_children_first():
    ctx = open_provider("soft").open_device()
    memory = np.zeros(4096, np.uint8)
    pd = ctx.alloc_pd()
    mr = pd.reg_mr(memory.ctypes.data, 4096, Access.LOCAL_WRITE)
    cq = ctx.create_cq(4)
    qp = pd.create_qp(cq, cq, max_send_wr=1, max_recv_wr=1)
    listener = ctx.listen("127.0.0.1", 0)
    with pytest.raises(TransportError) as info:
        cq.close()  # a QP still uses it
    assert info.value.errno == errno.EBUSY
    ctx.close()
    ctx.close()
    assert all(o.closed for o in (pd, mr, cq, qp, listener))
    with pytest.raises(TransportError) as info:
        qp.post_recv(1, mr.addr, 16, mr.lkey)
    assert info.value.errno == errno.EBADF


def test_mr_in_use_cannot_be_deregistered(pair):
    pair.qp_a.post_recv(1, pair.mr_a.addr, 4096, pair.mr_a.lkey)
    with pytest.raises(TransportError) as info:
        pair.mr_a.close()
    assert info.value.errno == errno.EBUSY
    pair.qp_a.disconnect()
    assert wait_wcs(pair.cq_a, 1)[0].status == WCStatus.WR_FLUSH_ERR
    pair.mr_a.close()


def test_bad_lkey_completes_loc_prot_err_in_order(pair):
    pair.write(1, 0, 100, 0)
    pair.qp_a.post_send(2, 0, pair.mr_a.addr, 100, pair.mr_a.lkey ^ 1,
                        remote_addr=pair.mr_b.addr, rkey=pair.mr_b.rkey)
    pair.write(3, 0, 100, 0)
    wcs = wait_wcs(pair.cq_a, 3)
    assert [(wc.wr_id, wc.status) for wc in wcs] == [
        (1, WCStatus.SUCCESS), (2, WCStatus.LOC_PROT_ERR), (3, WCStatus.WR_FLUSH_ERR)]
    assert pair.qp_a.state == QPState.ERR


def test_sge_outside_its_mr_is_a_local_protection_error(pair):
    pair.qp_a.post_send(1, 0, pair.mr_a.addr + MiB - 10, 20, pair.mr_a.lkey,
                        remote_addr=pair.mr_b.addr, rkey=pair.mr_b.rkey)
    assert wait_wcs(pair.cq_a, 1)[0].status == WCStatus.LOC_PROT_ERR


def test_recv_buffer_without_local_write_fails_on_both_sides():
    p = Pair("soft")
    try:
        mem = np.zeros(4096, np.uint8)
        ro = p.pd_b.reg_mr(mem.ctypes.data, 4096, Access.NONE)
        p.qp_b.post_recv(1, ro.addr, 4096, ro.lkey)
        p.send(2, 0, 8)
        assert wait_wcs(p.rcq_b, 1)[0].status == WCStatus.LOC_PROT_ERR
        assert wait_wcs(p.cq_a, 1)[0].status == WCStatus.REM_OP_ERR
    finally:
        p.close()


def test_remote_write_requires_local_write():
    memory = np.zeros(4096, np.uint8)
    with open_provider("soft").open_device() as ctx:
        with pytest.raises(TransportError) as info:
            ctx.alloc_pd().reg_mr(memory.ctypes.data, 4096, Access.REMOTE_WRITE)
        assert info.value.errno == errno.EINVAL


def test_cq_overrun_is_reported():
    with open_provider("soft").open_device() as ctx:
        memory = np.zeros(4096, np.uint8)
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(memory.ctypes.data, 4096, Access.LOCAL_WRITE)
        cq = ctx.create_cq(2)
        qp = pd.create_qp(cq, cq, max_send_wr=1, max_recv_wr=4)
        for i in range(3):
            qp.post_recv(i, mr.addr, 64, mr.lkey)
        qp.disconnect()  # INIT -> ERR flushes three RECVs into a CQ of two
        with pytest.raises(TransportError) as info:
            cq.poll()
        assert info.value.errno == errno.EOVERFLOW


def test_cq_fd_is_readable_exactly_while_completions_wait(pair):
    fd = pair.cq_a.fileno()
    for i in range(3):
        pair.write(i, 0, 10, 0)
    assert pair.cq_a.wait(5)
    assert select.select([fd], [], [], 0)[0] == [fd]
    wait_wcs(pair.cq_a, 3)
    assert select.select([fd], [], [], 0)[0] == []
    assert not pair.cq_a.wait(0.05)


def test_both_directions_saturated_at_once_do_not_deadlock():
    p = Pair("soft", max_send_wr=64)
    try:
        # B writes into A's memory while A writes into B's: 32 MiB each way.
        mr_a_remote = p.pd_a.reg_mr(p.mem_a.ctypes.data, MiB,
                                    Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        p.mem_a[:] = 1
        p.mem_b[:] = 2
        for i in range(32):
            p.write(i, 0, MiB, 0, signaled=i % 8 == 7)
            p.qp_b.post_send(i, 0, p.mr_b.addr, MiB, p.mr_b.lkey,
                             remote_addr=mr_a_remote.addr, rkey=mr_a_remote.rkey,
                             signaled=i % 8 == 7)
        assert [wc.status for wc in wait_wcs(p.cq_a, 4, 30)] == [WCStatus.SUCCESS] * 4
        assert [wc.status for wc in wait_wcs(p.cq_b, 4, 30)] == [WCStatus.SUCCESS] * 4
    finally:
        p.close()


def test_waiter_in_another_thread_wakes_on_completion(pair):
    woke = threading.Event()

    def waiter():
        if pair.rcq_b.wait(10):
            woke.set()

    pair.recv_b(1, 0, 64)
    thread = threading.Thread(target=waiter)
    thread.start()
    pair.send(5, 0, 8)
    thread.join(10)
    assert woke.is_set()


def test_frame_layout_is_fixed():
    assert wire.FRAME.size == 28
    assert wire.frame(wire.ACK, 5)[:1] == bytes([wire.ACK])
    assert len(wire.cm_message(wire.CM_REQ, b"12345678")) == wire.CM_HEADER.size + 8


def test_closing_the_target_mid_stream_neither_hangs_nor_loses_completions():
    p = Pair("soft", max_send_wr=64)
    try:
        for i in range(64):
            p.write(i, 0, MiB, 0)
        started = time.monotonic()
        p.ctx_b.close()  # its responder is busy placing our writes
        assert time.monotonic() - started < 3.0
        wcs = wait_wcs(p.cq_a, 64, 5.0)
        assert [wc.wr_id for wc in wcs] == list(range(64))
        assert {wc.status for wc in wcs} <= {WCStatus.SUCCESS, WCStatus.WR_FLUSH_ERR}
    finally:
        p.close()
