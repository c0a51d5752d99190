"""Batched RDMA WRITEs: ``QP.post_writes`` on every provider, and the soft provider's
WRITE_BATCH frame (known-answer bytes, scattered reads, on-demand faulting)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from verbs_helpers import Pair, address, port, wait_wcs
from verbs_peer import Peer, writer_to

from shm.errors import TransportError
from stages.verbs import Access, QPState, WCOpcode, WCStatus
from stages.verbs.base import WRITE_WR_DTYPE
from stages.verbs.soft import batch, wire

KiB, MiB = 1 << 10, 1 << 20


def writes(pair, src, dst, lengths, *, first_id: int = 0, signaled=True) -> np.ndarray:
    """WRs copying ``pair.mem_a[src[i]:+len]`` to ``pair.mem_b[dst[i]:+len]``."""
    wrs = np.zeros(len(lengths), WRITE_WR_DTYPE)
    wrs["wr_id"] = np.arange(len(lengths)) + first_id
    wrs["addr"] = pair.mr_a.addr + np.asarray(src, np.uint64)
    wrs["remote_addr"] = pair.mr_b.addr + np.asarray(dst, np.uint64)
    wrs["length"] = lengths
    wrs["lkey"], wrs["rkey"] = pair.mr_a.lkey, pair.mr_b.rkey
    wrs["signaled"] = signaled
    return wrs


def packed_layout(lengths) -> np.ndarray:
    """Offsets that place ``lengths`` back to back."""
    return np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.uint64)


def test_post_writes_places_every_size_and_completes_in_order(make_pair):
    rng = np.random.default_rng(7)
    n = 1100  # more than one iovec (IOV_MAX) and more than one WRITE_BATCH
    pair = make_pair(max_send_wr=2048)
    lengths = rng.choice([0, 1, 3, 64, 100, 512, 4096], n).astype(np.uint32)
    lengths[[5, 500]] = 64 * KiB
    lengths[[0, 1, 2, n - 1]] = 0
    assert lengths.sum() < MiB
    pair.mem_a[:] = rng.integers(0, 256, MiB, np.uint8)
    src = rng.integers(0, MiB - 64 * KiB, n).astype(np.uint64)
    dst = packed_layout(lengths)
    signaled = (np.arange(n) % 7 == 6) | (np.arange(n) == n - 1)
    pair.qp_a.post_writes(writes(pair, src, dst, lengths, signaled=signaled))
    wcs = wait_wcs(pair.cq_a, int(signaled.sum()))
    assert [wc.wr_id for wc in wcs] == np.flatnonzero(signaled).tolist()
    assert {(wc.status, wc.opcode) for wc in wcs} == {(WCStatus.SUCCESS, WCOpcode.RDMA_WRITE)}
    expected = np.zeros(MiB, np.uint8)
    for s, d, length in zip(src.tolist(), dst.tolist(), lengths.tolist(), strict=True):
        expected[d:d + length] = pair.mem_a[s:s + length]
    assert (pair.mem_b == expected).all()
    assert not pair.cq_a.poll()
    pair.qp_a.post_writes(writes(pair, [], [], np.zeros(0, np.uint32)))  # an empty list is fine


def test_post_writes_and_post_send_interleave_in_order(make_pair):
    pair = make_pair(max_send_wr=256)
    pair.mem_a[:4096] = np.arange(4096) % 253
    lengths = np.full(16, 256, np.uint32)
    for round_ in range(4):  # the same destination again and again: the last write wins
        pair.qp_a.post_writes(writes(pair, packed_layout(lengths), np.zeros(16), lengths,
                                     first_id=round_ * 100))
        pair.write(round_ * 100 + 99, 4096 - 256, 256, 0)
    wcs = wait_wcs(pair.cq_a, 68)
    assert [wc.wr_id for wc in wcs] == [r * 100 + i for r in range(4) for i in [*range(16), 99]]
    assert all(wc.ok for wc in wcs)
    assert (pair.mem_b[:256] == pair.mem_a[4096 - 256:4096]).all()


def test_bad_rkey_mid_batch_places_earlier_writes_and_flushes_later_ones(make_pair):
    pair = make_pair(prepost_b=1)
    pair.mem_a[:] = 9
    lengths = np.full(10, 1000, np.uint32)
    wrs = writes(pair, np.zeros(10), np.arange(10) * 4096, lengths)
    wrs["rkey"][5] ^= 0x5A5A
    pair.qp_a.post_writes(wrs)
    wcs = wait_wcs(pair.cq_a, 10)
    assert [(wc.wr_id, wc.status) for wc in wcs] == [
        *((i, WCStatus.SUCCESS) for i in range(5)), (5, WCStatus.REM_ACCESS_ERR),
        *((i, WCStatus.WR_FLUSH_ERR) for i in range(6, 10))]
    placed = pair.mem_b.reshape(-1, 4096)[:10, :1000]
    assert (placed[:5] == 9).all() and (placed[5:] == 0).all()
    assert pair.qp_a.state == QPState.ERR
    assert wait_wcs(pair.rcq_b, 1)[0].status == WCStatus.WR_FLUSH_ERR  # the target is in ERR


def test_out_of_bounds_write_in_a_batch_is_a_remote_access_error(make_pair):
    pair = make_pair()
    lengths = np.full(4, 100, np.uint32)
    pair.qp_a.post_writes(writes(pair, np.zeros(4), [0, 100, MiB - 50, 300], lengths))
    assert [wc.status for wc in wait_wcs(pair.cq_a, 4)] == [
        WCStatus.SUCCESS, WCStatus.SUCCESS, WCStatus.REM_ACCESS_ERR, WCStatus.WR_FLUSH_ERR]


@pytest.mark.parametrize("case", ["unknown lkey", "outside its MR"])
def test_bad_lkey_in_a_batch_fails_when_its_turn_comes(make_pair, case):
    pair = make_pair()
    pair.mem_a[:] = 4
    lengths = np.full(6, 64, np.uint32)
    wrs = writes(pair, np.zeros(6), np.arange(6) * 64, lengths)
    if case == "unknown lkey":
        wrs["lkey"][3] ^= 1
    else:
        wrs["addr"][3] = pair.mr_a.addr + MiB - 10
    pair.qp_a.post_writes(wrs)
    assert [(wc.wr_id, wc.status) for wc in wait_wcs(pair.cq_a, 6)] == [
        (0, WCStatus.SUCCESS), (1, WCStatus.SUCCESS), (2, WCStatus.SUCCESS),
        (3, WCStatus.LOC_PROT_ERR), (4, WCStatus.WR_FLUSH_ERR), (5, WCStatus.WR_FLUSH_ERR)]
    assert (pair.mem_b[:192] == 4).all() and (pair.mem_b[192:384] == 0).all()
    assert pair.qp_a.state == QPState.ERR


def test_full_send_queue_posts_what_fits_then_enomem(make_pair):
    pair = make_pair(max_send_wr=8)
    lengths = np.full(12, 32, np.uint32)
    wrs = writes(pair, np.zeros(12), np.arange(12) * 32, lengths)
    with pytest.raises(TransportError) as info:
        pair.qp_a.post_writes(wrs)
    assert info.value.errno == errno.ENOMEM
    assert [wc.wr_id for wc in wait_wcs(pair.cq_a, 8)] == list(range(8))
    pair.qp_a.post_writes(wrs[8:])  # polling freed the slots
    assert [wc.wr_id for wc in wait_wcs(pair.cq_a, 4)] == [8, 9, 10, 11]
    assert not pair.cq_a.poll()


def test_send_between_batches_waits_out_rnr_and_nothing_overtakes_it(make_pair):
    pair = make_pair(rnr_retry=7, max_send_wr=64)
    pair.mem_a[:] = 5
    lengths = np.full(10, 512, np.uint32)
    pair.qp_a.post_writes(writes(pair, np.zeros(10), np.arange(10) * 512, lengths))
    pair.send(10, 0, 64)  # no RECV posted yet: RNR NAK, retried
    pair.qp_a.post_writes(writes(pair, np.zeros(10), 8192 + np.arange(10) * 512, lengths,
                                 first_id=11))
    assert [wc.wr_id for wc in wait_wcs(pair.cq_a, 10)] == list(range(10))
    assert not pair.cq_a.wait(0.3)  # retrying the SEND; the second batch waits behind it
    assert (pair.mem_b[8192:8192 + 5120] == 0).all()
    pair.recv_b(77, 64 * KiB, 4096)
    wcs = wait_wcs(pair.cq_a, 11)
    assert [(wc.wr_id, wc.status) for wc in wcs] == [(i, WCStatus.SUCCESS) for i in range(10, 21)]
    wc = wait_wcs(pair.rcq_b, 1)[0]
    assert (wc.wr_id, wc.status, wc.byte_len) == (77, WCStatus.SUCCESS, 64)
    assert (pair.mem_b[:5120] == 5).all() and (pair.mem_b[8192:8192 + 5120] == 5).all()
    assert pair.qp_a.state == QPState.RTS


def test_killed_peer_mid_batch_flushes_every_outstanding_write(provider):
    n, size = 64, 64 * KiB
    with Peer(provider, size=MiB) as target, \
            writer_to(target, provider, address(provider), port(provider), max_send_wr=n) as w:
        mr, cq, qp = w.mr, w.send_cq, w.qp
        os.kill(target.pid, signal.SIGSTOP)  # it stops reading: batches stay in flight
        wrs = np.zeros(n, WRITE_WR_DTYPE)
        wrs["wr_id"] = np.arange(n)
        wrs["addr"], wrs["length"], wrs["lkey"] = mr.addr, size, mr.lkey
        wrs["remote_addr"] = target.info["addr"] + (np.arange(n) % 16) * size
        wrs["rkey"], wrs["signaled"] = target.info["rkey"], 1
        for start in range(0, n, 16):
            qp.post_writes(wrs[start:start + 16])
        time.sleep(0.2)
        target.kill()
        wcs = wait_wcs(cq, n, 5.0)  # the broken connection is seen at once, not by timeout
        statuses = [wc.status for wc in wcs]
        assert [wc.wr_id for wc in wcs] == list(range(n))
        first = statuses.index(WCStatus.WR_FLUSH_ERR)
        assert set(statuses[:first]) <= {WCStatus.SUCCESS}
        assert set(statuses[first:]) == {WCStatus.WR_FLUSH_ERR}
        assert qp.state == QPState.ERR


def test_post_writes_refuses_other_arrays(make_pair):
    pair = make_pair()
    with pytest.raises(ValueError):
        pair.qp_a.post_writes(np.zeros(4, np.uint64))


# -- the soft provider's WRITE_BATCH ---------------------------------------------------
def test_write_batch_frame_bytes():
    assert wire.batch_header(5, 2, 300).hex() == (
        "05" "00" "0000" "0000000000000005" "0000000000000000" "00000002" "0000012c")
    assert wire.descriptors([0x1000, 0x2000], [7, 7], [100, 200]).hex() == (
        "0000000000001000" "00000007" "00000064" "0000000000002000" "00000007" "000000c8")
    descs = np.frombuffer(wire.descriptors([1, 2], [3, 4], [5, 6]), wire.DESC_DTYPE)
    assert descs.tolist() == [(1, 3, 5), (2, 4, 6)]
    assert [wire.DESC.unpack_from(wire.descriptors([9], [8], [7]))] == [(9, 8, 7)]


def test_recv_scattered_fills_more_views_than_one_call_takes():
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 300, 3000)
    lengths[lengths < 20] = 1
    data = rng.integers(0, 256, int(lengths.sum()), np.uint8).tobytes()
    target = bytearray(len(data))
    view, views, at = memoryview(target), [], 0
    for length in lengths.tolist():
        views.append(view[at:at + length])
        at += length
    assert len(views) > batch.RECV_IOV_MAX
    left, right = socket.socketpair()
    with left, right:
        def dribble():  # in pieces, so reads come back partial
            for start in range(0, len(data), 70_001):
                right.sendall(data[start:start + 70_001])
                time.sleep(0.001)

        thread = threading.Thread(target=dribble)
        thread.start()
        assert batch.recv_scattered(left, views)
        thread.join(5)
        right.close()
        assert bytes(target) == data
        assert not batch.recv_scattered(left, [memoryview(bytearray(1))])  # EOF


def test_merged_ranges_join_only_touching_writes():
    starts = np.array([8192, 0, 4096, 100_000, 20_000, 9000], np.uint64)
    ends = np.array([12288, 4096, 6000, 100_000, 20_100, 10_000], np.uint64)  # one is empty
    assert batch._merged(starts, ends) == [(0, 6000), (8192, 12288), (20_000, 20_100)]


def test_batch_into_on_demand_memory_faults_in_what_it_writes():
    import ctypes
    import mmap

    from shm.memory import mincore

    ram = mmap.mmap(-1, 4 * MiB)  # private, anonymous, never touched
    base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    pair = Pair("soft")
    try:
        odp = pair.pd_b.reg_mr(base, 4 * MiB,
                               Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.ON_DEMAND)
        pair.mem_a[:] = 6
        wrs = np.zeros(8, WRITE_WR_DTYPE)
        wrs["wr_id"], wrs["signaled"] = np.arange(8), 1
        wrs["addr"], wrs["lkey"], wrs["rkey"] = pair.mr_a.addr, pair.mr_a.lkey, odp.rkey
        wrs["remote_addr"] = odp.addr + np.array([0, 4096, 8192, MiB, 3 * MiB, 3 * MiB + 100,
                                                  2 * MiB, 2 * MiB], np.uint64)
        wrs["length"] = [4096, 4096, 4096, 4096, 100, 4096 - 100, 0, 4096]
        pair.qp_a.post_writes(wrs)
        assert all(wc.ok for wc in wait_wcs(pair.cq_a, 8))
        resident = mincore(base, 4 * MiB)
        assert resident is not None
        # the targets are in (and, from a helper thread, the memory after them: faulting)
        assert {0, 1, 2, 256, 512, 768} <= set(np.flatnonzero(resident).tolist())
        data = np.frombuffer(ram, np.uint8)
        assert (data[:3 * 4096] == 6).all() and (data[3 * MiB:3 * MiB + 4096] == 6).all()
        del data
        pair.qp_a.disconnect()
    finally:
        pair.close()
        ram.close()


# -- the soft send queue: a post_writes call is one entry, retired in parts --------------
@contextlib.contextmanager
def _unlinked_qp(max_send_wr: int = 32):
    """(mr, qp, cq): a soft QP in RTS without a connection over a 64 KiB MR. Nothing is
    transmitted: the test plays the responder's ACKs and NAKs itself (under the QP lock, as
    the link's reader would)."""
    from stages.verbs import open_provider

    memory = np.zeros(64 * KiB, np.uint8)
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(memory.ctypes.data, memory.nbytes, Access.LOCAL_WRITE)
        cq = ctx.create_cq(64)
        qp = pd.create_qp(cq, cq, max_send_wr=max_send_wr, max_recv_wr=0)
        qp._state = QPState.RTS
        yield mr, qp, cq
        qp.close()
        cq.close()
        mr.close()


