import numpy as np

from stages.records import OP_END, OP_RUN
from stages.scanner import Scanner, expand_runs


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


def test_first_round_sends_everything_and_tags_zero_runs():
    views, log, sc = make()
    views[0][9] = 7          # chunk 1 of block 0 has data
    out = sc.scan(1)
    runs, end = out[:-1], out[-1]
    assert (runs["op"] == OP_RUN).all() and end["op"] == OP_END
    assert runs["n_pages"].sum() == 80 == end["n_pages"]
    assert len(runs) == 8 + 2            # cut at every 8-page chunk boundary
    nonzero = runs[runs["zero"] == 0]
    assert nonzero["block"].tolist() == [0] and nonzero["first_page"].tolist() == [8]
    assert end["first_page"] == 79       # zero pages
    assert sc.scan(2)["n_pages"].tolist() == [0]   # nothing dirty: only the END marker


def test_sync_accumulates_without_losing_bits():
    views, log, sc = make()
    sc.scan(1)
    log.mark(0, np.array([1, 2, 3, 20]))
    assert sc.sync() == 4
    log.mark(1, np.array([5]))
    views[1][5] = 1
    out = sc.scan(2)
    runs = out[:-1]
    assert [(r["block"], r["first_page"], r["n_pages"], r["zero"]) for r in runs] == [
        (0, 1, 3, 1), (0, 20, 1, 1), (1, 5, 1, 0)]
    assert sc.sync() == 0


def test_zero_tag_uses_whole_block_scan_when_many_dirty():
    views, log, sc = make(pages=(64,))
    sc.scan(1)
    log.mark(0, np.arange(0, 64))
    views[0][63, 5] = 1
    runs = sc.scan(2)[:-1]
    assert runs["zero"].tolist() == [1] * 7 + [0]


def test_nearby_data_runs_in_a_chunk_merge_and_zero_runs_stay_apart():
    from stages.records import RUN_DTYPE
    from stages.scanner import merge_runs

    def body(*rows):
        out = np.zeros(len(rows), RUN_DTYPE)
        for i, (b, f, n, z) in enumerate(rows):
            out[i]["block"], out[i]["first_page"], out[i]["n_pages"], out[i]["zero"] = b, f, n, z
        return out

    runs = body((0, 0, 1, 0), (0, 3, 2, 0), (0, 20, 1, 0), (0, 22, 1, 1), (0, 24, 1, 0),
                (0, 33, 1, 1), (0, 35, 1, 1), (0, 40, 1, 0), (1, 41, 1, 0))
    got = merge_runs(runs, chunk_pages=32, gap=8)
    assert got[["block", "first_page", "n_pages", "zero"]].tolist() == [
        (0, 0, 5, 0),      # 0 and 3-4: the two clean pages between them travel too
        (0, 20, 5, 0),     # 11 pages from the last: apart; a zero run joins its data neighbours
        (0, 33, 1, 1),     # another chunk; two zero runs never join (a COMPRESS must not
        (0, 35, 6, 0),     # cover page 34), but a zero run joins the data run after it
        (1, 41, 1, 0)]     # another block
