"""Dirty logs: marking, fetch-and-clear, no bit lost under a concurrent writer, dead writers."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest
from signal_helpers import Stop, signal_soon

from shm import naming
from shm.dirtylog import _WRITER_PID, DirtyLog
from shm.errors import ShmError
from shm.region import RamBlockSpec, RamRegion
from shm.runs import dirty_pages, dirty_runs
from shm.segment import PeerGone, ShmTimeout

ctx = mp.get_context("spawn")
BLOCK_PAGES = [20000, 77]  # the second block is smaller than two u64 words


@pytest.fixture
def region():
    specs = [RamBlockSpec(f"b{i}", n * 4096) for i, n in enumerate(BLOCK_PAGES)]
    with RamRegion.create(naming.new_run_id(), specs) as region:
        yield region


@pytest.fixture
def log(region):
    run_id = naming.parse_segment_name(region.name).run_id
    with DirtyLog.create(run_id, region) as log:
        yield log


def as_sets(bitmaps: list[np.ndarray]) -> list[set[int]]:
    return [set(dirty_pages(b).tolist()) for b in bitmaps]


def test_mark_and_fetch_clears(log):
    assert log.block_pages == tuple(BLOCK_PAGES)
    log.mark(0, np.array([0, 7, 8, 63, 64, 19999, 7, 7]))
    log.mark(1, np.array([76], np.uint16))
    log.mark_range(0, 100, 1)      # one bit
    log.mark_range(0, 201, 5)      # inside one byte
    log.mark_range(0, 1003, 1000)  # head byte, whole bytes, tail byte
    log.mark_range(1, 0, 77)       # a whole block
    log.mark(0, np.array([], np.int64))
    log.mark_range(0, 5, 0)
    bitmaps = log.fetch()
    assert [b.dtype for b in bitmaps] == [np.uint8, np.uint8]
    assert [b.size for b in bitmaps] == [8 * 313, 16]  # whole u64 words
    want = {0, 7, 8, 63, 64, 19999, 100, *range(201, 206), *range(1003, 2003)}
    assert as_sets(bitmaps) == [want, set(range(77))]
    assert as_sets(log.fetch()) == [set(), set()]
    runs = dirty_runs(bitmaps, 256)
    assert (0, 1003, 21) in runs.tolist() and (0, 1024, 256) in runs.tolist()


def test_bad_marks_refused(log):
    with pytest.raises(IndexError):
        log.mark(0, np.array([20000]))
    with pytest.raises(IndexError):
        log.mark(0, np.array([-1]))
    with pytest.raises(IndexError):
        log.mark(2, np.array([0]))
    with pytest.raises(IndexError):
        log.mark_range(1, 70, 8)
    with pytest.raises(TypeError):
        log.mark(0, np.array([1.0]))
    assert as_sets(log.fetch()) == [set(), set()]


def test_writer_and_reader_in_one_process(region, log):
    """The writer answers flips from its service thread; the reader is another object."""
    reader = DirtyLog.attach(log.name, region)
    try:
        assert as_sets(reader.fetch(timeout=1)) == [set(), set()]  # no writer yet: nothing
        log.mark(0, np.array([3]))
        with pytest.raises(ShmTimeout, match="service"):  # the writer is not serving
            reader.fetch(timeout=0.3)
        log.start_service()
        assert as_sets(reader.fetch(timeout=5)) == [{3}, set()]
        log.mark(1, np.array([5]))
        assert as_sets(reader.fetch(timeout=5)) == [set(), {5}]
        log.mark(0, np.array([9]))
        log.close()  # the writer leaves: a fetch takes both bitmaps
        assert as_sets(reader.fetch(timeout=5)) == [{9}, set()]
        assert as_sets(reader.fetch(timeout=5)) == [set(), set()]
    finally:
        reader.close()


def test_marks_after_the_flip_stay_out_of_the_taken_bitmap(region, log):
    """The ownership rule, without timing luck: a mark landing while the reader copies and
    clears its bitmap goes to the writer's new bitmap and arrives with the next fetch."""
    reader = DirtyLog.attach(log.name, region)
    take = reader._take

    def take_while_writer_marks(*epochs):
        log.mark(0, np.array([2]))  # the writer runs on between its ack and our copy
        take(*epochs)

    try:
        log.mark(0, np.array([1]))
        log.start_service()
        reader._take = take_while_writer_marks
        assert as_sets(reader.fetch(timeout=5)) == [{1}, set()]
        reader._take = take
        assert as_sets(reader.fetch(timeout=5)) == [{2}, set()]
    finally:
        reader.close()


