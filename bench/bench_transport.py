"""Soft-provider transport between two processes, against plain TCP in the same run.

    .venv/bin/python -m bench.bench_transport            # table (median of --repeat runs)
    .venv/bin/python -m bench.bench_transport --json     # one JSON line per run of a case

Cases (each in a fresh interpreter, ``--case NAME``, which spawns the other process):
    tcp-1m        1 MiB sendall() into recv_into() over loopback: the baseline for write-1m
    write-1m      1 MiB RDMA WRITEs, every one signaled (as QEMU posts them), SQ of 64
    tcp-4k        4 KiB messages the same way: the baseline for write-4k
    write-4k      4 KiB RDMA WRITEs, every one signaled, posted one post_send at a time
    write-4k-b64  the same writes posted 64 at a time with post_writes (one WR array a call),
                  SQ of 256 (four batches in flight)
    tcp-rtt       16-byte ping-pong over a socket: the baseline for sendrecv-rtt
    sendrecv-rtt  16-byte SEND answered by a 16-byte SEND, a RECV always posted

Both ends write into memory faulted in beforehand (the target's registered 64 MiB, the TCP
receiver's 64 MiB), cycling through it. A WRITE counts when its completion arrives, which in
RC means the data is placed at the target. CPU is both processes (user + system).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time

import numpy as np

from bench.common import case_result, usage

MiB = 1 << 20
TARGET = 64 * MiB
CASES = {
    # name: (kind, message size, messages)
    "tcp-1m": ("tcp", MiB, 4096),
    "write-1m": ("write", MiB, 4096),
    "tcp-4k": ("tcp", 4096, 200_000),
    "write-4k": ("write", 4096, 200_000),
    "write-4k-b64": ("write-b64", 4096, 400_000),
    "tcp-rtt": ("tcp-rtt", 16, 20_000),
    "sendrecv-rtt": ("rtt", 16, 20_000),
}
BASELINE = {"write-1m": "tcp-1m", "write-4k": "tcp-4k", "write-4k-b64": "tcp-4k",
            "sendrecv-rtt": "tcp-rtt"}
BATCH = 64  # WRs a post_writes call in the write-*-b64 cases
SPAWN = mp.get_context("spawn")


# -- the other process ------------------------------------------------------------------
def tcp_receiver(conn, size: int, count: int, echo: bool) -> None:
    memory = np.ones(TARGET, np.uint8)  # faulted in
    view = memoryview(memory)
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(server.getsockname()[1])
        sock, _ = server.accept()
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        offset = 0
        for _ in range(count):
            chunk = view[offset:offset + size]
            got = 0
            while got < size:
                got += sock.recv_into(chunk[got:], size - got, socket.MSG_WAITALL)
            if echo:
                sock.sendall(chunk)
            offset = (offset + size) % TARGET
        sock.sendall(b"k")  # everything arrived
        sock.recv(1)


def verbs_target(conn, size: int, count: int, echo: bool) -> None:
    from stages.verbs import Access, SendOpcode, open_provider

    memory = np.ones(TARGET, np.uint8)
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(memory.ctypes.data, TARGET, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        cq = ctx.create_cq(1024)
        qp = pd.create_qp(cq, cq, max_send_wr=64, max_recv_wr=64)
        if echo:
            for i in range(32):
                qp.post_recv(i, mr.addr + i * 4096, 4096, mr.lkey)
        listener = ctx.listen("127.0.0.1", 0)
        conn.send((listener.port, mr.addr, mr.rkey))
        listener.get_request(30).accept(qp)
        if echo:  # answer each SEND with a SEND; re-post the RECV it consumed
            done = 0
            while done < count:
                cq.wait(10)
                for wc in cq.poll(64):
                    if wc.opcode >= 128:
                        slot = wc.wr_id
                        qp.post_recv(slot, mr.addr + slot * 4096, 4096, mr.lkey)
                        qp.post_send(1 << 20, SendOpcode.SEND, mr.addr + slot * 4096, size,
                                     mr.lkey)
                        done += 1
        conn.recv()  # the requester is done (the responder thread did all the work)


# -- the measuring process --------------------------------------------------------------
def _tcp(size: int, count: int, echo: bool) -> float:
    parent, child = SPAWN.Pipe()
    peer = SPAWN.Process(target=tcp_receiver, args=(child, size, count, echo))
    peer.start()
    port = parent.recv()
    source = np.full(size, 3, np.uint8)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = memoryview(source)
        reply = memoryview(bytearray(size))
        start = time.perf_counter()
        for _ in range(count):
            sock.sendall(view)
            if echo:
                sock.recv_into(reply, size, socket.MSG_WAITALL)
        sock.recv(1)
        wall = time.perf_counter() - start
        sock.sendall(b"x")
    peer.join()
    return wall


def _write(size: int, count: int, batch: int = 0) -> float:
    """``count`` signaled WRITEs, ``batch`` a post_writes call (0: one post_send each)."""
    from stages.verbs import Access, SendOpcode, open_provider
    from stages.verbs.base import WRITE_WR_DTYPE

    parent, child = SPAWN.Pipe()
    peer = SPAWN.Process(target=verbs_target, args=(child, size, count, False))
    peer.start()
    port, remote, rkey = parent.recv()
    source = np.full(size, 3, np.uint8)
    depth = max(64, 4 * batch)  # a batched poster keeps a few batches in flight
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(source.ctypes.data, size, Access.LOCAL_WRITE)
        cq = ctx.create_cq(depth * 2)
        qp = pd.create_qp(cq, cq, max_send_wr=depth, max_recv_wr=1)
        ctx.connect(qp, "127.0.0.1", port)
        wrs = np.zeros(max(batch, 1), WRITE_WR_DTYPE)
        wrs["addr"], wrs["length"], wrs["lkey"], wrs["rkey"] = mr.addr, size, mr.lkey, rkey
        wrs["signaled"] = 1
        steps = np.arange(len(wrs), dtype=np.uint64)
        posted = completed = offset = 0
        start = time.perf_counter()
        while completed < count:
            if batch:
                while posted < count and depth - (posted - completed) >= batch:
                    n = min(batch, count - posted)
                    wrs["wr_id"][:n] = steps[:n] + posted
                    wrs["remote_addr"][:n] = (steps[:n] * size + offset) % TARGET + remote
                    qp.post_writes(wrs[:n])
                    offset = (offset + n * size) % TARGET
                    posted += n
            while not batch and posted < count and posted - completed < depth:
                qp.post_send(posted, SendOpcode.RDMA_WRITE, mr.addr, size, mr.lkey,
                             remote_addr=remote + offset, rkey=rkey)
                offset = (offset + size) % TARGET
                posted += 1
            cq.wait(10)
            for wc in cq.poll(depth):
                if wc.status != 0:
                    raise RuntimeError(f"write {wc.wr_id} failed: {wc.status!r}")
                completed += 1
        wall = time.perf_counter() - start
    parent.send("done")
    peer.join()
    return wall


def _rtt(size: int, count: int) -> float:
    from stages.verbs import Access, SendOpcode, open_provider

    parent, child = SPAWN.Pipe()
    peer = SPAWN.Process(target=verbs_target, args=(child, size, count, True))
    peer.start()
    port, _remote, _rkey = parent.recv()
    buffer = np.zeros(8192, np.uint8)
    with open_provider("soft").open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(buffer.ctypes.data, 8192, Access.LOCAL_WRITE)
        send_cq, recv_cq = ctx.create_cq(64), ctx.create_cq(64)
        qp = pd.create_qp(send_cq, recv_cq, max_send_wr=16, max_recv_wr=4)
        qp.post_recv(0, mr.addr + 4096, 4096, mr.lkey)
        ctx.connect(qp, "127.0.0.1", port)
        start = time.perf_counter()
        for i in range(count):
            qp.post_send(i, SendOpcode.SEND, mr.addr, size, mr.lkey)
            while not recv_cq.poll(1):
                recv_cq.wait(10)
            qp.post_recv(0, mr.addr + 4096, 4096, mr.lkey)
            send_cq.poll(16)  # retire send slots
        wall = time.perf_counter() - start
    parent.send("done")
    peer.join()
    return wall


def run_case(name: str) -> dict:
    kind, size, count = CASES[name]
    if kind == "tcp":
        wall = _tcp(size, count, echo=False)
    elif kind == "tcp-rtt":
        wall = _tcp(size, count, echo=True)
    elif kind == "write":
        wall = _write(size, count)
    elif kind == "write-b64":
        wall = _write(size, count, BATCH)
    else:
        wall = _rtt(size, count)
    return {"case": name, "size": size, "messages": count, "bytes": size * count,
            "wall_s": round(wall, 4), **usage(),
            "gb_per_s": round(size * count / wall / 1e9, 3), "ops_per_s": round(count / wall)}


def _table(rows: list[dict]) -> str:
    by = {r["case"]: r for r in rows}
    lines = [f"{'case':14} {'size':>6} {'msgs':>8} {'wall s':>8} {'GB/s':>7} {'ops/s':>10} "
             f"{'cpu s':>6}  vs."]
    for r in rows:
        base = BASELINE.get(r["case"])
        vs = ""
        if base in by:
            vs = f"{r['ops_per_s'] / by[base]['ops_per_s']:.2f}x {base}"
        lines.append(f"{r['case']:14} {r['size']:>6} {r['messages']:>8} {r['wall_s']:>8.3f} "
                     f"{r['gb_per_s']:>7.3f} {r['ops_per_s']:>10} {r['cpu_s']:>6.2f}  {vs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median shown)")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return 0
    names = [n for n in CASES if args.k in n]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.repeat):
        for name in names:  # interleaved, so drift hits baseline and contender alike
            row = case_result("bench.bench_transport", name)
            runs[name].append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    medians = []
    for name in names:
        rows = sorted(runs[name], key=lambda r: r["wall_s"])
        row = dict(rows[len(rows) // 2])
        base = BASELINE.get(name)
        if base in runs:
            row["vs_baseline"] = round(
                row["ops_per_s"] / statistics.median(r["ops_per_s"] for r in runs[base]), 3)
        medians.append(row)
    if args.json:
        for row in medians:
            print(json.dumps({"median": True, **row}), flush=True)
    else:
        print(_table(medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())
