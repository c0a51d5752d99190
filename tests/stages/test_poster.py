import copy
from collections import Counter

import numpy as np
import pytest

from stages.poster import Poster, _segments
from stages.records import (
    CHUNK_DONE,
    COMPLETION_RING,
    MR_IMPORT,
    MR_RELEASE,
    ROUND_DRAINED,
    WRITE,
    WRITE_END,
    WRITE_RING,
    CompletionOp,
    WriteOp,
    concat,
    records,
)
from stages.verbs.base import WRITE_WR_DTYPE

CHUNK, DRAINED = CompletionOp.CHUNK, CompletionOp.DRAINED


def writes(n, round_no=1, chunk=0, length=4096, block=0):
    """WRITE records as the ring carries them (``.view(WRITE)`` to change one)."""
    return records(WRITE, n, round=round_no, block=block, chunk=chunk, length=length,
                   local_addr=np.arange(n) * length, remote_addr=7, lkey=1,
                   rkey=2).view(WRITE_RING)


def end(round_no):
    return records(WRITE_END, round=round_no).view(WRITE_RING)


def chunks(comps):
    """The CHUNK_DONE records among ``comps``."""
    return comps[comps["op"] == CHUNK].view(CHUNK_DONE)


def drained(comps):
    """The ROUND_DRAINED records among ``comps``."""
    return comps[comps["op"] == DRAINED].view(ROUND_DRAINED)


