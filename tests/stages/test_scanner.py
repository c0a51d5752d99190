import numpy as np
import pytest

from stages.records import RUN, SCAN_END, RunOp
from stages.scanner import GAP_PAGES, Scanner, expand_runs


def reference_runs(bitmaps, chunk_pages):
    """Slow, obviously right: runs of set bits, cut at chunk boundaries."""
    dtype = np.dtype([("block", "<u4"), ("first_page", "<u8"), ("n_pages", "<u4")])
    out = []
    for b, bm in enumerate(bitmaps):
        bits = np.unpackbits(np.asarray(bm).view(np.uint8), bitorder="little")
        start = None
        for p, bit in enumerate(list(bits) + [0]):
            if start is not None and (not bit or p % chunk_pages == 0):
                out.append((b, start, p - start))
                start = None
            if bit and start is None:
                start = p
    return np.array(out, dtype=dtype)


class FakeLog:
    def __init__(self, pages_per_block):
        self.bits = [np.zeros(n, bool) for n in pages_per_block]

    def mark(self, b, pages):
        self.bits[b][pages] = True

    def fetch(self):
        out = [np.packbits(x, bitorder="little") for x in self.bits]
        for x in self.bits:
            x[:] = False
        return out


def make(pages=(64, 16), chunk_pages=8):
    views = [np.zeros((n, 512), np.uint64) for n in pages]
    log = FakeLog(pages)
    return views, log, Scanner(views, chunk_pages, log.fetch, reference_runs)


def test_expand_runs():
    pages, starts = expand_runs(np.array([3, 10]), np.array([2, 3]))
    assert pages.tolist() == [3, 4, 10, 11, 12]
    assert starts.tolist() == [0, 2]


def test_first_round_scans_everything_and_sends_only_data():
    views, log, sc = make()
    views[0][9] = 7          # chunk 1 of block 0 has data
    views[0][20:28] = 1      # chunk 2 is all data, chunk 3 starts with some
    views[0][29] = 1
    out = sc.scan(1)
    assert (out["op"][:-1] == RunOp.RUN).all() and out["op"][-1] == RunOp.END
    runs, end = out[:-1].view(RUN), out[-1].view(SCAN_END)
    assert end["dirty_pages"] == 80 and end["zero_pages"] == 80 - 10
    # the destination's RAM starts zero: its zero pages never cross, not even as COMPRESS,
    # and runs are cut at every 8-page chunk boundary
    assert runs[["block", "first_page", "n_pages", "zero"]].tolist() == [
        (0, 9, 1, 0), (0, 20, 4, 0), (0, 24, 4, 0), (0, 29, 1, 0)]   # no write carries 28
    assert sc.dest_zero[0][[9, 20, 27, 29]].tolist() == [False] * 4
    assert sc.dest_zero[0][[8, 10, 28, 30]].tolist() == [True] * 4
    assert sc.scan(2).view(SCAN_END)["dirty_pages"].tolist() == [0]   # nothing dirty: END only
    assert sc.scan(2).view(SCAN_END)["dirty_pages"].tolist() == [0]   # nothing dirty: END only


def test_sync_accumulates_without_losing_bits():
    views, log, sc = make()
    views[0][[1, 2, 3, 20]] = 1
    sc.scan(1)
    views[0][[1, 2, 3, 20]] = 0          # zero now where the destination holds data
    log.mark(0, np.array([1, 2, 3, 20]))
    assert sc.sync() == 4
    log.mark(1, np.array([5]))
    views[1][5] = 1
    out = sc.scan(2)
    runs = out[:-1].view(RUN)
    assert [(r["block"], r["first_page"], r["n_pages"], r["zero"]) for r in runs] == [
        (0, 1, 3, 1), (0, 20, 1, 1), (1, 5, 1, 0)]
    assert sc.sync() == 0


def test_zero_tag_uses_whole_block_scan_when_many_dirty():
    views, log, sc = make(pages=(64,))
    views[0][:] = 1
    sc.scan(1)
    views[0][:] = 0
    log.mark(0, np.arange(0, 64))
    views[0][63, 5] = 1
    runs = sc.scan(2)[:-1].view(RUN)
    assert runs["zero"].tolist() == [1] * 7 + [0]


