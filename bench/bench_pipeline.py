"""A whole migration (guest, source stages, destination), against raw TCP moving the same bytes.

    .venv/bin/python -m bench.bench_pipeline            # table (median of --repeat runs)
    .venv/bin/python -m bench.bench_pipeline --json     # one JSON line per case

Each case runs in a fresh interpreter (``--case NAME``). The guest is idle, ``RAM`` bytes, every
page non-zero. ``gb_per_s`` is the first round's throughput (bytes sent / round time, QEMU's
``mbps``: the round that moves all of RAM); ``end_to_end_gb_per_s`` is RAM / total-time (process
start, setup, rounds, switchover, verification and resume included). Baselines, in the same
invocation: ``tcp-fresh``, the same bytes over a loopback TCP socket into a receiver's fresh
shared memory (faulted in by the receiver inside the timing, as the destination must), and
``tcp-warm``, into memory faulted in beforehand (the link's ceiling).
"""

from __future__ import annotations

import sys

from bench.common import usage as _usage

RAM = 512 << 20
CASES = {
    "tcp-warm": ("tcp", True),
    "tcp-fresh": ("tcp", False),
    "migrate-pin-off": ("migrate", False),
    "migrate-pin-on": ("migrate", True),
}
BASELINE = {"migrate-pin-off": "tcp-fresh", "migrate-pin-on": "tcp-fresh",
            "tcp-fresh": "tcp-warm"}


def run_case(name: str) -> dict:
    from bench.migration import run_migration, tcp_copy

    kind, flag = CASES[name]
    if kind == "tcp":
        out = tcp_copy(RAM, warm=flag)
        return {"case": name, **out, "end_to_end_gb_per_s": out["gb_per_s"], **_usage()}
    s = run_migration(RAM, pin_all=flag)
    total = s["total-time"] / 1e3
    return {"case": name, "status": s["status"], "verified": s.get("verified"), "bytes": RAM,
            "wall_s": round(total, 4), "gb_per_s": s.get("first_round_gb_per_s"),
            "end_to_end_gb_per_s": s["end_to_end_gb_per_s"],
            "pages_per_s": round(RAM / 4096 / total) if total else None,
            "setup_ms": s["setup-time"], "downtime_ms": s.get("downtime"),
            "rounds": len(s["rounds"]), **_usage()}


def main(argv: list[str] | None = None) -> int:
    from bench.stages import module_main

    return module_main("pipeline", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
