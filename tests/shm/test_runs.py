"""Dirty bitmaps to runs: exact cover of the set bits, cut at chunk boundaries, maximal."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm.runs import RUN_DTYPE, dirty_pages, dirty_runs, expand_runs, pages_to_bitmap

# chunk sizes of 1 MiB, 2 MiB, 64 MiB and 1 GiB in pages, and small ones so that boundaries
# fall often inside small bitmaps
CHUNK_PAGES = [1, 2, 8, 64, 256, 512, 16384, 262144]


def check_runs(blocks_pages: list[np.ndarray], runs: np.ndarray, chunk_pages: int) -> None:
    assert runs.dtype == RUN_DTYPE
    # exact cover: every set bit once, nothing else
    blocks, pages = expand_runs(runs)
    want_blocks = np.concatenate([np.full(p.size, b) for b, p in enumerate(blocks_pages)]
                                 + [np.empty(0, np.int64)])
    want_pages = np.concatenate(list(blocks_pages) + [np.empty(0, np.int64)])
    assert blocks.tolist() == want_blocks.tolist() and pages.tolist() == want_pages.tolist()
    first = runs["first_page"].astype(np.int64)
    end = first + runs["n_pages"]
    assert (runs["n_pages"] >= 1).all()
    # no run crosses a chunk boundary
    assert (first // chunk_pages == (end - 1) // chunk_pages).all()
    # maximal: two runs of a block meet only where a chunk starts
    same_block = runs["block"][1:] == runs["block"][:-1]
    touching = same_block & (end[:-1] == first[1:])
    assert (first[1:][touching] % chunk_pages == 0).all()


def random_block(rng: np.random.Generator, nb_pages: int, style: str) -> np.ndarray:
    if style == "sparse":
        bits = rng.random(nb_pages) < 0.01
    elif style == "dense":
        bits = rng.random(nb_pages) < 0.9
    elif style == "runs":  # long stretches, as a guest writing buffers makes
        bits = np.repeat(rng.random(-(-nb_pages // 37)) < 0.4, 37)[:nb_pages]
    elif style == "full":
        bits = np.ones(nb_pages, bool)
    else:
        bits = np.zeros(nb_pages, bool)
    return np.flatnonzero(bits)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
       styles=st.lists(st.sampled_from(["sparse", "dense", "runs", "full", "empty"]),
                       min_size=4, max_size=4),
       chunk_pages=st.sampled_from(CHUNK_PAGES))
def test_runs_cover_exactly_the_set_bits(seed, sizes, styles, chunk_pages):
    rng = np.random.default_rng(seed)
    pages = [random_block(rng, n, styles[i]) for i, n in enumerate(sizes)]
    bitmaps = [pages_to_bitmap(p, n) for p, n in zip(pages, sizes, strict=True)]
    check_runs(pages, dirty_runs(bitmaps, chunk_pages), chunk_pages)


@pytest.mark.parametrize("chunk_pages", [256, 512, 262144])
def test_large_sparse_bitmap(chunk_pages):
    """An 8 GiB block: 2 Mi pages, a few thousand dirty, some runs crossing chunks."""
    rng = np.random.default_rng(chunk_pages)
    nb_pages = 2 << 20
    starts = rng.choice(nb_pages - 600, 3000, replace=False)
    lengths = rng.integers(1, 600, starts.size)
    bits = np.zeros(nb_pages, bool)
    for s, n in zip(starts[:50], lengths[:50], strict=True):
        bits[s:s + n] = True  # a few long runs
    bits[starts[50:]] = True
    pages = np.flatnonzero(bits)
    check_runs([pages], dirty_runs([pages_to_bitmap(pages, nb_pages)], chunk_pages),
               chunk_pages)


def test_known_answer():
    bitmap = np.zeros(8, np.uint8)
    bitmap[0] = 0b1110_0110  # pages 1, 2, 5, 6, 7
    bitmap[1] = 0b0000_0011  # pages 8, 9
    bitmap[7] = 0b1000_0000  # page 63
    runs = dirty_runs([np.zeros(8, np.uint8), bitmap], chunk_pages=8)
    assert runs.tolist() == [(1, 1, 2), (1, 5, 3), (1, 8, 2), (1, 63, 1)]
    assert dirty_runs([bitmap], 4).tolist() == [(0, 1, 2), (0, 5, 3), (0, 8, 2), (0, 63, 1)]
    assert dirty_runs([bitmap], 2).tolist() == [(0, 1, 1), (0, 2, 1), (0, 5, 1), (0, 6, 2),
                                                (0, 8, 2), (0, 63, 1)]


def test_input_forms():
    assert dirty_runs([], 256).dtype == RUN_DTYPE and dirty_runs([], 256).size == 0
    odd = np.array([0xFF, 0x01, 0x80], np.uint8)  # not a whole word: padded inside
    assert dirty_pages(odd).tolist() == [*range(9), 23]
    words = np.array([1 | 1 << 63], "<u8")
    assert dirty_pages(words).tolist() == [0, 63]
    assert dirty_runs([odd.reshape(1, 3)], 256).tolist() == [(0, 0, 9), (0, 23, 1)]
    with pytest.raises(TypeError):
        dirty_pages(np.zeros(4, np.int32))
    with pytest.raises(ValueError):
        dirty_runs([odd], 0)


def test_pages_to_bitmap_round_trip():
    pages = np.array([0, 5, 64, 65, 199])
    bitmap = pages_to_bitmap(pages, 200)
    assert bitmap.dtype == np.uint8 and bitmap.size == 32  # padded to whole u64 words
    assert dirty_pages(bitmap).tolist() == pages.tolist()
    assert np.unpackbits(bitmap, bitorder="little")[pages].all()
