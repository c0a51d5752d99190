"""The poster stage in GB/s of RDMA WRITEs, against a raw TCP socket between two processes.

    .venv/bin/python -m bench.bench_poster            # table (median of --repeat runs)
    .venv/bin/python -m bench.bench_poster --json     # one JSON line per case

Cases, each in a fresh interpreter (``--case NAME``) that spawns the receiving process:
    tcp-1m      1 MiB sendall() into recv_into() over loopback (the baseline, from
                bench_transport: the receiver's memory is faulted in beforehand)
    write-1m    1 MiB soft-provider RDMA WRITEs posted directly, every one signaled
                (bench_transport's case: the transport alone)
    poster-1m   the same writes through ``stages.poster.Poster``, as the poster stage posts them
                (256 outstanding, a completion every 16 writes, in-order retirement)
    tcp-4k / poster-4k   the same with 4 KiB writes (one page: a guest dirtying at random)
"""

from __future__ import annotations

import sys
import time

import numpy as np

from bench import bench_transport as transport
from bench.common import (
    rates,
    stage_cli,
    vs_text,
)
from bench.common import usage as _usage

MiB = 1 << 20
CASES = {   # name: (kind, write size, writes)
    "tcp-1m": ("tcp", MiB, 4096),
    "write-1m": ("write", MiB, 4096),
    "poster-1m": ("poster", MiB, 4096),
    "tcp-4k": ("tcp", 4096, 200_000),
    "poster-4k": ("poster", 4096, 200_000),
}
BASELINE = {"write-1m": "tcp-1m", "poster-1m": "tcp-1m", "poster-4k": "tcp-4k"}
METRIC = "gb_per_s"


def _poster(size: int, count: int) -> float:
    parent, child = transport.SPAWN.Pipe()
    peer = transport.SPAWN.Process(target=transport.verbs_target,
                                   args=(child, size, count, False))
    peer.start()
    try:
        return _post_through_poster(parent, size, count)
    finally:
        parent.send("done")
        peer.join(10)
        if peer.is_alive():
            peer.kill()
            peer.join()


def _post_through_poster(parent, size: int, count: int) -> float:
    from stages.poster import Poster, check_completions
    from stages.records import OP_END, OP_RUN, WRITE_DTYPE, records
    from stages.verbs import Access, SendOpcode, open_provider

    port, remote, rkey = parent.recv()
    source = np.full(transport.TARGET, 3, np.uint8)
    depth = 256
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(source.ctypes.data, source.nbytes, Access.LOCAL_WRITE)
        cq = ctx.create_cq(2 * depth + 16)
        qp = pd.create_qp(cq, cq, max_send_wr=depth, max_recv_wr=1)
        ctx.connect(qp, "127.0.0.1", port)
        per_target = transport.TARGET // size
        offsets = (np.arange(count, dtype=np.uint64) % per_target) * np.uint64(size)
        writes = records(WRITE_DTYPE, count + 1, op=OP_RUN, round=1, length=size, pages=1,
                         lkey=mr.lkey, rkey=rkey)
        body = writes[:-1]
        body["local_addr"] = np.uint64(mr.addr) + offsets
        body["remote_addr"] = np.uint64(remote) + offsets
        body["chunk"] = offsets // np.uint64(MiB)
        writes[-1]["op"] = OP_END

        def post(wr_id, laddr, length, lkey, raddr, rk, signaled):
            qp.post_send(wr_id, SendOpcode.RDMA_WRITE, laddr, length, lkey,
                         remote_addr=raddr, rkey=rk, signaled=signaled)

        poster = Poster(post, max_outstanding=depth)
        start = time.perf_counter()
        done = poster.on_writes(writes, time.monotonic())[0]
        drained = bool(len(done) and (done["op"] == OP_END).any())
        while not drained:
            cq.wait(10)
            ids = check_completions(cq.poll(64))
            comps, _ = poster.on_completions(ids, time.monotonic())
            drained = bool((comps["op"] == OP_END).any())
        return time.perf_counter() - start


def run_case(name: str) -> dict:
    kind, size, count = CASES[name]
    if kind == "poster":
        wall = _poster(size, count)
    else:
        wall = transport.run_case(f"{kind}-{'1m' if size == MiB else '4k'}")["wall_s"]
    return {"case": name, "size": size, "writes": count, **rates(size * count, wall),
            "writes_per_s": round(count / wall), **_usage()}


COLUMNS = [
    ("case", "case", ""),
    ("write B", "size", ""),
    ("GB/s", "gb_per_s", ".3f"),
    ("writes/s", "writes_per_s", ",.0f"),
    ("wall s", "wall_s", ".3f"),
    ("CPU s", "cpu_s", ".2f"),
    ("peak RSS MiB", "peak_rss_mib", ".0f"),
    ("vs. baseline", vs_text, ""),
]


def main(argv: list[str] | None = None) -> int:
    return stage_cli(argv, description=__doc__.splitlines()[0], module="bench.bench_poster",
                     cases=CASES,
                     run_case=run_case, metric=METRIC, baseline_of=BASELINE,
                     baselines=[c for c in CASES if c not in BASELINE], columns=COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
