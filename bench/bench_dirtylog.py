"""Dirty-log fetch plus run extraction, in GB/s of guest RAM covered, against numpy memcpy.

    .venv/bin/python -m bench.bench_dirtylog            # table
    .venv/bin/python -m bench.bench_dirtylog --json     # one JSON line per case

Each case runs in a fresh interpreter (``--case NAME``): an 8 GiB guest (sparse: never
touched) with its dirty log, a writer process that marks a seeded pattern and answers flips
from its service thread, and the scanner side timing ``fetch()`` + ``dirty_runs()`` (1 MiB
chunks) over several rounds. ``gb_per_s`` is guest bytes covered per second of fetch+runs
(median round). The baseline, in the same invocation, is numpy copying 256 MiB of touched
memory: what any pass that reads guest RAM itself would cost at best. ``mark-*`` cases time the
writer's ``mark`` (``pages_per_s``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time

import numpy as np

from bench.common import case_result
from shm import DirtyLog, RamBlockSpec, RamRegion, dirty_runs, naming

GUEST = 8 << 30
PAGES = GUEST >> 12
CHUNK_PAGES = 256
ROUNDS = 15
# case -> share of pages dirty, layout
CASES = {
    "memcpy": (0.0, "baseline"),
    "idle": (0.0, "random"),
    "sparse-1pct": (0.01, "random"),
    "clustered-5pct": (0.05, "clustered"),
    "dense-50pct": (0.5, "random"),
    "all-dirty": (1.0, "clustered"),
    "mark-random": (0.01, "mark"),
}


def pattern(share: float, layout: str) -> np.ndarray:
    """Seeded dirty pages of the guest's one big block."""
    rng = np.random.default_rng(42)
    if share >= 1.0:
        return np.arange(PAGES)
    if layout == "clustered":  # runs of 1..64 pages, as a guest writing buffers makes
        n_runs = max(1, int(PAGES * share / 32))
        starts = rng.choice(PAGES // 64, n_runs, replace=False) * 64
        bits = np.zeros(PAGES, bool)
        lengths = rng.integers(1, 65, n_runs)
        idx = np.repeat(starts, lengths) + (np.arange(lengths.sum())
                                            - np.repeat(np.cumsum(lengths) - lengths, lengths))
        bits[idx] = True
        return np.flatnonzero(bits)
    return np.flatnonzero(rng.random(PAGES) < share)


def writer(name: str, share: float, layout: str, conn) -> None:
    """Child: mark the pattern each time it is asked; answer flips from the service thread."""
    mark_on_request(name, pattern(share, layout), conn)


def mark_on_request(name: str, pages: np.ndarray, conn) -> None:
    """A dirty log's writer (a benchmark child): mark ``pages`` of block 0 whenever ``conn``
    says "mark", answering the reader's flips from the log's service thread meanwhile."""
    log = DirtyLog.attach(name)
    log.start_service()
    conn.send("ready")
    while conn.recv() == "mark":
        if pages.size:
            log.mark(0, pages)
        conn.send("marked")
    log.close()


def memcpy_case() -> dict:
    src = np.ones(256 << 20, np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    wall = float(np.median(times))
    return {"bytes": src.nbytes, "wall_s": round(wall, 6), "gb_per_s": round(src.nbytes / wall
                                                                            / 1e9, 2)}


def mark_case(share: float) -> dict:
    run_id = naming.new_run_id()
    pages = pattern(share, "random")
    rng = np.random.default_rng(1)
    batches = [rng.permutation(pages)[:4096] for _ in range(ROUNDS)]
    with RamRegion.create(run_id, [RamBlockSpec("pc.ram", GUEST)]) as region, \
            DirtyLog.create(run_id, region) as log:
        start = time.perf_counter()
        for batch in batches:
            log.mark(0, batch)
        wall = time.perf_counter() - start
    return {"pages": 4096 * ROUNDS, "wall_s": round(wall, 6),
            "pages_per_s": round(4096 * ROUNDS / wall)}


def fetch_case(share: float, layout: str) -> dict:
    run_id = naming.new_run_id()
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    with RamRegion.create(run_id, [RamBlockSpec("pc.ram", GUEST),
                                   RamBlockSpec("vga.vram", 16 << 20)]) as region, \
            DirtyLog.create(run_id, region) as log:
        proc = ctx.Process(target=writer, args=(log.name, share, layout, child_conn))
        proc.start()
        child_conn.close()  # so that a writer that dies shows as EOF here, not a hang
        try:
            assert conn.poll(60) and conn.recv() == "ready"
            fetch_s, runs_s, n_runs, dirty = [], [], 0, 0
            for _ in range(ROUNDS):
                conn.send("mark")
                assert conn.poll(60) and conn.recv() == "marked"
                start = time.perf_counter()
                bitmaps = log.fetch(timeout=10)
                mid = time.perf_counter()
                runs = dirty_runs(bitmaps, CHUNK_PAGES)
                end = time.perf_counter()
                fetch_s.append(mid - start)
                runs_s.append(end - mid)
                n_runs, dirty = len(runs), int(runs["n_pages"].sum())
            conn.send("stop")
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    total = np.array(fetch_s) + np.array(runs_s)
    wall = float(np.median(total))
    return {"guest_bytes": region.total_length, "dirty_pages": dirty, "runs": n_runs,
            "fetch_ms": round(float(np.median(fetch_s)) * 1e3, 3),
            "runs_ms": round(float(np.median(runs_s)) * 1e3, 3), "wall_s": round(wall, 6),
            "gb_per_s": round(region.total_length / wall / 1e9, 1)}


def run_case(case: str) -> dict:
    share, layout = CASES[case]
    cpu0 = time.process_time()
    if layout == "baseline":
        result = memcpy_case()
    elif layout == "mark":
        result = mark_case(share)
    else:
        result = fetch_case(share, layout)
    me = resource.getrusage(resource.RUSAGE_SELF)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"case": case, **result,
            "cpu_s": round(time.process_time() - cpu0 + child.ru_utime + child.ru_stime, 3),
            "peak_rss_mib": round(max(me.ru_maxrss, child.ru_maxrss) / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    parser.add_argument("--case", choices=CASES, help="run one case in this process")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return 0
    results = {}
    for case in CASES:
        results[case] = case_result("bench.bench_dirtylog", case)
        if args.json:
            print(json.dumps(results[case]), flush=True)
    if not args.json:
        print_table(results)
    return 0


def print_table(results: dict) -> None:
    base = results["memcpy"]["gb_per_s"]
    print(f"{'case':<16}{'GB/s':>9}{'fetch ms':>10}{'runs ms':>9}{'dirty pages':>13}{'runs':>10}"
          f"{'cpu s':>8}{'RSS MiB':>9}  vs. memcpy")
    for case, r in results.items():
        if "pages_per_s" in r:
            print(f"{case:<16}{'':>9}{'':>10}{'':>9}{'':>13}{'':>10}{r['cpu_s']:>8.2f}"
                  f"{r['peak_rss_mib']:>9.0f}  mark: {r['pages_per_s']:,} pages/s")
            continue
        vs = "(baseline)" if case == "memcpy" else f"{r['gb_per_s'] / base:.1f}x"
        print(f"{case:<16}{r['gb_per_s']:>9.1f}{r.get('fetch_ms', ''):>10}"
              f"{r.get('runs_ms', ''):>9}{r.get('dirty_pages', ''):>13}{r.get('runs', ''):>10}"
              f"{r['cpu_s']:>8.2f}{r['peak_rss_mib']:>9.0f}  {vs}")


if __name__ == "__main__":
    sys.exit(main())