def test_nearby_data_runs_in_a_chunk_merge_and_zero_runs_stay_apart():
    from stages.scanner import merge_runs

    def body(*rows):
        out = np.zeros(len(rows), RUN)
        for i, (b, f, n, z) in enumerate(rows):
            out[i]["block"], out[i]["first_page"], out[i]["n_pages"], out[i]["zero"] = b, f, n, z
        return out

    runs = body((0, 0, 1, 0), (0, 3, 2, 0), (0, 20, 1, 0), (0, 22, 1, 1), (0, 24, 1, 0),
                (0, 33, 1, 1), (0, 35, 1, 1), (0, 40, 1, 0), (1, 41, 1, 0),
                (1, 44, 1, 0), (1, 45, 2, 2), (1, 47, 1, 0), (1, 50, 1, 2))
    got = merge_runs(runs, chunk_pages=32, gap=8)
    assert got[["block", "first_page", "n_pages", "zero"]].tolist() == [
        (0, 0, 5, 0),      # 0 and 3-4: the two clean pages between them travel too
        (0, 20, 5, 0),     # 11 pages from the last: apart; a zero run joins its data neighbours
        (0, 33, 1, 1),     # another chunk; two zero runs never join (a COMPRESS must not
        (0, 35, 6, 0),     # cover page 34), but a zero run joins the data run after it
        (1, 41, 4, 0),     # another block
        (1, 45, 2, 2),     # zeros the destination holds already: nothing joins across them
        (1, 47, 1, 0),
        (1, 50, 1, 2)]


def hashing_to_zero(seed):
    """A non-zero page whose hash is 0 (word 0 solved for; the multipliers are odd)."""
    from stages.pagehash import KEYS

    page = np.random.default_rng(seed).integers(0, 1 << 64, 512, np.uint64, endpoint=False)
    rest = sum(int(w) * int(k) for w, k in zip(page[1:], KEYS[1:], strict=True))
    page[0] = (-rest * pow(int(KEYS[0]), -1, 1 << 64)) % (1 << 64)
    return page


