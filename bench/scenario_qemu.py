"""Scenario 0, against QEMU itself: the same idle guest RAM migrated by two QEMU 7.2 processes
over ``tcp:`` and by ``rdma-pipeline run`` over ``rdma:``, alternated, in one run.

    .venv/bin/python -m bench.scenario_qemu [--ram 1G] [--fill 0.67] [--repeat 3] [--json]

The contents are our synthetic guest's boot image (``Workload.boot``: the first ``--fill`` of
RAM stamped data, one page in ten zero), written to a file once; QEMU's source loads it with
``-device loader`` into ``-M none -m RAM`` and migrates to a second QEMU started with
``-incoming`` on loopback, ``max-bandwidth`` raised from QEMU's 128 MiB/s default to 10 GiB/s
(unlimited in practice); its ``total-time`` (setup included) is read with ``query-migrate``.
Ours is ``python -m pipeline run --ram RAM --dirty-rate 0 --fill FILL`` over ``rdma:`` (our
default machine: verification on), in a fresh process. Both rates are the data pages' bytes /
total-time; target 0 is ours at least 0.8x QEMU's (1.0x the goal after that). Each case runs
in a fresh process; the medians of ``--repeat`` runs, their spread and the load average are
printed, and the fastest run of each. QEMU's own time swings widely here from run to run
(0.3-2.3 s for 1 GiB, fresh processes each time): its fast runs switch over early, with about
140 ms of downtime, its slow ones send everything live (downtime 0-2 ms); memory compaction
before a run made no difference. Use --repeat 5 or more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

QEMU = shutil.which("qemu-system-x86_64")
TARGET, GOAL = 0.8, 1.0


def boot_image(path: str, ram: int, fill: float) -> int:
    """Our synthetic guest's boot contents of a ``ram``-byte block written to ``path`` (up to
    the last filled page); the bytes of non-zero pages."""
    from pipeline.guest.synthetic import GuestState, Workload
    from shm.memory import PAGE_SIZE, WORDS_PER_PAGE

    pages = ram // PAGE_SIZE
    upto = int(pages * fill)
    view = np.zeros((upto, WORDS_PER_PAGE), np.uint64)
    work = Workload(GuestState(), [pages])
    work.boot([view], 1.0)      # the first ``upto`` pages, exactly as a fill of ``fill``
    view.tofile(path)
    return int(np.count_nonzero(view[:, 0])) * PAGE_SIZE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qemu_case(image: str, ram: int, workdir: str) -> dict:
    """QEMU into QEMU over tcp: on loopback; QEMU's own figures."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "integration"))
    from qemu_vm import QemuVm

    port = free_port()
    with QemuVm(workdir, ram, incoming=True, name="dst") as dst, \
            QemuVm(workdir, ram, pattern=image, name="src") as src:
        dst.incoming(f"tcp:127.0.0.1:{port}")
        t0 = time.monotonic()
        src.migrate(f"tcp:127.0.0.1:{port}")
        status = src.wait_migration(300.0)
        wall = time.monotonic() - t0
        info = src.cmd("query-migrate")
        dst.wait_migration(60.0)
    ram_info = info.get("ram", {})
    return {"case": "qemu", "status": status, "total_ms": info.get("total-time"),
            "setup_ms": info.get("setup-time"), "downtime_ms": info.get("downtime"),
            "transferred": ram_info.get("transferred"), "wall_s": round(wall, 3)}


def ours_case(ram: int, fill: float) -> dict:
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", "--ram", str(ram),
                          "--dirty-rate", "0", "--fill", str(fill), "--guest-watch", "0",
                          "--json"], capture_output=True, text=True, timeout=900)
    try:
        s = json.loads(out.stdout)
    except json.JSONDecodeError:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": "rdma-pipeline", "status": "error", "error": last}
    return {"case": "rdma-pipeline", "status": s["status"], "verified": s.get("verified"),
            "total_ms": s["total-time"], "setup_ms": s["setup-time"],
            "downtime_ms": s.get("downtime"), "transferred": s["ram"]["transferred"]}


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import parse_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ram", default="1G")
    p.add_argument("--fill", type=float, default=0.67)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if QEMU is None:
        print("scenario_qemu: qemu-system-x86_64 is not installed (scripts/install)")
        return 2
    ram = parse_size(args.ram)
    runs: dict[str, list[dict]] = {"qemu": [], "rdma-pipeline": []}
    with tempfile.TemporaryDirectory(prefix="rdp-qemu-bench-") as workdir:
        image = os.path.join(workdir, "ram.img")
        data = boot_image(image, ram, args.fill)
        for _ in range(args.repeat):     # alternated: a shared machine's load hits both
            row = qemu_case(image, ram, workdir)
            row["load"] = round(os.getloadavg()[0], 2)
            runs["qemu"].append(row)
            row = ours_case(ram, args.fill)
            row["load"] = round(os.getloadavg()[0], 2)
            runs["rdma-pipeline"].append(row)
    rows = {}
    for case, rs in runs.items():
        ok = [r for r in rs if r.get("status") == "completed" and r.get("total_ms")]
        rows[case] = {"case": case, "runs": len(rs), "completed": len(ok),
                      "total_ms": statistics.median([r["total_ms"] for r in ok]) if ok else None,
                      "setup_ms": statistics.median([r["setup_ms"] for r in ok]) if ok else None,
                      "loads": [r["load"] for r in rs], "all": rs}
        if ok:
            rows[case]["data_gb_per_s"] = round(data / (rows[case]["total_ms"] / 1e3) / 1e9, 3)
    q, o = rows["qemu"], rows["rdma-pipeline"]
    ratio = (q["total_ms"] / o["total_ms"]) if q["total_ms"] and o["total_ms"] else None
    if args.json:
        print(json.dumps({"data_bytes": data, "rows": rows, "ratio": ratio}))
        return 0
    print(f"{data / (1 << 20):.0f} MiB of data in {ram >> 20} MiB of RAM, medians of "
          f"{args.repeat}, alternated")
    for r in rows.values():
        if r["total_ms"] is None:
            errs = {x.get("error") or x.get("status") for x in r["all"]}
            print(f"  {r['case']:<14} no completed run: {', '.join(map(str, errs))}")
            continue
        totals = [x["total_ms"] for x in r["all"] if x.get("total_ms")]
        print(f"  {r['case']:<14} total {r['total_ms']:7.0f} ms  setup {r['setup_ms']:5.0f} ms  "
              f"{r['data_gb_per_s']:.2f} GB/s of data  ({r['completed']}/{r['runs']} completed,"
              f" totals {min(totals):.0f}-{max(totals):.0f} ms,"
              f" load {min(r['loads'])}-{max(r['loads'])})")
    if ratio is not None:
        verdict = "met" if ratio >= TARGET else "NOT met"
        print(f"target 0: rdma-pipeline over rdma: at {ratio:.2f}x QEMU's tcp: data rate "
              f"(>= {TARGET}, goal {GOAL}): {verdict}")
        # QEMU's time here is bimodal (its fast runs switch over early with ~140 ms of
        # downtime; its slow ones send everything live): the fastest runs, side by side.
        best = {c: min(x["total_ms"] for x in r["all"] if x.get("total_ms"))
                for c, r in rows.items()}
        print(f"fastest runs: QEMU {best['qemu']:.0f} ms, ours {best['rdma-pipeline']:.0f} ms: "
              f"ours at {best['qemu'] / best['rdma-pipeline']:.2f}x QEMU's best")
    return 0


if __name__ == "__main__":
    sys.exit(main())
