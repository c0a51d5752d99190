"""Busy-guest live migrations with each dirty source: rounds, downtime, total time, converged.

Cases (guest / dirty tracking):

    synthetic-soft   the synthetic guest marking its own dirty log (the software default)
    synthetic-uffd   the same guest, no dirty log: userfaultfd WP + PAGEMAP_SCAN by the scanner
    kvm-kvm          a KVM guest (CPL3 page writer) with KVM's dirty log, fetched on request
    kvm-uffd         the same KVM guest, KVM logging off, its VMM mapping write-protected

Every case is a whole ``run_local`` migration (guest, source stages, destination process, soft
provider over loopback) of the same workload: ``--ram`` of RAM written in order, one sweep
after another, at ``--dirty-rate`` MB/s (the synthetic guest with the ``sequential`` pattern and no
zero pages, so both guests dirty the same number of distinct pages per second). Each run is a
fresh subprocess printing one JSON line; ``--repeat`` runs per case, the table shows medians and
the "vs." column compares downtime with synthetic-soft from the same invocation. Figures are
wall-clock on a shared machine: compare rows of one run, not runs of different days.

    python -m bench.bench_real_guests [--ram 256M] [--dirty-rate 100] [--repeat 3] [-k kvm]
                                      [--parameter downtime-limit=300 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from bench.common import mib_of

CASES = {  # name: (guest, dirty tracking)
    "synthetic-soft": ("synthetic", "soft"),
    "synthetic-uffd": ("synthetic", "uffd"),
    "kvm-kvm": ("kvm", "kvm"),
    "kvm-uffd": ("kvm", "uffd"),
}
BASELINE = "synthetic-soft"
MIB = 1 << 20


def run_case(name: str, ram_mib: int, dirty_mb: float, parameters: list[str]) -> dict:
    """One migration of case ``name`` in this process; the JSON row."""
    from pipeline.api import run_local
    from pipeline.config import MigrationConfig
    from pipeline.guest.factory import GuestSpec
    from pipeline.guest.synthetic import GuestState
    from shm.errors import MigrationError

    kind, tracking = CASES[name]
    row = {"case": name, "guest": kind, "tracking": tracking, "ram_mib": ram_mib,
           "dirty_mb": dirty_mb}
    state = GuestState(dirty_rate=int(dirty_mb * 1e6), pattern="sequential", zero_share=0.0)
    spec = GuestSpec(kind, tracking, state, fill=0.0)
    try:
        spec.check()
        summary = run_local(ram_mib * MIB, MigrationConfig().with_options([], parameters),
                            guest=spec)
    except MigrationError as exc:
        return {**row, "error": str(exc)}
    ram = summary["ram"]
    return {**row, "status": summary["status"], "converged": summary["status"] == "completed",
            "verified": summary.get("verified"), "rounds": summary["round"],
            "syncs": ram["dirty-sync-count"], "downtime_ms": summary.get("downtime"),
            "total_ms": summary["total-time"], "setup_ms": summary["setup-time"],
            "transferred_mib": round(ram["transferred"] / MIB, 1),
            "dirty_rate_mb": round(ram["dirty-pages-rate"] * 4096 / 1e6, 1),
            "tracking_ran": summary.get("dirty-tracking"),
            "error": summary.get("error-desc", "")}


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(name: str, rows: list[dict]) -> dict:
    """Medians over the repeats of one case."""
    done = [r for r in rows if "status" in r]
    out = {"case": name, "runs": len(rows),
           "converged": sum(1 for r in done if r["converged"])}
    for key in ("rounds", "downtime_ms", "total_ms", "setup_ms", "transferred_mib",
                "dirty_rate_mb"):
        out[key] = _median([r for r in done if r["converged"]] or done, key)
    errors = [r["error"] for r in rows if r.get("error")]
    if errors:
        out["error"] = errors[0]
    return out


def _fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def table(summaries: list[dict]) -> str:
    base = next((s["downtime_ms"] for s in summaries if s["case"] == BASELINE), None)
    head = (f"{'case':<16}{'converged':>10}{'rounds':>8}{'downtime ms':>13}{'vs.':>7}"
            f"{'total ms':>10}{'sent MiB':>10}{'dirty MB/s':>12}")
    lines = [head, "-" * len(head)]
    for s in summaries:
        vs = "-" if not base or s["downtime_ms"] is None else f"{s['downtime_ms'] / base:.2f}x"
        lines.append(f"{s['case']:<16}{s['converged']:>5}/{s['runs']:<4}"
                     f"{_fmt(s['rounds'], '.1f'):>8}{_fmt(s['downtime_ms']):>13}{vs:>7}"
                     f"{_fmt(s['total_ms']):>10}{_fmt(s['transferred_mib']):>10}"
                     f"{_fmt(s['dirty_rate_mb']):>12}")
        if s.get("error"):
            lines.append(f"    {s['error'][:96]}")
    return "\n".join(lines)


def _one(name: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_real_guests", "--case", name,
           "--ram", f"{args.ram_mib}M", "--dirty-rate", str(args.dirty_mb)]
    for p in args.parameter:
        cmd += ["--parameter", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    if lines:
        return json.loads(lines[-1])
    return {"case": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ram", type=mib_of, metavar="SIZE", default=256, dest="ram_mib",
                   help="guest RAM, e.g. 256M or 1G (default 256M)")
    p.add_argument("--ram-mib", type=int, dest="ram_mib", help=argparse.SUPPRESS)  # old name
    p.add_argument("--dirty-rate", type=float, default=100.0, dest="dirty_mb", metavar="MB/S",
                   help="MB/s each guest writes, as for rdma-pipeline run (default 100)")
    p.add_argument("--dirty-mb", type=float, dest="dirty_mb", help=argparse.SUPPRESS)  # old name
    p.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    p.add_argument("--parameter", action="append", default=[], metavar="NAME=VALUE",
                   help="a migration parameter, as for rdma-pipeline run")
    p.add_argument("-k", default="", help="run only cases whose name contains this")
    p.add_argument("--json", action="store_true", help="print one JSON line per run")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one run in this process
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.ram_mib, args.dirty_mb, args.parameter)),
              flush=True)
        return 0
    summaries = []
    for name in CASES:
        if args.k not in name:
            continue
        rows = []
        for _ in range(max(1, args.repeat)):
            row = _one(name, args)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
        summaries.append(summarize(name, rows))
    if not args.json:
        print(table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
