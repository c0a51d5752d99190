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
def collect(qp, bufs: list, *, max_bytes: int, max_iov: int) -> None:
    """Append frames for the WRs from ``qp.tx_next`` to ``bufs`` and advance ``tx_next``.

    Stops at a WR with a local protection error (it fails when it reaches the front), when
    ``bufs`` holds ``max_iov`` buffers or ``max_bytes`` of payload."""
    sq = qp.sq
    if not sq:
        return
    pending = itertools.islice(sq, qp.tx_next - sq[0].seq, None)
    size = 0
    wr = next(pending, None)
    while wr is not None and not wr.bad and len(bufs) < max_iov and size < max_bytes:
        if wr.opcode != SendOpcode.RDMA_WRITE:
            bufs.append(wire.frame(wire.SEND, wr.seq, length=wr.length))
            if wr.length:
                bufs.append(wr.view)
            size += wr.length
            qp.tx_next += 1
            wr = next(pending, None)
            continue
        # A run of WRITEs: as many as one frame, the iovec and the byte budget allow.
        run, run_bytes = [wr], wr.length
        room = max_iov - len(bufs) - 2
        wr = next(pending, None)
        while (wr is not None and not wr.bad and wr.opcode == SendOpcode.RDMA_WRITE
               and len(run) < wire.MAX_BATCH and len(run) < room
               and run_bytes + wr.length <= FRAME_BYTES and size + run_bytes < max_bytes):
            run.append(wr)
            run_bytes += wr.length
            wr = next(pending, None)
        if len(run) == 1:
            first = run[0]
            bufs.append(wire.frame(wire.WRITE, first.seq, remote_addr=first.remote_addr,
                                   rkey=first.rkey, length=first.length))
        else:
            bufs.append(wire.batch_header(run[0].seq, len(run), run_bytes))
            bufs.append(b"".join([w.desc for w in run]))
        bufs.extend([w.view for w in run if w.length])
        size += run_bytes
        qp.tx_next += len(run)


def local_sges(pd, wrs: np.ndarray) -> tuple[list, list]:
    """The MR and byte view of each WR's local SGE, None for both where the lkey is unknown or
    the SGE lies outside its MR. Takes one in-flight reference per good WR (pd lock held)."""
    n = len(wrs)
    mrs: list = [None] * n
    views: list = [None] * n
    lkeys = wrs["lkey"]
    groups = ((int(lkeys[0]), None),) if (lkeys == lkeys[0]).all() else (
        (int(key), np.flatnonzero(lkeys == key)) for key in np.unique(lkeys))
    for key, index in groups:
        mr = pd.lookup(key)
        if mr is None:
            continue
        sel = wrs if index is None else wrs[index]
        addr, length = sel["addr"], sel["length"].astype(np.uint64)
        offset = addr - np.uint64(mr.addr)  # wraps below the MR: caught by the next test
        ok = (addr >= mr.addr) & (offset <= mr.length) & (length <= mr.length - offset)
        good = np.arange(n) if index is None else index
        if not ok.all():
            good, offset, length = good[ok], offset[ok], length[ok]
        whole = mr._view
        for i, start, end in zip(good.tolist(), offset.tolist(),
                                     (offset + length).tolist(), strict=True):
            mrs[i] = mr
            views[i] = whole[start:end]
        mr.inflight += len(good)
    return mrs, views


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