class Recorder:
    """A fake ``qp.post_writes``: keeps every array it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, wrs):
        assert wrs.dtype == WRITE_WR_DTYPE
        self.calls.append(wrs.copy())

    @property
    def wrs(self):
        return np.concatenate(self.calls) if self.calls else np.empty(0, WRITE_WR_DTYPE)

    @property
    def signals(self):
        return [bool(s) for s in self.wrs["signaled"]]


def test_signals_every_n_and_the_tail_then_drains_round():
    rec = Recorder()
    p = Poster(rec, signal_every=4)
    comps, wait = p.on_writes(np.concatenate([writes(10), end(1)]), 0.0)
    assert wait == 0 and len(comps) == 0
    assert len(rec.calls) == 1                          # one call for the whole stretch
    assert rec.signals == [False, False, False, True] * 2 + [False, True]
    assert rec.wrs["wr_id"].tolist() == list(range(10))
    assert rec.wrs["addr"].tolist() == (np.arange(10) * 4096).tolist()
    assert set(rec.wrs["lkey"]) == {1} and set(rec.wrs["rkey"]) == {2}
    assert set(rec.wrs["length"]) == {4096} and set(rec.wrs["remote_addr"]) == {7}
    comps, _ = p.on_completions([3], 0.0)
    assert comps["op"].tolist() == [CHUNK] and chunks(comps)["writes"].tolist() == [4]
    comps, _ = p.on_completions([7, 9], 0.0)
    assert comps["op"].tolist() == [CHUNK, DRAINED]
    assert drained(comps)[["bytes", "writes"]].tolist() == [(10 * 4096, 10)]
    assert p.idle and p.writes_posted == 10 and p.bytes_posted == 10 * 4096


def test_empty_round_drains_at_once():
    rec = Recorder()
    p = Poster(rec)
    comps, _ = p.on_writes(end(5), 0.0)
    assert comps["op"].tolist() == [DRAINED]
    assert drained(comps)[["round", "writes"]].tolist() == [(5, 0)] and not rec.calls


def test_send_queue_depth_is_respected():
    rec = Recorder()
    p = Poster(rec, max_outstanding=3, signal_every=16)
    p.on_writes(writes(5), 0.0)
    assert len(rec.wrs) == 3 and rec.signals[-1]       # the last before waiting: signaled
    p.on_completions([2], 0.0)
    assert len(rec.wrs) == 5 and rec.signals[-1]
    assert len(rec.calls) == 2


def test_signals_follow_the_wr_id_so_a_trickle_refills_in_full_steps():
    rec = Recorder()
    p = Poster(rec, max_outstanding=32, signal_every=16)
    p.on_writes(writes(100), 0.0)
    for k in (15, 31, 47, 63, 79):                       # one completion at a time
        p.on_completions([k], 0.0)
    assert [len(c) for c in rec.calls] == [32, 16, 16, 16, 16, 4]
    ids = rec.wrs["wr_id"][rec.wrs["signaled"] != 0].tolist()
    assert ids == [15, 31, 47, 63, 79, 95, 99]


def test_completion_retires_part_of_a_batch():
    rec = Recorder()
    p = Poster(rec, signal_every=4)
    batch = np.concatenate([writes(3, chunk=0), writes(4, chunk=1), writes(3, chunk=2)])
    p.on_writes(batch, 0.0)
    comps, _ = p.on_completions([4], 0.0)               # ids 0..4: chunk 0 whole, 2 of chunk 1
    comps = chunks(comps)
    assert comps["chunk"].tolist() == [0, 1] and comps["writes"].tolist() == [3, 2]
    assert comps["bytes"].tolist() == [3 * 4096, 2 * 4096]
    assert p.n_outstanding == 5 and p.outstanding[0]["wr_id"][0] == 5
    comps, _ = p.on_completions([4], 0.0)                 # nothing new: nothing out
    assert len(comps) == 0 and p.n_outstanding == 5
    comps, _ = p.on_completions([], 0.0)
    assert len(comps) == 0
    comps = chunks(p.on_completions([9], 0.0)[0])
    assert comps["chunk"].tolist() == [1, 2] and comps["writes"].tolist() == [2, 3]
    assert p.idle


def test_completion_retires_across_posted_batches():
    rec = Recorder()
    p = Poster(rec, max_outstanding=4, signal_every=2)
    p.on_writes(writes(4, chunk=0), 0.0)
    p.on_writes(writes(4, chunk=1), 0.0)
    p.on_completions([1], 0.0)                           # room for 2: a batch of 2
    assert [len(c) for c in rec.calls] == [4, 2]
    comps = chunks(p.on_completions([4], 0.0)[0])       # the rest of batch 1, part of batch 2
    assert comps["chunk"].tolist() == [0, 1] and comps["writes"].tolist() == [2, 1]
    assert [o["wr_id"].tolist() for o in p.outstanding] == [[5], [6, 7]]   # 6, 7 just posted
    assert p.n_outstanding == 3 and [len(c) for c in rec.calls] == [4, 2, 2]


def test_chunks_interleaved_are_aggregated_in_first_seen_order():
    rec = Recorder()
    p = Poster(rec)
    batch = writes(6)
    batch.view(WRITE)["chunk"] = [5, 3, 5, 3, 9, 5]
    batch.view(WRITE)["block"] = [0, 0, 0, 0, 0, 1]
    batch.view(WRITE)["length"] = [1, 2, 4, 8, 16, 32]
    p.on_writes(batch, 0.0)
    comps, _ = p.on_completions([5], 0.0)
    assert comps["op"].tolist() == [CHUNK] * 4
    comps = comps.view(CHUNK_DONE)
    assert list(zip(comps["block"].tolist(), comps["chunk"].tolist(),
                    comps["writes"].tolist(), comps["bytes"].tolist(), strict=True)) == [
        (0, 5, 2, 5), (0, 3, 2, 10), (0, 9, 1, 16), (1, 5, 1, 32)]


def test_end_markers_split_stretches_and_rounds_drain_in_turn():
    rec = Recorder()
    p = Poster(rec, signal_every=16)
    comps, _ = p.on_writes(np.concatenate([writes(3, 1), end(1), writes(2, 2), end(2),
                                           end(3), writes(2, 4)]), 0.0)
    assert len(comps) == 0
    assert [len(c) for c in rec.calls] == [3, 2, 2]      # one call per stretch
    assert all(c["signaled"][-1] for c in rec.calls)     # each stretch ends signaled
    assert rec.signals.count(True) == 3
    comps, _ = p.on_completions([2], 0.0)                # round 1 is done
    assert comps["op"].tolist() == [CHUNK, DRAINED]
    assert drained(comps)[["round", "writes", "bytes"]].tolist() == [(1, 3, 3 * 4096)]
    comps, _ = p.on_completions([4], 0.0)                # round 2, then empty round 3
    assert comps["op"].tolist() == [CHUNK, DRAINED, DRAINED]
    assert chunks(comps)["round"].tolist() == [2]
    assert drained(comps)[["round", "writes"]].tolist() == [(2, 2), (3, 0)]
    comps, _ = p.on_completions([6], 0.0)                # round 4 has no END yet
    assert comps["op"].tolist() == [CHUNK]
    comps, _ = p.on_writes(end(4), 0.0)
    assert drained(comps)[["round", "writes"]].tolist() == [(4, 2)] and len(comps) == 1


def test_end_waits_behind_a_full_send_queue():
    rec = Recorder()
    p = Poster(rec, max_outstanding=2)
    p.on_writes(np.concatenate([writes(3, 1), end(1), writes(1, 2), end(2)]), 0.0)
    assert len(rec.wrs) == 2 and not p.ends              # END 1 waits in the backlog
    comps, _ = p.on_completions([1], 0.0)                # write 2, then round 2's in its own call
    assert comps["op"].tolist() == [CHUNK]
    assert [len(c) for c in rec.calls] == [2, 1, 1] and list(p.ends) == [1, 2]
    comps, _ = p.on_completions([2], 0.0)
    assert comps["op"].tolist() == [CHUNK, DRAINED] and drained(comps)["round"].tolist() == [1]
    comps, _ = p.on_completions([3], 0.0)
    assert comps["op"].tolist() == [CHUNK, DRAINED] and drained(comps)["round"].tolist() == [2]


def test_queued_arrays_without_end_are_posted_in_one_call():
    rec = Recorder()
    p = Poster(rec, max_outstanding=4)
    p.on_writes(writes(4), 0.0)
    p.on_writes(writes(3, chunk=1), 0.0)
    p.on_writes(writes(3, chunk=2), 0.0)
    p.on_completions([3], 0.0)
    assert [len(c) for c in rec.calls] == [4, 4]          # 3 of chunk 1 and 1 of chunk 2
    assert rec.calls[1]["signaled"].tolist() == [0, 0, 0, 1]


def test_bandwidth_cap_defers_posting():
    rec = Recorder()
    p = Poster(rec, max_bandwidth=400 * 4096)     # a bucket of 4 writes of 4 KiB (10 ms)
    _, wait = p.on_writes(writes(10), 0.0)
    assert len(rec.wrs) == 4 and wait == pytest.approx(0.0025, abs=1e-5)   # one write's time
    assert rec.signals[-1]                        # the last write before the wait: signaled
    _, wait = p.pump(0.001)                       # not one write's worth yet
    assert len(rec.wrs) == 4 and wait == pytest.approx(0.0015, abs=1e-5)
    _, wait = p.pump(0.0051)                      # two writes' worth
    assert len(rec.wrs) == 6 and rec.signals[-1] and wait > 0
    _, wait = p.pump(1.0)                         # the bucket holds 4: all that is left goes
    assert len(rec.wrs) == 10 and wait == 0


def test_bandwidth_cap_counts_bytes_not_writes():
    rec = Recorder()
    p = Poster(rec, max_bandwidth=1000 * 100)     # a bucket of 1000 bytes
    batch = writes(5)
    batch.view(WRITE)["length"] = [600, 300, 100, 1, 5000]
    p.on_writes(batch, 0.0)
    assert rec.wrs["length"].tolist() == [600, 300, 100]      # exactly the bucket
    p.pump(0.00001)
    assert rec.wrs["length"].tolist() == [600, 300, 100, 1]   # 1 byte refilled in 10 us
    _, wait = p.pump(0.005)                       # half full: 5000 waits for a full bucket
    assert rec.wrs["length"].tolist() == [600, 300, 100, 1] and wait > 0
    _, wait = p.pump(0.005 + wait)                # full: larger than the bucket, it goes
    assert rec.wrs["length"].tolist() == [600, 300, 100, 1, 5000]
    assert p.bytes_posted == 6001 and p.bucket.tokens < -3999   # in debt, paid back later


def test_token_bucket_never_exceeds_the_rate_and_lets_no_write_through_unconditionally():
    from stages.poster import WINDOW, TokenBucket

    rate = 4_000_000                              # 4 MB/s: a bucket of 40 kB
    rng = np.random.default_rng(3)
    lengths = rng.choice([4096, 65536, 1 << 20], 400).astype(np.uint64)
    bucket = TokenBucket(rate)
    now, at, sent, times = 0.0, 0, 0, []
    while at < len(lengths):
        n, wait = bucket.take(lengths[at:], now)
        if n:
            sent += int(lengths[at:at + n].sum())
            times.append((now, sent))
            at += n
        assert n or wait > 0                      # nothing went: a wait says when
        # the old cap's flaw: a fresh window let its first write through whatever came before
        if at < len(lengths) and wait > 1.01 * WINDOW:
            assert copy.deepcopy(bucket).take(lengths[at:at + 1], now + WINDOW)[0] == 0
        now += wait
    for t, total in times:                        # never ahead of the rate ...
        assert total <= rate * t + (1 << 20) + 1
    t_end, total = times[-1]
    assert total / t_end == pytest.approx(rate, rel=0.05)     # ... and not behind it either


def test_failed_post_changes_nothing():
    def refuse(wrs):
        raise RuntimeError("send queue full")

    p = Poster(refuse)
    with pytest.raises(RuntimeError):
        p.on_writes(writes(3), 0.0)
    assert p.n_outstanding == 0 and p.writes_posted == 0 and p.seq == 0
    assert sum(len(b) for b in p.backlog) == 3


def test_segments_keep_writes_and_ends_together():
    recs = concat(WRITE_RING, [records(MR_IMPORT, 2), writes(2), end(1), writes(1, 2),
                               records(MR_RELEASE), end(2)])
    kinds = [(op, len(seg)) for op, seg in _segments(recs)]
    assert kinds == [(WriteOp.IMPORT, 2), (WriteOp.WRITE, 4), (WriteOp.RELEASE, 1),
                     (WriteOp.WRITE, 1)]


class FakeQP:
    """Completes signaled writes in order, a random number at a time (a seeded RNG)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.rec = Recorder()
        self.signaled = []          # signaled wr_ids not yet completed
        self.completed = -1

    def __call__(self, wrs):
        if len(self.rec.calls):
            assert wrs["wr_id"][0] == self.rec.calls[-1]["wr_id"][-1] + 1
        self.rec(wrs)
        self.signaled.extend(wrs["wr_id"][wrs["signaled"] != 0].tolist())

    def poll(self):
        n = int(self.rng.integers(0, len(self.signaled) + 1))
        if n == 0 and self.signaled:
            n = 1
        done, self.signaled = self.signaled[:n], self.signaled[n:]
        if done:
            self.completed = done[-1]
        return done


