"""The poster stage: RDMA WRITEs posted a batch at a time, completions back, rounds drained.

``Poster`` is sans-IO: ``post`` is a callable posting an array of ``WRITE_WR_DTYPE`` work
requests at once (``qp.post_writes``) and the clock is passed in. WRITE records queue in a
backlog of arrays, with each round's END marker in order between them. ``pump`` posts, in one
``post`` call, as much of the contiguous stretch at the head of the backlog (up to the next
END) as the send queue has room for (``max_outstanding``) and the bandwidth cap allows
(``max_bandwidth`` bytes/s: a ``TokenBucket`` ``WINDOW`` seconds deep). No Python runs per
write: everything is whole-array numpy.

Invariants:
- wr_ids are a running counter, so a completion for wr_id k retires every write with id <= k
  (completions come in order on an RC QP).
- A completion is requested for every wr_id k with (k + 1) % signal_every == 0, and on the
  last write of a call after which the poster would wait with that write's completion
  unrequested: the end of a stretch (more records or an END must come first), a stop for the
  cap, or a full send queue shorter than ``signal_every``. A call that fills a longer queue
  leaves a signaled write outstanding whose completion brings the next call. So nothing is
  left unsignaled at rest, and a trickle of completions refills the queue in full steps of
  ``signal_every`` (signaling every call's last write would split those steps for good).
- A round's END record is answered with DRAINED once no write of that round or an earlier one
  is outstanding: the barrier after which the coordinator may send REGISTER FINISHED.
- An exception from ``post`` leaves the poster's state as before the call; the stage is lost
  then anyway (some of the WRs may have been posted).

``poster_main`` is the process: it imports the registrar's PD, connects its own data QP to the
destination, and runs the ``Poster`` between the writes ring and the completion queue.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

from shm.errors import TransportError
from stages.records import (
    CHUNK_DONE,
    COMPLETION_RING,
    ROUND_DRAINED,
    WRITE,
    WRITE_END,
    WRITE_RING,
    WriteOp,
    concat,
    records,
)
from stages.verbs.base import WRITE_WR_DTYPE

# Send-queue depth: writes in flight. One-page writes of a busy guest need thousands in flight to
# keep the link busy across the ACK round trip: at 256 (1 MiB of 4 KiB writes) both sides sat
# idle a quarter of the time and a guest dirtying 586 MB/s took 7-12 rounds; at 4096, 3-4.
DEPTH = 4096
FOREIGN_WR_ID = 1 << 63   # work requests from here up share the QP but are not the poster's
WINDOW = 0.01     # the bandwidth cap's bucket depth, in seconds at the cap
NO_COMPLETIONS = np.zeros(0, COMPLETION_RING)
NO_COMPLETIONS.flags.writeable = False

# What the poster remembers of a posted write until its completion.
OUTSTANDING_DTYPE = np.dtype([
    ("wr_id", "<u8"),
    ("round", "<u4"),
    ("block", "<u4"),
    ("chunk", "<u4"),
    ("length", "<u8"),
])


class TokenBucket:
    """Pacing to ``rate`` bytes/s, the clock passed in: bytes leave while the bucket holds
    them; it refills at ``rate`` up to ``depth`` bytes (``WINDOW`` seconds' worth) and starts
    full. A write larger than the whole bucket leaves once the bucket is full and leaves it in
    debt, so the average never exceeds the rate and no write ever passes unconditionally: by
    any time t after the first write, at most ``rate * t + max(depth, largest write)`` bytes
    have left."""

    def __init__(self, rate: int, depth: int = 0) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.depth = float(depth or max(1, int(rate * WINDOW)))
        self.tokens = self.depth
        self._last: float | None = None

    def take(self, lengths: np.ndarray, now: float) -> tuple[int, float]:
        """How many of ``lengths`` (in order) may leave at ``now`` (their bytes are taken from
        the bucket), and the seconds until the next one may (0.0 when all went)."""
        if self._last is not None and now > self._last:
            self.tokens = min(self.depth, self.tokens + (now - self._last) * self.rate)
        self._last = now if self._last is None else max(self._last, now)
        sent = np.cumsum(lengths, dtype=np.float64)
        n = int(np.searchsorted(sent, self.tokens, side="right"))
        if n == 0 and len(sent) and sent[0] > self.depth and self.tokens >= self.depth:
            n = 1                        # larger than the bucket: goes when it is full
        if n:
            self.tokens -= float(sent[n - 1])
        if n == len(sent):
            return n, 0.0
        need = min(float(lengths[n]), self.depth)
        return n, (need - self.tokens) / self.rate + 1e-6   # a hair late, never early


class Poster:
    """Sans-IO write posting, a batch per call, with in-order completion retirement."""

    def __init__(self, post: Callable[[np.ndarray], None], *, max_outstanding: int = DEPTH,
                 signal_every: int = 16, max_bandwidth: int = 0) -> None:
        if max_outstanding < 1 or signal_every < 1:
            raise ValueError("max_outstanding and signal_every must be >= 1")
        self._post = post
        self.max_outstanding = max_outstanding
        self.signal_every = signal_every
        self.max_bandwidth = max_bandwidth
        self.backlog: deque[np.ndarray | int] = deque()  # WRITE arrays; an int: a round's END
        self.outstanding: deque[np.ndarray] = deque()     # OUTSTANDING_DTYPE, one per post
        self.n_outstanding = 0
        self.ends: deque[int] = deque()          # rounds whose END was reached, not drained
        self.seq = 0                             # wr_id of the next write
        self.post_calls = 0
        self.round_bytes: dict[int, int] = {}
        self.round_writes: dict[int, int] = {}
        self.writes_posted = 0
        self.bytes_posted = 0
        self.busy_ns = 0
        self.bucket = TokenBucket(max_bandwidth) if max_bandwidth else None

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing outstanding."""
        return not self.backlog and not self.n_outstanding

    def on_writes(self, writes: np.ndarray, now: float) -> tuple[np.ndarray, float]:
        """Queue ``WRITE_RING`` records (WRITE and END, in order) and post what fits; returns
        (``COMPLETION_RING`` records, seconds to wait)."""
        t0 = time.perf_counter_ns()
        if len(writes):
            is_end = writes["op"] == WriteOp.END
            if not is_end.any():
                self.backlog.append(writes.view(WRITE))
            else:
                ends = np.flatnonzero(is_end)
                rounds = writes[ends].view(WRITE_END)["round"].tolist()
                start = 0
                for i, r in zip(ends.tolist(), rounds, strict=True):   # a step per END marker
                    if i > start:
                        self.backlog.append(writes[start:i].view(WRITE))
                    self.backlog.append(r)
                    start = i + 1
                if start < len(writes):
                    self.backlog.append(writes[start:].view(WRITE))
        self.busy_ns += time.perf_counter_ns() - t0
        return self.pump(now)

    def pump(self, now: float) -> tuple[np.ndarray, float]:
        """Post from the backlog; returns (DRAINED records, seconds until the cap allows more)."""
        t0 = time.perf_counter_ns()
        wait = 0.0
        while True:
            while self.backlog and isinstance(self.backlog[0], int):
                self.ends.append(self.backlog.popleft())
            room = self.max_outstanding - self.n_outstanding
            if not self.backlog or room <= 0:
                break
            batch, stretch_end = self._head(room)
            n = len(batch)
            capped = False
            if self.bucket is not None:
                n, wait = self.bucket.take(batch["length"], now)
                capped = n < len(batch)
            if n:
                tail = capped or stretch_end or self.max_outstanding < self.signal_every
                self._post_batch(batch[:n], tail)
                self._consume(n)
            if capped:
                break
        self.busy_ns += time.perf_counter_ns() - t0
        return self._drained(), max(0.0, wait)

    def on_completions(self, wr_ids, now: float) -> tuple[np.ndarray, float]:
        """Retire every write up to the highest completed wr_id; returns (completion records:
        CHUNK_DONE per (round, block, chunk) in order, then ROUND_DRAINED, seconds to wait)."""
        t0 = time.perf_counter_ns()
        out = NO_COMPLETIONS
        if len(wr_ids):
            done = self._retire(int(max(wr_ids)))
            if len(done):
                out = _per_chunk(done)
        self.busy_ns += time.perf_counter_ns() - t0
        drained, wait = self.pump(now)
        if not len(drained):        # concatenating structured arrays is not free
            return out, wait
        return (np.concatenate([out, drained]) if len(out) else drained), wait

    # -- internals -----------------------------------------------------------------------
    def _head(self, limit: int) -> tuple[np.ndarray, bool]:
        """Up to ``limit`` writes from the head of the backlog, stopping at an END marker, and
        whether they are all of the stretch (nothing but an END or the end comes next)."""
        parts, total, end = [], 0, True
        for item in self.backlog:
            if isinstance(item, int):
                break
            if total >= limit:
                end = False
                break
            part = item[:limit - total]
            parts.append(part)
            total += len(part)
            if len(part) < len(item):
                end = False
                break
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), end

    def _consume(self, n: int) -> None:
        """Drop the first ``n`` writes of the backlog (they were posted)."""
        while n:
            head = self.backlog[0]
            if len(head) <= n:
                self.backlog.popleft()
                n -= len(head)
            else:
                self.backlog[0] = head[n:]
                n = 0

    def _post_batch(self, batch: np.ndarray, signal_tail: bool) -> None:
        n = len(batch)
        wrs = np.empty(n, WRITE_WR_DTYPE)
        wrs["wr_id"] = np.arange(self.seq, self.seq + n, dtype=np.uint64)
        wrs["addr"] = batch["local_addr"]
        wrs["remote_addr"] = batch["remote_addr"]
        wrs["length"] = batch["length"]
        wrs["lkey"] = batch["lkey"]
        wrs["rkey"] = batch["rkey"]
        # Every signal_every-th wr_id overall, not of this call: completions then free the
        # send queue in steps of signal_every and the next call posts that many again.
        first = (-(self.seq + 1)) % self.signal_every
        signaled = np.zeros(n, np.uint32)
        signaled[first::self.signal_every] = 1
        if signal_tail:
            signaled[-1] = 1
        wrs["signaled"] = signaled
        self._post(wrs)
        # Posted: now remember it.
        pending = np.empty(n, OUTSTANDING_DTYPE)
        pending["wr_id"] = wrs["wr_id"]
        for name in ("round", "block", "chunk", "length"):
            pending[name] = batch[name]
        self.outstanding.append(pending)
        self.n_outstanding += n
        self.seq += n
        self.post_calls += 1
        lengths = pending["length"]
        nbytes = int(lengths.sum())
        self.writes_posted += n
        self.bytes_posted += nbytes
        rounds = pending["round"]
        if rounds[0] == rounds[-1] and (rounds == rounds[0]).all():
            per_round = [(int(rounds[0]), n, nbytes)]
        else:                            # a stretch over several rounds: once per round
            per_round = [(int(r), int(m.sum()), int(lengths[m].sum()))
                         for r in np.unique(rounds).tolist() for m in [rounds == r]]
        for r, writes, nb in per_round:
            self.round_writes[r] = self.round_writes.get(r, 0) + writes
            self.round_bytes[r] = self.round_bytes.get(r, 0) + nb

    def _retire(self, wr_id: int) -> np.ndarray:
        """Remove and return (in order) the outstanding writes with ids <= ``wr_id``."""
        done = []
        while self.outstanding:
            head = self.outstanding[0]
            if int(head["wr_id"][-1]) <= wr_id:
                done.append(self.outstanding.popleft())
                continue
            k = int(np.searchsorted(head["wr_id"], wr_id, side="right"))
            if k:
                done.append(head[:k])
                self.outstanding[0] = head[k:]
            break
        if not done:
            return np.empty(0, OUTSTANDING_DTYPE)
        out = done[0] if len(done) == 1 else np.concatenate(done)
        self.n_outstanding -= len(out)
        return out

    def _drained(self) -> np.ndarray:
        out = []
        oldest = int(self.outstanding[0]["round"][0]) if self.outstanding else None
        while self.ends and (oldest is None or oldest > self.ends[0]):
            r = self.ends.popleft()
            out.append(records(ROUND_DRAINED, round=r, writes=self.round_writes.pop(r, 0),
                               bytes=self.round_bytes.pop(r, 0), post_ns=self.busy_ns))
        if not out:
            return NO_COMPLETIONS
        return concat(COMPLETION_RING, out)