def test_second_writer_and_region_mismatch_refused(region, log):
    other = DirtyLog.attach(log.name)
    try:
        log._hdr[_WRITER_PID] = os.getppid()  # pretend a live process writes
        with pytest.raises(ShmError, match="already has a writer"):
            other.mark(0, np.array([1]))
    finally:
        other.close()
    with RamRegion.create(naming.new_run_id(), [RamBlockSpec("b0", 4096)]) as small:
        with pytest.raises(ShmError, match="other blocks"):
            DirtyLog.attach(log.name, small)


WRITES = 600
BIG = [1 << 20, 77]  # a 4 GiB block (sparse) so that marks and fetches take long enough to race


def write_pattern(seed: int, nb_pages: list[int]):
    """The writes of one seeded writer: (block, pages) or (block, first, n)."""
    rng = np.random.default_rng(seed)
    for i in range(WRITES):
        block = int(rng.integers(0, len(nb_pages)))
        if i % 5 == 4:
            first = int(rng.integers(0, nb_pages[block]))
            n = int(rng.integers(1, min(nb_pages[block] - first, 50000) + 1))
            yield block, first, n
        else:
            yield block, rng.integers(0, nb_pages[block], int(rng.integers(1, 5000)))


def writer(name: str, seed: int, ready, pause: bool) -> None:
    """Child: mark as fast as it can (answering flips between marks), then leave or pause."""
    log = DirtyLog.attach(name)
    ready.send("go")
    for write in write_pattern(seed, list(log.block_pages)):
        if len(write) == 3:
            log.mark_range(*write)
        else:
            log.mark(*write)
    if pause:  # a paused guest still answers flips, from the service thread
        log.start_service()
        ready.send("paused")
        time.sleep(60)
    log.close()


def test_no_bit_lost_under_concurrent_writer():
    """Whatever the interleaving, the union of all fetches is exactly the set of marked pages.
    On a busy 2-core machine the two processes rarely run truly in parallel, so this catches
    lost flips and lost leftovers; the test above pins the ownership rule deterministically."""
    specs = [RamBlockSpec(f"b{i}", n * 4096) for i, n in enumerate(BIG)]
    run_id = naming.new_run_id()
    with RamRegion.create(run_id, specs) as region, DirtyLog.create(run_id, region) as log:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=writer, args=(log.name, 1234, child_end, False))
        proc.start()
        try:
            assert parent_end.poll(30) and parent_end.recv() == "go"
            union = [np.zeros(8 * -(-n // 64), np.uint8) for n in BIG]
            fetches = nonempty = 0
            while proc.is_alive() or fetches == 0:
                bitmaps = log.fetch(timeout=10)
                fetches += 1
                nonempty += any(b.any() for b in bitmaps)
                for u, b in zip(union, bitmaps, strict=True):
                    u |= b
            proc.join(30)
            assert proc.exitcode == 0
            for u, b in zip(union, log.fetch(timeout=10), strict=True):  # what the writer left
                u |= b
        finally:
            proc.join(30)
    want = [np.zeros(n, bool) for n in BIG]
    for write in write_pattern(1234, BIG):
        if len(write) == 3:
            want[write[0]][write[1]:write[1] + write[2]] = True
        else:
            want[write[0]][write[1]] = True
    for u, w in zip(union, want, strict=True):
        got = np.unpackbits(u, bitorder="little")[:w.size].astype(bool)
        assert (got == w).all(), f"{int((w & ~got).sum())} bits lost, {int((got & ~w).sum())} " \
                                 "bits invented"
    assert nonempty >= 3, "the scanner should have caught the writer mid-run several times"


def test_paused_writer_answers_then_dead_writer_is_peer_gone(log):
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=writer, args=(log.name, 99, child_end, True))
    proc.start()
    try:
        assert parent_end.poll(30) and parent_end.recv() == "go"
        assert parent_end.poll(30) and parent_end.recv() == "paused"
        got = as_sets(log.fetch(timeout=10))
        assert sum(len(s) for s in got) > 0
        assert as_sets(log.fetch(timeout=10)) == [set(), set()]  # the pause still answers
        proc.kill()
        start = time.monotonic()
        with pytest.raises(PeerGone, match="died"):
            log.fetch(timeout=10)
        assert time.monotonic() - start < 1.5
    finally:
        proc.kill()
        proc.join(30)


def test_a_signal_handlers_exception_ends_a_fetch(log, region):
    """A scanner told to stop while it waits for the writer's flip stops waiting."""
    writer = DirtyLog.attach(log.name, region)
    try:
        writer.mark(0, np.array([1]))       # a writer that never answers a fetch
        t0 = time.monotonic()
        with signal_soon(raises=True), pytest.raises(Stop):
            log.fetch(timeout=10)
        assert time.monotonic() - t0 < 5
        writer.start_service()              # as after a timeout, no bit is lost
        assert as_sets(log.fetch(timeout=10))[0] == {1}
    finally:
        writer.close()
