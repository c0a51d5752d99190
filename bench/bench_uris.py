"""The same guest migrated over ``rdma:`` (soft provider) and ``tcp:`` (pages inline), side by side.

    .venv/bin/python -m bench.bench_uris                      # table
    .venv/bin/python -m bench.bench_uris --json               # one JSON line per case
    .venv/bin/python -m bench.bench_uris --ram 1G --rates 0,50 --repeat 3

The comparison a user of QEMU makes before taking RDMA: one guest (a synthetic guest of
``--ram`` bytes, half filled, 10 % zero pages), for each dirty rate in ``--rates`` (MB/s), a
whole migration on this machine (``run_local``: destination process, source, verification,
resume) over each URI. Each case runs in a fresh interpreter (``--case``) and prints one JSON
line: status, total time, setup, downtime, rounds, bytes on the wire, average throughput (RAM
size / total time), CPU seconds of the case's processes (source, stages, guest, destination,
reaped children) and peak RSS. With ``--repeat`` the median run (by total time) is kept, the
cases alternated (rdma, tcp, rdma, ...) so that a shared machine's load falls on both; the
table is followed by issue 15's targets 1 and 2 with whether this run met them, and the load
average seen. The table's "vs. tcp" column divides tcp's total time (and downtime) by rdma's:
above 1 means rdma is faster. Standalone: it shares no code with the other benchmarks.
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

SCHEMES = ("rdma", "tcp")
MIB = 1 << 20


def run_case(scheme: str, ram: int, rate_mb: float, seed: int) -> dict:
    """One migration in this process (the destination and the stages are its children)."""
    from pipeline.api import run_local
    from pipeline.config import MigrationConfig
    from pipeline.guest.synthetic import GuestState

    state = GuestState(seed=seed, dirty_rate=int(rate_mb * 1e6))
    t0, c0 = time.perf_counter(), time.process_time()
    s = run_local(ram, MigrationConfig(), state=state, scheme=scheme, guest_watch=0.0)
    wall = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total_ms = s["total-time"]
    return {
        "case": f"{scheme}-{rate_mb:g}MBps", "scheme": scheme, "ram": ram,
        "dirty_rate_mb_s": rate_mb, "status": s["status"], "verified": s.get("verified"),
        "error": s.get("error-desc", ""),
        "total_ms": total_ms, "setup_ms": s["setup-time"], "downtime_ms": s.get("downtime"),
        "rounds": s["round"], "transferred": s["ram"]["transferred"],
        "gb_per_s": round(ram / (total_ms / 1e3) / 1e9, 3) if total_ms else 0.0,
        "wire_gb_per_s": round(s["ram"]["transferred"] / (total_ms / 1e3) / 1e9, 3)
        if total_ms else 0.0,
        "wall_s": round(wall, 3),
        "cpu_s": round(time.process_time() - c0 + kids.ru_utime + kids.ru_stime, 3),
        "peak_rss_mib": round(max(me.ru_maxrss, kids.ru_maxrss) / 1024, 1),
    }


def one_process(scheme: str, ram: int, rate: float, seed: int) -> dict:
    argv = [sys.executable, "-m", "bench.bench_uris", "--case", scheme, "--ram", str(ram),
            "--rates", str(rate), "--seed", str(seed)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if out.returncode != 0 or not out.stdout.strip():
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": f"{scheme}-{rate:g}MBps", "scheme": scheme, "ram": ram,
                "dirty_rate_mb_s": rate, "status": "error", "error": last}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "completed"] or rows
    if "total_ms" not in ok[0]:
        return ok[0]
    mid = statistics.median_low([r["total_ms"] for r in ok])
    row = dict(next(r for r in ok if r["total_ms"] == mid))
    row["runs"] = len(rows)
    row["setup_med"] = statistics.median([r["setup_ms"] for r in ok])
    row["transferred_med"] = statistics.median([r["transferred"] for r in ok])
    row["load"] = max(r.get("load", 0.0) for r in rows)
    return row


def attach_ratios(rows: list[dict]) -> None:
    """``vs_tcp``: tcp's total time / this case's (and downtime), same dirty rate."""
    tcp = {r["dirty_rate_mb_s"]: r for r in rows if r["scheme"] == "tcp"}
    for r in rows:
        base = tcp.get(r["dirty_rate_mb_s"])
        r["vs_tcp_total"] = r["vs_tcp_downtime"] = None
        if base is None or "total_ms" not in r or "total_ms" not in base:
            continue
        if r["total_ms"]:
            r["vs_tcp_total"] = round(base["total_ms"] / r["total_ms"], 3)
        if r.get("downtime_ms") and base.get("downtime_ms"):
            r["vs_tcp_downtime"] = round(base["downtime_ms"] / r["downtime_ms"], 3)


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<16}{'status':<10}{'total ms':>10}{'downtime':>10}{'rounds':>7}"
          f"{'wire MiB':>10}{'GB/s':>7}{'cpu s':>8}{'RSS MiB':>9}  vs. tcp (total, downtime)")
    for r in rows:
        if "total_ms" not in r:
            print(f"{r['case']:<16}{r['status']:<10}  {r.get('error', '')}")
            continue
        vs = ""
        if r["scheme"] != "tcp" and r["vs_tcp_total"]:
            vs = f"{r['vs_tcp_total']:.2f}x, " + (f"{r['vs_tcp_downtime']:.2f}x"
                                                  if r["vs_tcp_downtime"] else "-")
        down = f"{r['downtime_ms']:.0f}" if r.get("downtime_ms") else "-"
        print(f"{r['case']:<16}{r['status']:<10}{r['total_ms']:>10.0f}{down:>10}"
              f"{r['rounds']:>7}{r['transferred'] / MIB:>10.1f}{r['gb_per_s']:>7.2f}"
              f"{r['cpu_s']:>8.2f}{r['peak_rss_mib']:>9.1f}  {vs}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--ram", default="512M", help="guest RAM (default 512M)")
    p.add_argument("--rates", default="0,50", help="dirty rates in MB/s (default 0,50)")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the median is kept")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--case", choices=SCHEMES, help="run one case in this process")
    args = p.parse_args()
    from pipeline.config import parse_size

    ram = parse_size(args.ram)
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    if args.case:
        print(json.dumps(run_case(args.case, ram, rates[0], args.seed)), flush=True)
        return 0
    rows = []
    for rate in rates:
        runs: dict[str, list[dict]] = {s: [] for s in SCHEMES}
        for _ in range(max(1, args.repeat)):
            for scheme in SCHEMES:        # alternated: a shared machine's load hits both alike
                row = one_process(scheme, ram, rate, args.seed)
                row["load"] = round(os.getloadavg()[0], 2)
                runs[scheme].append(row)
        rows += [median(runs[s]) for s in SCHEMES]
    attach_ratios(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print_table(rows)
        for line in verdicts(rows):
            print(line)
    return 0


def verdicts(rows: list[dict]) -> list[str]:
    """Issue 15's targets 1 and 2, each with whether this run met it (medians)."""
    out = []
    tcp = {r["dirty_rate_mb_s"]: r for r in rows if r["scheme"] == "tcp" and "total_ms" in r}
    for r in rows:
        base = tcp.get(r["dirty_rate_mb_s"])
        if r["scheme"] != "rdma" or "total_ms" not in r or base is None:
            continue
        speed, wire = r["vs_tcp_total"] or 0.0, r["transferred_med"] / base["transferred_med"]
        ok = speed >= 1.0 and wire <= 1.05
        out.append(f"target 1, {r['case']}: rdma: {speed:.2f}x tcp:'s speed (>= 1.0), "
                   f"{wire:.3f}x its bytes (<= 1.05): {'met' if ok else 'NOT met'}")
        out.append(f"target 2, {r['case']}: setup-time {r['setup_med']:.0f} ms (<= 100): "
                   f"{'met' if r['setup_med'] <= 100 else 'NOT met'}")
    loads = [r.get("load") for r in rows if r.get("load") is not None]
    if loads:
        out.append(f"load average (1 min) while measured: {min(loads)}-{max(loads)}")
    return out


if __name__ == "__main__":
    sys.exit(main())