def _per_chunk(done: np.ndarray) -> np.ndarray:
    """One CHUNK_DONE record per (round, block, chunk) of ``done``, with its writes and bytes,
    in the order each key first appears (as ``COMPLETION_RING``)."""
    r, b, c = done["round"], done["block"], done["chunk"]
    if (r[0] == r[-1] and b[0] == b[-1] and c[0] == c[-1]
            and (r == r[0]).all() and (b == b[0]).all() and (c == c[0]).all()):
        return records(CHUNK_DONE, round=r[0], block=b[0], chunk=c[0], writes=len(done),
                       bytes=done["length"].sum()).view(COMPLETION_RING)   # one chunk: common
    order = np.lexsort((c, b, r))        # stable: within a key, completion order is kept
    rs, bs, cs = r[order], b[order], c[order]
    new = np.ones(len(done), bool)
    new[1:] = (rs[1:] != rs[:-1]) | (bs[1:] != bs[:-1]) | (cs[1:] != cs[:-1])
    starts = np.flatnonzero(new)
    seq = np.argsort(order[starts], kind="stable")   # keys by their first completion
    first = starts[seq]
    counts = np.diff(np.append(starts, len(done)))[seq]
    nbytes = np.add.reduceat(done["length"][order], starts)[seq]
    return records(CHUNK_DONE, len(first), round=rs[first], block=bs[first], chunk=cs[first],
                   writes=counts, bytes=nbytes).view(COMPLETION_RING)


