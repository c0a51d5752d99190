"""The soft QP's send-queue entries: what ``post_send`` and ``post_writes`` queue.

An entry covers consecutive sequence numbers, ``seq`` (its first outstanding WR) to ``end``:
a ``SendWR`` is one WR; a ``WriteRun`` is the RDMA WRITEs of one ``post_writes`` call whose
local SGEs passed, kept as arrays (no object per write), retired from its head as cumulative
ACKs land inside it. Every outstanding WR with a good local SGE holds one in-flight reference
on its MR (``release_into`` says which to drop). ``write_runs`` builds the entries of a call
under ``pd._lock``.
"""

from __future__ import annotations

import bisect

import numpy as np

from stages.verbs.base import SendOpcode
from stages.verbs.soft import wire

NO_MR = np.uint64((1 << 64) - 1)  # the base of a key that names no usable MR: fails every check


class SendWR:
    """One posted WR: a send-queue entry of one sequence (a ``WriteRun`` holds many)."""

    __slots__ = ("seq", "end", "wr_id", "opcode", "view", "length", "remote_addr", "rkey",
                 "signaled", "mr", "rnr_left", "rnr_count", "bad", "desc")

    def __init__(self, seq, wr_id, opcode, view, length, remote_addr, rkey, signaled, mr,
                 rnr_left, desc=b""):
        self.seq, self.end, self.wr_id, self.opcode, self.view = seq, seq + 1, wr_id, opcode, view
        self.length, self.remote_addr, self.rkey = length, remote_addr, rkey
        self.signaled, self.mr, self.rnr_left, self.rnr_count = signaled, mr, rnr_left, 0
        self.bad = mr is None  # a local protection error, reported when its turn comes
        self.desc = desc  # a WRITE's WRITE_BATCH descriptor, packed once at posting

    def length_at(self, seq: int) -> int:
        return self.length

    def release_into(self, counts: dict, a: int, b: int) -> None:
        if self.mr is not None:
            counts[self.mr] = counts.get(self.mr, 0) + 1

    def release_rest(self, counts: dict) -> None:
        self.release_into(counts, 0, 1)


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

    def __init__(self, seq: int, wrs: np.ndarray, mrs: list, mr_of: np.ndarray | None,
                 offset: np.ndarray, rnr_left: int) -> None:
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
        if mr_of is not None and (mr_of == mr_of[0]).all():
            mrs, mr_of = [mrs[int(mr_of[0])]], None
        if mr_of is None:
            self.mrs, self.mr_of = mrs, None
            mrs[0].inflight += n
        else:
            used = np.unique(mr_of)
            self.mrs = mrs = [mrs[i] for i in used.tolist()]
            self.mr_of = mr_of = np.searchsorted(used, mr_of).astype(np.int32)
            for mr, count in zip(mrs, np.bincount(mr_of).tolist(), strict=True):
                mr.inflight += count
        # One view per stretch of writes that are adjacent in local memory (same MR).
        offset = offset.astype(np.int64)
        if lengths.all():
            start, size, owner, nz = offset, lengths, mr_of, None
        else:
            nz = np.flatnonzero(lengths)
            start, size = offset[nz], lengths[nz]
            owner = None if mr_of is None else mr_of[nz]
        self.view_at, self.views = [], []
        if not len(start):
            return
        new = np.empty(len(start), bool)
        new[0] = True
        np.not_equal(start[1:], start[:-1] + size[:-1], out=new[1:])
        if owner is not None:
            new[1:] |= owner[1:] != owner[:-1]
        first = np.flatnonzero(new) if nz is None else nz[new]
        at = cum[first]
        ends = np.empty(len(at), np.int64)
        ends[:-1] = at[1:]
        ends[-1] = cum[-1]
        spans = zip(offset[first].tolist(), (ends - at + offset[first]).tolist(), strict=True)
        self.view_at = at.tolist()
        if mr_of is None:
            whole = mrs[0]._view
            self.views = [whole[s:e] for s, e in spans]
        else:
            wholes = [mr._view for mr in mrs]
            self.views = [wholes[m][s:e] for m, (s, e) in zip(mr_of[first].tolist(), spans,
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
            j = bisect.bisect_left(view_at, q, i)  # views i .. j-1 hold [p, q)
            head, tail = parts[i], parts[j - 1]
            if j - i == 1:
                views.append(head[p - view_at[i]:q - view_at[i]])
            else:
                views.append(head[p - view_at[i]:] if p > view_at[i] else head)
                views += parts[i + 1:j - 1]
                end = q - view_at[j - 1]
                views.append(tail if end == len(tail) else tail[:end])
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
    if (lkeys == lkeys[0]).all():  # the common case: one MR
        mr = pd.lookup(int(lkeys[0]))
        if mr is not None:
            offset = addr - np.uint64(mr.addr)  # wraps below the MR: caught by the next test
            ok = (addr >= mr.addr) & (offset <= mr.length) & (length <= mr.length - offset)
            if ok.all():
                return [WriteRun(seq, wrs, [mr], None, offset, rnr_left)]
    keys, mr_of = np.unique(lkeys, return_inverse=True)  # one lookup per distinct key
    mrs = [pd.lookup(key) for key in keys.tolist()]
    base, size = extents(mrs)
    offset = addr - base[mr_of]  # wraps below the MR: caught by the next test
    ok = (base[mr_of] != NO_MR) & (addr >= base[mr_of]) & (offset <= size[mr_of]) & (
        length <= size[mr_of] - offset)
    mr_of = np.where(ok, mr_of, -1)
    entries, start = [], 0
    for stop in [*np.flatnonzero(mr_of < 0).tolist(), n]:
        if stop > start:
            entries.append(WriteRun(seq + start, wrs[start:stop], mrs, mr_of[start:stop],
                                    offset[start:stop], rnr_left))
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


def extents(mrs: list) -> tuple[np.ndarray, np.ndarray]:
    """The base addresses and lengths of ``mrs`` (None entries: ``NO_MR`` and 0)."""
    base = np.array([NO_MR if mr is None else mr.addr for mr in mrs], np.uint64)
    size = np.array([0 if mr is None else mr.length for mr in mrs], np.uint64)
    return base, size