def _local_writes(mr, n: int, signaled) -> np.ndarray:
    wrs = np.zeros(n, WRITE_WR_DTYPE)
    wrs["wr_id"] = np.arange(n) + 100
    wrs["addr"] = mr.addr + np.arange(n, dtype=np.uint64) * 64
    wrs["length"], wrs["lkey"], wrs["remote_addr"], wrs["rkey"] = 64, mr.lkey, 1 << 20, 7
    wrs["signaled"] = signaled
    return wrs


def test_ack_inside_a_batch_retires_its_head_and_completes_only_signaled_writes():
    with _unlinked_qp() as (mr, qp, cq):
        signaled = np.isin(np.arange(10), [3, 7, 9])
        qp.post_writes(_local_writes(mr, 10, signaled))
        assert len(qp.sq) == 1 and mr.inflight == 10  # one entry for the whole call
        with qp.lock:
            qp.on_ack(4)  # lands inside the entry: writes 0..4 are placed
        assert [(wc.wr_id, wc.status) for wc in cq.poll()] == [(103, WCStatus.SUCCESS)]
        assert qp.sq_used == 6 and mr.inflight == 5 and qp.unsignaled_done == 1
        with pytest.raises(TransportError):
            mr.close()  # writes 5..9 still use it
        with qp.lock:
            qp.on_ack(7)
        assert [wc.wr_id for wc in cq.poll()] == [107]
        with qp.lock:
            qp.on_nak(9, wire.NAK_REM_ACCESS)  # 8 placed, 9 refused: ERR
        wcs = cq.poll()
        assert [(wc.wr_id, wc.status, wc.byte_len) for wc in wcs] == [
            (109, WCStatus.REM_ACCESS_ERR, 64)]
        assert qp.state == QPState.ERR and qp.sq_used == 0 and mr.inflight == 0