def check_completions(wcs) -> list[int]:
    """wr_ids of successful completions; TransportError on the first failed one."""
    ids = []
    for wc in wcs:
        status = getattr(wc.status, "name", str(wc.status))
        if status != "SUCCESS":
            raise TransportError(f"RDMA WRITE failed with {status} (wr_id {wc.wr_id}): the "
                                 "destination or the connection went away")
        ids.append(wc.wr_id)
    return ids


# An ODP responder answers a write into a page it has not mapped yet with RNR NAK while it
# faults the page in: retry for as long as that takes (7 = forever), never fail the write.
RNR_RETRY = 7


def mr_handle_of(rec, provider: str, pd_name: str, path: str):
    """The MRHandle that an MR_IMPORT record describes (``path``: the region's file)."""
    from stages.verbs.base import MRHandle

    return MRHandle(provider, pd_name, int(rec["lkey"]), int(rec["rkey"]), int(rec["addr"]),
                    int(rec["length"]), int(rec["access"]), mr_handle=int(rec["mr_handle"]),
                    slot=int(rec["pd_slot"]), path=path, file_offset=int(rec["file_offset"]))


def proxy_writes(proxy, recs: np.ndarray) -> np.ndarray:
    """``recs`` (WRITE_RING: writes and END markers) with the writes' virtual lkeys and
    registrar addresses made ours (proxy mode); a copy."""
    recs = recs.copy()
    is_write = recs["op"] == WriteOp.WRITE
    if is_write.any():
        writes = recs[is_write].view(WRITE)
        lkeys, addrs = writes["lkey"].copy(), writes["local_addr"].copy()
        proxy.translate(lkeys, addrs)
        writes["lkey"], writes["local_addr"] = lkeys, addrs
        recs[is_write] = writes.view(WRITE_RING)
    return recs