def test_large_batches_of_one_page_writes_across_chunks_and_rounds():
    rng = np.random.default_rng(1)
    rounds, per_round = 10, 10_000
    batches, stream = [], []
    for r in range(1, rounds + 1):
        pages = np.sort(rng.choice(1 << 16, per_round, replace=False))    # scattered pages
        w = records(WRITE, per_round, round=r, length=4096, lkey=3, rkey=4,
                    block=pages >> 14, chunk=(pages >> 8) & 63,
                    local_addr=pages * 4096, remote_addr=(pages + 1) * 4096)
        stream.append(w)
        batches.extend(np.array_split(concat(WRITE_RING, [w, end(r)]), 7))   # as rings deliver
    stream = np.concatenate(stream)
    qp = FakeQP(2)
    p = Poster(qp, max_outstanding=256, signal_every=16)
    out = []
    for b in batches:
        out.append(p.on_writes(b, 0.0)[0])
        while p.n_outstanding >= 256 or (not p.backlog and p.n_outstanding):
            assert p.n_outstanding <= 256
            assert qp.signaled                  # at rest, a completion is still to come
            if not p.backlog:                   # waiting for records: the newest is signaled
                assert qp.signaled[-1] == qp.rec.calls[-1]["wr_id"][-1]
            out.append(p.on_completions(qp.poll(), 0.0)[0])
    assert p.idle and not qp.signaled
    comps = np.concatenate(out)
    assert comps.dtype == COMPLETION_RING

    posted = qp.rec.wrs          # every write posted once, in order
    assert posted["wr_id"].tolist() == list(range(len(stream)))
    assert np.array_equal(posted["addr"], stream["local_addr"])
    assert np.array_equal(posted["remote_addr"], stream["remote_addr"])
    assert set(posted["lkey"]) == {3} and set(posted["rkey"]) == {4}
    assert len(qp.rec.calls) < len(stream) / 50          # per batch, not per write
    assert p.writes_posted == len(stream) and p.bytes_posted == 4096 * len(stream)

    runs = chunks(comps)
    got = Counter()
    for r, b, c, n, nb in zip(runs["round"].tolist(), runs["block"].tolist(),
                              runs["chunk"].tolist(), runs["writes"].tolist(),
                              runs["bytes"].tolist(), strict=True):
        assert nb == 4096 * n
        got[r, b, c] += n
    want = Counter(zip(stream["round"].tolist(), stream["block"].tolist(),
                       stream["chunk"].tolist(), strict=True))
    assert got == want                                   # aggregated exactly

    ends = drained(comps)
    assert ends["round"].tolist() == list(range(1, rounds + 1))
    assert set(ends["writes"]) == {per_round}
    assert set(ends["bytes"]) == {per_round * 4096}
    for i in np.flatnonzero(comps["op"] == DRAINED):   # after every completion of its round
        r = comps[i].view(ROUND_DRAINED)["round"]
        assert not (chunks(comps[i + 1:])["round"] <= r).any()
    assert not p.round_writes and not p.round_bytes
    assert ends["post_ns"][-1] <= p.busy_ns


