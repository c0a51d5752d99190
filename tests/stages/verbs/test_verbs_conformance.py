"""Verbs semantics every provider must keep: placement, access checks, RNR, ordering, flushes."""

from __future__ import annotations

import errno
import os
import select
import signal
import threading
import time

import numpy as np
import pytest
from verbs_helpers import address, port, wait_for, wait_wcs
from verbs_peer import Peer, writer_to

from shm.errors import TransportError
from stages.verbs import Access, QPState, SendOpcode, WCOpcode, WCStatus, open_provider

MiB = 1 << 20


def test_connect_carries_private_data_both_ways(make_pair):
    pair = make_pair()
    assert pair.private_data["request"][:12] == b"hello from A"  # verbs may pad
    assert pair.private_data["reply"][:12] == b"reply from B"
    assert pair.qp_a.state == QPState.RTS and pair.qp_b.state == QPState.RTS


def test_write_from_another_process_lands_in_registered_memory(provider):
    pattern = np.random.default_rng(1).integers(0, 256, MiB, np.uint8)
    with Peer(provider, size=2 * MiB) as target:
        listen_port = target.call("listen", address(provider), port(provider))
        target.send("accept", b"target")
        with open_provider(provider).open_device() as ctx:
            pd = ctx.alloc_pd()
            mr = pd.reg_mr(pattern.ctypes.data, MiB, Access.LOCAL_WRITE)
            cq = ctx.create_cq(64)
            qp = pd.create_qp(cq, cq, max_send_wr=16, max_recv_wr=1)
            reply = ctx.connect(qp, address(provider), listen_port, b"poster", 10)
            assert reply[:6] == b"target"
            assert target.answer()[:6] == b"poster"
            remote, rkey = target.info["addr"], target.info["rkey"]
            qp.post_send(1, SendOpcode.RDMA_WRITE, mr.addr, MiB, mr.lkey,
                         remote_addr=remote + MiB, rkey=rkey)
            qp.post_send(2, SendOpcode.RDMA_WRITE, mr.addr + 10, 100, mr.lkey,
                         remote_addr=remote + 7, rkey=rkey, signaled=False)
            qp.post_send(3, SendOpcode.RDMA_WRITE, mr.addr + 4096, 0, mr.lkey,
                         remote_addr=remote, rkey=rkey)  # zero-length writes are legal
            wcs = wait_wcs(cq, 2)
            assert [(wc.wr_id, wc.status, wc.opcode) for wc in wcs] == [
                (1, WCStatus.SUCCESS, WCOpcode.RDMA_WRITE), (3, WCStatus.SUCCESS,
                                                             WCOpcode.RDMA_WRITE)]
            # RC: a completion means the data is placed; read it back from the target.
            assert target.call("read", MiB, MiB) == pattern.tobytes()
            assert target.call("read", 0, 120) == bytes(7) + pattern[10:110].tobytes() + bytes(13)


@pytest.mark.parametrize("case", ["wrong rkey", "out of bounds", "no REMOTE_WRITE"])
def test_bad_write_is_a_remote_access_error(make_pair, case):
    pair = make_pair(access_b=Access.LOCAL_WRITE if case == "no REMOTE_WRITE"
                     else Access.LOCAL_WRITE | Access.REMOTE_WRITE, prepost_b=2)
    pair.write(1, 0, 4096, 0)
    assert wait_wcs(pair.cq_a, 1)[0].status == (
        WCStatus.SUCCESS if case != "no REMOTE_WRITE" else WCStatus.REM_ACCESS_ERR)
    if case != "no REMOTE_WRITE":
        if case == "wrong rkey":
            pair.write(2, 0, 4096, 0, rkey=pair.mr_b.rkey ^ 0x5A5A)
        else:
            pair.write(2, 0, 4096, (1 << 20) - 100)
        wcs = wait_wcs(pair.cq_a, 1)
        assert (wcs[0].wr_id, wcs[0].status) == (2, WCStatus.REM_ACCESS_ERR)
    assert pair.qp_a.state == QPState.ERR
    # Later work flushes; nothing reached the target's memory after the error.
    pair.write(3, 0, 4096, 0)
    pair.send(4, 0, 16)
    assert [(wc.wr_id, wc.status) for wc in wait_wcs(pair.cq_a, 2)] == [
        (3, WCStatus.WR_FLUSH_ERR), (4, WCStatus.WR_FLUSH_ERR)]
    # The responder moved to ERR too (class C error) and flushed its posted RECVs.
    assert wait_for(lambda: pair.qp_b.state == QPState.ERR)
    assert {wc.status for wc in wait_wcs(pair.rcq_b, 2)} == {WCStatus.WR_FLUSH_ERR}