__all__ = ["RNR_RETRY", "Poster", "check_completions", "mr_handle_of", "proxy_writes",
           "serve_writes", "FOREIGN_WR_ID", "TokenBucket"]


def _segments(recs: np.ndarray):
    """Consecutive stretches of ``recs`` (``WRITE_RING``) of one kind, in order, with their
    op: IMPORT, RELEASE, or WRITE for writes and END markers together (``Poster.on_writes``
    takes them as they come)."""
    if not len(recs):
        return
    kind = np.where(recs["op"] == WriteOp.END, WriteOp.WRITE, recs["op"])
    cuts = np.flatnonzero(np.diff(kind)).tolist()
    start = 0
    for end in [c + 1 for c in cuts] + [len(recs)]:
        yield WriteOp(int(kind[start])), recs[start:end]
        start = end


def serve_writes(qp, cq, pd, pd_handle, path: str, writes_in, comps_out, *, depth: int = DEPTH,
                 max_bandwidth: int = 0, foreign: Callable | None = None,
                 proxy=None) -> Poster:
    """Run a ``Poster`` between the ``writes_in`` ring and ``qp``'s completion queue ``cq``
    until the writes ring ends and every write completed; import and release the registrar's
    MRs (``pd`` is the import of ``pd_handle``, ``path`` its memory file) as the ring says, or,
    with ``proxy`` (``stages.verbs.proxy.Registrations`` on our own ``pd``: a device that
    cannot share a PD), register and release them here and rewrite the writes' keys.
    ``foreign``: the writes share ``qp`` with the control channel (QEMU's protocol version 1,
    one QP): completions of work requests with ``wr_id >= FOREIGN_WR_ID`` are its SENDs' and
    go to ``foreign``. Returns the poster (its figures); the completions ring is closed."""
    import select

    from stages.harness import Inbox
    from stages.records import MR_IMPORT, MR_RELEASE, MR_RELEASED

    imported: dict[int, object] = {}
    poster = Poster(qp.post_writes, max_outstanding=depth, max_bandwidth=max_bandwidth)
    inbox = Inbox()
    try:
        inbox.watch("writes", writes_in)
        writes_done = False
        wait = 0.0
        while not (writes_done and poster.idle):
            timeout = wait if wait > 0 else None
            readable, _, _ = select.select([inbox.fileno(), cq.fileno()], [], [], timeout)
            now = time.monotonic()
            out = []
            if cq.fileno() in readable or len(cq):
                ids = []
                while True:
                    wcs = cq.poll(depth)
                    if not wcs:
                        break
                    if foreign is not None:
                        for wc in wcs:
                            if wc.wr_id >= FOREIGN_WR_ID:
                                foreign(wc)
                        wcs = [wc for wc in wcs if wc.wr_id < FOREIGN_WR_ID]
                    ids.extend(check_completions(wcs))
                comps, wait = poster.on_completions(ids, now)
                out.append(comps)
            while (item := inbox.get_nowait()) is not None:
                _name, recs = item
                if isinstance(recs, BaseException):
                    raise recs
                if not len(recs):
                    writes_done = True
                    continue
                for op_code, seg in _segments(recs):
                    if op_code == WriteOp.IMPORT:
                        for r in seg.view(MR_IMPORT):
                            if proxy is not None:
                                proxy.register(int(r["lkey"]), int(r["addr"]),
                                               int(r["file_offset"]), int(r["length"]),
                                               int(r["access"]))
                                continue
                            h = mr_handle_of(r, pd_handle.provider, pd_handle.name, path)
                            imported[h.lkey] = pd.import_mr(h)
                    elif op_code == WriteOp.RELEASE:
                        lkeys = seg.view(MR_RELEASE)["lkey"]
                        for lkey in lkeys.tolist():
                            if proxy is not None:
                                proxy.release(lkey)
                            else:
                                imported.pop(lkey).close()
                        out.append(records(MR_RELEASED, len(seg),
                                           lkey=lkeys).view(COMPLETION_RING))
                    else:
                        if proxy is not None:
                            seg = proxy_writes(proxy, seg)
                        comps, wait = poster.on_writes(seg, now)
                        out.append(comps)
            if wait > 0 and not readable:
                comps, wait = poster.pump(time.monotonic())
                out.append(comps)
            out = [o for o in out if len(o)]
            if out:
                comps_out.push(np.concatenate(out))
    finally:
        inbox.close()                   # its thread ends before the rings close
        for mr in imported.values():
            try:
                mr.close()
            except Exception:  # noqa: BLE001 - a write still in flight: the PD's close says
                pass
    comps_out.close_write()
    return poster


