import numpy as np
import pytest

from stages.records import (
    ALL_CHUNKS,
    ANSWER,
    CHUNK_DONE,
    COMPLETION_RING,
    COMPRESS_REQUEST,
    DRAINED_REQUEST,
    MR_RELEASED,
    REGISTER_REQUEST,
    ROUND_DRAINED,
    RUN,
    RUN_RING,
    SCAN_END,
    UNREGISTER_REQUEST,
    WRITE,
    WRITE_END,
    AnswerStatus,
    Request,
    WriteOp,
    records,
    select,
)
from stages.registrar import BlockInfo, Registrar

CHUNK = 1 << 20
CP = CHUNK // 4096


class FakeMR:
    next_key = 100

    def __init__(self, addr, length):
        self.addr, self.length = addr, length
        FakeMR.next_key += 1
        self.lkey = FakeMR.next_key
        self.closed = False

    def close(self):
        self.closed = True


def runs(*items, round_no=1):
    """items: (block, first_page, n_pages, zero)."""
    out = records(RUN, len(items), round=round_no)
    for i, (b, f, n, z) in enumerate(items):
        out[i]["block"], out[i]["first_page"], out[i]["n_pages"], out[i]["zero"] = b, f, n, z
    return out.view(RUN_RING)


def end(round_no, dirty=0, zero=0):
    return records(SCAN_END, round=round_no, dirty_pages=dirty, zero_pages=zero).view(RUN_RING)


def answer(block, chunk, rkey, base=0x7F0000000000):
    return records(ANSWER, block=block, chunk=chunk, rkey=rkey, remote_base=base)


