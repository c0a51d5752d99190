"""Ring throughput and wake-up latency between two processes, against multiprocessing.Queue.

    .venv/bin/python -m bench.bench_ring            # table
    .venv/bin/python -m bench.bench_ring --json     # one JSON line per case

Each case runs in a fresh interpreter (``--case NAME``) that spawns the producer process and
prints one JSON line: records, wall and CPU seconds (both processes), peak RSS, and
``records_per_s`` or latency percentiles. Records are shm.RUN_DTYPE (16 bytes). The baselines
run in the same invocation: ``multiprocessing.Queue`` with one tuple per record (how a Queue is
normally used), and with the same numpy batches pickled through it.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import time

import numpy as np

from shm import RUN_DTYPE, Ring, naming

CAPACITY = 1 << 16
# case -> (kind, batch, records)
CASES = {
    "queue-b1": ("queue", 1, 100_000),
    "ring-b1": ("ring", 1, 300_000),
    "queue-b64": ("queue", 64, 2_000_000),
    "ring-b64": ("ring", 64, 4_000_000),
    "queue-b4096": ("queue", 4096, 20_000_000),
    "ring-b4096": ("ring", 4096, 40_000_000),
    "queue-latency": ("queue-latency", 1, 1000),
    "ring-latency": ("ring-latency", 1, 1000),
}
BASELINE = {"ring-b1": "queue-b1", "ring-b64": "queue-b64", "ring-b4096": "queue-b4096",
            "ring-latency": "queue-latency", "queue-b64": "queue-b1", "queue-b4096": "queue-b1"}
LATENCY_GAP = 0.002  # the producer sleeps this long so that the consumer is asleep when it sends


def ring_producer(name: str, batch: int, records: int, go) -> None:
    ring = Ring.attach(name, RUN_DTYPE, role="producer")
    data = np.zeros(batch, RUN_DTYPE)
    data["n_pages"] = 1
    go.send("ready")
    go.recv()
    for _ in range(records // batch):
        ring.push(data)
    ring.close_write()
    ring.close()


def queue_producer(queue, batch: int, records: int, go) -> None:
    data = np.zeros(batch, RUN_DTYPE)
    go.send("ready")
    go.recv()
    if batch == 1:
        for i in range(records):
            queue.put((0, i, 1))
    else:
        for _ in range(records // batch):
            queue.put(data)
    queue.put(None)


def ring_latency_producer(name: str, samples: int, go) -> None:
    ring = Ring.attach(name, RUN_DTYPE, role="producer")
    record = np.zeros(1, RUN_DTYPE)
    go.send("ready")
    go.recv()
    for _ in range(samples):
        time.sleep(LATENCY_GAP)
        record["first_page"] = time.perf_counter_ns()  # CLOCK_MONOTONIC: one clock for both
        ring.push(record)
    ring.close_write()
    ring.close()


def queue_latency_producer(queue, samples: int, go) -> None:
    go.send("ready")
    go.recv()
    for _ in range(samples):
        time.sleep(LATENCY_GAP)
        queue.put(time.perf_counter_ns())
    queue.put(None)


def run_case(case: str) -> dict:
    kind, batch, records = CASES[case]
    records -= records % batch
    ctx = mp.get_context("spawn")
    go, child_go = ctx.Pipe()
    result: dict = {"case": case, "batch": batch, "records": records}
    latencies: list[int] = []
    ring = queue = None
    if kind.startswith("ring"):
        ring = Ring.create(naming.segment_name(naming.new_run_id(), "bench"), RUN_DTYPE,
                           CAPACITY, role="consumer")
        target, args = ((ring_producer, (ring.name, batch, records, child_go)) if kind == "ring"
                        else (ring_latency_producer, (ring.name, records, child_go)))
    else:
        queue = ctx.Queue()
        target, args = ((queue_producer, (queue, batch, records, child_go)) if kind == "queue"
                        else (queue_latency_producer, (queue, records, child_go)))
    proc = ctx.Process(target=target, args=args)
    proc.start()
    try:
        assert go.recv() == "ready"
        cpu0 = time.process_time()
        start = time.perf_counter()
        go.send("go")
        got = 0
        if ring is not None:
            while True:
                out = ring.pop(max(batch, 4096))
                if out.size == 0:
                    break
                if kind == "ring-latency":
                    latencies.append(time.perf_counter_ns() - int(out["first_page"][0]))
                got += out.size
        else:
            while (item := queue.get()) is not None:
                if kind == "queue-latency":
                    latencies.append(time.perf_counter_ns() - item)
                got += 1 if batch == 1 else len(item)
        wall = time.perf_counter() - start
        cpu_self = time.process_time() - cpu0
    finally:
        proc.join(60)
        if ring is not None:
            ring.__exit__(None, None, None)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    assert got == records, (got, records)
    result.update(wall_s=round(wall, 4), cpu_s=round(cpu_self + child.ru_utime + child.ru_stime, 4),
                  peak_rss_mib=round(max(me.ru_maxrss, child.ru_maxrss) / 1024, 1))
    if latencies:
        lat = np.array(latencies) / 1000
        result.update(p50_us=round(float(np.percentile(lat, 50)), 1),
                      p99_us=round(float(np.percentile(lat, 99)), 1))
    else:
        result["records_per_s"] = round(records / wall)
    return result


def main(argv: list[str] | None = None) -> int:
    from bench.stages import module_main

    return module_main("ring", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
