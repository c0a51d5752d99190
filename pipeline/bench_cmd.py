"""``rdma-pipeline bench``: per-stage benchmarks, each against a baseline from the same run.

Stages: ring (records/s, against multiprocessing.Queue), scanner (GB/s of RAM covered, against
numpy memcpy), registrar (chunks/s registered and unregistered, against mlock), poster (GB/s of
RDMA WRITEs, against a raw TCP socket), codec (control messages/s, against struct) and pipeline
(a whole migration, against raw TCP moving the same bytes). Every case runs in a fresh process
on seeded inputs; a table per stage shows medians, or ``--json`` prints one object per case.
The benchmark code is the ``bench`` package (installed with the project).
"""

from __future__ import annotations

import json
import sys

STAGE_NAMES = ("ring", "scanner", "registrar", "poster", "codec", "pipeline")


def add_arguments(p) -> None:
    p.add_argument("--stage", action="append", choices=STAGE_NAMES, metavar="NAME",
                   help=f"only this stage ({', '.join(STAGE_NAMES)}); repeatable")
    p.add_argument("--case", action="append", metavar="NAME",
                   help="only this case (and its baseline); repeatable")
    p.add_argument("--list", action="store_true",
                   help="list every stage's cases (the names --case takes) and exit")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each case; the median is shown (default 3)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line and case (medians, baseline figures, "
                        "vs_baseline) instead of tables")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and one contender per stage: checks that everything runs "
                        "(the figures mean nothing)")


def main(args) -> int:
    from bench.stages import STAGES, run_stage, table

    if args.repeat < 1:
        print("rdma-pipeline bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    stages = args.stage or STAGE_NAMES
    known = {stage: list(STAGES[stage].load().CASES) for stage in stages}
    if args.list:
        for stage, cases in known.items():
            print(f"{stage}: {', '.join(cases)}")
        return 0
    unknown = [c for c in args.case or () if not any(c in cases for cases in known.values())]
    if unknown:
        print(f"rdma-pipeline bench: no case {', '.join(unknown)} in "
              f"{', '.join(stages)} (bench --list shows the cases)", file=sys.stderr)
        return 2
    failed = False
    for stage in stages:
        if not args.json:
            print(f"== {stage} ==", flush=True)
        cases = None
        if args.case:
            cases = [c for c in args.case if c in known[stage]]
            if not cases:
                continue
        rows = run_stage(stage, repeat=args.repeat, quick=args.quick, cases=cases)
        failed |= any("error" in r for r in rows)
        if args.json:
            for r in rows:
                print(json.dumps(r, sort_keys=True), flush=True)
        else:
            print(table(stage, rows) + "\n", flush=True)
    return 1 if failed else 0