def poster_main(config: dict, link) -> int:
    """Process: waits for ("connect", pd_handle, region_path, host, port, private_data) on its
    pipe, imports the registrar's PD (or, with no PD handle, makes its own and registers what
    the registrar decides: proxy mode), connects its own data QP with the coordinator's
    ``private_data`` (the data-connection hello, bytes), then posts writes. ("idle",): the
    destination granted no data QP and the coordinator posts the writes on its control QP
    (QEMU's protocol version 1): the poster ends at once, having touched no ring."""
    from contextlib import ExitStack

    from shm.ring import CONSUMER, PRODUCER, Ring
    from stages.verbs import open_provider
    from stages.verbs.proxy import Registrations

    depth = int(config.get("max_outstanding", DEPTH))
    with ExitStack() as stack:
        link.ready()
        msg = link.recv()
        if msg[0] == "idle":
            return 0
        op, pd_handle, path, host, port, private_data = msg
        if op != "connect":
            raise ValueError(f"poster expected connect, got {op}")
        writes_in = stack.enter_context(Ring.attach(config["writes"], WRITE_RING,
                                                    role=CONSUMER))
        comps_out = stack.enter_context(Ring.attach(config["completions"], COMPLETION_RING,
                                                    role=PRODUCER))
        # Share mode: the registrar's PD, on its device (the connection must go through it
        # too). Proxy mode (no PD handle): our own PD on the device of the route, registering
        # what the registrar decides (``stages.verbs.proxy``).
        share = pd_handle is not None
        ctx = stack.enter_context(open_provider(config["transport"]).open_device(
            pd_handle.name if share and pd_handle.provider == "verbs" else None, peer=host))
        pd = ctx.import_pd(pd_handle) if share else ctx.alloc_pd()
        proxy = None if share else Registrations(pd, path)
        cq = ctx.create_cq(2 * depth + 16)
        qp = pd.create_qp(cq, cq, max_send_wr=depth, max_recv_wr=1, rnr_retry=RNR_RETRY)
        ctx.connect(qp, host, port, private_data, timeout=10.0)
        link.send("connected")
        poster = serve_writes(qp, cq, pd, pd_handle, path, writes_in, comps_out, depth=depth,
                              max_bandwidth=config.get("max_bandwidth", 0), proxy=proxy)
        qp.disconnect()
        if proxy is not None:
            qp.close()              # before the MRs it may still reference
            proxy.close()
        ctx.close()            # un-imports the PD: the registrar may now deregister
        link.send("figures", {"writes_posted": poster.writes_posted,
                              "bytes_posted": poster.bytes_posted, "busy_ns": poster.busy_ns})
    return 0
