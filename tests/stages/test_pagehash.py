"""Page hashes: the incremental RAM check (stages.pagehash) and the scanner's part in it."""

from __future__ import annotations

import numpy as np
import pytest

from shm import RamBlockSpec, RamRegion, naming
from stages.pagehash import (
    KEYS,
    PageHasher,
    PageTable,
    hash_and_test,
    hash_pages,
    hash_rows,
    pack_round,
    table_digests,
    unpack_round,
)
from stages.scanner import Scanner


def pages_of(n, seed=1):
    return np.random.default_rng(seed).integers(0, 1 << 64, (n, 512), np.uint64, endpoint=False)


def hashing_to_zero(seed=5):
    """A page that is not zero but hashes to 0: random words, then word 0 solved for (the
    multipliers are odd, so invertible modulo 2^64)."""
    page = pages_of(1, seed)[0]
    rest = sum(int(w) * int(k) for w, k in zip(page[1:], KEYS[1:], strict=True))
    page[0] = (-rest * pow(int(KEYS[0]), -1, 1 << 64)) % (1 << 64)
    assert hash_rows(page[None])[0] == 0 and page.any()
    return page


def mixed_pages(n, seed=4):
    """Random pages, about a third of them zero, three that hash to 0 without being zero."""
    rng = np.random.default_rng(seed)
    view = pages_of(n, seed)
    view[rng.random(n) < 0.35] = 0
    for i, p in enumerate((0, n // 2, n - 1)):
        view[p] = hashing_to_zero(seed + i)
    return view


def test_zero_page_hashes_to_zero_and_any_single_word_change_shows():
    assert hash_rows(np.zeros((1, 512), np.uint64))[0] == 0
    page = pages_of(1)
    h = hash_rows(page)[0]
    for word in (0, 17, 511):
        for bit in (0, 31, 63):
            changed = page.copy()
            changed[0, word] ^= np.uint64(1 << bit)
            assert hash_rows(changed)[0] != h


@pytest.mark.parametrize("pick", ["dense", "scattered", "mixed"])
def test_hash_pages_matches_row_hashes(pick):
    view = pages_of(5000)
    rng = np.random.default_rng(2)
    pages = {"dense": np.arange(100, 4100),
             "scattered": np.sort(rng.choice(5000, 40, replace=False)),
             "mixed": np.concatenate([np.arange(0, 1500), np.arange(3000, 5000, 97)])}[pick]
    table = np.zeros(5000, np.uint64)
    hash_pages(view, pages, table)
    assert (table[pages] == hash_rows(view[pages])).all()
    rest = np.setdiff1d(np.arange(5000), pages)
    assert (table[rest] == 0).all()


@pytest.mark.parametrize("pick", ["dense", "scattered", "mixed", "all"])
def test_hash_and_test_tags_zero_pages_from_the_hash_and_checks_those_that_hash_to_0(pick):
    n = 3000
    view = mixed_pages(n)
    view[1200:1400] = 0                                 # a zero stretch (every hash 0)
    rng = np.random.default_rng(2)
    pages = {"dense": np.arange(100, 2600),
             "scattered": np.sort(np.concatenate([[0, 1500, n - 1],
                                                  rng.choice(np.arange(1, n - 1), 40, False)])),
             "mixed": np.concatenate([np.arange(0, 700), np.arange(1000, 2999, 37), [n - 1]]),
             "all": np.arange(n)}[pick]
    table = np.full(n, 7, np.uint64)
    nonzero = hash_and_test(view, pages, table)
    assert (nonzero == view[pages].any(axis=1)).all()
    tricky = np.isin(pages, [0, n // 2, n - 1])         # hash 0, yet not zero
    assert tricky.any() and nonzero[tricky].all()
    assert (table[pages] == hash_rows(view[pages])).all()
    assert (np.delete(table, pages) == 7).all()


@pytest.mark.parametrize("window", [64, 1024])
@pytest.mark.parametrize("zero_share", [0.1, 0.6, 0.95])
@pytest.mark.parametrize("zero_led", [0.0, 0.8])
def test_hash_and_test_is_exact_whichever_way_a_window_is_read(monkeypatch, window,
                                                               zero_share, zero_led):
    import stages.pagehash as ph

    monkeypatch.setattr(ph, "TEST_WINDOW", window)
    n = 2500
    rng = np.random.default_rng(int(zero_share * 100))
    view = pages_of(n, seed=8)
    view[rng.random(n) < zero_led, 0] = 0   # data led by a zero word: looks zero at first
    view[rng.random(n) < zero_share] = 0
    view[[5, 700, 2400]] = [hashing_to_zero(s) for s in (1, 2, 3)]
    view[701, 1:] = 0                       # only the lead word set
    for pages in (np.arange(n), np.sort(rng.choice(n, 300, replace=False)),
                  np.concatenate([np.arange(0, 40), np.arange(60, 2000, 3), [2400]])):
        table = np.zeros(n, np.uint64)
        nonzero = hash_and_test(view, pages, table)
        assert (nonzero == view[pages].any(axis=1)).all()
        assert (table[pages] == hash_rows(view[pages])).all()


@pytest.mark.parametrize("count", [1024, 1000])          # whole zero blocks, and a tail
def test_a_mostly_zero_window_finds_data_past_a_zero_lead_word_and_hashes_it(count):
    """The zero-led order of work: pages tested a flat block at a time, only the data hashed."""
    from shm.memory import ZERO_BLOCK

    view = np.zeros((count, 512), np.uint64)
    late = [1, 17 * ZERO_BLOCK + 5, count - 1]          # first word zero, a later one not
    for p, word in zip(late, (1, 255, 511), strict=True):
        view[p, word] = np.uint64(0x1234_5678)
    view[40 * ZERO_BLOCK] = hashing_to_zero(9)          # data that hashes to 0
    odd = 40 * ZERO_BLOCK + 1
    view[odd] = hashing_to_zero(10)
    view[odd, 0] = 0                  # no longer hashes to 0, and led by a zero word
    view[odd, 3] ^= np.uint64(1) if view[odd, 3] else np.uint64(2)
    pages = np.arange(count)
    table = np.full(count, 7, np.uint64)
    nonzero = hash_and_test(view, pages, table)
    expect = view.any(axis=1)
    assert expect[late].all() and expect.sum() == len(late) + 2
    assert (nonzero == expect).all()
    assert (table == hash_rows(view)).all()             # zero pages: 0, without a hash pass
    assert (table[~expect] == 0).all() and (table[late] != 0).all()


def test_hash_and_test_leaves_pages_not_held_unread_at_zero():
    view = mixed_pages(600)
    held = np.ones(600, bool)
    held[[3, 4, 5, 300]] = False
    held[520:] = False
    table = np.full(600, 7, np.uint64)
    view[~held] = 0           # what such a page holds; the check is that it counts as zero
    pages = np.arange(600)
    before = view.copy()
    nonzero = hash_and_test(view, pages, table, held)
    assert (nonzero == view.any(axis=1)).all() and not nonzero[~held].any()
    assert (table == hash_rows(view)).all() and (view == before).all()


def test_round_bitmaps_round_trip_and_misfits_are_refused():
    bits = [np.packbits(np.arange(20) % 3 == 0, bitorder="little"), np.zeros(1, np.uint8)]
    pages = unpack_round(pack_round(bits), [20, 5])
    assert pages[0].tolist() == list(range(0, 20, 3)) and pages[1].tolist() == []
    with pytest.raises(ValueError):
        unpack_round(pack_round(bits), [64, 5])


def test_table_digests_name_the_chunk_that_differs():
    a = [np.arange(10, dtype=np.uint64), np.arange(3, dtype=np.uint64)]
    b = [a[0].copy(), a[1].copy()]
    b[0][7] += np.uint64(1)
    da, db = table_digests(a, 4), table_digests(b, 4)
    assert len(da) == 32 * (3 + 1)
    differ = [i for i in range(4) if da[i * 32:(i + 1) * 32] != db[i * 32:(i + 1) * 32]]
    assert differ == [1]


def test_table_digests_of_zero_chunks_are_the_sha256_of_their_slice():
    import hashlib

    tables = [np.zeros(10, np.uint64), np.zeros(3, np.uint64), np.zeros(0, np.uint64)]
    tables[0][5] = 9
    want = b"".join(hashlib.sha256(t[i:i + 4].astype("<u8").tobytes()).digest()
                    for t in tables for i in range(0, len(t), 4))
    assert table_digests(tables, 4) == want and len(want) == 32 * (3 + 1)


def test_hasher_skips_pages_never_faulted_in():
    with RamRegion.create(naming.new_run_id(), [RamBlockSpec("pc.ram", 8 << 20)]) as region:
        try:
            view = region.blocks[0].view.view(np.uint64).reshape(-1, 512)
            view[3] = 5                                  # one page written, the rest absent
            hasher = PageHasher([view])
            hasher.submit([np.arange(len(view))])
            (table,) = hasher.wait()
            hasher.close()
            assert table[3] == hash_rows(view[3:4])[0] and np.count_nonzero(table) == 1
        finally:
            region.unlink()


class Log:
    def __init__(self, n):
        self.bits = np.zeros(n, bool)

    def fetch(self):
        out = [np.packbits(self.bits, bitorder="little")]
        self.bits[:] = False
        return out


def test_scanner_hashes_what_it_scanned_and_records_the_rounds_pages():
    from shm.dirtylog import dirty_runs

    name = naming.segment_name(naming.new_run_id(), "phash")
    table = PageTable.create(name, [64])
    try:
        view = np.zeros((64, 512), np.uint64)
        view[[1, 2, 40]] = pages_of(3)
        log = Log(64)
        scanner = Scanner([view], 8, log.fetch, dirty_runs, table)
        scanner.scan(1)
        assert (table.hashes[0] == hash_rows(view)).all()
        view[2] = 0                                      # written zero, and logged
        view[50] = pages_of(1, seed=9)[0]
        log.bits[[2, 50]] = True
        scanner.scan(2)
        assert unpack_round(pack_round(table.sent), [64])[0].tolist() == [2, 50]
        assert (table.hashes[0] == hash_rows(view)).all()
    finally:
        table.close()
        table.unlink()


def test_hasher_takes_a_packed_round_a_stretch_at_a_time(monkeypatch):
    import stages.pagehash as ph

    monkeypatch.setattr(ph, "STRETCH", 64)
    views = [pages_of(200), pages_of(30, seed=3)]
    chosen = [np.arange(0, 200, 3), np.array([0, 29])]
    bits = [np.packbits(np.isin(np.arange(len(v)), c), bitorder="little")
            for v, c in zip(views, chosen, strict=True)]
    hasher = PageHasher(views)
    hasher.submit(pack_round(bits))
    tables = hasher.wait()
    hasher.close()
    for v, c, t in zip(views, chosen, tables, strict=True):
        assert (t[c] == hash_rows(v[c])).all()
        assert np.count_nonzero(t) == len(c)
