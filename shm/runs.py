"""Dirty bitmaps to runs of dirty pages, vectorised.

A bitmap is packed little-endian: page ``p`` of a block is bit ``p & 7`` of byte ``p >> 3``
(equivalently bit ``p & 63`` of little-endian u64 word ``p >> 6``). A run is
``(block, first_page, n_pages)``: maximal stretches of set bits, cut where a chunk starts, so
that no run crosses a chunk boundary (one RDMA WRITE per run, never spanning two chunks' MRs).

Cost: all-zero u64 words are skipped first, so only words with a set bit are unpacked; the rest
is a few numpy passes over the dirty pages. No Python loop runs per page or per word, only per
block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RUN_DTYPE = np.dtype([("block", "<u4"), ("first_page", "<u8"), ("n_pages", "<u4")])


def _words(bitmap: np.ndarray) -> np.ndarray:
    """The bitmap as little-endian u64 words (a view when possible), zero-padded."""
    b = np.asarray(bitmap)
    if b.dtype == np.dtype("<u8"):
        return np.ascontiguousarray(b).reshape(-1)
    if b.dtype != np.uint8:
        raise TypeError(f"a dirty bitmap is uint8 (packed, little bit order) or <u8, not "
                        f"{b.dtype}")
    b = np.ascontiguousarray(b).reshape(-1)
    if b.size % 8:
        b = np.concatenate((b, np.zeros(8 - b.size % 8, np.uint8)))
    return b.view("<u8")


def dirty_pages(bitmap: np.ndarray) -> np.ndarray:
    """Sorted indices (int64) of the set bits of one packed bitmap."""
    words = _words(bitmap)
    nonzero = np.flatnonzero(words)
    if nonzero.size == 0:
        return np.empty(0, np.int64)
    bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little")
    pos = np.flatnonzero(bits)
    return (nonzero[pos >> 6] << 6) | (pos & 63)


def pages_to_bitmap(pages: np.ndarray, nb_pages: int) -> np.ndarray:
    """A packed little-endian bitmap (uint8, padded to whole u64 words) with ``pages`` set."""
    bits = np.zeros(-(-nb_pages // 64) * 64, bool)
    bits[np.asarray(pages, np.int64)] = True
    return np.packbits(bits, bitorder="little")


def dirty_runs(bitmaps: Sequence[np.ndarray], chunk_pages: int) -> np.ndarray:
    """Runs of set bits, one bitmap per block (list position = block index), as a RUN_DTYPE
    array sorted by block then page, none crossing a multiple of ``chunk_pages``."""
    if not isinstance(chunk_pages, int | np.integer) or chunk_pages < 1:
        raise ValueError(f"chunk_pages must be a positive int, not {chunk_pages!r}")
    parts = []
    for block, bitmap in enumerate(bitmaps):
        pages = dirty_pages(bitmap)
        if pages.size == 0:
            continue
        starts_here = np.empty(pages.size, bool)
        starts_here[0] = True
        np.not_equal(np.diff(pages), 1, out=starts_here[1:])
        starts_here[1:] |= pages[1:] % chunk_pages == 0
        starts = np.flatnonzero(starts_here)
        runs = np.empty(starts.size, RUN_DTYPE)
        runs["block"] = block
        runs["first_page"] = pages[starts]
        runs["n_pages"] = np.diff(starts, append=pages.size)
        parts.append(runs)
    if not parts:
        return np.empty(0, RUN_DTYPE)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def expand_runs(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every page of ``runs``: arrays ``(block, page)`` in run order."""
    n = runs["n_pages"].astype(np.int64)
    total = int(n.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # page = first_page of its run + its position inside the run
    run_of = np.repeat(np.arange(runs.size), n)
    offsets = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
    return (runs["block"].astype(np.int64)[run_of],
            runs["first_page"].astype(np.int64)[run_of] + offsets)
