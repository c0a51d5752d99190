"""Pages and libc (shm.memory): residency, zero tests and bulk faulting that never allocate."""

from __future__ import annotations

import numpy as np
import pytest

import shm.memory as memory
from pipeline.protocol import records
from shm import RamBlockSpec, RamRegion, naming
from shm.memory import (
    PAGE_SIZE,
    WORDS_PER_PAGE,
    Madv,
    in_halves,
    map_in,
    mincore,
    nonzero_pages,
    nonzero_rows,
    resident,
)


def test_one_page_size_for_ram_and_the_stream():
    assert PAGE_SIZE == 4096 == 1 << memory.PAGE_SHIFT == WORDS_PER_PAGE * 8
    assert records.PAGE_SIZE == PAGE_SIZE        # QEMU's TARGET_PAGE_SIZE, kept by the codec
    assert (Madv.POPULATE_READ, Madv.POPULATE_WRITE) == (22, 23)


@pytest.fixture
def ram():
    with RamRegion.create(naming.new_run_id(), [RamBlockSpec("pc.ram", 4 << 20)]) as region:
        yield region.blocks[0].view.view(np.uint64).reshape(-1, WORDS_PER_PAGE)


def test_only_written_pages_are_resident_and_asking_faults_nothing_in(ram):
    ram[[3, 700]] = 1
    ram[10] = 0                                   # written zero: in memory all the same
    held = resident(ram)
    if held is None:
        pytest.skip("mincore unavailable")
    assert held.tolist() == (np.isin(np.arange(len(ram)), [3, 10, 700])).tolist()
    assert (mincore(ram.ctypes.data, ram.nbytes) == held).all()
    map_in(ram)                                   # maps what is in, allocates nothing
    assert (resident(ram) == held).all()


@pytest.mark.parametrize("share", [0.01, 0.5, 1.0])
def test_nonzero_pages_reads_only_resident_pages(monkeypatch, ram, share):
    monkeypatch.setattr(memory, "SLICE_PAGES", 16)        # many slices, split across threads
    rng = np.random.default_rng(1)
    written = np.flatnonzero(rng.random(len(ram)) < 0.2)
    ram[written] = rng.integers(0, 2, (len(written), WORDS_PER_PAGE), np.uint64)
    data = np.zeros(len(ram), bool)
    data[written] = ram[written].any(axis=1)              # reads no page left unwritten
    held = resident(ram)
    pages = np.sort(rng.choice(len(ram), int(len(ram) * share), replace=False))
    assert (nonzero_pages(ram, pages) == data[pages]).all()
    if held is not None:
        assert (resident(ram) == held).all()


@pytest.mark.parametrize("n", [0, 7, 1024, 1029])
@pytest.mark.parametrize("data_share", [0.0, 0.01, 0.9])
def test_nonzero_rows_finds_any_word_set_in_blocks_of_zeros_or_of_data(n, data_share):
    rng = np.random.default_rng(n)
    rows = np.zeros((n, WORDS_PER_PAGE), np.uint64)
    data = np.flatnonzero(rng.random(n) < data_share)
    rows[data, rng.integers(1, WORDS_PER_PAGE, len(data))] = 1     # the first word stays 0
    if n:
        rows[n - 1, WORDS_PER_PAGE - 1] = 2                          # in the tail, if any
    assert (nonzero_rows(rows) == rows.any(axis=1)).all()


@pytest.mark.parametrize("n", [0, 5, 16 * memory.SLICE_PAGES + 3])
def test_in_halves_covers_the_range_once(n):
    seen = np.zeros(n, int)

    def work(lo, hi):
        seen[lo:hi] += 1

    in_halves(work, n)
    assert (seen == 1).all()
