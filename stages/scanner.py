"""The scanner stage: dirty log -> runs of dirty pages, cut at chunk boundaries, zero runs tagged.

``Scanner`` holds the pages dirty but not yet sent (``pending``, one bool per page per block).
It starts with every page pending, since the first round sends all of RAM. ``sync()`` fetches
and clears the dirty log and ORs it into ``pending`` (so no bit is lost between a sync and the
round that sends it) and returns how many pages are pending: the coordinator's convergence test.
``scan_stretches(round)`` syncs, turns ``pending`` into runs with ``shm.dirtylog.dirty_runs``,
clears ``pending``, and then reads the round's pages once, a stretch of RAM at a time
(``STRETCH_PAGES``, cut at chunk boundaries): each page's hash goes into the page table and the
same read tags it zero or not (``stages.pagehash.hash_and_test``). Runs are cut where pages
turn from data to zero (``split_runs``); zero pages the destination surely holds zeros in
(``dest_zero``: never written nor compressed there, since its RAM starts zero) are dropped, so
they never cross, not even as a COMPRESS, and no write carries them. It yields each stretch's
RUN records (merged, ``merge_runs``) as soon as the stretch is done, so the first writes leave after
one stretch rather than after the whole round, and last the END marker, which means "the round's
hashes are in the table". ``scan(round)`` is the same, joined. Pages not in memory are never
read. All of it is numpy over whole stretches; no Python loop runs per page.

``scanner_main`` is the process: commands in (ROUND / FINAL / SYNC / STOP), runs out to the
registrar, SYNC answers out to the coordinator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from shm.memory import THREADS, WORDS_PER_PAGE, map_in, pool, resident
from stages import pagehash
from stages.records import (
    COMMAND,
    RUN,
    RUN_RING,
    SCAN_END,
    SYNC_REPLY,
    Command,
    records,
)


def expand_runs(first: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Page numbers covered by runs (first, n), and the index of each run's first page."""
    n = n.astype(np.int64)
    total = int(n.sum())
    starts = np.zeros(len(n), dtype=np.int64)
    if len(n):
        np.cumsum(n[:-1], out=starts[1:])
    # int32 where it fits (blocks under 8 TiB): these arrays hold one entry per dirty page, and
    # a whole-RAM round makes several; memory beyond guest RAM must stay a small share of it.
    small = total < 1 << 31 and (not len(first) or int(first.max()) + int(n.max()) < 1 << 31)
    kind = np.int32 if small else np.int64
    pages = np.arange(total, dtype=kind)
    pages -= np.repeat((starts - first.astype(np.int64)).astype(kind), n)
    return pages, starts


GAP_PAGES = 2     # clean pages a write may carry to save a write (a write costs about 8 KiB more)

# Values of a RUN's ``zero`` inside the scanner: data, zero pages the destination may hold data
# in (a COMPRESS, or written when small), and zero pages it holds zeros in already (nothing
# crosses: dropped before the runs leave; only 0 and 1 ever reach the registrar).
DATA, ZERO, ALREADY_ZERO = 0, 1, 2


