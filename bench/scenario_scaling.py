"""Scenario 4, scaling: total time and peak memory for guest RAM of 256 MiB, 1 GiB and 4 GiB.

    .venv/bin/python -m bench.scenario_scaling [--sizes 256M,1G,4G] [--repeat 3] [--json]

Full guests (non-zero RAM), idle, pin-all off, in two series: the destination's RAM fresh
(faulted in by the migration's writes) and preallocated (faulted in before the source
connects, as QEMU's -mem-prealloc does). Raw TCP into fresh and into warm memory of the same
size runs alongside each. The fresh series carries this VM's cost of faulting memory in for
the first time, which is not linear here: the host backs the VM's pages lazily, and memory the
VM has not touched recently costs up to six times more per GiB (the tcp-fresh column shows
it); the preallocated series is the pipeline's own scaling.

Linearity is judged against a fit, time = constant + slope x RAM (setup and switchover are a
constant): every size within 20% of the fit. Memory beyond the guest RAM on both sides
(anonymous memory of every process of the run, plus every shared segment other than the two
RAM regions, sampled every 50 ms) is fitted the same way: slope under 2% of the guest RAM.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from bench.common import format_table
from bench.scenario_common import med, migration, save

MiB = 1 << 20
GiB = 1 << 30
SERIES = {"fresh": ("tcp-fresh", False), "prealloc": ("tcp-warm", True)}
LINEAR_WITHIN = 0.20
MIN_SIZES = 3          # a fit through two points judges nothing


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """(constant, slope) of a least-squares line; None with fewer than two points."""
    if len(xs) < 2:
        return None
    slope, const = np.polyfit(np.array(xs, float), np.array(ys, float), 1)
    return float(const), float(slope)


def series_rows(name: str, sizes: list[int], runs: dict, tcp: dict) -> tuple[list, dict]:
    """One table row per size of a series, and the series' time fit."""
    rows = []
    for ram in sizes:
        ok = [r for r in runs[ram] if r.get("status") == "completed"]
        total = med(ok, "total-time")
        tcp_ms = med(tcp[ram], lambda r: r.get("wall_s", 0) * 1e3 or None)
        rows.append({
            "case": f"{ram // MiB} MiB, {name}", "series": name, "ram": ram, "total_ms": total,
            "s_per_gib": total / 1e3 / (ram / GiB) if total else None,
            "round1_gb_per_s": med(ok, "first_round_gb_per_s"),
            "overhead_bytes": med(ok, "peak_overhead_bytes"),
            "baseline": SERIES[name][0], "tcp_ms": tcp_ms,
            "tcp_s_per_gib": tcp_ms / 1e3 / (ram / GiB) if tcp_ms else None,
            "completed": f"{len(ok)}/{len(runs[ram])}"})
    good = [r for r in rows if r["total_ms"]]
    fit = {}
    line = linear_fit([r["ram"] for r in good], [r["total_ms"] for r in good])
    if line:
        const, slope = line
        for r in good:
            r["vs_linear"] = round(r["total_ms"] / (const + slope * r["ram"]), 3)
        worst = max(abs(r["vs_linear"] - 1) for r in good)
        fit = {"time_ms_const": round(const, 1), "time_ms_per_gib": round(slope * GiB, 1),
               "worst_vs_linear": round(worst, 3), "linear": worst <= LINEAR_WITHIN}
        tline = linear_fit([r["ram"] for r in good if r["tcp_ms"]],
                           [r["tcp_ms"] for r in good if r["tcp_ms"]])
        if tline:
            fit["tcp_worst_vs_linear"] = round(max(
                abs(r["tcp_ms"] / (tline[0] + tline[1] * r["ram"]) - 1)
                for r in good if r["tcp_ms"]), 3)
    return rows, fit


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import parse_size

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256M,1G,4G",
                   help="guest RAM sizes, comma-separated, three or more (default 256M,1G,4G)")
    p.add_argument("--series", default="fresh,prealloc", help="fresh, prealloc or both")
    p.add_argument("--repeat", type=int, default=3, help="runs per size (default 3)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of a table")
    args = p.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    except ValueError as exc:
        p.error(f"--sizes: {exc}")
    if len(set(sizes)) < MIN_SIZES:
        p.error(f"--sizes {args.sizes}: the linearity check needs three sizes or more (a line "
                "passes through any two points, so two would always look linear)")
    names = [s for s in args.series.split(",") if s]
    if not names or any(s not in SERIES for s in names):
        p.error(f"--series takes {', '.join(SERIES)}")
    runs = {s: {ram: [] for ram in sizes} for s in names}
    tcp = {s: {ram: [] for ram in sizes} for s in names}
    for _ in range(args.repeat):           # interleaved: drift hits every case alike
        for ram in sizes:
            for s in names:
                base, prealloc = SERIES[s]
                tcp[s][ram].append(migration(ram, tcp=base.removeprefix("tcp-")))
                runs[s][ram].append(migration(ram, fill=1.0, memory=True, prealloc=prealloc))
    rows, fits = [], {}
    for s in names:
        r, fits[s] = series_rows(s, sizes, runs[s], tcp[s])
        rows.extend(r)
    mem = [r for r in rows if r["overhead_bytes"]]
    mline = linear_fit([r["ram"] for r in mem], [r["overhead_bytes"] for r in mem])
    memory = ({"memory_const_mib": round(mline[0] / MiB, 1),
               "memory_share_of_ram": round(mline[1], 4)} if mline else {})
    payload = {"scenario": "scaling", "rows": rows, "fit": fits, "memory": memory,
               "runs": {s: {str(k): v for k, v in runs[s].items()} for s in names},
               "tcp": {s: {str(k): v for k, v in tcp[s].items()} for s in names}}
    notes = [save("scenario_scaling", payload)]
    if args.json:
        print(json.dumps(payload))
        return 0
    print(format_table(rows, [
        ("case", "case", ""), ("total ms", "total_ms", ".0f"), ("s/GiB", "s_per_gib", ".2f"),
        ("round-1 GB/s", "round1_gb_per_s", ".2f"), ("vs. linear fit", "vs_linear", ".2f"),
        ("memory beyond RAM MiB", lambda r: r["overhead_bytes"] and r["overhead_bytes"] / MiB,
         ".0f"), ("completed", "completed", ""), ("baseline", "baseline", ""),
        ("baseline s/GiB", "tcp_s_per_gib", ".2f")]))
    for s, fit in fits.items():
        if fit:
            print(f"{s}: time = {fit['time_ms_const']:.0f} ms + {fit['time_ms_per_gib']:.0f} "
                  f"ms/GiB; worst size {fit['worst_vs_linear']:.0%} off the line "
                  f"(target: within {LINEAR_WITHIN:.0%}); {SERIES[s][0]} alone: "
                  f"{fit.get('tcp_worst_vs_linear', float('nan')):.0%} off its line")
    if memory:
        print(f"memory beyond RAM = {memory['memory_const_mib']:.0f} MiB + "
              f"{memory['memory_share_of_ram']:.2%} of RAM (target: < 2% + a constant)")
    print(f"medians of {args.repeat}")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
