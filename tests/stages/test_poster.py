import numpy as np

from stages.poster import Poster
from stages.records import OP_END, OP_RUN, WRITE_DTYPE, records


def writes(n, round_no=1, chunk=0, length=4096):
    return records(WRITE_DTYPE, n, op=OP_RUN, round=round_no, chunk=chunk, length=length,
                   local_addr=np.arange(n) * length, lkey=1, rkey=2)


def end(round_no):
    return records(WRITE_DTYPE, op=OP_END, round=round_no)


class Recorder:
    def __init__(self):
        self.posted = []

    def __call__(self, wr_id, laddr, length, lkey, raddr, rkey, signaled):
        self.posted.append((wr_id, signaled))


def test_signals_every_n_and_the_tail_then_drains_round():
    rec = Recorder()
    p = Poster(rec, signal_every=4)
    comps, wait = p.on_writes(np.concatenate([writes(10), end(1)]), 0.0)
    assert wait == 0 and len(comps) == 0
    assert [s for _, s in rec.posted] == [False, False, False, True] * 2 + [False, True]
    comps, _ = p.on_completions([3], 0.0)
    assert comps["op"].tolist() == [OP_RUN] and comps[0]["writes"] == 4
    comps, _ = p.on_completions([7, 9], 0.0)
    assert comps["op"].tolist() == [OP_RUN, OP_END]
    assert comps[-1]["bytes"] == 10 * 4096 and comps[-1]["writes"] == 10


def test_empty_round_drains_at_once():
    p = Poster(Recorder())
    comps, _ = p.on_writes(end(5), 0.0)
    assert comps["op"].tolist() == [OP_END] and comps[0]["round"] == 5


def test_send_queue_depth_is_respected():
    rec = Recorder()
    p = Poster(rec, max_outstanding=3, signal_every=16)
    p.on_writes(writes(5), 0.0)
    assert len(rec.posted) == 3 and rec.posted[-1][1]     # the last before waiting: signaled
    p.on_completions([2], 0.0)
    assert len(rec.posted) == 5


def test_bandwidth_cap_defers_posting():
    rec = Recorder()
    p = Poster(rec, max_bandwidth=400 * 4096)     # 4 writes of 4 KiB per 10 ms window
    _, wait = p.on_writes(writes(10), 0.0)
    assert len(rec.posted) == 4 and 0 < wait <= 0.01
    _, wait = p.pump(0.0101)
    assert len(rec.posted) == 8
