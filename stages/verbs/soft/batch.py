"""Many RDMA WRITEs at once: the soft provider's WRITE_BATCH frame at both ends.

Requester: ``collect`` turns the send queue from ``qp.tx_next`` into frames, coalescing each
run of consecutive WRITEs (however they were posted) into one WRITE_BATCH; SENDs and lone
WRITEs stay single frames. ``local_sges`` resolves the SGEs of an array of WRs with one key
lookup per distinct lkey.

Responder: ``remote_targets`` checks a batch's descriptors all at once (rkey, bounds,
REMOTE_WRITE) and says how many of them, from the first, may be placed; ``recv_scattered``
then reads the payloads straight into those MR views with recvmsg_into (no copy).

Everything here that touches a PD's key table runs under ``pd._lock``; ``collect`` runs under
the QP lock.
"""

from __future__ import annotations

import bisect
import itertools
import os
import socket

import numpy as np

from stages.verbs.base import Access, SendOpcode
from stages.verbs.soft import wire

FRAME_BYTES = 1 << 20  # payload of one WRITE_BATCH beyond its first write: bounds ACK latency
try:
    RECV_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError):
    RECV_IOV_MAX = 1024


# -- requester ---------------------------------------------------------------------------
class WriteRun:
    """The RDMA WRITEs of one ``post_writes`` call (all with good local SGEs), as arrays: ONE
    send-queue entry for the sequences ``seq0 .. end-1``; writes ``done ..`` are outstanding
    and ``seq`` is the first of them. ``cum`` is the payload offset of each write (and of the
    end); the payload is ``views`` (local bytes, adjacent writes merged into one view) starting
    at the payload offsets ``view_at``. ``mr_of`` says which of ``mrs`` each write holds an
    in-flight reference on (None: all of them ``mrs[0]``)."""

    __slots__ = ("seq0", "seq", "end", "done", "wr_id", "signaled", "cum", "descs", "mrs",
                 "mr_of", "view_at", "views", "rnr_left", "rnr_count")
    opcode = SendOpcode.RDMA_WRITE
    bad = False

    def __init__(self, seq: int, wrs: np.ndarray, mr_of: np.ndarray, offset: np.ndarray,
                 mrs: list, rnr_left: int) -> None:
        n = len(wrs)
        self.seq0 = self.seq = seq
        self.end, self.done = seq + n, 0
        self.rnr_left, self.rnr_count = rnr_left, 0
        self.wr_id = wrs["wr_id"].copy()
        self.signaled = wrs["signaled"] != 0
        self.descs = memoryview(wire.descriptors(wrs["remote_addr"], wrs["rkey"],
                                                 wrs["length"]))
        lengths = wrs["length"].astype(np.int64)
        self.cum = cum = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=cum[1:])
        used = mr_of[:1] if (mr_of == mr_of[0]).all() else np.unique(mr_of)
        if len(used) == 1:
            self.mrs, self.mr_of = [mrs[int(used[0])]], None
            mrs[int(used[0])].inflight += n
        else:
            self.mrs = [mrs[i] for i in used.tolist()]
            self.mr_of = np.searchsorted(used, mr_of).astype(np.int32)
            for mr, count in zip(self.mrs, np.bincount(self.mr_of).tolist(), strict=True):
                mr.inflight += count
        # One view per stretch of writes that are adjacent in local memory (same MR).
        nz = np.flatnonzero(lengths)
        self.view_at, self.views = [], []
        if len(nz):
            start, size, owner = offset[nz].astype(np.int64), lengths[nz], mr_of[nz]
            new = np.ones(len(nz), bool)
            new[1:] = (owner[1:] != owner[:-1]) | (start[1:] != start[:-1] + size[:-1])
            first = nz[new]
            at = cum[first]
            stop = np.append(at[1:], cum[-1])
            self.view_at = at.tolist()
            self.views = [mrs[m]._view[s:s + ln] for m, s, ln in zip(
                mr_of[first].tolist(), offset[first].tolist(), (stop - at).tolist(),
                strict=True)]

    def length_at(self, seq: int) -> int:
        i = seq - self.seq0
        return int(self.cum[i + 1] - self.cum[i])

    def take(self, seq: int, descs: list, views: list, *, max_count: int, max_bytes: int,
             max_views: int, first: bool) -> tuple[int, int]:
        """Append the descriptors and payload views of the writes from ``seq`` on: as many as
        ``max_count``, ``max_bytes`` (at least one write if ``first`` in its frame) and
        ``max_views`` (at least 1) allow. Returns ``(writes, bytes)`` taken."""
        cum, a = self.cum, seq - self.seq0
        b = min(self.end - self.seq0, a + max_count)
        p = int(cum[a])
        if int(cum[b]) - p > max_bytes:
            b = max(int(np.searchsorted(cum, p + max_bytes, "right")) - 1, a + first)
        q = int(cum[b])
        if q > p:
            view_at, parts = self.view_at, self.views
            i = bisect.bisect_right(view_at, p) - 1
            last = i + max_views
            if last < len(view_at) and view_at[last] < q:  # too many views: stop before one
                q = view_at[last]  # (a view starts where a write starts)
                b = int(np.searchsorted(cum, q, "right")) - 1
            j = i
            while j < len(view_at) and view_at[j] < q:
                view, at = parts[j], view_at[j]
                lo, hi = max(p - at, 0), min(q - at, len(view))
                views.append(view if lo == 0 and hi == len(view) else view[lo:hi])
                j += 1
        descs.append(self.descs[a * wire.DESC.size:b * wire.DESC.size])
        return b - a, q - p

    def release_rest(self, counts: dict) -> None:
        """Add the in-flight references of the outstanding writes to ``counts``."""
        self.release_into(counts, self.done, self.end - self.seq0)

    def release_into(self, counts: dict, a: int, b: int) -> None:
        """Add the in-flight references of writes ``a .. b-1`` (indices) to ``counts``."""
        if self.mr_of is None:
            mr = self.mrs[0]
            counts[mr] = counts.get(mr, 0) + (b - a)
            return
        for mr, count in zip(self.mrs, np.bincount(self.mr_of[a:b], minlength=len(
                self.mrs)).tolist(), strict=True):
            if count:
                counts[mr] = counts.get(mr, 0) + count


