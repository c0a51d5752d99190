"""Scenario 3, a busy guest: dirty rates at 25%, 50% and 90% of scenario 2's throughput; rounds,
downtime against downtime-limit, total time, whether it converged.

    .venv/bin/python -m bench.scenario_busy [--ram 1G] [--throughput GB/s] [--repeat 3] [--plot]

The guest writes uniformly random pages of its 1 GiB (10% of them zero) at the given rate; the
source iterates until the expected downtime fits ``downtime-limit`` (300 ms), and gives up
after ``x-max-rounds`` (30) rounds. The throughput comes from bench/results/scenario_full.json
(run scenario_full first) or ``--throughput``. Targets: converges at 25% and 50% with a
measured downtime under 300 ms.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.common import RESULTS, format_table
from bench.scenario_common import med, migration, plot, save

SHARES = (0.25, 0.50, 0.90)
LIMIT_MS = 300


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import parse_size

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ram", default="1G")
    p.add_argument("--throughput", type=float, help="GB/s (default: scenario_full's result)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--plot", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ram = parse_size(args.ram)
    gbps = args.throughput
    if gbps is None:
        try:
            gbps = json.loads((RESULTS / "scenario_full.json").read_text())["throughput_gb_per_s"]
        except (OSError, KeyError, ValueError):
            print("scenario_busy: no throughput: run bench.scenario_full first or pass "
                  "--throughput GB/s", file=sys.stderr)
            return 2
    runs: dict[float, list[dict]] = {s: [] for s in SHARES}
    for _ in range(args.repeat):
        for share in SHARES:
            runs[share].append(migration(ram, fill=1.0, zero_share=0.1,
                                         dirty_rate=share * gbps * 1e9,
                                         parameters=[f"downtime-limit={LIMIT_MS}"]))
    rows = []
    for share, rs in runs.items():
        ok = [r for r in rs if r.get("status") == "completed"]
        rows.append({
            "case": f"{share:.0%} of {gbps:.2f} GB/s", "share": share,
            "dirty_rate_mb_per_s": share * gbps * 1e3,
            "measured_dirty_mb_per_s": med(rs, lambda r: max(
                (x.get("dirty-pages-rate", 0) for x in r.get("rounds", [])), default=None)
                and max(x.get("dirty-pages-rate", 0) for x in r["rounds"]) * 4096 / 1e6),
            "converged": f"{len(ok)}/{len(rs)}",
            "rounds": med(rs, lambda r: len(r.get("rounds", [])) or None),
            "downtime_ms": med(ok, "downtime"), "limit_ms": LIMIT_MS,
            "total_ms": med(ok, "total-time"),
            "verified": all(r.get("verified") for r in ok) if ok else None,
            "reason": next((r.get("error-desc") or r.get("error") for r in rs
                            if r not in ok), ""),
        })
    payload = {"scenario": "busy", "ram": ram, "throughput_gb_per_s": gbps, "rows": rows,
               "runs": {str(k): v for k, v in runs.items()}}
    notes = [save("scenario_busy", payload)]
    if args.plot:
        notes.append(plot("scenario_busy", {f"{s:.0%}": rs[0] for s, rs in runs.items() if rs},
                          "Scenario 3: busy guest, uniform random writes"))
    if args.json:
        print(json.dumps(payload))
        return 0
    print(format_table(rows, [
        ("case", "case", ""), ("dirty MB/s", "dirty_rate_mb_per_s", ".0f"),
        ("seen MB/s", "measured_dirty_mb_per_s", ".0f"), ("converged", "converged", ""),
        ("rounds", "rounds", ".0f"), ("downtime ms", "downtime_ms", ".0f"),
        ("limit ms", "limit_ms", ""), ("total ms", "total_ms", ".0f"),
        ("verified", "verified", ""), ("why not", "reason", "")]))
    print(f"guest RAM {ram / (1 << 30):g} GiB, uniform random writes; medians of {args.repeat}")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