def test_flush_of_a_partly_acked_batch_completes_each_remaining_write():
    with _unlinked_qp() as (mr, qp, cq):
        wrs = _local_writes(mr, 8, False)
        wrs["lkey"][5] ^= 0x77  # a bad local key splits the call into entries around it
        qp.post_writes(wrs[:6])
        qp.post_writes(_local_writes(mr, 3, True))
        assert len(qp.sq) == 3 and mr.inflight == 8
        with qp.lock:
            qp.on_ack(2)  # no completion: 0..2 are unsignaled
        assert not cq.poll() and qp.unsignaled_done == 3
        with qp.lock:
            qp.on_ack(4)  # the bad WR reaches the front: it fails, the rest flushes
        wcs = cq.poll(32)
        assert [(wc.wr_id, wc.status) for wc in wcs] == [
            (105, WCStatus.LOC_PROT_ERR), (100, WCStatus.WR_FLUSH_ERR),
            (101, WCStatus.WR_FLUSH_ERR), (102, WCStatus.WR_FLUSH_ERR)]
        assert qp.sq_used == 0 and mr.inflight == 0 and qp.state == QPState.ERR
        qp.post_writes(_local_writes(mr, 2, False))  # in ERR: flushed at once, each one
        assert [wc.status for wc in cq.poll()] == [WCStatus.WR_FLUSH_ERR] * 2