def test_a_stretch_that_ends_where_the_queue_fills_is_signaled():
    rec = Recorder()
    p = Poster(rec, max_outstanding=20, signal_every=16)
    p.on_writes(writes(20), 0.0)
    assert rec.wrs["wr_id"][rec.wrs["signaled"] != 0].tolist() == [15, 19]
    p.on_writes(writes(25), 0.0)                          # queued: the queue is full
    p.on_completions([19], 0.0)                           # 20 in a call filling the queue
    assert rec.wrs["wr_id"][rec.wrs["signaled"] != 0].tolist() == [15, 19, 31]
    p.on_completions([31], 0.0)                           # the last 5, the stretch's end
    assert rec.wrs["wr_id"][rec.wrs["signaled"] != 0].tolist() == [15, 19, 31, 44]
    p.on_completions([44], 0.0)
    assert p.idle


@pytest.mark.parametrize("depth,every", [(1, 1), (3, 16), (16, 16), (17, 16), (20, 7),
                                         (256, 16), (64, 1)])
def test_nothing_is_left_unsignaled_at_rest(depth, every):
    rng = np.random.default_rng(depth * 100 + every)
    qp = FakeQP(depth + every)
    p = Poster(qp, max_outstanding=depth, signal_every=every)
    total, feeds = 0, []
    for r in range(1, 6):
        for _ in range(int(rng.integers(0, 4))):
            n = int(rng.integers(1, 3 * depth + 2))
            feeds.append(writes(n, r, chunk=int(rng.integers(0, 3))))
            total += n
        feeds.append(end(r))
    out = []
    while feeds or not p.idle:
        if feeds and (not p.n_outstanding or rng.random() < 0.5):
            out.append(p.on_writes(feeds.pop(0), 0.0)[0])
        elif p.n_outstanding:
            assert qp.signaled, "writes outstanding with no completion to come"
            out.append(p.on_completions(qp.poll(), 0.0)[0])
        assert p.n_outstanding <= depth
    comps = np.concatenate(out)
    assert drained(comps)["round"].tolist() == [1, 2, 3, 4, 5]
    assert chunks(comps)["writes"].sum() == total == p.writes_posted
    assert qp.rec.wrs["wr_id"].tolist() == list(range(total))
