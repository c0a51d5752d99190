"""Scenario 4, scaling: total time and peak memory for guest RAM of 256 MiB, 1 GiB and 4 GiB.

    .venv/bin/python -m bench.scenario_scaling [--sizes 256M,1G,4G] [--repeat 3] [--json]

Full guests (non-zero RAM), idle, pin-all off; raw TCP into fresh memory of the same size runs
alongside, since how fast this machine faults fresh memory in changes with the amount. Time
per GiB should stay the same (linear within 20%); memory beyond the guest RAM on both sides
(anonymous memory of every process of the run, plus every shared segment other than the two
RAM regions, sampled every 50 ms) should grow by less than 2% of the guest RAM: the script
fits overhead = constant + slope x RAM.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from bench.common import format_table
from bench.scenario_common import med, migration, save

MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import parse_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256M,1G,4G")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    runs: dict[int, list[dict]] = {s: [] for s in sizes}
    tcp: dict[int, list[dict]] = {s: [] for s in sizes}
    for _ in range(args.repeat):
        for ram in sizes:
            tcp[ram].append(migration(ram, tcp="fresh"))
            runs[ram].append(migration(ram, fill=1.0, memory=True))
    rows = []
    for ram, rs in runs.items():
        ok = [r for r in rs if r.get("status") == "completed"]
        total = med(ok, "total-time")
        rows.append({"case": f"{ram // MiB} MiB", "ram": ram, "total_ms": total,
                     "s_per_gib": total / 1e3 / (ram / (1 << 30)) if total else None,
                     "round1_gb_per_s": med(ok, "first_round_gb_per_s"),
                     "overhead_bytes": med(ok, "peak_overhead_bytes"),
                     "tcp_fresh_ms": med(tcp[ram], lambda r: r.get("wall_s", 0) * 1e3 or None),
                     "completed": f"{len(ok)}/{len(rs)}"})
        r = rows[-1]
        if r["tcp_fresh_ms"]:
            r["tcp_s_per_gib"] = r["tcp_fresh_ms"] / 1e3 / (ram / (1 << 30))
    good = [r for r in rows if r["total_ms"] and r["overhead_bytes"]]
    fit = {}
    if len(good) >= 2:
        x = np.array([r["ram"] for r in good], float)
        t = np.array([r["total_ms"] for r in good], float)
        m = np.array([r["overhead_bytes"] for r in good], float)
        t_slope, t_const = np.polyfit(x, t, 1)
        m_slope, m_const = np.polyfit(x, m, 1)
        per = [r["s_per_gib"] for r in good]
        fit = {"time_ms_const": round(t_const, 1), "time_ms_per_gib": round(t_slope * (1 << 30), 1),
               "s_per_gib_spread": round(max(per) / min(per) - 1, 3),
               "memory_const_mib": round(m_const / MiB, 1),
               "memory_share_of_ram": round(m_slope, 4)}
        for r in rows:
            if r["total_ms"]:
                r["vs_linear"] = round(r["total_ms"] / (t_const + t_slope * r["ram"]), 3)
    payload = {"scenario": "scaling", "rows": rows, "fit": fit,
               "runs": {str(k): v for k, v in runs.items()},
               "tcp_fresh": {str(k): v for k, v in tcp.items()}}
    notes = [save("scenario_scaling", payload)]
    if args.json:
        print(json.dumps(payload))
        return 0
    print(format_table(rows, [
        ("case", "case", ""), ("total ms", "total_ms", ".0f"), ("s/GiB", "s_per_gib", ".2f"),
        ("round-1 GB/s", "round1_gb_per_s", ".2f"),
        ("memory beyond RAM MiB", lambda r: r["overhead_bytes"] and r["overhead_bytes"] / MiB,
         ".0f"), ("completed", "completed", ""), ("vs. linear fit", "vs_linear", ".2f"),
        ("raw TCP (fresh) s/GiB", "tcp_s_per_gib", ".2f")]))
    if fit:
        print(f"time = {fit['time_ms_const']:.0f} ms + {fit['time_ms_per_gib']:.0f} ms/GiB; "
              f"s/GiB varies {fit['s_per_gib_spread']:.0%} across sizes (target: within 20%)")
        print(f"memory beyond RAM = {fit['memory_const_mib']:.0f} MiB + "
              f"{fit['memory_share_of_ram']:.2%} of RAM (target: < 2% + a constant)")
    print(f"medians of {args.repeat}")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