def test_batches_over_many_mrs_check_every_key_at_both_ends():
    pair = Pair("soft", max_send_wr=256)
    try:
        pair.mem_a[:] = np.arange(MiB) % 251
        quarter = MiB // 4  # four MRs a side over the same memory
        src = [pair.pd_a.reg_mr(pair.mr_a.addr + i * quarter, quarter, Access.LOCAL_WRITE)
               for i in range(4)]
        dst = [pair.pd_b.reg_mr(pair.mr_b.addr + i * quarter, quarter,
                                Access.LOCAL_WRITE | Access.REMOTE_WRITE) for i in range(4)]
        n = 64
        pages = np.arange(n) * 4096  # page i lies in MR i // 64 ... spread over the four
        pages = (pages * 3) % MiB
        which = pages // quarter
        wrs = np.zeros(n, WRITE_WR_DTYPE)
        wrs["wr_id"], wrs["signaled"], wrs["length"] = np.arange(n), 1, 4096
        wrs["addr"] = pair.mr_a.addr + pages.astype(np.uint64)
        wrs["remote_addr"] = pair.mr_b.addr + pages.astype(np.uint64)
        wrs["lkey"] = [src[i].lkey for i in which]
        wrs["rkey"] = [dst[i].rkey for i in which]
        pair.qp_a.post_writes(wrs)
        assert all(wc.ok for wc in wait_wcs(pair.cq_a, n))
        placed = np.zeros(MiB, bool)
        for page in pages.tolist():
            placed[page:page + 4096] = True
        assert (pair.mem_b[placed] == pair.mem_a[placed]).all()
        assert not pair.mem_b[~placed].any()
        wrs["wr_id"] += n
        wrs["rkey"][40] = dst[3].rkey ^ 0x5A5A  # no such key at the target: NAKed there
        pair.qp_a.post_writes(wrs)
        statuses = [wc.status for wc in wait_wcs(pair.cq_a, n)]
        assert statuses == [WCStatus.SUCCESS] * 40 + [WCStatus.REM_ACCESS_ERR] + [
            WCStatus.WR_FLUSH_ERR] * 23
        assert all(mr.inflight == 0 for mr in [*src, *dst, pair.mr_a, pair.mr_b])
        for mr in [*src, *dst]:
            mr.close()
    finally:
        pair.close()


