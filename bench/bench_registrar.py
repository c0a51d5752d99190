"""The registrar stage in chunks/s registered and unregistered (with the real pinning), against
mlock/munlock of the same bytes.

    .venv/bin/python -m bench.bench_registrar            # table (median of --repeat runs)
    .venv/bin/python -m bench.bench_registrar --json     # one JSON line per case

Each case runs in a fresh interpreter (``--case NAME``) over a RAM region of ``SIZE`` bytes in
POSIX shared memory, either touched beforehand (the source's guest RAM) or fresh (a
destination's RAM, never written: pinning faults it in). ``register-*`` does what the registrar
does for every chunk: ``pd.reg_mr`` (pins with mlock), the export that lets the poster import
the MR (``stages.registrar.import_records``), then, once every chunk is registered, closes them
all (unpins). ``register-1m-batch`` registers and exports ``BATCH`` adjacent chunks at a time, as
the registrar does with the chunks of one REGISTER request (``pd.reg_mrs``: one mlock and one
PD-table write for the batch, still one MR a chunk). ``mlock-*``, the baseline, is ``mlock``
then ``munlock`` of the same chunks.
``chunks_per_s`` counts a chunk registered and unregistered; ``gb_per_s`` the bytes.
"""

from __future__ import annotations

import ctypes
import sys
import time

from bench.common import (
    rates,
)
from bench.common import usage as _usage
from shm.memory import Madv, libc, madvise

SIZE = 1 << 30
MiB = 1 << 20
# case -> (kind, chunk size, memory)
CASES = {
    "mlock-1m": ("mlock", MiB, "touched"),
    "register-1m": ("register", MiB, "touched"),
    "register-1m-batch": ("batch", MiB, "touched"),
    "mlock-4m": ("mlock", 4 * MiB, "touched"),
    "register-4m": ("register", 4 * MiB, "touched"),
    "mlock-16m": ("mlock", 16 * MiB, "touched"),
    "register-16m": ("register", 16 * MiB, "touched"),
    "mlock-1m-fresh": ("mlock", MiB, "fresh"),
    "register-1m-fresh": ("register", MiB, "fresh"),
}
BATCH = 64          # chunks per reg_mrs call in register-*-batch
BASELINE = {n: n.replace("register", "mlock").removesuffix("-batch")
            for n in CASES if n.startswith("register")}
METRIC = "chunks_per_s"


def run_case(case: str) -> dict:
    from shm import RamBlockSpec, RamRegion, naming

    kind, chunk, memory = CASES[case]
    n = SIZE // chunk
    with RamRegion.create(naming.new_run_id(), [RamBlockSpec("pc.ram", SIZE)]) as region:
        try:
            base = region.blocks[0].address
            if memory == "touched":
                madvise(base, SIZE, Madv.POPULATE_WRITE)
            if kind == "mlock":
                t0 = time.perf_counter()
                for c in range(n):
                    if libc.mlock(base + c * chunk, chunk):
                        raise OSError(ctypes.get_errno(), "mlock failed")
                t1 = time.perf_counter()
                for c in range(n):
                    libc.munlock(base + c * chunk, chunk)
                t2 = time.perf_counter()
            else:
                from stages.registrar import import_records
                from stages.verbs import open_provider
                from stages.verbs.base import Access

                with open_provider("soft").open_device() as ctx:
                    pd = ctx.alloc_pd()
                    pd.export()
                    per_call = BATCH if kind == "batch" else 1
                    t0 = time.perf_counter()
                    mrs = []
                    for c in range(0, n, per_call):
                        ranges = [(base + k * chunk, chunk) for k in range(c, min(n, c + per_call))]
                        batch = pd.reg_mrs(ranges, Access.NONE)
                        import_records(batch)
                        mrs.extend(batch)
                    t1 = time.perf_counter()
                    for mr in mrs:
                        mr.close()
                    t2 = time.perf_counter()
        finally:
            region.unlink()
    out = rates(SIZE, t2 - t0, records=n)
    out[METRIC] = out.pop("records_per_s")
    return {"case": case, "chunk_bytes": chunk, "chunks": n, **out,
            "register_ms": round((t1 - t0) * 1e3, 2), "unregister_ms": round((t2 - t1) * 1e3, 2),
            **_usage()}


def main(argv: list[str] | None = None) -> int:
    from bench.stages import module_main

    return module_main("registrar", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
