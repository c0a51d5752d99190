"""Many RDMA WRITEs at once: the soft provider's WRITE_BATCH frame at both ends.

Requester: ``write_runs`` turns the WRs of one ``post_writes`` call into send-queue entries:
one ``WriteRun`` (arrays, no object per write) per stretch of WRs whose local SGEs pass, with
one key lookup per distinct lkey; a WR that fails them gets an entry of its own. ``collect``
turns the send queue from ``qp.tx_next`` into frames by slicing those arrays, coalescing each
run of consecutive WRITEs (however they were posted) into WRITE_BATCH frames; SENDs and lone
WRITEs stay single frames. Locally adjacent writes share one payload buffer (fewer iovecs).

Responder: ``remote_targets`` checks a batch's descriptors all at once (rkey, bounds,
REMOTE_WRITE) and says how many of them, from the first, may be placed; ``recv_scattered``
then reads the payloads straight into those MR views with recvmsg_into (no copy), writes
adjacent in one MR sharing a view.

Everything here that touches a PD's key table or an MR's in-flight count runs under
``pd._lock``; ``collect`` runs under the QP lock.
"""

from __future__ import annotations

import itertools
import os
import socket

import numpy as np

from stages.verbs.base import SendOpcode
from stages.verbs.soft import sendq, wire

FEW = 64  # writes in a batch below which a Python loop checks them faster than numpy
FRAME_BYTES = 1 << 20  # payload of one WRITE_BATCH beyond its first write: bounds ACK latency
try:
    RECV_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError):
    RECV_IOV_MAX = 1024


# -- requester ---------------------------------------------------------------------------
def collect(qp, bufs: list, *, max_bytes: int, max_iov: int) -> None:
    """Append frames for the WRs from ``qp.tx_next`` to ``bufs`` and advance ``tx_next``.

    Each run of consecutive WRITEs (however they were posted) becomes WRITE_BATCH frames; SENDs
    and lone WRITEs stay single frames. Stops at a WR with a local protection error (it fails
    when it reaches the front), when ``bufs`` holds ``max_iov`` buffers or ``max_bytes`` of
    payload."""
    sq = qp.sq
    if not sq or qp.tx_next >= qp.next_seq:
        return
    entry, index = sendq.entry_at(sq, qp.tx_next)
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
        room = max_iov - len(bufs) - 2  # buffers left for payloads after header and descriptors
        if room < 1:
            break  # the next call starts a fresh iovec (never a frame of no writes)
        while (entry is not None and not entry.bad and entry.opcode == SendOpcode.RDMA_WRITE
               and tx - first < wire.MAX_BATCH and len(views) < room
               and frame_bytes < FRAME_BYTES and size + frame_bytes < max_bytes):
            budget = min(FRAME_BYTES - frame_bytes, max_bytes - size - frame_bytes)
            if type(entry) is sendq.WriteRun:
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
    lies inside it); ``views`` are their non-empty targets in order (writes adjacent in the
    same MR share one view), ``mrs`` the distinct MRs they use (each given one in-flight
    reference) and ``ranges`` the ``(mr, address, length)`` spans of on-demand MRs to fault in
    before the data lands, adjacent writes merged."""
    n = len(descs)
    rkeys = descs["rkey"]
    same = bool((rkeys == rkeys[0]).all())
    if n <= FEW or (n <= 4 * FEW and not same):
        return _few_targets(pd, descs)
    addr = descs["remote_addr"].astype(np.uint64)
    length = descs["length"].astype(np.uint64)
    if same:
        mr = pd.lookup(int(rkeys[0]))
        if mr is None or not mr.remote_write:
            return 0, [], [], []
        offset = addr - np.uint64(mr.addr)  # wraps below the MR: caught by the next test
        ok = (addr >= mr.addr) & (offset <= mr.length) & (length <= mr.length - offset)
        k = n if ok.all() else int(np.argmin(ok))
        used, owner = [mr], None
    else:  # one key lookup per distinct key, the checks over all writes at once
        keys, owner = np.unique(rkeys, return_inverse=True)
        mrs = [pd.lookup(key) for key in keys.tolist()]
        mrs = [mr if mr is not None and mr.remote_write else None for mr in mrs]
        base, size = sendq.extents(mrs)
        offset = addr - base[owner]
        ok = (base[owner] != sendq.NO_MR) & (addr >= base[owner]) & (offset <= size[owner]) & (
            length <= size[owner] - offset)
        k = n if ok.all() else int(np.argmin(ok))
        if k == 0:
            return 0, [], [], []
        present = np.unique(owner[:k])
        used = [mrs[i] for i in present.tolist()]
        owner = np.searchsorted(present, owner[:k])
    if k == 0:
        return 0, [], [], []
    start = offset[:k].astype(np.int64)
    size = length[:k].astype(np.int64)
    stop = start + size
    # One view per stretch of non-empty writes that follow each other in one MR.
    nz = np.flatnonzero(size)
    views: list = []
    if len(nz):
        s, e = start[nz], stop[nz]
        new = np.empty(len(nz), bool)
        new[0] = True
        np.not_equal(s[1:], e[:-1], out=new[1:])
        if owner is not None:
            new[1:] |= owner[nz][1:] != owner[nz][:-1]
        first = np.flatnonzero(new)
        last = np.empty(len(first), np.intp)
        last[:-1] = first[1:] - 1
        last[-1] = len(nz) - 1
        spans = zip(s[first].tolist(), e[last].tolist(), strict=True)
        if owner is None:
            whole = used[0]._view
            views = [whole[lo:hi] for lo, hi in spans]
        else:
            wholes = [mr._view for mr in used]
            views = [wholes[m][lo:hi] for m, (lo, hi) in zip(owner[nz][first].tolist(), spans,
                                                              strict=True)]
    ranges: list = []
    for i, mr in enumerate(used):
        mr.inflight += 1
        if mr.on_demand:
            sel = slice(None) if owner is None else owner == i
            base = mr.local_address
            ranges += [(mr, base + lo, hi - lo) for lo, hi in _merged(start[sel], stop[sel])]
    return k, views, used, ranges


def _few_targets(pd, descs: np.ndarray) -> tuple[int, list, list, list]:
    """``remote_targets`` by a Python loop: below a few dozen writes (or a few hundred over
    many MRs) it costs less than numpy's fixed cost per call. On-demand ranges are the views'
    spans (adjacent writes merged, not sorted)."""
    spans: list = []
    used: dict = {}
    k, last, last_end = 0, None, -1
    for addr, rkey, length in descs.tolist():
        mr = used.get(rkey)
        if mr is None:
            mr = pd.lookup(rkey)
            if mr is None or not mr.remote_write:
                break
        offset = addr - mr.addr
        if offset < 0 or offset + length > mr.length:
            break
        used[rkey] = mr
        k += 1
        if not length:
            continue
        if mr is last and offset == last_end:
            spans[-1][2] = last_end = offset + length
        else:
            last, last_end = mr, offset + length
            spans.append([mr, offset, last_end])
    for mr in used.values():
        mr.inflight += 1
    ranges = [(mr, mr.local_address + lo, hi - lo) for mr, lo, hi in spans if mr.on_demand]
    return k, [mr._view[lo:hi] for mr, lo, hi in spans], list(used.values()), ranges


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
        if got == sum(map(len, chunk)):  # MSG_WAITALL: the usual case
            i += len(chunk)
            continue
        for view in chunk:
            size = len(view)
            if got < size:
                if got:
                    views[i] = view[got:]
                break
            got -= size
            i += 1
    return True
