"""Whole migrations and their raw-TCP baseline, measured the same way for every scenario.

``run_migration`` runs ``pipeline.api.run_local`` (guest, destination and source on this
machine, soft provider over loopback) and returns the query-migrate summary plus what the
scenarios need: the rounds (throughput, dirty rate, bytes left after each), the first round's
throughput (QEMU's ``mbps``: bytes sent / round time), and the peak memory beyond the guest RAM,
sampled every 50 ms over every process of the run (anonymous memory of each, plus every shared
segment of the run other than the two RAM regions).

``tcp_copy`` is the baseline: ``size`` bytes of non-zero data in one process's shared memory
sent over a loopback TCP socket, 1 MiB per ``sendall``, into another process's shared memory
with ``recv_into``. ``warm``: the receiver's memory is faulted in before the clock starts (the
link's ceiling); otherwise the receiver faults its fresh memory in, in bulk, inside the timing
(what a destination that has never touched its RAM must do).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time

import numpy as np

from shm.memory import PAGE_SIZE, Madv, madvise

MiB = 1 << 20
PIECE = MiB
_SPAWN = mp.get_context("spawn")


# -- memory of a run ------------------------------------------------------------------------
def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = {root}, {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _anonymous(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _shm_besides_ram(run_id: str) -> int:
    total = 0
    for name in os.listdir("/dev/shm"):
        if run_id in name and not name.endswith("ram"):
            try:
                total += os.stat(f"/dev/shm/{name}").st_blocks * 512
            except OSError:
                pass
    return total


class MemorySampler:
    """Peak of (anonymous memory of this process tree + the run's non-RAM segments)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.run_id = ""
        self.peak = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mem-sampler")

    def sample(self) -> int:
        pids = _descendants(os.getpid())
        used = sum(_anonymous(p) for p in pids)
        if self.run_id:
            used += _shm_besides_ram(self.run_id)
        if used > self.peak:
            self.peak, self.peak_processes = used, len(pids)
        return used

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- migrations ---------------------------------------------------------------------------
class RoundRecorder:
    """Snapshots from ``run_local``'s progress callback, one kept per round."""

    def __init__(self) -> None:
        self.by_round: dict[int, dict] = {}
        self.t0 = time.monotonic()

    def __call__(self, st: dict) -> None:
        r = st.get("round", 0)
        if r and r not in self.by_round:
            ram = st["ram"]
            self.by_round[r] = {"round": r, "t_s": round(time.monotonic() - self.t0, 3),
                                "mbps": ram["mbps"], "remaining": ram["remaining"],
                                "dirty_pages_rate": ram["dirty-pages-rate"]}

    def rounds(self) -> list[dict]:
        return [self.by_round[r] for r in sorted(self.by_round)]


def run_migration(ram: int, *, pin_all: bool = False, dirty_rate: int = 0, fill: float = 1.0,
                  zero_share: float = 0.0, pattern: str = "uniform", seed: int = 1,
                  parameters: list[str] = (), memory: bool = False,
                  prealloc: bool = False) -> dict:
    """One local migration; the summary with ``rounds``, ``first_round_gb_per_s``,
    ``end_to_end_gb_per_s`` and (``memory``) ``peak_overhead_bytes``."""
    from pipeline.api import LocalRun
    from pipeline.config import MigrationConfig
    from pipeline.guest.synthetic import GuestState

    config = MigrationConfig().with_options([f"rdma-pin-all={'on' if pin_all else 'off'}"],
                                            list(parameters))
    state = GuestState(seed=seed, pattern=pattern, zero_share=zero_share,
                       dirty_rate=int(dirty_rate))
    recorder = RoundRecorder()
    sampler = MemorySampler()
    with LocalRun(ram, config, state=state, fill=fill, dest_prealloc=prealloc) as lr:
        sampler.run_id = lr.run_id
        with sampler if memory else _Null():
            mig = lr.start()
            recorder.t0 = time.monotonic()
            while not mig.done:
                recorder(mig.stats())
                mig._done.wait(0.01)
            summary = lr.finish()
    rounds = summary.get("rounds") or recorder.rounds()
    summary["rounds"] = rounds
    first = rounds[0] if rounds else {}
    if "seconds" in first and first["seconds"]:
        summary["first_round_gb_per_s"] = round(first["bytes"] / first["seconds"] / 1e9, 3)
    elif first:
        summary["first_round_gb_per_s"] = round(first["mbps"] / 8e3, 3)
    total_s = summary["total-time"] / 1e3
    summary["end_to_end_gb_per_s"] = round(ram / total_s / 1e9, 3) if total_s else None
    if memory:
        summary["peak_overhead_bytes"] = sampler.peak
    return summary


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


# -- the raw TCP baseline ----------------------------------------------------------------------
def _populate(buf: np.ndarray) -> None:
    if not madvise(buf.ctypes.data, buf.nbytes, Madv.POPULATE_WRITE):
        buf[::PAGE_SIZE] = 0                              # older kernel: touch instead


def _receiver(conn, size: int, warm: bool) -> None:
    from shm import RamBlockSpec, RamRegion, naming

    with RamRegion.create(naming.new_run_id(), [RamBlockSpec("dst", size)],
                          kind="dstram") as region:
        try:
            view = region.blocks[0].view
            if warm:
                _populate(view)
            mem = memoryview(view)
            with socket.create_server(("127.0.0.1", 0)) as server:
                conn.send(server.getsockname()[1])
                sock, _ = server.accept()
            with sock:
                if not warm:
                    _populate(view)      # first thing once the clock runs: fault in bulk
                got = 0
                while got < size:
                    n = sock.recv_into(mem[got:], min(PIECE, size - got))
                    if not n:
                        raise ConnectionError("sender went away")
                    got += n
                sock.sendall(b"k")
                sock.recv(1)
            mem.release()
        finally:
            region.unlink()


def tcp_copy(size: int, *, warm: bool = True) -> dict:
    """Move ``size`` bytes between two processes over loopback TCP (see the module doc)."""
    from shm import RamBlockSpec, RamRegion, naming

    parent, child = _SPAWN.Pipe()
    peer = _SPAWN.Process(target=_receiver, args=(child, size, warm))
    with RamRegion.create(naming.new_run_id(), [RamBlockSpec("src", size)]) as region:
        try:
            src = region.blocks[0].view
            words = src.view(np.uint64)
            for p0 in range(0, len(words), 32 << 17):          # 32 MiB at a time
                seg = words[p0:p0 + (32 << 17)]
                seg[:] = np.arange(p0, p0 + len(seg), dtype=np.uint64) * np.uint64(
                    0x9E3779B97F4A7C15) | np.uint64(1)
            peer.start()
            port = parent.recv()
            mem = memoryview(src)
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                start = time.perf_counter()
                for off in range(0, size, PIECE):
                    sock.sendall(mem[off:off + PIECE])
                sock.recv(1)
                wall = time.perf_counter() - start
                sock.sendall(b"x")
            mem.release()
            peer.join(30)
        finally:
            if peer.is_alive():
                peer.kill()
                peer.join()
            region.unlink()
    return {"bytes": size, "wall_s": round(wall, 4), "gb_per_s": round(size / wall / 1e9, 3)}


def main(argv: list[str] | None = None) -> int:
    """One migration or one baseline in this process, as one JSON line (for the scenarios,
    which run each in a fresh interpreter)."""
    import argparse
    import json

    from pipeline.config import parse_size

    p = argparse.ArgumentParser(description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ram", default="1G")
    p.add_argument("--tcp", choices=("warm", "fresh"), help="the raw TCP baseline instead")
    p.add_argument("--pin-all", action="store_true")
    p.add_argument("--dirty-rate", type=float, default=0.0, help="bytes/s the guest writes")
    p.add_argument("--fill", type=float, default=1.0)
    p.add_argument("--zero-share", type=float, default=0.0)
    p.add_argument("--pattern", default="uniform")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--parameter", action="append", default=[])
    p.add_argument("--memory", action="store_true", help="sample the run's memory")
    p.add_argument("--prealloc", action="store_true",
                   help="the destination faults its RAM in before the source connects")
    args = p.parse_args(argv)
    ram = parse_size(args.ram)
    if args.tcp:
        out = {"case": f"tcp-{args.tcp}", **tcp_copy(ram, warm=args.tcp == "warm")}
    else:
        out = run_migration(ram, pin_all=args.pin_all, dirty_rate=int(args.dirty_rate),
                            fill=args.fill, zero_share=args.zero_share, pattern=args.pattern,
                            seed=args.seed, parameters=args.parameter, memory=args.memory,
                            prealloc=args.prealloc)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