def test_send_consumes_oldest_recv_and_reports_byte_len(make_pair):
    pair = make_pair(prepost_b=1)  # posted before connecting
    pair.recv_b(2, 8192, 4096)
    pair.mem_a[:300] = np.arange(300) % 251
    pair.send(10, 0, 100)
    pair.send(11, 100, 200)
    sends = wait_wcs(pair.cq_a, 2)
    assert [(wc.wr_id, wc.status, wc.opcode) for wc in sends] == [
        (10, WCStatus.SUCCESS, WCOpcode.SEND), (11, WCStatus.SUCCESS, WCOpcode.SEND)]
    recvs = wait_wcs(pair.rcq_b, 2)
    assert [(wc.wr_id, wc.status, wc.opcode, wc.byte_len) for wc in recvs] == [
        (1000, WCStatus.SUCCESS, WCOpcode.RECV, 100), (2, WCStatus.SUCCESS, WCOpcode.RECV, 200)]
    assert (pair.mem_b[:100] == pair.mem_a[:100]).all()
    assert (pair.mem_b[8192:8392] == pair.mem_a[100:300]).all()


@pytest.mark.parametrize("rnr_retry", [0, 2])
def test_send_without_recv_and_a_finite_rnr_retry_fails(make_pair, rnr_retry):
    pair = make_pair(rnr_retry=rnr_retry)
    pair.send(1, 0, 64)
    wcs = wait_wcs(pair.cq_a, 1)
    assert (wcs[0].wr_id, wcs[0].status) == (1, WCStatus.RNR_RETRY_EXC_ERR)
    assert pair.qp_a.state == QPState.ERR


def test_send_without_recv_and_rnr_retry_7_waits_for_a_recv(make_pair):
    pair = make_pair(rnr_retry=7)
    pair.mem_a[:64] = 7
    pair.send(1, 0, 64)
    pair.write(2, 0, 16, 5000)  # queued behind the SEND: must not overtake it
    assert not pair.cq_a.wait(0.3)  # retrying, not failing
    assert pair.mem_b[5000] == 0
    pair.recv_b(9, 0, 4096)
    assert [(wc.wr_id, wc.status) for wc in wait_wcs(pair.cq_a, 2)] == [
        (1, WCStatus.SUCCESS), (2, WCStatus.SUCCESS)]
    wc = wait_wcs(pair.rcq_b, 1)[0]
    assert (wc.wr_id, wc.status, wc.byte_len) == (9, WCStatus.SUCCESS, 64)
    assert pair.mem_b[5000] == 7 and pair.qp_a.state == QPState.RTS


def test_message_longer_than_recv_buffer_is_an_error(make_pair):
    pair = make_pair()
    pair.recv_b(1, 0, 32)
    pair.send(2, 0, 33)
    wc = wait_wcs(pair.rcq_b, 1)[0]
    assert (wc.wr_id, wc.status) == (1, WCStatus.LOC_LEN_ERR)
    wc = wait_wcs(pair.cq_a, 1)[0]
    assert (wc.wr_id, wc.status) == (2, WCStatus.REM_INV_REQ_ERR)
    assert pair.qp_a.state == QPState.ERR


def test_completions_in_posting_order_with_unsignaled_wrs(make_pair):
    pair = make_pair(max_send_wr=8)
    signaled = [i % 3 == 2 for i in range(24)]
    expected = [i for i, s in enumerate(signaled) if s]
    got = []
    for i, sig in enumerate(signaled):
        # The queue holds 8: unsignaled WRs are retired by the signaled one after them,
        # once its completion is polled.
        while True:
            try:
                pair.write(i, i * 100, 100, i * 100, signaled=sig)
                break
            except TransportError as exc:
                assert exc.errno == errno.ENOMEM
                got += [wc.wr_id for wc in wait_wcs(pair.cq_a, 1)]
    got += [wc.wr_id for wc in wait_wcs(pair.cq_a, len(expected) - len(got))]
    assert got == expected
    assert not pair.cq_a.poll()


