"""A synthetic guest: a process that writes RAM at a set rate and logs what it wrote.

``Workload`` is the deterministic part (no I/O, no clock): batch ``k`` of a guest with seed
``s`` always writes the same pages with the same contents, so a guest resumed on the destination
from its state (``GuestState``: seed, batch counter, sequential position, pages written)
continues exactly where the source stopped it. Pages are written whole, vectorised (a uint64 view
of shape ``(pages, 512)``), each non-zero page stamped with a value derived from (seed, batch,
page); a set share of the pages written are zero pages. Every page is marked in the dirty log
*after* it is written, so a scanner that fetch-and-clears the log never misses a write.

``guest_main`` is the process (see ``stages.harness``): it attaches the region and the dirty log
by name, fills its RAM once ("boots"), reports ready, then writes at ``dirty_rate`` bytes/s,
answering ``pause`` / ``resume`` / ``state`` / ``throttle`` / ``stop`` on its pipe between
batches (``throttle``, auto-converge's, scales its write rate; the state it migrates keeps the
rate it was given). With
``tracking="uffd"`` it keeps no dirty log at all: after booting it arms its own mapping of the
RAM with userfaultfd write-protect (``shm.uffd.arm``), reports that mapping's (address, length)
per block in its ready message, and the scanner harvests the pages it wrote from
``/proc/<pid>/pagemap``; the guest's code is the same, only ``mark`` is gone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.guest.owner import GuestProcess
from pipeline.sections import SYNTHETIC_SECTION
from shm.memory import PAGE_SIZE, WORDS_PER_PAGE

PATTERNS = ("uniform", "hotspot", "sequential")
TICK = 0.01                  # seconds between batches at a non-zero rate
MAX_BATCH_PAGES = 16384      # 64 MiB per batch at most


@dataclass
class GuestState:
    """Everything needed to resume the same guest elsewhere."""

    seed: int = 1
    pattern: str = "uniform"
    zero_share: float = 0.1
    dirty_rate: int = 0          # bytes/s
    batch: int = 0               # batches written so far
    position: int = 0            # next page of the sequential pattern (global page number)
    pages_written: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> GuestState:
        return cls(**json.loads(data.decode()))


def page_stamp(seed: int, batch: np.ndarray | int, pages: np.ndarray) -> np.ndarray:
    """Non-zero uint64 stamp of each page written by ``batch``."""
    pages = np.asarray(pages, dtype=np.uint64)
    v = (np.uint64(seed & 0xFFFF) << np.uint64(48)) ^ (np.uint64(batch) << np.uint64(24)) ^ pages
    return v | np.uint64(1 << 63)


class Workload:
    """Which pages batch ``k`` writes and what it writes there, over blocks of given sizes."""

    def __init__(self, state: GuestState, block_pages: list[int]) -> None:
        if state.pattern not in PATTERNS:
            raise ValueError(f"pattern {state.pattern!r}: use one of {', '.join(PATTERNS)}")
        if not 0.0 <= state.zero_share <= 1.0:
            raise ValueError("zero share must be between 0 and 1")
        self.state = state
        self.block_pages = list(block_pages)
        self.starts = np.cumsum([0] + self.block_pages)   # global page number of each block
        self.total_pages = int(self.starts[-1])

    def pick(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Global page numbers and zero flags of the next batch (advances the state)."""
        st = self.state
        rng = np.random.default_rng([st.seed, st.batch])
        total = self.total_pages
        if st.pattern == "uniform":
            pages = rng.integers(0, total, n, dtype=np.int64)
        elif st.pattern == "hotspot":
            hot = max(1, total // 10)
            in_hot = rng.random(n) < 0.9
            pages = np.where(in_hot, rng.integers(0, hot, n), rng.integers(0, total, n))
        else:
            pages = (st.position + np.arange(n, dtype=np.int64)) % total
            st.position = int((st.position + n) % total)
        zero = rng.random(n) < st.zero_share
        return pages.astype(np.int64), zero

    def split(self, pages: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(block index, block-relative pages) for each block hit by ``pages``."""
        blk = np.searchsorted(self.starts, pages, side="right") - 1
        out = []
        for b in np.unique(blk):
            sel = pages[blk == b] - self.starts[b]
            out.append((int(b), sel))
        return out

    def write_batch(self, views: list[np.ndarray], n: int, mark=None) -> int:
        """Write batch of ``n`` pages into ``views`` (uint64, (pages, 512) per block)."""
        st = self.state
        pages, zero = self.pick(n)
        stamps = page_stamp(st.seed, st.batch, pages)
        stamps[zero] = 0
        blk = np.searchsorted(self.starts, pages, side="right") - 1
        for b in np.unique(blk):
            sel = blk == b
            local = pages[sel] - self.starts[b]
            views[b][local] = stamps[sel][:, None]
            if mark is not None:
                mark(int(b), np.unique(local))
        st.batch += 1
        st.pages_written += n
        return n

    def boot(self, views: list[np.ndarray], fill: float) -> None:
        """Fill the first ``fill`` share of every block with stamped data (not logged)."""
        share = self.state.zero_share
        zero_every = 0 if share <= 0 else max(1, int(round(1 / share)))
        step = 1 << 13   # pages per slice: 32 MiB at a time, no huge temporaries
        for b, view in enumerate(views):
            upto = int(len(view) * fill)
            for p0 in range(0, upto, step):
                p1 = min(upto, p0 + step)
                local = np.arange(p0, p1, dtype=np.int64)
                stamps = page_stamp(self.state.seed, 0xFFFFFF, local + self.starts[b])
                if zero_every:
                    stamps[local % zero_every == zero_every - 1] = 0
                view[p0:p1] = stamps[:, None]


def guest_main(config: dict, link) -> int:
    """Process entry: see the module docstring. ``config`` keys: region, dirtylog (or None),
    state (GuestState as dict), fill (share of RAM to fill at boot, 0 on a resumed guest),
    tracking ("soft", the default, or "uffd")."""
    from shm.dirtylog import DirtyLog
    from shm.region import RamRegion
    from shm.uffd import arm

    with RamRegion.attach(config["region"]) as region:
        log = DirtyLog.attach(config["dirtylog"], region) if config.get("dirtylog") else None
        wp = None
        if log is not None:
            log.start_service()   # answer the scanner's fetches even while paused
        try:
            views = [blk.view.view(np.uint64).reshape(-1, WORDS_PER_PAGE) for blk in region.blocks]
            if config.get("state") is None:
                # A destination guest, started early: it gets its state at resume time.
                link.ready(pid=__import__("os").getpid())
                op, state_dict = link.recv()
                if op != "load":
                    link.send("stopped", None)
                    return 0
                state = GuestState(**state_dict)
                work = Workload(state, [blk.nb_pages for blk in region.blocks])
                link.send("loaded", time.monotonic())
            else:
                state = GuestState(**config["state"])
                work = Workload(state, [blk.nb_pages for blk in region.blocks])
                if config.get("fill"):
                    work.boot(views, float(config["fill"]))
                if config.get("tracking") == "uffd":
                    first, last = region.blocks[0], region.blocks[-1]
                    wp = arm(first.address, last.address + last.length - first.address)
                link.ready(state=asdict(state), pid=__import__("os").getpid(),
                           blocks=[(b.address, b.length) for b in region.blocks])
            mark = log.mark if log is not None else None
            _run(work, views, mark, link, state)
            return 0
        finally:
            if wp is not None:
                wp.close()
            if log is not None:
                log.close()


def _run(work: Workload, views, mark, link, state: GuestState) -> None:
    paused = False
    rate_pages = state.dirty_rate / PAGE_SIZE
    t0 = time.monotonic()
    done_at_t0 = state.pages_written
    while True:
        if paused or rate_pages <= 0:
            timeout = None
        else:
            timeout = TICK
        if link.poll(timeout):
            cmd = link.recv()
            op = cmd[0]
            if op == "pause":
                paused = True
                link.send("paused", asdict(state), time.monotonic())
            elif op == "resume":
                paused = False
                t0, done_at_t0 = time.monotonic(), state.pages_written
                link.send("resumed", time.monotonic())
            elif op == "state":
                link.send("state", asdict(state))
            elif op == "throttle":       # auto-converge: write (100 - pct) % of the rate
                rate_pages = state.dirty_rate * (100 - int(cmd[1])) / 100 / PAGE_SIZE
                t0, done_at_t0 = time.monotonic(), state.pages_written
                link.send("throttle", int(cmd[1]))
            elif op == "stop":
                link.send("stopped", asdict(state))
                return
            continue
        if paused or rate_pages <= 0:
            continue
        due = int((time.monotonic() - t0) * rate_pages) - (state.pages_written - done_at_t0)
        if due > 0:
            work.write_batch(views, min(due, MAX_BATCH_PAGES), mark)


class SyntheticGuest(GuestProcess):
    """The owner side of a synthetic guest (see ``GuestProcess``): ``pause`` and ``query``
    return its ``GuestState``. ``tracking``: "soft" (the guest marks a shared dirty log) or
    "uffd" (no log; the kernel tracks the guest's writes)."""

    kind = "synthetic"
    device_section = SYNTHETIC_SECTION

    def __init__(self, ram: int, *, run_id: str, state: GuestState | None = None,
                 fill: float = 0.5, chunk_size: int = 1 << 20, dirty_log: bool = True,
                 blocks: list[tuple[str, int]] | None = None, region_kind: str = "ram",
                 tracking: str = "soft") -> None:
        if tracking not in ("soft", "uffd"):
            raise ValueError(f"dirty tracking {tracking!r}: the synthetic guest has soft or uffd")
        self.tracking = tracking
        self.state = state or GuestState()
        super().__init__(ram, run_id=run_id, target="pipeline.guest.synthetic:guest_main",
                         config={"state": asdict(self.state), "fill": fill,
                                 "tracking": tracking},
                         dirty_log=dirty_log and tracking == "soft", chunk_size=chunk_size,
                         blocks=blocks, region_kind=region_kind)

    @property
    def busy(self) -> bool:
        """Whether the guest writes memory while it runs."""
        return self.state.dirty_rate > 0

    def pause(self, timeout: float = 10.0) -> GuestState:
        _, state, self.paused_at = self.request("pause", timeout)
        self.state = GuestState(**state)
        return self.state

    def query(self, timeout: float = 10.0) -> GuestState:
        return GuestState(**self.request("state", timeout)[1])