def merge_runs(body: np.ndarray, chunk_pages: int, gap: int = GAP_PAGES) -> np.ndarray:
    """Runs with data that lie within ``gap`` clean pages of each other in one chunk, as one
    run that carries the clean pages between them too (their contents are what the
    destination already has). A guest dirtying pages at random makes thousands of one-page
    runs; each is one RDMA WRITE, and a write posted in a batch costs about as much as 8 KiB
    more data here (a busy guest converged fastest with a gap of 1 or 2 pages; 8 sent twice
    the bytes and took twice the rounds). A zero run next to a data run joins it (its zeros
    are written: cheaper than a COMPRESS message each); two zero runs never join, since a
    COMPRESS must not cover the pages between them, which may hold data. An ALREADY_ZERO run
    joins nothing and no run joins across it: its zeros are at the destination already and
    never cross as data. So every merged run holds data and is written whole."""
    first = body["first_page"].astype(np.int64)
    end = first + body["n_pages"].astype(np.int64)
    data = body["zero"] == DATA
    keep = body["zero"] != ALREADY_ZERO
    join = ((body["block"][1:] == body["block"][:-1]) & (data[1:] | data[:-1])
            & keep[1:] & keep[:-1]
            & (first[1:] // chunk_pages == first[:-1] // chunk_pages)
            & (first[1:] - end[:-1] <= gap))
    if not join.any():
        return body
    starts = np.flatnonzero(np.concatenate([[True], ~join]))
    out = body[starts].copy()
    out["n_pages"] = np.maximum.reduceat(end, starts) - first[starts]
    # a group of several runs holds data; a lone run keeps its tag
    out["zero"] = np.where(np.logical_and.reduceat(~data, starts), body["zero"][starts], DATA)
    return out


def split_runs(body: np.ndarray, pages: np.ndarray, starts: np.ndarray,
               kind: np.ndarray) -> np.ndarray:
    """``body``'s runs (their pages ``pages``, each run's first at ``starts``) cut where the
    pages' ``kind`` (DATA, ZERO, ALREADY_ZERO) changes, each piece tagged with its kind."""
    cut = np.zeros(len(pages), bool)
    cut[starts] = True
    cut[1:] |= kind[1:] != kind[:-1]
    first = np.flatnonzero(cut)
    out = np.repeat(body, np.diff(np.append(np.searchsorted(first, starts), len(first))))
    out["first_page"] = pages[first]
    out["n_pages"] = np.diff(np.append(first, len(pages)))
    out["zero"] = kind[first]
    return out


STRETCH_PAGES = 1 << 15   # 128 MiB: RAM hashed and tagged before its runs go out
# The first stretch of each block comes in smaller steps (8 MiB, then 32 MiB): the first writes
# of a whole-RAM round leave after 8 MiB is hashed rather than 128 MiB (70-90 ms here).
RAMP_PAGES = (1 << 11, 1 << 13)
THREAD_PAGES = 1 << 13    # a stretch with this many dirty pages is hashed on THREADS threads


class Scanner:
    """Sans-IO scanner over RAM views and a dirty-log ``fetch`` callable."""

    def __init__(self, views: list[np.ndarray], chunk_pages: int,
                 fetch: Callable[[], list[np.ndarray]],
                 runs: Callable[[list[np.ndarray], int], np.ndarray],
                 table=None, gap: int = GAP_PAGES) -> None:
        self.views = views
        self.table = table            # a stages.pagehash.PageTable, or None: hashes discarded
        self._scratch: list[np.ndarray] = []
        self._spare: np.ndarray | None = None     # the hashes of a scanner without a table
        self.chunk_pages = chunk_pages
        self.gap = gap                # clean pages a merged write may carry (merge_runs)
        self.stretch_pages = -(-STRETCH_PAGES // chunk_pages) * chunk_pages
        ramp = {-(-p // chunk_pages) * chunk_pages for p in RAMP_PAGES}
        self.ramp = np.array(sorted(p for p in ramp if p < self.stretch_pages), np.int64)
        self._fetch = fetch
        self._runs = runs
        self.pending = [np.ones(len(v), dtype=bool) for v in views]
        # Pages the destination surely holds zeros in: nothing was written or compressed there
        # yet (its RAM starts zero). A zero page of these never crosses, not even as COMPRESS.
        self.dest_zero = [np.ones(len(v), dtype=bool) for v in views]
        self.pages_scanned = 0
        self.zero_pages = 0
        self.busy_ns = 0

    def sync(self) -> int:
        """Fetch-and-clear the dirty log into ``pending``; pages pending now."""
        t0 = time.perf_counter_ns()
        bitmaps = self._fetch()
        total = 0
        for b, bm in enumerate(bitmaps):
            n = len(self.pending[b])
            bits = np.unpackbits(np.asarray(bm).view(np.uint8), bitorder="little")[:n]
            self.pending[b] |= bits.astype(bool)
            total += int(np.count_nonzero(self.pending[b]))
        self.busy_ns += time.perf_counter_ns() - t0
        return total

    def scan(self, round_no: int) -> np.ndarray:
        """RUN records of every pending page plus a SCAN_END marker (a ``RUN_RING`` array);
        clears ``pending``."""
        return np.concatenate(list(self.scan_stretches(round_no)))

    def scan_stretches(self, round_no: int) -> Iterator[np.ndarray]:
        """The round's RUN records a stretch of RAM at a time, each once its pages are hashed
        into the table and tagged, then the SCAN_END marker alone (``RUN_RING`` arrays); clears
        ``pending`` first.
        ``busy_ns`` counts the scanner's work, not the time the caller holds a stretch."""
        self.sync()
        t0 = time.perf_counter_ns()
        packed = [np.packbits(p, bitorder="little") for p in self.pending]
        crossed = [np.zeros(len(p), bool) for p in self.pending] if self.table is not None else None
        runs = self._runs(packed, self.chunk_pages)
        for p in self.pending:
            p[:] = False
        # Runs come sorted by block then page and never cross a chunk, so none crosses a
        # stretch either, and merging stretch by stretch merges as the whole round would.
        first = runs["first_page"].astype(np.int64)
        part = np.where(first < self.stretch_pages,
                        np.searchsorted(self.ramp, first, side="right"),
                        len(self.ramp) + first // self.stretch_pages)
        key = runs["block"].astype(np.int64) << 40 | part
        cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
        dirty = zero = 0
        for part in np.split(runs, cuts) if len(runs) else ():
            body = records(RUN, len(part), round=round_no,
                           block=part["block"], first_page=part["first_page"],
                           n_pages=part["n_pages"])
            pages, starts = expand_runs(body["first_page"], body["n_pages"])
            b = int(part["block"][0])
            nz = self._hash_and_test(b, pages)
            n_nz = int(np.count_nonzero(nz))
            dirty += len(pages)
            zero += len(pages) - n_nz
            if n_nz < len(pages):
                kind = np.where(nz, DATA, np.where(self.dest_zero[b][pages], ALREADY_ZERO,
                                                   ZERO)).astype(np.uint8)
                body = split_runs(body, pages, starts, kind)
            if len(body) > 1:
                body = merge_runs(body, self.chunk_pages, self.gap)
            if n_nz < len(pages):
                body = body[body["zero"] != ALREADY_ZERO]
            if len(body):
                # what is written or compressed may hold anything at the destination now
                # (a write carries the page as it is when posted, not as it was scanned)
                covered, _ = expand_runs(body["first_page"], body["n_pages"])
                self.dest_zero[b][covered] = False
                if crossed is not None:
                    crossed[b][covered] = True
            self.busy_ns += time.perf_counter_ns() - t0
            if len(body):
                yield body.view(RUN_RING)
            t0 = time.perf_counter_ns()
        if crossed is not None:
            # The round's pages for the destination to hash: those written or compressed.
            # A zero page that never crossed is zero there, and its entry the 0 it began as.
            for sent, bits in zip(self.table.sent, crossed, strict=True):
                sent[:] = np.packbits(bits, bitorder="little")
        self.pages_scanned += dirty
        self.zero_pages += zero
        self.busy_ns += time.perf_counter_ns() - t0
        yield records(SCAN_END, round=round_no, dirty_pages=dirty, zero_pages=zero,
                      scan_ns=self.busy_ns).view(RUN_RING)

    def _hash_and_test(self, b: int, pages: np.ndarray) -> np.ndarray:
        """Hash ``pages`` (sorted, one stretch of block ``b``) into the table; which are
        non-zero. Only the span they cover is asked about residency, and a big stretch is
        split between THREADS threads (numpy releases the GIL while it hashes)."""
        lo, hi = int(pages[0]), int(pages[-1]) + 1
        view = self.views[b][lo:hi]
        local = pages - lo
        if self.table is not None:
            table = self.table.hashes[b][lo:hi]
        else:
            if self._spare is None or len(self._spare) < hi - lo:
                self._spare = np.empty(self.stretch_pages, np.uint64)
            table = self._spare[:hi - lo]
        held = resident(view)
        if held is not None and held.all():
            held = None
        ways = THREADS if len(pages) >= THREAD_PAGES else 1
        while len(self._scratch) < ways:
            self._scratch.append(np.empty((pagehash.TEST_WINDOW, WORDS_PER_PAGE), np.uint64))
        if ways == 1:
            return pagehash.hash_and_test(view, local, table, held, self._scratch[0])
        # cut at a window boundary near each share of the pages, so no window is split
        window = pagehash.TEST_WINDOW
        marks = [int(local[len(local) * i // ways]) // window * window
                 for i in range(1, ways)]
        edges = [0, *np.searchsorted(local, marks).tolist(), len(local)]
        out = np.empty(len(local), bool)

        def work(i: int) -> None:
            sel = slice(edges[i], edges[i + 1])
            out[sel] = pagehash.hash_and_test(view, local[sel], table, held, self._scratch[i])

        futures = [pool().submit(work, i) for i in range(1, ways)]
        work(0)
        for f in futures:
            f.result()
        return out


def scanner_main(config: dict, link) -> int:
    """Process: config keys region, dirty (a ``stages.dirty_sources`` spec; or dirtylog, a log
    name), chunk_pages, commands, runs, syncs (ring names)."""
    from shm.dirtylog import dirty_runs
    from shm.region import RamRegion
    from shm.ring import Ring
    from stages.dirty_sources import scanner_source

    with RamRegion.attach(config["region"]) as region, \
            scanner_source(config, region) as source, \
            Ring.attach(config["commands"], COMMAND) as commands, \
            Ring.attach(config["runs"], RUN_RING) as runs_out, \
            Ring.attach(config["syncs"], SYNC_REPLY) as syncs:
        views = [blk.view.view(np.uint64).reshape(-1, WORDS_PER_PAGE) for blk in region.blocks]
        table = None
        if config.get("pagehash"):
            table = pagehash.PageTable.attach(config["pagehash"])
        scanner = Scanner(views, config["chunk_pages"], source.fetch, dirty_runs, table,
                          gap=int(config.get("gap", GAP_PAGES)))
        import threading

        mapper = threading.Thread(target=lambda: [map_in(v) for v in views], daemon=True,
                                  name="map-in")
        mapper.start()            # while the rest of setup runs
        link.ready()
        batch = int(config.get("batch", 4096))
        while True:
            cmds = commands.pop(16)
            if len(cmds) == 0:
                break                        # the coordinator closed the ring
            for cmd in cmds:
                op = int(cmd["op"])
                if op == Command.STOP:
                    runs_out.close_write()
                    return 0
                if op == Command.SYNC:
                    n = scanner.sync()
                    syncs.push(records(SYNC_REPLY, round=cmd["round"], dirty_pages=n))
                elif op in (Command.ROUND, Command.FINAL):
                    mapper.join()
                    # each stretch's runs leave while the next stretch is hashed; the END
                    # comes last: the round's hashes are in the table
                    for out in scanner.scan_stretches(int(cmd["round"])):
                        for i in range(0, len(out), batch):
                            runs_out.push(out[i:i + batch])
        runs_out.close_write()
        if table is not None:
            table.close()
    return 0