def make(**kw):
    blocks = [BlockInfo(0x10000000, 4 * CHUNK), BlockInfo(0x20000000, CHUNK // 4)]
    return Registrar(blocks, CHUNK, pin_all=kw.pop("pin_all", False), reg_mr=FakeMR, **kw)


def test_unregistered_runs_park_until_answered_then_write():
    reg = make()
    w, q = reg.on_runs(np.concatenate([runs((0, 3, 2, 0), (0, CP + 1, 1, 1), (1, 0, 4, 0)),
                                       end(1, 7, 1)]))
    assert len(w) == 0                                   # nothing registered yet, END held
    assert select(q, COMPRESS_REQUEST)[["block", "offset", "length"]].tolist() == [
        (0, (CP + 1) * 4096, 4096)]
    regs = select(q, REGISTER_REQUEST)
    assert sorted(regs[["block", "chunk"]].tolist()) == [(0, 0), (1, 0)]
    w, q = reg.on_answers(answer(0, 0, 7))
    assert w["op"].tolist() == [WriteOp.WRITE]
    w = w.view(WRITE)
    assert w["remote_addr"][0] == 0x7F0000000000 + 3 * 4096
    assert w["local_addr"][0] == 0x10000000 + 3 * 4096 and w["rkey"][0] == 7
    assert w["length"][0] == 2 * 4096 and w["lkey"][0] == reg.lkey[0][0]
    w, q = reg.on_answers(answer(1, 0, 9, base=0x5000))
    assert w["op"].tolist() == [WriteOp.WRITE, WriteOp.END]   # END follows the last parked write
    assert w[0].view(WRITE)["remote_addr"] == 0x5000
    assert w[1].view(WRITE_END)[["round", "dirty_pages", "zero_pages"]].tolist() == (1, 7, 1)


def test_registered_chunks_write_small_zero_runs_and_compress_big_ones():
    reg = make()
    reg.on_runs(runs((0, 0, 1, 0)))
    reg.on_answers(answer(0, 0, 7))
    w, q = reg.on_runs(np.concatenate([runs((0, 1, 1, 0), (0, 5, 3, 1), (0, 100, 64, 1),
                                            round_no=2), end(2)]))
    assert w["op"].tolist() == [WriteOp.WRITE, WriteOp.WRITE, WriteOp.END]
    assert w[:2].view(WRITE)[["pages", "zero_pages"]].tolist() == [(1, 0), (3, 3)]   # written
    assert w[2].view(WRITE_END)["compressed_pages"] == 64
    assert q["op"].tolist() == [Request.COMPRESS]
    assert q.view(COMPRESS_REQUEST)[["offset", "length"]].tolist() == [(100 * 4096, 64 * 4096)]


def test_pin_all_registers_nothing_and_compresses_zero_runs():
    reg = make(pin_all=True)
    reg.pin_blocks()
    reg.on_answers(np.concatenate([answer(0, ALL_CHUNKS, 11), answer(1, ALL_CHUNKS, 12)]))
    w, q = reg.on_runs(np.concatenate([runs((0, 0, CP, 1), (0, 3 * CP, 2, 0), (1, 1, 1, 0)),
                                       end(1)]))
    assert q["op"].tolist() == [Request.COMPRESS]
    assert q[0].view(COMPRESS_REQUEST)["length"] == CP * 4096
    assert w["op"].tolist() == [WriteOp.WRITE] * 2 + [WriteOp.END]
    assert w[:2].view(WRITE)["rkey"].tolist() == [11, 12]


def test_drained_forwarded_with_round_figures():
    reg = make()
    reg.on_runs(np.concatenate([runs((0, 0, 1, 1)), end(1, dirty=1, zero=1)]))
    comps = records(ROUND_DRAINED, round=1, bytes=0, writes=0).view(COMPLETION_RING)
    q = reg.on_completions(comps)
    assert q["op"].tolist() == [Request.DRAINED]
    assert q.view(DRAINED_REQUEST)[["dirty_pages", "zero_pages", "compressed_pages"]].tolist() == [
        (1, 1, 1)]


def test_pin_budget_unregisters_idle_lru_chunks_only():
    reg = make(pin_budget=2 * CHUNK)
    reg.on_runs(runs((0, 0, 1, 0), (0, CP, 1, 0)))
    w, _ = reg.on_answers(np.concatenate([answer(0, 0, 1), answer(0, 1, 2)]))
    assert len(w) == 2
    # chunk 0 completes, chunk 1 still in flight
    reg.on_completions(records(CHUNK_DONE, round=1, block=0, chunk=0, writes=1,
                               bytes=4096).view(COMPLETION_RING))
    _, q = reg.on_runs(runs((0, 2 * CP, 1, 0), round_no=2))
    un = select(q, UNREGISTER_REQUEST)
    assert un[["block", "chunk"]].tolist() == [(0, 0)]
    assert reg.state[0][0] == 0 and reg.chunks_unregistered == 1
    (mr,) = reg.to_release
    assert not mr.closed                      # the poster still holds an import
    reg.on_completions(records(MR_RELEASED, lkey=mr.lkey).view(COMPLETION_RING))
    assert mr.closed


def test_refused_registration_raises():
    reg = make()
    reg.on_runs(runs((0, 0, 1, 0)))
    bad = answer(0, 0, 0)
    bad["status"] = AnswerStatus.REFUSED
    with pytest.raises(RuntimeError):
        reg.on_answers(bad)


def test_adjacent_zero_runs_merge_into_one_compress_across_chunks():
    reg = make()
    _, q = reg.on_runs(runs((0, CP - 2, 2, 1), (0, CP, CP, 1), (0, 2 * CP, 3, 1),
                            (0, 3 * CP + 5, 1, 1)))
    c = select(q, COMPRESS_REQUEST)
    assert c[["offset", "length"]].tolist() == [((CP - 2) * 4096, (CP + 5) * 4096),
                                                ((3 * CP + 5) * 4096, 4096)]
    assert reg.compress_sent == 2 and reg.round_compressed[1] == CP + 6


def test_chunks_requested_together_are_registered_with_one_call_in_request_order():
    calls = []

    def reg_mrs(ranges):
        calls.append(list(ranges))
        return [FakeMR(a, n) for a, n in ranges]

    blocks = [BlockInfo(0x10000000, 4 * CHUNK), BlockInfo(0x20000000, CHUNK // 4)]
    reg = Registrar(blocks, CHUNK, pin_all=False, reg_mr=FakeMR, reg_mrs=reg_mrs)
    _, q = reg.on_runs(runs((0, 2 * CP, 1, 0), (0, 0, 1, 0), (0, CP, 1, 0), (1, 0, 2, 0)))
    asked = select(q, REGISTER_REQUEST)
    reg.register_pending()
    reg.register_pending()                              # nothing left: no second call
    assert calls == [[(0x10000000, CHUNK), (0x10000000 + CHUNK, CHUNK),
                      (0x10000000 + 2 * CHUNK, CHUNK), (0x20000000, CHUNK // 4)]]
    assert list(zip(asked["block"].tolist(), asked["chunk"].tolist(), strict=True)) == [
        (0, 0), (0, 1), (0, 2), (1, 0)]
    lkeys = [reg.lkey[0][0], reg.lkey[0][1], reg.lkey[0][2], reg.lkey[1][0]]
    assert len(set(lkeys)) == 4 and reg.new_mrs == [reg.mrs[k] for k in
                                                    [(0, 0), (0, 1), (0, 2), (1, 0)]]
    w, _ = reg.on_answers(np.concatenate([answer(0, c, 50 + c) for c in range(3)]
                                         + [answer(1, 0, 60)]))
    assert sorted(w.view(WRITE)["rkey"].tolist()) == [50, 51, 52, 60]
    assert calls[1:] == []


def test_without_reg_mrs_each_chunk_goes_through_reg_mr():
    reg = make()
    reg.on_runs(runs((0, 0, 1, 0), (0, CP, 1, 0)))
    reg.register_pending()
    assert [(m.addr, m.length) for m in reg.new_mrs] == [(0x10000000, CHUNK),
                                                          (0x10000000 + CHUNK, CHUNK)]


def test_an_answer_registers_locally_only_up_to_the_chunks_it_answers():
    calls = []

    def reg_mrs(ranges):
        calls.append(len(ranges))
        return [FakeMR(a, n) for a, n in ranges]

    blocks = [BlockInfo(0x10000000, 4 * CHUNK)]
    reg = Registrar(blocks, CHUNK, pin_all=False, reg_mr=FakeMR, reg_mrs=reg_mrs)
    reg.on_runs(runs(*[(0, c * CP, 1, 0) for c in range(4)]))
    reg.register_pending(1)                            # a slice while nothing else waits
    w, _ = reg.on_answers(np.concatenate([answer(0, 0, 70), answer(0, 1, 71)]))
    assert calls == [1, 1] and reg.to_register == [(0, 2), (0, 3)]
    assert sorted(w.view(WRITE)["rkey"].tolist()) == [70, 71] and len(reg.new_mrs) == 2
    w, _ = reg.on_answers(answer(0, 3, 73))            # (0, 2) is registered on the way
    assert calls == [1, 1, 2] and reg.to_register == []
    assert w.view(WRITE)["rkey"].tolist() == [73]
    w, _ = reg.on_answers(answer(0, 2, 72))
    assert calls == [1, 1, 2] and w.view(WRITE)["rkey"].tolist() == [72]


def _done(block, chunk, writes=1, round_no=1):
    return records(CHUNK_DONE, round=round_no, block=block, chunk=chunk, writes=writes,
                   bytes=4096 * writes).view(COMPLETION_RING)


def test_pin_budget_cycles_round_1_through_lru_chunks_never_past_the_budget():
    reg = make(pin_budget=2 * CHUNK)
    _, q = reg.on_runs(runs(*[(0, k * CP, 1, 0) for k in range(4)]))
    asked = select(q, REGISTER_REQUEST)["chunk"].tolist()
    assert asked == [0, 1] and not len(select(q, UNREGISTER_REQUEST))   # 2 wait for room
    reg.register_pending()
    w, _ = reg.on_answers(np.concatenate([answer(0, 0, 1), answer(0, 1, 2)]))
    assert select(w, WRITE)["chunk"].tolist() == [0, 1]
    # chunk 1 completes first: it is the one unregistered (idle), though written this round
    q = reg.on_completions(_done(0, 1))
    assert select(q, UNREGISTER_REQUEST)["chunk"].tolist() == [1]
    assert not len(select(q, REGISTER_REQUEST))       # its MR is not released yet
    (mr,) = reg.to_release
    reg.to_release.clear()
    q = reg.on_completions(records(MR_RELEASED, lkey=mr.lkey).view(COMPLETION_RING))
    assert select(q, REGISTER_REQUEST)["chunk"].tolist() == [2]
    assert reg.registered_now + len(reg.releasing) <= 2
    # chunk 0 completes: evicted, then chunk 3 asked for once released
    q = reg.on_completions(_done(0, 0))
    assert select(q, UNREGISTER_REQUEST)["chunk"].tolist() == [0]
    (mr,) = reg.to_release
    q = reg.on_completions(records(MR_RELEASED, lkey=mr.lkey).view(COMPLETION_RING))
    assert select(q, REGISTER_REQUEST)["chunk"].tolist() == [3] and reg.waiting == []


def test_pin_budget_evicts_least_recently_written_first():
    reg = make(pin_budget=2 * CHUNK)
    reg.on_runs(runs((0, 0, 1, 0), (0, CP, 1, 0)))
    reg.register_pending()
    reg.on_answers(np.concatenate([answer(0, 0, 1), answer(0, 1, 2)]))
    reg.on_completions(np.concatenate([_done(0, 0), _done(0, 1)]))
    reg.on_runs(runs((0, 5, 1, 0), round_no=2))          # chunk 0 written again: newest
    reg.on_completions(_done(0, 0, round_no=2))
    _, q = reg.on_runs(runs((0, 2 * CP, 1, 0), round_no=2))
    assert select(q, UNREGISTER_REQUEST)["chunk"].tolist() == [1]


def test_local_room_past_the_budget_keeps_requests_going_during_releases():
    reg = make(pin_budget=CHUNK, local_budget=2 * CHUNK)
    reg.on_runs(runs((0, 0, 1, 0), (0, CP, 1, 0), (0, 2 * CP, 1, 0)))
    reg.register_pending()
    reg.on_answers(answer(0, 0, 1))
    q = reg.on_completions(_done(0, 0))
    # chunk 0 unregistered at the destination: chunk 1 may be asked for before the release
    assert select(q, UNREGISTER_REQUEST)["chunk"].tolist() == [0]
    assert select(q, REGISTER_REQUEST)["chunk"].tolist() == [1]
    assert reg.registered_now == 1 and len(reg.releasing) == 1


def test_small_zero_runs_of_a_chunk_asked_for_anyway_are_written_not_compressed():
    reg = make()
    # chunk 0: data and a small zero run (registered for the data: the zero run is written);
    # chunk 1: zero runs alone (COMPRESS, nothing registered for it)
    _, q = reg.on_runs(runs((0, 0, 1, 0), (0, 7, 2, 1), (0, CP + 3, 1, 1)))
    assert select(q, REGISTER_REQUEST)["chunk"].tolist() == [0]
    assert select(q, COMPRESS_REQUEST)["offset"].tolist() == [(CP + 3) * 4096]
    w, _ = reg.on_answers(answer(0, 0, 7))
    assert w.view(WRITE)[["pages", "zero_pages"]].tolist() == [
        (1, 0), (2, 2)]


def _budget_round(reg, chunks, round_no):
    """Runs for one page in each of ``chunks``; returns the requests of that batch."""
    return reg.on_runs(runs(*[(0, k * CP, 1, 0) for k in chunks], round_no=round_no))[1]


def test_a_pin_budget_is_cycled_a_group_at_a_time_not_a_chunk_at_a_time():
    blocks = [BlockInfo(0x10000000, 16 * CHUNK)]
    reg = Registrar(blocks, CHUNK, pin_all=False, reg_mr=FakeMR, pin_budget=4 * CHUNK,
                    local_budget=8 * CHUNK)
    q = _budget_round(reg, range(12), 1)
    assert select(q, REGISTER_REQUEST)["chunk"].tolist() == [0, 1, 2, 3]
    reg.register_pending()
    reg.on_answers(np.concatenate([answer(0, c, 10 + c) for c in range(4)]))
    # one chunk's writes complete: no UNREGISTER of one chunk yet (half the budget: 2)
    q = reg.on_completions(_done(0, 0))
    assert not len(select(q, UNREGISTER_REQUEST)) and not len(select(q, REGISTER_REQUEST))
    # a second: both go in one UNREGISTER, and two chunks are asked for in one REGISTER
    q = reg.on_completions(_done(0, 1))
    assert select(q, UNREGISTER_REQUEST)["chunk"].tolist() == [0, 1]
    assert select(q, REGISTER_REQUEST)["chunk"].tolist() == [4, 5]
    assert reg.registered_now <= 4


def test_a_pin_budget_never_waits_for_a_group_with_nothing_under_way():
    blocks = [BlockInfo(0x10000000, 16 * CHUNK)]
    reg = Registrar(blocks, CHUNK, pin_all=False, reg_mr=FakeMR, pin_budget=4 * CHUNK,
                    local_budget=8 * CHUNK)
    _budget_round(reg, [0], 1)
    reg.register_pending()
    reg.on_answers(answer(0, 0, 10))
    reg.on_completions(_done(0, 0))
    # one idle chunk, everything else asked for: all of it fits or is made room for now
    q = _budget_round(reg, [1, 2, 3, 4], 2)
    assert select(q, UNREGISTER_REQUEST)["chunk"].tolist() == [0]
    assert select(q, REGISTER_REQUEST)["chunk"].tolist() == [1, 2, 3, 4]
