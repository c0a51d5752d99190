"""The registrar stage: makes every run writable (local MR + remote rkey) and hands writes on.

``Registrar`` is sans-IO. Per block it keeps numpy arrays indexed by chunk: state (NONE,
REQUESTED, REGISTERED), local lkey, remote rkey, writes in flight and the round last used, plus
one local MR object per registered chunk. A batch of runs is handled whole:

- runs in registered chunks (or every run, with pin-all) become WRITE records at once;
- all-zero runs in chunks not registered (nor to be for a data run of the same batch), and
  every zero run of 64 pages or more (pin-all too), become COMPRESS requests (no write),
  merged when adjacent: large zero areas never cross the data connection, and the
  destination never faults in a page that stays zero (QEMU compresses only in unregistered
  chunks); small zero runs in registered chunks are written, since a control message costs
  more than a small write;
- other runs are parked, and their chunks get one REGISTER request each. The local MR is
  registered right away, while the request is out, and parked runs leave as soon as the answer
  comes (``on_answers``), so registration overlaps the writes of chunks already registered.

A round's END marker goes on to the poster only after every parked run of that round has left;
the poster's DRAINED for the round comes back through ``on_completions`` and is forwarded to the
coordinator with the round's figures.

With a pin budget (``x-pin-budget``, or RLIMIT_MEMLOCK when registrations pin: ``x-odp=off``)
at most ``budget_chunks`` chunks are pinned here at once, counting those asked for and those
whose MR the poster has not released yet. A chunk that does not fit waits (its runs stay
parked) while chunks least recently written, with no write in flight, are unregistered
(UNREGISTER request, then local deregistration once the poster let go of its import); the
waiting chunk is asked for when a release leaves room. That holds from round 1 on, so RAM many
times the budget migrates through it.

``registrar_main`` is the process shell around it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shm.memory import PAGE_SIZE
from stages.records import (
    ALL_CHUNKS,
    ANSWER,
    CHUNK_DONE,
    COMPLETION_RING,
    COMPRESS_REQUEST,
    DRAINED_REQUEST,
    MR_IMPORT,
    MR_RELEASE,
    MR_RELEASED,
    REGISTER_REQUEST,
    REQUEST_RING,
    ROUND_DRAINED,
    RUN,
    RUN_RING,
    SCAN_END,
    UNREGISTER_REQUEST,
    WRITE,
    WRITE_END,
    WRITE_RING,
    AnswerStatus,
    concat,
    records,
    select,
)

NONE, REQUESTED, REGISTERED, WAITING = 0, 1, 2, 3   # WAITING: wanted, no room in the budget
BIG_ZERO_PAGES = 64          # a zero run this long always goes as COMPRESS (256 KiB)
LOCAL_SLICE = 16             # chunks registered locally between looks at the inputs


@dataclass
class BlockInfo:
    """A RAM block as the registrar sees it: base VA in this process, length in bytes."""

    address: int
    length: int

    def nb_chunks(self, chunk_size: int) -> int:
        return max(1, -(-self.length // chunk_size))


class Registrar:
    """Chunk registration cache and run -> write translation (see the module docstring)."""

    def __init__(self, blocks: list[BlockInfo], chunk_size: int, *, pin_all: bool,
                 reg_mr: Callable[[int, int], object], pin_budget: int = 0,
                 reg_mrs: Callable[[list[tuple[int, int]]], list] | None = None,
                 local_budget: int = 0) -> None:
        self.blocks = blocks
        self.chunk_size = chunk_size
        self.chunk_pages = chunk_size // PAGE_SIZE
        self.pin_all = pin_all
        self._reg_mr = reg_mr
        # one MR per (address, length), in one go (adjacent chunks pinned by one call)
        self._reg_mrs = reg_mrs or (lambda ranges: [reg_mr(a, n) for a, n in ranges])
        self.budget_chunks = pin_budget // chunk_size if pin_budget else 0
        # Chunks pinned here may also count those unregistered at the destination whose MR
        # the poster has not released yet: room past the budget (the limit's own, beside a
        # budget that leaves some for the peer) keeps requests going meanwhile.
        self.local_chunks = max(self.budget_chunks, local_budget // chunk_size)
        n = [b.nb_chunks(chunk_size) for b in blocks]
        self.state = [np.zeros(k, np.uint8) for k in n]
        self.lkey = [np.zeros(k, np.uint32) for k in n]
        self.rkey = [np.zeros(k, np.uint32) for k in n]
        self.inflight = [np.zeros(k, np.int64) for k in n]
        self.last_used = [np.zeros(k, np.int64) for k in n]   # the batch of writes, not round
        self._tick = 0                 # batches of writes made so far (the LRU clock)
        self.waiting: list[tuple[int, int, int]] = []   # (block, chunk, round) past the budget
        self.remote_base = np.zeros(len(blocks), np.uint64)
        self.mrs: dict[tuple[int, int], object] = {}
        self.new_mrs: list = []        # registered since the shell last looked (to export)
        self.to_register: list[tuple[int, int]] = []   # requested, not registered locally yet
        self.releasing: dict[int, object] = {}   # lkey -> MR waiting for the poster's release
        self.to_release: list = []     # MRs the shell must ask the poster to release
        self.parked: list[np.ndarray] = []
        self.ends: dict[int, np.void] = {}
        self._sent_ends: set[int] = set()
        self.round_compressed: dict[int, int] = {}
        self.round_writes: dict[int, int] = {}
        self.registered_now = 0
        self.chunks_registered = 0
        self.chunks_unregistered = 0
        self.compress_sent = 0
        self.busy_ns = 0
        self.bytes_done = 0          # bytes whose RDMA WRITEs completed, every round so far

    # -- pin-all -------------------------------------------------------------------------
    def pin_blocks(self) -> None:
        """Register every block whole (pin-all); rkeys come later through ``on_answers``."""
        for b, blk in enumerate(self.blocks):
            mr = self._reg_mr(blk.address, blk.length)
            self.mrs[(b, ALL_CHUNKS)] = mr
            self.new_mrs.append(mr)
            self.lkey[b][:] = mr.lkey
        self.chunks_registered += len(self.blocks)

    # -- inputs --------------------------------------------------------------------------
    def on_runs(self, runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Handle scanner records (``RUN_RING``); returns (writes, requests)."""
        t0 = time.perf_counter_ns()
        writes, reqs = [], []
        data = select(runs, RUN)
        if len(data):
            self._route(data, writes, reqs)
        for end in select(runs, SCAN_END):
            self.ends[int(end["round"])] = end
        writes.append(self._ready_ends())
        self.busy_ns += time.perf_counter_ns() - t0
        return concat(WRITE_RING, writes), concat(REQUEST_RING, reqs)

    def on_answers(self, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Handle REGISTER answers (and pin-all block keys); returns (writes, requests)."""
        self._register_answered(answers)
        t0 = time.perf_counter_ns()
        for a in answers:
            b, c = int(a["block"]), int(a["chunk"])
            if int(a["status"]) != AnswerStatus.OK:
                raise RuntimeError(f"destination refused to register block {b} chunk {c}")
            self.remote_base[b] = a["remote_base"]
            if c == ALL_CHUNKS:
                self.rkey[b][:] = a["rkey"]
                self.state[b][:] = REGISTERED
            else:
                self.rkey[b][c] = a["rkey"]
                self.state[b][c] = REGISTERED
        writes: list[np.ndarray] = []
        if self.parked:
            parked = np.concatenate(self.parked)
            self.parked = []
            ready = self._registered(parked)
            writes.append(self._writes(parked[ready]))
            if (~ready).any():
                self.parked.append(parked[~ready])
        writes.append(self._ready_ends())
        self.busy_ns += time.perf_counter_ns() - t0
        return concat(WRITE_RING, writes), records(REQUEST_RING, 0)

    def on_completions(self, comps: np.ndarray) -> np.ndarray:
        """Handle poster completions (``COMPLETION_RING``); returns requests (DRAINED forwarded
        to the coordinator)."""
        reqs = []
        for lkey in select(comps, MR_RELEASED)["lkey"].tolist():
            mr = self.releasing.pop(lkey, None)
            if mr is not None:
                mr.close()
        done = select(comps, CHUNK_DONE)
        self.bytes_done += int(done["bytes"].sum())
        for b in np.unique(done["block"]):
            sel = done[done["block"] == b]
            np.subtract.at(self.inflight[b], sel["chunk"].astype(np.int64),
                           sel["writes"].astype(np.int64))
        if self.waiting:               # room freed, or chunks idle to make room with
            self._request_waiting(reqs)
        for end in select(comps, ROUND_DRAINED):
            r = int(end["round"])
            scan = self.ends.pop(r, None)
            req = records(DRAINED_REQUEST, round=r, bytes_written=end["bytes"],
                          writes_posted=end["writes"],
                          compressed_pages=self.round_compressed.pop(r, 0),
                          post_ns=end["post_ns"], reg_ns=self.busy_ns)
            if scan is not None:
                req["dirty_pages"] = scan["dirty_pages"]
                req["zero_pages"] = scan["zero_pages"]
                req["scan_ns"] = scan["scan_ns"]
            reqs.append(req)
        return concat(REQUEST_RING, reqs)

    # -- internals -----------------------------------------------------------------------
    def _chunks(self, runs: np.ndarray) -> np.ndarray:
        return (runs["first_page"] // self.chunk_pages).astype(np.int64)

    def _keys(self, runs: np.ndarray) -> np.ndarray:
        """One int64 per run naming its (block, chunk)."""
        return runs["block"].astype(np.int64) * (1 << 32) + self._chunks(runs)

    def _registered(self, runs: np.ndarray) -> np.ndarray:
        ok = np.zeros(len(runs), dtype=bool)
        chunks = self._chunks(runs)
        for b in np.unique(runs["block"]):
            sel = runs["block"] == b
            ok[sel] = self.state[b][chunks[sel]] == REGISTERED
        return ok

    def _state(self, runs: np.ndarray) -> np.ndarray:
        state = np.empty(len(runs), np.uint8)
        chunks = self._chunks(runs)
        for b in np.unique(runs["block"]):
            sel = runs["block"] == b
            state[sel] = self.state[b][chunks[sel]]
        return state

    def _route(self, runs: np.ndarray, writes: list, reqs: list) -> None:
        zero = runs["zero"] != 0
        if zero.any():
            # A COMPRESS is a control message with its round trip (~0.3 ms here), a small
            # write ~25 us: small zero runs in chunks registered, asked for, or about to be
            # asked for (a data run of this batch lies in them) are written, as QEMU writes
            # them in registered chunks; the rest go as COMPRESS. Under a small pin budget,
            # where every chunk of a busy guest is registered again each round, this took a
            # round's COMPRESS messages from ~200 to none.
            big = runs["n_pages"] >= BIG_ZERO_PAGES
            unasked = (self._state(runs) == NONE) & ~np.isin(
                self._keys(runs), self._keys(runs[~zero]))
            compress = zero & (big | unasked)
            if compress.any():
                self._compress(runs[compress], reqs)
                runs = runs[~compress]
        ready = self._registered(runs)
        writes.append(self._writes(runs[ready]))
        rest = runs[~ready]
        if not len(rest):
            return
        if self.pin_all:
            self.parked.append(rest)   # block keys not here yet: never REGISTER with pin-all
            return
        self.parked.append(rest)
        new = [(int(k >> 32), int(k & 0xFFFFFFFF)) for k in np.unique(self._keys(rest))]
        round_no = int(rest["round"][0])
        for b, c in new:
            if self.state[b][c] == NONE:
                self.state[b][c] = WAITING
                self.waiting.append((b, c, round_no))
        self._request_waiting(reqs)

    def _request_waiting(self, reqs: list) -> None:
        """REGISTER requests for the waiting chunks that fit the budget, after UNREGISTER
        requests for idle chunks that make room for the rest (room they leave once the
        poster has released them: ``on_completions`` asks again then).

        Each request is a control exchange (a round trip, and pinning or unpinning at the
        destination) whatever it holds, so under a budget room is made and used in groups of
        at least half the budget (or all that waits), not a message per chunk as each one's
        writes complete: at 8 MiB, 256 MiB of busy guest cycled through in 43 exchanges of 6
        chunks each way a round instead of ~130 of 2 (0.18-0.26 s a round, from 0.38).
        Nothing waits for a group when nothing else under way could complete one."""
        if not self.waiting:
            return
        fit = len(self.waiting)
        if self.budget_chunks:
            group = min(fit, max(1, self.budget_chunks // 2))
            short = fit - (self.budget_chunks - self.registered_now)
            if short > 0:
                idle = self._idle_count()
                if idle >= min(short, group) or idle == self.registered_now:
                    reqs.append(self._evict(short, self.waiting[0][2]))
            fit = max(0, min(fit, self.budget_chunks - self.registered_now,
                             self.local_chunks - self.registered_now - len(self.releasing)))
            if fit < group and (self.registered_now or self.releasing):
                return              # room for a whole group comes as the others finish
        if not fit:
            return
        new, self.waiting = self.waiting[:fit], self.waiting[fit:]
        for b, c, _ in new:
            self.state[b][c] = REQUESTED
        self.to_register.extend((b, c) for b, c, _ in new)
        self.registered_now += len(new)
        self.chunks_registered += len(new)
        reqs.append(records(REGISTER_REQUEST, len(new), round=[r for _, _, r in new],
                            block=[b for b, _, _ in new], chunk=[c for _, c, _ in new],
                            n_chunks=1))

    def _compress(self, z: np.ndarray, reqs: list) -> None:
        """COMPRESS requests for all-zero runs, registered chunk or not, pin-all or not: a
        zero page never crosses the data connection (QEMU writes zero pages of registered
        chunks; a COMPRESS is valid in any registration window and costs 24 bytes)."""
        # Adjacent zero runs merge into one COMPRESS even across chunk boundaries: the
        # destination zero-fills any range of a block.
        first = z["first_page"].astype(np.int64)
        n = z["n_pages"].astype(np.int64)
        joins = (z["block"][1:] == z["block"][:-1]) & (first[1:] == first[:-1] + n[:-1])
        starts = np.flatnonzero(np.concatenate([[True], ~joins]))
        pages = np.add.reduceat(n, starts)
        zs = z[starts]
        reqs.append(records(COMPRESS_REQUEST, len(zs), round=zs["round"], block=zs["block"],
                            chunk=self._chunks(zs), offset=zs["first_page"] * PAGE_SIZE,
                            length=pages.astype(np.uint64) * PAGE_SIZE, pages=pages))
        self.compress_sent += len(zs)
        for r in np.unique(z["round"]):
            self.round_compressed[int(r)] = self.round_compressed.get(int(r), 0) + int(
                z["n_pages"][z["round"] == r].sum())

    def register_pending(self, limit: int | None = None) -> None:
        """Register locally the chunks whose REGISTER request is out, in the order asked, at
        most ``limit`` of them (call after sending the requests, so that local pinning overlaps
        the destination's; an answer needs its chunks done, see ``_register_answered``)."""
        if not self.to_register:
            return
        t0 = time.perf_counter_ns()
        todo = self.to_register[:limit] if limit else list(self.to_register)
        ranges = []
        for b, c in todo:
            start = c * self.chunk_size
            ranges.append((self.blocks[b].address + start,
                           min(self.chunk_size, self.blocks[b].length - start)))
        mrs = self._reg_mrs(ranges)
        for (b, c), mr in zip(todo, mrs, strict=True):
            self.mrs[(b, c)] = mr
            self.lkey[b][c] = mr.lkey
        self.new_mrs.extend(mrs)
        del self.to_register[:len(todo)]
        self.busy_ns += time.perf_counter_ns() - t0

    def _register_answered(self, answers: np.ndarray) -> None:
        """Register locally every chunk up to the last one ``answers`` answer (the requests
        and their answers come in the order asked): their writes can then leave, while the
        chunks asked for later are still being registered."""
        if not self.to_register:
            return
        if (answers["chunk"] == ALL_CHUNKS).any():
            self.register_pending()
            return
        answered = set(zip(answers["block"].tolist(), answers["chunk"].tolist(), strict=True))
        last = max((i for i, key in enumerate(self.to_register) if key in answered),
                   default=-1)
        if last >= 0:
            self.register_pending(last + 1)

    def _idle_count(self) -> int:
        """Chunks registered with no write in flight (those ``_evict`` may pick)."""
        return sum(int(np.count_nonzero((st == REGISTERED) & (n == 0)))
                   for st, n in zip(self.state, self.inflight, strict=True))

    def _evict(self, need: int, round_no: int) -> np.ndarray:
        """UNREGISTER requests for up to ``need`` chunks, least recently written first, of
        those registered with no write in flight (this round's too: the budget may be far
        smaller than RAM)."""
        idle = [np.flatnonzero((self.state[b] == REGISTERED) & (self.inflight[b] == 0))
                for b in range(len(self.blocks))]
        used = np.concatenate([self.last_used[b][i] for b, i in enumerate(idle)])
        blocks = np.concatenate([np.full(len(i), b) for b, i in enumerate(idle)])
        chunks = np.concatenate(idle)
        pick = np.argsort(used, kind="stable")[:need]     # ties: in (block, chunk) order
        out = []
        for b, c in zip(blocks[pick].tolist(), chunks[pick].tolist(), strict=True):
            mr = self.mrs.pop((b, c))
            self.releasing[int(mr.lkey)] = mr
            self.to_release.append(mr)
            self.state[b][c] = NONE
            self.lkey[b][c] = self.rkey[b][c] = 0
            out.append((b, c))
        self.registered_now -= len(out)
        self.chunks_unregistered += len(out)
        return records(UNREGISTER_REQUEST, len(out), round=round_no,
                       block=[b for b, _ in out], chunk=[c for _, c in out], n_chunks=1)

    def _writes(self, runs: np.ndarray) -> np.ndarray:
        n = len(runs)
        out = records(WRITE, n)
        if not n:
            return out
        chunks = self._chunks(runs)
        blocks = runs["block"].astype(np.int64)
        offset = runs["first_page"].astype(np.uint64) * np.uint64(PAGE_SIZE)
        out["round"] = runs["round"]
        out["block"] = blocks
        out["chunk"] = chunks
        out["length"] = runs["n_pages"].astype(np.uint64) * np.uint64(PAGE_SIZE)
        out["pages"] = runs["n_pages"]
        out["zero_pages"] = np.where(runs["zero"] != 0, runs["n_pages"], 0)
        self._tick += 1
        for b in np.unique(blocks):
            sel = blocks == b
            c = chunks[sel]
            out["local_addr"][sel] = np.uint64(self.blocks[b].address) + offset[sel]
            out["remote_addr"][sel] = self.remote_base[b] + offset[sel]
            out["lkey"][sel] = self.lkey[b][c]
            out["rkey"][sel] = self.rkey[b][c]
            np.add.at(self.inflight[b], c, 1)
            self.last_used[b][c] = self._tick
        for r in np.unique(out["round"]):
            self.round_writes[int(r)] = self.round_writes.get(int(r), 0) + int(
                np.count_nonzero(out["round"] == r))
        return out

    def _ready_ends(self) -> np.ndarray:
        """END markers of rounds with no parked run left, to follow their writes."""
        waiting = set()
        for p in self.parked:
            waiting.update(int(r) for r in np.unique(p["round"]))
        out = []
        for r, end in sorted(self.ends.items()):
            if r in waiting or r in self._sent_ends:
                continue
            self._sent_ends.add(r)
            out.append(records(WRITE_END, round=r, dirty_pages=end["dirty_pages"],
                               zero_pages=end["zero_pages"],
                               compressed_pages=self.round_compressed.get(r, 0)))
        return concat(WRITE_RING, out)


def _export(mrs: list, attempts: int = 5) -> list:
    """The export handles of ``mrs`` (all of one PD, exported together: one PD-table write in
    the soft provider), retried: the soft provider reads /proc/self/maps to find the backing
    file, and that read can miss a mapping while another thread of ours maps memory (a numpy
    allocation in an Inbox thread), which makes it fail now and then."""
    from shm.errors import TransportError

    for attempt in range(attempts):
        try:
            return mrs[0].pd.export_mrs(mrs)
        except TransportError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.001)


def import_records(mrs: list) -> np.ndarray:
    """MR_IMPORT records telling the poster how to import each of ``mrs`` (exported here)."""
    out = records(MR_IMPORT, len(mrs))
    if not mrs:
        return out
    handles = _export(mrs)
    out["lkey"] = [h.lkey for h in handles]
    out["rkey"] = [h.rkey for h in handles]
    out["addr"] = [h.addr for h in handles]
    out["length"] = [h.length for h in handles]
    out["file_offset"] = [h.file_offset for h in handles]
    out["access"] = [h.access for h in handles]
    out["pd_slot"] = [h.slot for h in handles]
    out["mr_handle"] = [h.mr_handle for h in handles]
    return out


def proxy_records(mrs: list, base: int) -> np.ndarray:
    """MR_IMPORT records telling the poster to register each of ``mrs`` (``ProxyMR``s, virtual
    lkeys) itself: proxy mode; ``base`` is where the region's file starts here."""
    out = records(MR_IMPORT, len(mrs))
    if mrs:
        out["lkey"] = [m.lkey for m in mrs]
        out["addr"] = [m.addr for m in mrs]
        out["length"] = [m.length for m in mrs]
        out["file_offset"] = [m.addr - base for m in mrs]
        out["access"] = [int(m.access) for m in mrs]
        out["pd_slot"] = -1
    return out


REGISTRATION_ENV = "RDMA_PIPELINE_REGISTRATION"     # share, proxy or auto (the default)


def registration_mode(pd, wanted: str = "auto") -> str:
    """"share" (the poster imports our PD and MRs) where the PD can be shared, else "proxy"
    (the poster registers what we decide); ``wanted`` forces one ("share" must be possible)."""
    if wanted not in ("auto", "share", "proxy"):
        raise ValueError(f"registration mode {wanted!r}: use auto, share or proxy")
    if wanted == "auto":
        return "share" if pd.shareable else "proxy"
    if wanted == "share" and not pd.shareable:
        from shm.errors import TransportError

        raise TransportError("this RDMA device cannot share a PD between processes "
                             "(ibv_import_pd)", hint=f"unset {REGISTRATION_ENV} (auto)")
    return wanted


def registrar_main(config: dict, link) -> int:
    """Process: attaches the region and its rings, allocates the PD and, in "share" mode,
    exports it (the poster imports it and the MRs registered here); in "proxy" mode the
    poster registers what is decided here. Runs ``Registrar`` over three inputs."""
    from contextlib import ExitStack

    from shm.region import RamRegion
    from shm.ring import CONSUMER, PRODUCER, Ring
    from shm.segment import HEADER_SIZE
    from stages.harness import Inbox
    from stages.pinbudget import check_fits, human, pin_budget
    from stages.verbs import open_provider
    from stages.verbs.base import Access
    from stages.verbs.proxy import ProxyPD

    if config.get("memlock_limit"):
        from stages.harness import limit_memlock

        limit_memlock(config["memlock_limit"])
    odp = config.get("odp", True)
    # On demand (ODP), a whole block with pin-all as a chunk without it, nothing is pinned
    # (the soft provider; a device without ODP pins instead). Without ODP (x-odp=off) every
    # chunk is pinned, as QEMU's are, and what is pinned at once keeps inside the budget.
    access = Access.ON_DEMAND if odp else Access.NONE
    budget, why = pin_budget(config.get("pin_budget", 0), pins=not odp,
                             reserve=config.get("pin_reserve", 0))
    local_budget = pin_budget(0, pins=not odp)[0]     # what this process itself may pin
    with ExitStack() as stack:
        region = stack.enter_context(RamRegion.attach(config["region"]))
        ring = lambda key, dtype, role: stack.enter_context(  # noqa: E731
            Ring.attach(config[key], dtype, role=role))
        runs_in = ring("runs", RUN_RING, CONSUMER)
        answers_in = ring("answers", ANSWER, CONSUMER)
        comps_in = ring("completions", COMPLETION_RING, CONSUMER)
        writes_out = ring("writes", WRITE_RING, PRODUCER)
        requests_out = ring("requests", REQUEST_RING, PRODUCER)
        ctx = stack.enter_context(open_provider(config["transport"]).open_device(
            peer=config.get("peer")))       # the device the data connection will use
        pd = ctx.alloc_pd()
        mode = registration_mode(pd, config.get("registration")
                                 or os.environ.get(REGISTRATION_ENV, "auto"))
        if mode == "proxy":
            pd = ProxyPD()              # the poster registers (and pins) what we decide
        blocks = [BlockInfo(b.address, b.length) for b in region.blocks]
        # Before ready, so before anything moves: a budget that cannot hold what must be
        # pinned fails setup in one line.
        if config["pin_all"]:
            check_fits("source", budget, why, sum(b.length for b in blocks),
                       "all RAM blocks for rdma-pin-all")
        else:
            check_fits("source", budget, why, region.chunk_size,
                       f"one {human(region.chunk_size)} chunk")
        reg = Registrar(blocks, region.chunk_size, pin_all=config["pin_all"],
                        reg_mr=lambda a, n: pd.reg_mr(a, n, access),
                        reg_mrs=lambda ranges: pd.reg_mrs(ranges, access),
                        pin_budget=budget, local_budget=local_budget)
        if reg.pin_all:
            reg.pin_blocks()      # before ready: a pin that fails (RLIMIT_MEMLOCK) fails setup
        link.ready(pd=pd.export() if mode == "share" else None, path=region.segment.path,
                   registration=mode)
        new_records = (import_records if mode == "share" else
                       lambda mrs: proxy_records(mrs, region.segment.address - HEADER_SIZE))

        def flush(writes: np.ndarray, reqs: np.ndarray) -> None:
            if len(reqs):
                requests_out.push(reqs)     # first: the coordinator starts the exchange now
                reqs = reqs[:0]
            if reg.new_mrs:
                writes_out.push(new_records(reg.new_mrs).view(WRITE_RING))
                reg.new_mrs.clear()
            if len(writes):
                writes_out.push(writes)
            if reg.to_release:
                writes_out.push(records(MR_RELEASE, len(reg.to_release),
                                        lkey=[m.lkey for m in reg.to_release]).view(WRITE_RING))
                reg.to_release.clear()
            if len(reqs):
                requests_out.push(reqs)

        if reg.pin_all:
            flush(records(WRITE_RING, 0), records(REQUEST_RING, 0))
        inbox = Inbox()
        stack.callback(inbox.close)     # threads end before the rings close
        inbox.watch("runs", runs_in)
        inbox.watch("answers", answers_in)
        inbox.watch("completions", comps_in)
        open_inputs = {"runs", "answers", "completions"}
        while "completions" in open_inputs:
            # Chunks asked for are registered here a slice at a time while nothing else waits
            # (pinning overlaps the destination's), so that an answer is served as it comes.
            item = inbox.get_nowait() if reg.to_register else inbox.get()
            if item is None:
                reg.register_pending(LOCAL_SLICE)
                flush(records(WRITE_RING, 0), records(REQUEST_RING, 0))
                continue
            name, recs = item
            if isinstance(recs, BaseException):
                raise recs
            if len(recs) == 0:
                open_inputs.discard(name)
                if name == "runs":
                    writes_out.close_write()
                continue
            if name == "runs":
                flush(*reg.on_runs(recs))
            elif name == "answers":
                flush(*reg.on_answers(recs))
            else:
                flush(records(WRITE_RING, 0), reg.on_completions(recs))
                requests_out.note(reg.bytes_done)   # the coordinator's live progress
        requests_out.close_write()
        link.send("figures", {"chunks_registered": reg.chunks_registered,
                              "chunks_unregistered": reg.chunks_unregistered,
                              "compress_sent": reg.compress_sent, "busy_ns": reg.busy_ns,
                              "registration": mode})
    return 0