def guest(pages, seed):
    """Views of random pages, about half zero (in stretches and alone), some hashing to 0."""
    rng = np.random.default_rng(seed)
    views = []
    for b, n in enumerate(pages):
        v = rng.integers(0, 1 << 64, (n, 512), np.uint64, endpoint=False)
        v[rng.random(n) < 0.3] = 0
        v[n // 3:n // 2] = 0
        for i, p in enumerate((1, n // 2 + 1, n - 2)):
            v[p] = hashing_to_zero(seed * 10 + b * 3 + i)
        views.append(v)
    return views


def direct_records(views, bitmaps, chunk_pages, round_no, dest_zero):
    """What a round's records must be: runs cut where pages turn from data to zero (by a
    plain zero test, page by page), zeros the destination holds already (``dest_zero``,
    updated) dropped, merged."""
    from stages.scanner import ALREADY_ZERO, merge_runs

    runs = reference_runs(bitmaps, chunk_pages)
    rows = []
    for r in runs:
        b, f = int(r["block"]), int(r["first_page"])
        kinds = [0 if views[b][p].any() else 2 if dest_zero[b][p] else 1
                 for p in range(f, f + int(r["n_pages"]))]
        for i, k in enumerate(kinds):
            if i == 0 or k != kinds[i - 1]:
                rows.append((b, f + i, 1, k))
            else:
                rows[-1] = (b, rows[-1][1], rows[-1][2] + 1, k)
    body = np.zeros(len(rows), RUN)
    for i, (b, f, n, k) in enumerate(rows):
        body[i]["block"], body[i]["first_page"], body[i]["n_pages"], body[i]["zero"] = b, f, n, k
    body["round"] = round_no
    if len(body) > 1:
        body = merge_runs(body, chunk_pages)
    body = body[body["zero"] != ALREADY_ZERO]
    for r in body:
        f = int(r["first_page"])
        dest_zero[int(r["block"])][f:f + int(r["n_pages"])] = False
    return body


def fields(out):
    return out.view(RUN)[["op", "zero", "round", "block", "n_pages", "first_page"]].tolist()


def scanner_over(views, chunk_pages, table=None):
    from shm.dirtylog import dirty_runs

    log = FakeLog([len(v) for v in views])
    return log, Scanner(views, chunk_pages, log.fetch, dirty_runs, table)


@pytest.mark.parametrize("stretch, thread_pages", [(1 << 15, 1 << 13), (16, 1 << 13), (24, 4),
                                                   (8, 1)])
def test_rounds_in_stretches_make_the_records_of_one_direct_pass(monkeypatch, stretch,
                                                                  thread_pages):
    import stages.pagehash as ph
    import stages.scanner as sc

    monkeypatch.setattr(sc, "STRETCH_PAGES", stretch)
    monkeypatch.setattr(sc, "THREAD_PAGES", thread_pages)
    monkeypatch.setattr(ph, "TEST_WINDOW", 16)         # many windows, some cut by a stretch
    views = guest((300, 77), seed=3)
    log, scanner = scanner_over(views, chunk_pages=8)
    rng = np.random.default_rng(7)
    everything = [np.packbits(np.ones(len(v), bool), bitorder="little") for v in views]
    dest_zero = [np.ones(len(v), bool) for v in views]
    expect = [direct_records(views, everything, 8, 1, dest_zero)]
    got = [scanner.scan(1)]
    for r in (2, 3, 4):
        for b, v in enumerate(views):
            marked = np.flatnonzero(rng.random(len(v)) < (0.02, 0.3, 0.9)[r - 2])
            v[marked[::2]] = 0
            log.mark(b, marked)
        bitmaps = [np.packbits(x, bitorder="little") for x in log.bits]
        expect.append(direct_records(views, bitmaps, 8, r, dest_zero))
        got.append(scanner.scan(r))
    for e, g in zip(expect, got, strict=True):
        assert fields(g[:-1]) == fields(e)
        assert g[-1]["op"] == RunOp.END


def test_stretches_arrive_one_by_one_and_end_comes_alone_with_the_counts(monkeypatch):
    import stages.scanner as sc

    monkeypatch.setattr(sc, "STRETCH_PAGES", 20)       # 24 pages: a multiple of the chunk
    views = guest((100,), seed=4)
    log, scanner = scanner_over(views, chunk_pages=8)
    parts = list(scanner.scan_stretches(1))
    end = parts.pop()
    assert len(end) == 1 and end["op"][0] == RunOp.END
    end = end.view(SCAN_END)
    assert len(parts) == 5                             # pages 0-23, 24-47, ... 96-99
    for i, part in enumerate(parts):
        assert (part["op"] == RunOp.RUN).all()
        part = part.view(RUN)
        assert (part["first_page"] // 24 == i).all()
        assert ((part["first_page"] + part["n_pages"] - 1) // 24 == i).all()
    assert end["dirty_pages"][0] == 100
    assert end["zero_pages"][0] == 100 - np.count_nonzero(views[0].any(axis=1))
    assert end["scan_ns"][0] == scanner.busy_ns > 0


def test_page_table_holds_the_hashes_of_the_final_contents(monkeypatch):
    from shm import naming
    from stages.pagehash import PageTable, hash_pages, hash_rows, pack_round, unpack_round

    monkeypatch.setattr(__import__("stages.scanner").scanner, "STRETCH_PAGES", 32)
    views = guest((200, 40), seed=5)
    table = PageTable.create(naming.segment_name(naming.new_run_id(), "phash"), [200, 40])
    try:
        log, scanner = scanner_over(views, chunk_pages=8, table=table)
        rng = np.random.default_rng(1)
        for r in range(1, 5):
            scanner.scan(r)
            for b, v in enumerate(views):
                assert (table.hashes[b] == hash_rows(v)).all()
                fresh = np.zeros(len(v), np.uint64)
                hash_pages(v, np.arange(len(v)), fresh)
                assert (table.hashes[b] == fresh).all()
            marked = np.sort(rng.choice(200, 30, replace=False))
            views[0][marked] = rng.integers(0, 3, (30, 512), np.uint64)   # some zero, most not
            log.mark(0, marked)
        scanner.scan(5)
        # the round's pages as they crossed: every page marked, and the clean pages a
        # merged write carried between two of them (at most GAP_PAGES in a gap)
        sent = unpack_round(pack_round(table.sent), [200, 40])[0]
        extra = np.setdiff1d(sent, marked)
        assert np.isin(marked, sent).all()
        gaps = np.diff(marked) - 1
        carried = np.concatenate([np.arange(a + 1, b) for a, b, g in
                                  zip(marked[:-1], marked[1:], gaps, strict=True)
                                  if 0 < g <= GAP_PAGES])
        assert np.isin(extra, carried).all()
        assert (table.hashes[0] == hash_rows(views[0])).all()
    finally:
        table.close()
        table.unlink()


def test_pages_not_in_memory_stay_untouched(monkeypatch):
    from shm import RamBlockSpec, RamRegion, naming
    from shm.memory import resident

    monkeypatch.setattr(__import__("stages.scanner").scanner, "STRETCH_PAGES", 256)
    monkeypatch.setattr(__import__("stages.scanner").scanner, "THREAD_PAGES", 64)
    with RamRegion.create(naming.new_run_id(), [RamBlockSpec("pc.ram", 4 << 20)]) as region:
        try:
            view = region.blocks[0].view.view(np.uint64).reshape(-1, 512)
            view[3] = 5
            view[10:20] = 0                              # written zero: in memory
            view[700:900] = 9
            view[1000] = hashing_to_zero(1)
            held = resident(view)
            if held is None:
                pytest.skip("mincore unavailable")
            log, scanner = scanner_over([view], chunk_pages=256)
            out = scanner.scan(1)
            assert (resident(view) == held).all()        # nothing faulted in
            assert out[-1].view(SCAN_END)["dirty_pages"] == 1024
            assert out[-1].view(SCAN_END)["zero_pages"] == 1024 - 1 - 200 - 1
            assert out[:-1].view(RUN)[["first_page", "n_pages", "zero"]].tolist() == [
                (3, 1, 0), (700, 68, 0), (768, 132, 0), (1000, 1, 0)]
            log.mark(0, np.array([3, 4, 50, 51, 699, 700, 1000, 1001]))
            out = scanner.scan(2)
            assert (resident(view) == held).all()
            assert out[:-1].view(RUN)[["first_page", "n_pages", "zero"]].tolist() == [
                (3, 1, 0), (700, 1, 0), (1000, 1, 0)]     # 4, 50, 51, 699, 1001: zero there
        finally:
            region.unlink()


def test_a_blocks_first_stretch_comes_in_smaller_steps(monkeypatch):
    import stages.scanner as sc

    monkeypatch.setattr(sc, "STRETCH_PAGES", 64)
    monkeypatch.setattr(sc, "RAMP_PAGES", (3, 16))     # 3: rounded up to a chunk (4 pages)
    views = [np.ones((200, 512), np.uint64), np.ones((10, 512), np.uint64)]
    log, scanner = scanner_over(views, chunk_pages=4)
    parts = [p.view(RUN) for p in scanner.scan_stretches(1)][:-1]
    spans = [(int(p["block"][0]), int(p["first_page"][0]),
              int(p["first_page"][-1] + p["n_pages"][-1])) for p in parts]
    assert spans == [(0, 0, 4), (0, 4, 16), (0, 16, 64), (0, 64, 128), (0, 128, 192),
                     (0, 192, 200), (1, 0, 4), (1, 4, 10)]


def test_zero_pages_that_never_crossed_are_not_given_to_the_destination_to_hash():
    from shm import naming
    from stages.pagehash import PageTable, pack_round, unpack_round

    views = [np.zeros((64, 512), np.uint64)]
    views[0][[3, 4, 40]] = 7
    table = PageTable.create(naming.segment_name(naming.new_run_id(), "phash"), [64])
    try:
        log, scanner = scanner_over(views, chunk_pages=16, table=table)
        scanner.scan(1)                 # all 64 pending: only the data pages crossed
        assert unpack_round(pack_round(table.sent), [64])[0].tolist() == [3, 4, 40]
        views[0][40] = 0                # crossed before: its zero must cross (and be hashed)
        views[0][50] = 0                # written zero, never crossed: zero there already
        log.mark(0, np.array([40, 50]))
        scanner.scan(2)
        assert unpack_round(pack_round(table.sent), [64])[0].tolist() == [40]
    finally:
        table.close()
        table.unlink()


def test_an_idle_guest_of_zeros_sends_only_the_pages_with_data_past_a_zero_first_word():
    """The idle case read once: flat zero blocks, yet a page whose first word is zero and a
    later word not is data, is written and hashed; zero pages hash to 0 in the table."""
    from shm import naming
    from stages.pagehash import PageTable, hash_rows, pack_round, unpack_round

    n = 4096
    view = np.zeros((n, 512), np.uint64)
    late = [0, 333, 2048 + 17, n - 1]
    view[late, 200] = 3
    view[1500] = hashing_to_zero(7)
    table = PageTable.create(naming.segment_name(naming.new_run_id(), "phash"), [n])
    try:
        _, scanner = scanner_over([view], chunk_pages=256, table=table)
        out = scanner.scan(1)
        data = sorted([*late, 1500])
        assert out[:-1].view(RUN)[["first_page", "n_pages", "zero"]].tolist() == [
            (p, 1, 0) for p in data]
        assert out[-1].view(SCAN_END)["zero_pages"] == n - len(data)
        assert (table.hashes[0] == hash_rows(view)).all()
        assert (table.hashes[0][late] != 0).all()
        assert np.count_nonzero(table.hashes[0]) == len(late)     # 1500 hashes to 0 too
        assert unpack_round(pack_round(table.sent), [n])[0].tolist() == data
    finally:
        table.close()
        table.unlink()
