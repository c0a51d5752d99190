"""The scanner stage in GB/s of guest RAM covered (dirty-log sync, runs, zero detection, page
hashes), against numpy copying the same bytes.

    .venv/bin/python -m bench.bench_scanner            # table (median of --repeat runs)
    .venv/bin/python -m bench.bench_scanner --json     # one JSON line per case

Each case runs in a fresh interpreter (``--case NAME``): a guest of ``GUEST`` bytes whose pages
are all in memory (touched: zero, or stamped with data), its dirty log, a writer process that
marks a seeded pattern and answers the log's flips, and a round of ``stages.scanner.Scanner``
with its page table (``stages.pagehash.PageTable``, as the pipeline runs it: RUN records and the
round's page hashes) timed round after round (median of ``ROUNDS``). ``gb_per_s`` is guest
bytes covered per second of scan; ``pages_per_s`` the same in 4 KiB pages. The baseline,
``memcpy``, copies the guest's bytes 256 MiB at a time into a warm buffer: what any pass that
reads all of RAM costs at best.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

import numpy as np

from bench.common import (
    rates,
)
from bench.common import usage as _usage
from shm.memory import PAGE_SIZE, Madv, madvise

GUEST = 2 << 30
ROUNDS = 5
CHUNK_PAGES = 256
SLICE = 256 << 20
# case -> (share of pages dirty per round, content): round1 = the first round (all pending)
CASES = {
    "memcpy": (None, None),
    "round1-zero": (1.0, "zero"),
    "round1-data": (1.0, "data"),
    "idle": (0.0, "data"),
    "sparse-1pct": (0.01, "data"),
    "dense-50pct": (0.5, "data"),
}
BASELINE = {name: "memcpy" for name in CASES if name != "memcpy"}


def _populate(view: np.ndarray, value: int) -> None:
    if not madvise(view.ctypes.data, view.nbytes, Madv.POPULATE_WRITE):
        view[::PAGE_SIZE] = 0                              # older kernel: touch instead
    if value:
        for p0 in range(0, view.nbytes, SLICE):
            view[p0:p0 + SLICE].view(np.uint64)[:] = value


def writer(name: str, share: float, pages: int, conn) -> None:
    """Child: mark a seeded share of the pages each time it is asked; answer the log's flips."""
    from bench.bench_dirtylog import mark_on_request

    mark_on_request(name, np.flatnonzero(np.random.default_rng(42).random(pages) < share), conn)


def memcpy_case() -> dict:
    size = min(GUEST, SLICE)
    src = np.ones(size, np.uint8)
    dst = np.ones(size, np.uint8)
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(GUEST // size):
            np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return rates(GUEST, float(np.median(times)), pages=True)


def scan_case(share: float, content: str) -> dict:
    from shm import DirtyLog, RamBlockSpec, RamRegion, dirty_runs, naming
    from shm.memory import WORDS_PER_PAGE
    from stages.pagehash import PageTable
    from stages.records import SCAN_END
    from stages.scanner import Scanner

    run_id = naming.new_run_id()
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    with RamRegion.create(run_id, [RamBlockSpec("pc.ram", GUEST)]) as region, \
            DirtyLog.create(run_id, region) as log:
        table = PageTable.create(naming.segment_name(run_id, "phash"),
                                 [b.nb_pages for b in region.blocks])
        try:
            view = region.blocks[0].view
            _populate(view, 0 if content == "zero" else 0x5A5A_0001_0000_0001)
            proc = ctx.Process(target=writer, args=(log.name, share, GUEST >> 12, child_conn))
            proc.start()
            assert conn.recv() == "ready"
            views = [b.view.view(np.uint64).reshape(-1, WORDS_PER_PAGE) for b in region.blocks]
            times, dirty, n_runs = [], 0, 0
            for _ in range(ROUNDS):
                scanner = Scanner(views, CHUNK_PAGES, lambda: log.fetch(timeout=10), dirty_runs,
                                  table)
                if share < 1.0:
                    scanner.scan(0)            # round 1 done: only the pattern is pending now
                    conn.send("mark")
                    assert conn.recv() == "marked"
                start = time.perf_counter()
                out = scanner.scan(1)
                times.append(time.perf_counter() - start)
                dirty, n_runs = int(out[-1].view(SCAN_END)["dirty_pages"]), len(out) - 1
            conn.send("stop")
            proc.join(30)
        finally:
            table.close()
            table.unlink()
            region.unlink()
    wall = float(np.median(times))
    return {**rates(GUEST, wall, pages=True), "dirty_pages": dirty, "runs": n_runs}


def run_case(case: str) -> dict:
    share, content = CASES[case]
    result = memcpy_case() if share is None else scan_case(share, content)
    return {"case": case, "guest_bytes": GUEST, **result, **_usage()}


def main(argv: list[str] | None = None) -> int:
    from bench.stages import module_main

    return module_main("scanner", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
