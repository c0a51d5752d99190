"""Dirty sources compared: fetch cost and the writer's speed with tracking armed.

Sources: ``kvm`` (KVM_GET_DIRTY_LOG + CLEAR_DIRTY_LOG of a running CPL3 guest), ``uffd``
(userfaultfd WP_ASYNC + PAGEMAP_SCAN) and ``soft`` (shm.dirtylog, marked by the writer's code).

    fetch-{all,half,none}: time of one fetch-and-clear with every page / every second page /
        no page written since the previous fetch (median of a few), and dirty pages per second.
    rate-*: how fast the writer dirties pages while tracking is armed and fetched every 100 ms,
        against the same writer untracked (the "vs." column).

Each case runs in a fresh subprocess and prints one JSON line; the parent prints a table, or
the JSON lines with ``--json``. ``python -m bench.bench_dirty_sources [--ram 1G] [-k sub]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.common import mib_of
from shm.memory import PAGE_SIZE, Madv, madvise

REPEATS = 3
RATE_SECONDS = 2.0
FETCH_EVERY = 0.1


def _populate(region) -> None:
    """Fault the whole region in once (first touch costs several µs a page on this machine)."""
    for b in region.blocks:
        if not madvise(b.address, b.length, Madv.POPULATE_WRITE):
            b.view[::PAGE_SIZE] = 0  # older kernel: touch instead


def _region(size: int, kind: str = "ram"):
    from shm.naming import new_run_id
    from shm.region import RamBlockSpec, RamRegion
    region = RamRegion.create(new_run_id(), [RamBlockSpec("pc.ram", size)], kind=kind)
    _populate(region)
    return region


def _count(bitmaps) -> int:
    return int(sum(np.unpackbits(np.asarray(bm).view(np.uint8)).sum() for bm in bitmaps))


def _timed(fetch) -> tuple[float, int]:
    t0 = time.perf_counter()
    bitmaps = fetch()
    return time.perf_counter() - t0, _count(bitmaps)


def _fetch_result(times: list[float], pages: int) -> dict:
    t = statistics.median(times)
    return {"fetch_ms": t * 1e3, "dirty_pages": pages,
            "pages_per_s": pages / t if pages else 0.0}


# -- KVM ----------------------------------------------------------------------------------

def _kvm_wait_passes(guest, n: int) -> None:
    target = guest.passes() + n
    while guest.passes() < target:
        time.sleep(0.01)


def kvm_fetch(size: int, level: str) -> dict:
    from pipeline.guest.kvm.guest import KvmGuest
    with _region(size) as region, KvmGuest.boot(region.blocks, stride=2 if level == "half"
                                                else 1) as guest:
        guest.start()
        _kvm_wait_passes(guest, 1)
        times, pages = [], 0
        for _ in range(REPEATS):
            guest.fetch_dirty()
            if level != "none":
                _kvm_wait_passes(guest, 2)  # at least one whole pass since the fetch
            guest.pause()
            if level == "none":
                guest.fetch_dirty()
            t, pages = _timed(guest.fetch_dirty)
            times.append(t)
            guest.start()
        guest.pause()
        guest.check()
    return _fetch_result(times, pages)


def kvm_rate(size: int, tracking: str) -> dict:
    """Guest page writes per second; tracking 'off', 'kvm' or 'uffd' (on the VMM's mapping)."""
    from pipeline.guest.kvm.guest import KvmGuest
    from shm.uffd import PagemapHarvester, arm
    with _region(size) as region, KvmGuest.boot(region.blocks,
                                                log_dirty=tracking == "kvm") as guest:
        guest.start()
        _kvm_wait_passes(guest, 1)
        guest.pause()
        wp = harvester = None
        if tracking == "uffd":
            b = region.blocks[0]
            wp = arm(b.address, b.length)
            harvester = PagemapHarvester(os.getpid(), [(b.address, b.length)])
        fetch = {"kvm": guest.fetch_dirty, "uffd": harvester and harvester.harvest,
                 "off": None}[tracking]
        try:
            if fetch:
                fetch()
            start = guest.check().pages_written
            t0 = time.perf_counter()
            guest.start()
            fetched = 0
            while time.perf_counter() - t0 < RATE_SECONDS:
                time.sleep(FETCH_EVERY)
                if fetch:
                    fetched += _count(fetch())
            guest.pause()
            elapsed = time.perf_counter() - t0
            written = guest.check().pages_written - start
        finally:
            for r in (harvester, wp):
                if r is not None:
                    r.close()
    return {"rate_pages_per_s": written / elapsed, "dirty_pages": fetched}


# -- uffd and soft (a numpy writer in this process) ------------------------------------------

def _write(pages: np.ndarray, level: str, value: int) -> None:
    if level != "none":
        pages[:: 2 if level == "half" else 1, 0] = value


def uffd_fetch(size: int, level: str) -> dict:
    from shm.uffd import PagemapHarvester, arm
    with _region(size) as region:
        b = region.blocks[0]
        pages = b.view.reshape(-1, PAGE_SIZE)
        with arm(b.address, b.length), \
                PagemapHarvester(os.getpid(), [(b.address, b.length)]) as harvester:
            times, n = [], 0
            for i in range(REPEATS):
                harvester.harvest()
                _write(pages, level, i + 1)
                t, n = _timed(harvester.harvest)
                times.append(t)
    return _fetch_result(times, n)


def soft_fetch(size: int, level: str) -> dict:
    from shm.dirtylog import DirtyLog
    with _region(size) as region:
        pages = region.blocks[0].view.reshape(-1, PAGE_SIZE)
        log = DirtyLog.create(region.name.split("-")[1], region)
        try:
            times, n = [], 0
            for i in range(REPEATS):
                log.fetch()
                _write(pages, level, i + 1)
                if level == "all":
                    log.mark_range(0, 0, len(pages))
                elif level == "half":
                    log.mark(0, np.arange(0, len(pages), 2))
                t, n = _timed(log.fetch)
                times.append(t)
        finally:
            log.close()
            log.unlink()
    return _fetch_result(times, n)


def writer_rate(size: int, tracking: str) -> dict:
    """A numpy writer sweeping RAM in 64 MiB slices: 'off', 'uffd' or 'soft' (marks each slice)."""
    from shm.dirtylog import DirtyLog
    from shm.uffd import PagemapHarvester, arm
    with _region(size) as region:
        b = region.blocks[0]
        pages = b.view.reshape(-1, PAGE_SIZE)
        step = 16384
        wp = harvester = log = None
        if tracking == "uffd":
            wp = arm(b.address, b.length)
            harvester = PagemapHarvester(os.getpid(), [(b.address, b.length)])
            fetch = harvester.harvest
        elif tracking == "soft":
            log = DirtyLog.create(region.name.split("-")[1], region)
            fetch = log.fetch
        else:
            fetch = None
        try:
            written, busy, fetched, value = 0, 0.0, 0, 1
            t0 = last = time.perf_counter()
            while time.perf_counter() - t0 < RATE_SECONDS:
                for first in range(0, len(pages), step):
                    s = time.perf_counter()
                    pages[first:first + step, 0] = value
                    if log is not None:
                        log.mark_range(0, first, min(step, len(pages) - first))
                    busy += time.perf_counter() - s
                    written += min(step, len(pages) - first)
                    if fetch and time.perf_counter() - last >= FETCH_EVERY:
                        fetched += _count(fetch())
                        last = time.perf_counter()
                value = (value + 1) & 0xFF or 1
        finally:
            for r in (harvester, wp, log):
                if r is not None:
                    r.close()
            if log is not None:
                log.unlink()
    return {"rate_pages_per_s": written / busy, "dirty_pages": fetched}


CASES = {
    **{f"kvm-fetch-{lv}": (kvm_fetch, lv) for lv in ("all", "half", "none")},
    **{f"uffd-fetch-{lv}": (uffd_fetch, lv) for lv in ("all", "half", "none")},
    **{f"soft-fetch-{lv}": (soft_fetch, lv) for lv in ("all", "half", "none")},
    **{f"kvm-guest-rate-{t}": (kvm_rate, t) for t in ("off", "kvm", "uffd")},
    **{f"writer-rate-{t}": (writer_rate, t) for t in ("off", "uffd", "soft")},
}
BASELINE = {name: name.rsplit("-", 1)[0] + "-off" for name in CASES if "rate" in name}


def run_case(name: str, size: int) -> dict:
    func, arg = CASES[name]
    t0, c0 = time.perf_counter(), time.process_time()
    out = {"case": name, "size_bytes": size}
    try:
        out.update(func(size, arg))
    except Exception as e:  # noqa: BLE001 - a case that cannot run says why, in its line
        out["error"] = f"{type(e).__name__}: {e}"
    out.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
               peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return out


def _table(rows: list[dict]) -> str:
    by = {r["case"]: r for r in rows}
    lines = [f"{'case':<22} {'fetch ms':>9} {'dirty pages':>12} {'pages/s':>12} "
             f"{'writer pages/s':>15} {'vs.':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<22} {r['error']}")
            continue
        fetch = f"{r['fetch_ms']:.3f}" if "fetch_ms" in r else ""
        pps = f"{r['pages_per_s']:.3g}" if "pages_per_s" in r else ""
        rate = f"{r['rate_pages_per_s']:.3g}" if "rate_pages_per_s" in r else ""
        base = by.get(BASELINE.get(r["case"], ""))
        vs = (f"{r['rate_pages_per_s'] / base['rate_pages_per_s']:.3f}x"
              if base and "rate_pages_per_s" in base and base is not r else "")
        lines.append(f"{r['case']:<22} {fetch:>9} {r['dirty_pages']:>12} {pps:>12} {rate:>15} "
                     f"{vs:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ram", type=mib_of, metavar="SIZE", default=1024, dest="size_mib",
                   help="RAM per case, e.g. 256M or 1G (default 1G)")
    p.add_argument("--size-mib", type=int, dest="size_mib", help=argparse.SUPPRESS)  # old name
    p.add_argument("-k", default="", help="run only cases whose name contains this")
    p.add_argument("--json", action="store_true", help="print one JSON line per case")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args(argv)
    size = args.size_mib << 20
    if args.case:
        print(json.dumps(run_case(args.case, size)), flush=True)
        return 0
    rows = []
    for name in CASES:
        if args.k not in name:
            continue
        proc = subprocess.run([sys.executable, "-m", "bench.bench_dirty_sources", "--case", name,
                               "--ram", f"{args.size_mib}M"], capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if lines else {
            "case": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