def write_runs(pd, wrs: np.ndarray, seq: int, rnr_left: int, bad_wr) -> list:
    """Send-queue entries for an array of WRITEs numbered from ``seq`` (pd lock held): a
    ``WriteRun`` per stretch of WRs with good local SGEs, ``bad_wr(seq, wr)`` for each WR whose
    lkey is unknown or whose SGE lies outside its MR (it fails when its turn comes)."""
    n = len(wrs)
    lkeys, addr, length = wrs["lkey"], wrs["addr"], wrs["length"].astype(np.uint64)
    mr_of = np.full(n, -1, np.int32)
    offset = np.zeros(n, np.uint64)
    mrs: list = []
    same = bool((lkeys == lkeys[0]).all())
    for key in [int(lkeys[0])] if same else np.unique(lkeys).tolist():
        mr = pd.lookup(key)
        if mr is None:
            continue
        sel = slice(None) if same else lkeys == key
        a, ln = addr[sel], length[sel]
        off = a - np.uint64(mr.addr)  # wraps below the MR: caught by the next test
        ok = (a >= mr.addr) & (off <= mr.length) & (ln <= mr.length - off)
        mr_of[sel] = np.where(ok, len(mrs), -1)
        offset[sel] = off
        mrs.append(mr)
    bad = np.flatnonzero(mr_of < 0).tolist()
    entries, start = [], 0
    for stop in [*bad, n]:
        if stop > start:
            entries.append(WriteRun(seq + start, wrs[start:stop], mr_of[start:stop],
                                    offset[start:stop], mrs, rnr_left))
        if stop < n:
            entries.append(bad_wr(seq + stop, wrs[stop]))
        start = stop + 1
    return entries


def entry_at(sq, seq: int):
    """The send-queue entry holding sequence ``seq`` and its index (looked for from the newest
    end: ``seq`` is usually the next to transmit, among the latest posted)."""
    for back, entry in enumerate(reversed(sq)):
        if entry.seq <= seq:
            return entry, len(sq) - 1 - back
    raise LookupError(seq)


def collect(qp, bufs: list, *, max_bytes: int, max_iov: int) -> None:
    """Append frames for the WRs from ``qp.tx_next`` to ``bufs`` and advance ``tx_next``.

    Each run of consecutive WRITEs (however they were posted) becomes WRITE_BATCH frames; SENDs
    and lone WRITEs stay single frames. Stops at a WR with a local protection error (it fails
    when it reaches the front), when ``bufs`` holds ``max_iov`` buffers or ``max_bytes`` of
    payload."""
    sq = qp.sq
    if not sq or qp.tx_next >= qp.next_seq:
        return
    entry, index = entry_at(sq, qp.tx_next)
    pending = itertools.islice(sq, index + 1, None)
    tx, size = qp.tx_next, 0
    while entry is not None and not entry.bad and len(bufs) < max_iov and size < max_bytes:
        if entry.opcode != SendOpcode.RDMA_WRITE:
            bufs.append(wire.frame(wire.SEND, tx, length=entry.length))
            if entry.length:
                bufs.append(entry.view)
            size += entry.length
            tx += 1
            entry = next(pending, None)
            continue
        # WRITEs from tx on, across entries: as many as one frame, the iovec and the budgets
        # allow.
        first, descs, views, frame_bytes = tx, [], [], 0
        room = max_iov - len(bufs) - 2
        while (entry is not None and not entry.bad and entry.opcode == SendOpcode.RDMA_WRITE
               and tx - first < wire.MAX_BATCH and len(views) < room
               and frame_bytes < FRAME_BYTES and size + frame_bytes < max_bytes):
            budget = min(FRAME_BYTES - frame_bytes, max_bytes - size - frame_bytes)
            if type(entry) is WriteRun:
                count, got = entry.take(tx, descs, views, max_count=wire.MAX_BATCH - (tx - first),
                                        max_bytes=budget, max_views=room - len(views),
                                        first=tx == first)
                tx += count
                frame_bytes += got
                if tx < entry.end:
                    break  # the frame is full
            else:
                if tx > first and entry.length > budget:
                    break
                descs.append(entry.desc)
                if entry.length:
                    views.append(entry.view)
                tx += 1
                frame_bytes += entry.length
            entry = next(pending, None)
        if tx - first == 1:
            remote_addr, rkey, length = wire.DESC.unpack(descs[0])
            bufs.append(wire.frame(wire.WRITE, first, remote_addr=remote_addr, rkey=rkey,
                                   length=length))
        else:
            bufs.append(wire.batch_header(first, tx - first, frame_bytes))
            bufs.append(descs[0] if len(descs) == 1 else b"".join(descs))
        bufs.extend(views)
        size += frame_bytes
    qp.tx_next = tx