@pytest.mark.parametrize("spoil", ["none", "unknown key", "out of bounds", "no remote write"])
def test_few_and_many_write_checks_agree(spoil):
    """The responder's numpy checks (large batches) and its Python loop (small ones) take the
    same writes, into the same bytes, with the same MR references."""
    from stages.verbs import open_provider

    memory = (np.arange(8 * MiB) % 241).astype(np.uint8)
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        access = Access.LOCAL_WRITE | Access.REMOTE_WRITE
        mrs = [pd.reg_mr(memory.ctypes.data + i * MiB, MiB, access) for i in range(7)]
        mrs.append(pd.reg_mr(memory.ctypes.data + 7 * MiB, MiB, Access.LOCAL_WRITE))
        rng = np.random.default_rng(11)
        n = 300
        which = rng.integers(0, 7, n)
        which[:40] = 2  # a stretch of adjacent writes in one MR: one view
        offset = rng.integers(0, MiB - 8192, n).astype(np.uint64)
        offset[:40] = 4096 * np.arange(40, dtype=np.uint64)
        length = rng.choice([0, 1, 100, 4096, 8192], n).astype(np.uint64)
        length[:40] = 4096
        if spoil == "unknown key":
            which[170] = 99
        elif spoil == "out of bounds":
            offset[170], length[170] = MiB - 50, 100
        elif spoil == "no remote write":
            which[170] = 7
        keys = np.array([mr.rkey for mr in mrs] + [0xDEAD])[np.minimum(which, 8)]
        addr = np.array([mr.addr for mr in mrs] + [0])[np.minimum(which, 8)].astype(
            np.uint64) + offset
        descs = np.frombuffer(wire.descriptors(addr, keys, length), wire.DESC_DTYPE)
        got = []
        for check in (batch.remote_targets, batch._few_targets):
            k, views, used, ranges = check(pd, descs)
            got.append((k, b"".join(bytes(v) for v in views), sorted(mr.rkey for mr in used),
                        [mr.inflight for mr in mrs]))
            assert not ranges  # no on-demand MR here
            assert len(views) <= max(k - 39, 1)  # the adjacent stretch shares one view
            for mr in mrs:
                mr.inflight = 0
        assert got[0] == got[1]
        assert got[0][0] == (n if spoil == "none" else 170)