def test_full_send_queue_refuses_with_enomem(make_pair):
    pair = make_pair(max_send_wr=4)
    for i in range(4):
        pair.write(i, 0, 64, 0)
    with pytest.raises(TransportError) as info:
        pair.write(4, 0, 64, 0)
    assert info.value.errno == errno.ENOMEM
    assert [wc.wr_id for wc in wait_wcs(pair.cq_a, 4)] == [0, 1, 2, 3]
    pair.write(4, 0, 64, 0)  # polling freed the slots
    assert wait_wcs(pair.cq_a, 1)[0].wr_id == 4


def test_post_send_before_connect_is_refused_post_recv_is_not(provider):
    with open_provider(provider).open_device() as ctx:
        memory = np.zeros(4096, np.uint8)
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(memory.ctypes.data, 4096, Access.LOCAL_WRITE)
        cq = ctx.create_cq(8)
        qp = pd.create_qp(cq, cq, max_send_wr=2, max_recv_wr=2)
        qp.post_recv(1, mr.addr, 4096, mr.lkey)
        with pytest.raises(TransportError):
            qp.post_send(2, SendOpcode.SEND, mr.addr, 16, mr.lkey)


def test_disconnect_flushes_both_sides(make_pair):
    pair = make_pair(prepost_b=2)
    pair.qp_a.post_recv(5, pair.mr_a.addr, 4096, pair.mr_a.lkey)
    pair.qp_a.disconnect()
    assert [(wc.wr_id, wc.status) for wc in wait_wcs(pair.cq_a, 1)] == [
        (5, WCStatus.WR_FLUSH_ERR)]
    assert sorted((wc.wr_id, wc.status) for wc in wait_wcs(pair.rcq_b, 2, 2.0)) == [
        (1000, WCStatus.WR_FLUSH_ERR), (1001, WCStatus.WR_FLUSH_ERR)]


def test_cq_fds_select_across_several_cqs(make_pair):
    pair = make_pair(prepost_b=1)
    fds = [pair.cq_a.fileno(), pair.rcq_b.fileno()]
    assert select.select(fds, [], [], 0)[0] == []
    pair.send(1, 0, 8)
    ready = set()
    deadline = time.monotonic() + 5
    while ready != set(fds) and time.monotonic() < deadline:
        ready |= set(select.select(fds, [], [], 1)[0])
    assert ready == set(fds)
    assert pair.cq_a.poll() and pair.rcq_b.poll()
    if pair.cq_a.__class__.__module__.startswith("stages.verbs.soft"):
        assert select.select(fds, [], [], 0)[0] == []  # drained CQs stop being readable


def test_sigkilled_peer_flushes_every_outstanding_wr_and_wakes_waiters(provider):
    n = 48
    with Peer(provider, size=MiB) as target, \
            writer_to(target, provider, address(provider), port(provider), max_send_wr=n) as w:
        mr, send_cq, recv_cq, qp = w.mr, w.send_cq, w.recv_cq, w.qp
        woke = {}

        def waiter():
            recv_cq.wait(30)
            woke["at"] = time.monotonic()

        thread = threading.Thread(target=waiter)
        thread.start()
        os.kill(target.pid, signal.SIGSTOP)  # the target stops reading: WRs stay in flight
        for i in range(n):
            qp.post_send(i, SendOpcode.RDMA_WRITE, mr.addr, MiB, mr.lkey,
                         remote_addr=target.info["addr"], rkey=target.info["rkey"])
        time.sleep(0.2)
        killed = time.monotonic()
        target.kill()
        wcs = wait_wcs(send_cq, n, 5.0)
        flushed_at = time.monotonic()
        thread.join(5)
        assert flushed_at - killed < 1.0
        assert woke["at"] - killed < 1.0
        statuses = [wc.status for wc in wcs]
        assert [wc.wr_id for wc in wcs] == list(range(n))
        assert WCStatus.WR_FLUSH_ERR in statuses
        first = statuses.index(WCStatus.WR_FLUSH_ERR)
        assert set(statuses[:first]) <= {WCStatus.SUCCESS}
        assert set(statuses[first:]) == {WCStatus.WR_FLUSH_ERR}
        assert [(wc.wr_id, wc.status) for wc in recv_cq.poll()] == [
            (999, WCStatus.WR_FLUSH_ERR)]
        assert qp.state == QPState.ERR