# -- responder ---------------------------------------------------------------------------
def remote_targets(pd, descs: np.ndarray) -> tuple[int, list, list, list]:
    """Check a WRITE_BATCH's descriptors (pd lock held): ``(k, views, mrs, ranges)``.

    The first ``k`` writes pass (the key names an MR of this PD with REMOTE_WRITE and the range
    lies inside it); ``views`` are their non-empty targets in order, ``mrs`` the distinct MRs
    they use (each given one in-flight reference) and ``ranges`` the ``(mr, address,
    length)`` spans of on-demand MRs to fault in before the data lands, adjacent writes
    merged."""
    n = len(descs)
    rkeys = descs["rkey"]
    same = bool((rkeys == rkeys[0]).all())
    keys = [int(rkeys[0])] if same else np.unique(rkeys).tolist()
    addr = descs["remote_addr"]
    length = descs["length"].astype(np.uint64)
    ok = np.zeros(n, bool)
    offset = np.zeros(n, np.uint64)
    targets: dict[int, object] = {}
    for key in keys:
        mr = pd.lookup(key)
        if mr is None or not mr.access & Access.REMOTE_WRITE:
            continue
        targets[key] = mr
        sel = slice(None) if same else rkeys == key
        a, ln = addr[sel], length[sel]
        off = a - np.uint64(mr.addr)
        ok[sel] = (a >= mr.addr) & (off <= mr.length) & (ln <= mr.length - off)
        offset[sel] = off
    k = n if ok.all() else int(np.argmin(ok))
    if k == 0:
        return 0, [], [], []
    used = [targets[int(rkeys[0])]] if same else [targets[key] for key in np.unique(
        rkeys[:k]).tolist()]
    by_key = {mr.rkey: mr for mr in used}
    views: list = []
    ranges: list = []
    starts, ends = offset[:k], offset[:k] + length[:k]
    if same:
        whole = used[0]._view
        views = [whole[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
                 if e > s]
    else:
        for key, s, e in zip(rkeys[:k].tolist(), starts.tolist(), ends.tolist(),
                                strict=True):
            if e > s:
                views.append(by_key[key]._view[s:e])
    for mr in used:
        mr.inflight += 1
        if mr.on_demand:
            sel = slice(None) if same else rkeys[:k] == mr.rkey
            base = mr.local_address
            ranges += [(mr, base + s, e - s) for s, e in _merged(starts[sel], ends[sel])]
    return k, views, used, ranges


def _merged(starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """The union of ``[starts[i], ends[i])`` as sorted, disjoint, non-adjacent spans."""
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if not len(starts):
        return []
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    # A new span starts where a write begins beyond everything before it.
    new = np.empty(len(starts), bool)
    new[0] = True
    new[1:] = starts[1:] > ends[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(starts)) - 1
    return list(zip(starts[first].tolist(), ends[last].tolist(), strict=True))


def populate(ranges: list) -> None:
    """Fault in the ``(mr, address, length)`` targets of on-demand MRs (``SoftMR.fault_in``)."""
    for mr, address, length in ranges:
        mr.fault_in(address, length)


def recv_scattered(sock: socket.socket, views: list) -> bool:
    """Fill ``views`` in order from ``sock`` (recvmsg_into, ``RECV_IOV_MAX`` views a call,
    resuming after partial reads); False if the peer closed first."""
    i, n = 0, len(views)
    while i < n:
        chunk = views[i:i + RECV_IOV_MAX]
        got = sock.recvmsg_into(chunk, 0, socket.MSG_WAITALL)[0]
        if got == 0:
            return False
        for view in chunk:
            size = len(view)
            if got < size:
                if got:
                    views[i] = view[got:]
                break
            got -= size
            i += 1
    return True