def _parse_frames(data: bytes) -> list:
    """``(seq, remote_addr, rkey, payload)`` per WRITE in a stream of request frames, checking
    each WRITE_BATCH's count and total."""
    out, i = [], 0
    while i < len(data):
        kind, _, _, seq, remote_addr, rkey, length = wire.FRAME.unpack_from(data, i)
        i += wire.FRAME.size
        if kind == wire.WRITE:
            out.append((seq, remote_addr, rkey, data[i:i + length]))
            i += length
            continue
        assert kind == wire.WRITE_BATCH and 1 <= rkey <= wire.MAX_BATCH
        descs = np.frombuffer(data, wire.DESC_DTYPE, rkey, i)
        i += rkey * wire.DESC.size
        assert int(descs["length"].astype(np.int64).sum()) == length
        for j, (addr, key, size) in enumerate(descs.tolist()):
            out.append((seq + j, addr, key, data[i:i + size]))
            i += size
    return out


@pytest.mark.parametrize("seed", range(12))
def test_collect_frames_any_send_queue_under_any_budget(seed):
    """Runs over several MRs, adjacent or not, cut by tight iovec and byte budgets, rewound
    (an inline send that sent nothing) and acked in the middle: every frame is well formed,
    stays within the iovec, and the writes arrive once each, in order, with their bytes."""
    from collections import deque
    from types import SimpleNamespace

    from stages.verbs import open_provider
    from stages.verbs.soft import sendq

    rng = np.random.default_rng(seed)
    memory = rng.integers(0, 256, 4 * MiB, np.uint8)
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mrs = [pd.reg_mr(memory.ctypes.data + i * MiB, MiB, Access.LOCAL_WRITE)
               for i in range(4)]
        qp = SimpleNamespace(sq=deque(), next_seq=0, tx_next=0)
        expected = []
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.choice([1, 2, 5, 300, 1100]))
            which = rng.integers(0, 4, n) if rng.random() < 0.5 else np.full(n, n % 4)
            offset = (np.arange(n, dtype=np.uint64) * 4096) % MiB if rng.random() < 0.5 else \
                np.sort(rng.integers(0, 256, n)).astype(np.uint64) * 4096
            wrs = np.zeros(n, WRITE_WR_DTYPE)
            wrs["addr"] = np.array([mr.addr for mr in mrs], np.uint64)[which] + offset
            wrs["lkey"] = np.array([mr.lkey for mr in mrs])[which]
            wrs["length"] = 4096 if rng.random() < 0.3 else rng.choice([0, 1, 100, 4096], n)
            wrs["remote_addr"] = rng.integers(0, 1 << 40, n).astype(np.uint64)
            wrs["rkey"] = rng.integers(0, 1 << 20, n)
            qp.sq.extend(sendq.write_runs(pd, wrs, qp.next_seq, 0, None))
            qp.next_seq += n
            for w, i in zip(wrs, which.tolist(), strict=True):
                start = int(w["addr"]) - mrs[i].addr
                expected.append((int(w["remote_addr"]), int(w["rkey"]),
                                 memory[i * MiB + start:i * MiB + start + int(w["length"])]
                                 .tobytes()))
        got: list = []
        while qp.tx_next < qp.next_seq:
            max_iov = int(rng.choice([3, 4, 7, 50, 1024]))
            bufs = [b"x" * wire.FRAME.size] * (int(rng.integers(0, 2)) if max_iov >= 4 else 0)
            queued, start = len(bufs), qp.tx_next
            batch.collect(qp, bufs, max_bytes=int(rng.choice([1, 4096, 100_000, 8 << 20])),
                          max_iov=max_iov)
            assert len(bufs) <= max_iov and qp.tx_next > start
            frames = _parse_frames(b"".join(bytes(b) for b in bufs[queued:]))
            assert [f[0] for f in frames] == list(range(start, qp.tx_next))
            if rng.random() < 0.2:
                qp.tx_next = start  # nothing went out: sent again from the same WR
                continue
            got += frames
            if rng.random() < 0.5:  # an ACK lands somewhere in what was sent
                last = int(rng.integers(qp.sq[0].seq, qp.tx_next))
                while qp.sq and qp.sq[0].seq <= last:
                    entry = qp.sq[0]
                    if entry.end - 1 <= last:
                        qp.sq.popleft()
                    else:
                        entry.done, entry.seq = last + 1 - entry.seq0, last + 1
                        break
        assert [frame[1:] for frame in got] == expected
        for mr in mrs:
            mr.inflight = 0
