"""The poster stage: one RDMA WRITE per WRITE record, completions back, rounds drained.

``Poster`` is sans-IO: ``post`` is a callable doing one ``qp.post_send`` and the clock is passed
in. Writes queue in a backlog and are posted while the send queue has room (``max_outstanding``)
and the bandwidth cap allows (``max_bandwidth`` bytes/s, a budget refilled every 10 ms). A
completion is requested every ``signal_every`` writes and on the last write posted before the
poster would wait, so nothing is left unsignaled at rest; one completion retires every write
posted before it (completions come in order on an RC QP). A round's END record is answered with
DRAINED once no write of that round or an earlier one is outstanding: that is the barrier after
which the coordinator may send REGISTER FINISHED.

``poster_main`` is the process: it imports the registrar's PD, connects its own data QP to the
destination, and runs the ``Poster`` between the writes ring and the completion queue.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

from pipeline.errors import TransportError
from stages.records import COMPLETION_DTYPE, OP_END, OP_RUN, WRITE_DTYPE, records

WINDOW = 0.01     # seconds of bandwidth budget


class Poster:
    """Sans-IO write posting with in-order completion retirement."""

    def __init__(self, post: Callable[..., None], *, max_outstanding: int = 256,
                 signal_every: int = 16, max_bandwidth: int = 0) -> None:
        self._post = post
        self.max_outstanding = max_outstanding
        self.signal_every = signal_every
        self.max_bandwidth = max_bandwidth
        self.backlog: deque[np.void] = deque()
        self.outstanding: deque[tuple[int, int, int, int, int, bool]] = deque()
        self.ends: deque[int] = deque()          # rounds whose END was reached, not drained
        self.seq = 0
        self.since_signal = 0
        self.round_bytes: dict[int, int] = {}
        self.round_writes: dict[int, int] = {}
        self.writes_posted = 0
        self.bytes_posted = 0
        self.busy_ns = 0
        self._window_start = 0.0
        self._window_bytes = 0

    def on_writes(self, writes: np.ndarray, now: float) -> tuple[np.ndarray, float]:
        """Queue WRITE records and post what fits; returns (completions, seconds to wait)."""
        self.backlog.extend(writes)
        return self.pump(now)

    def pump(self, now: float) -> tuple[np.ndarray, float]:
        """Post from the backlog; returns (DRAINED records, seconds until the cap allows more)."""
        t0 = time.perf_counter_ns()
        wait = 0.0
        while self.backlog:
            rec = self.backlog[0]
            if rec["op"] == OP_END:
                self.backlog.popleft()
                self.ends.append(int(rec["round"]))
                continue
            if len(self.outstanding) >= self.max_outstanding:
                break
            length = int(rec["length"])
            if self.max_bandwidth:
                if now - self._window_start >= WINDOW:
                    self._window_start, self._window_bytes = now, 0
                if self._window_bytes and self._window_bytes + length > self.max_bandwidth * WINDOW:
                    wait = self._window_start + WINDOW - now
                    break
                self._window_bytes += length
            self.backlog.popleft()
            self.since_signal += 1
            last = (not self.backlog or self.backlog[0]["op"] == OP_END
                    or len(self.outstanding) + 1 >= self.max_outstanding)
            # With a cap the loop may stop before the next record: signal every write then.
            signaled = last or self.since_signal >= self.signal_every or bool(self.max_bandwidth)
            if signaled:
                self.since_signal = 0
            wr_id = self.seq
            self.seq += 1
            self._post(wr_id, int(rec["local_addr"]), length, int(rec["lkey"]),
                       int(rec["remote_addr"]), int(rec["rkey"]), signaled)
            r = int(rec["round"])
            self.outstanding.append((wr_id, r, int(rec["block"]), int(rec["chunk"]), length,
                                     signaled))
            self.writes_posted += 1
            self.bytes_posted += length
            self.round_bytes[r] = self.round_bytes.get(r, 0) + length
            self.round_writes[r] = self.round_writes.get(r, 0) + 1
        self.busy_ns += time.perf_counter_ns() - t0
        return self._drained(), max(0.0, wait)

    def on_completions(self, wr_ids: list[int], now: float) -> tuple[np.ndarray, float]:
        """Retire writes up to each completed wr_id; returns (completion records, wait)."""
        t0 = time.perf_counter_ns()
        done: dict[tuple[int, int, int], list[int]] = {}
        for wr_id in wr_ids:
            while self.outstanding and self.outstanding[0][0] <= wr_id:
                _, r, b, c, length, _ = self.outstanding.popleft()
                acc = done.setdefault((r, b, c), [0, 0])
                acc[0] += 1
                acc[1] += length
        out = records(COMPLETION_DTYPE, len(done))
        for i, ((r, b, c), (n, nbytes)) in enumerate(done.items()):
            out[i]["op"] = OP_RUN
            out[i]["round"], out[i]["block"], out[i]["chunk"] = r, b, c
            out[i]["writes"], out[i]["bytes"] = n, nbytes
        self.busy_ns += time.perf_counter_ns() - t0
        drained, wait = self.pump(now)
        return np.concatenate([out, drained]), wait

    def _drained(self) -> np.ndarray:
        out = []
        oldest = self.outstanding[0][1] if self.outstanding else None
        while self.ends and (oldest is None or oldest > self.ends[0]):
            r = self.ends.popleft()
            out.append(records(COMPLETION_DTYPE, op=OP_END, round=r,
                               writes=self.round_writes.pop(r, 0),
                               bytes=self.round_bytes.pop(r, 0), post_ns=self.busy_ns))
        if not out:
            return records(COMPLETION_DTYPE, 0)
        return np.concatenate(out)


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


__all__ = ["Poster", "check_completions", "WRITE_DTYPE"]


def _segments(recs: np.ndarray):
    """Consecutive stretches of ``recs`` with the same op, in order."""
    if not len(recs):
        return
    cuts = np.flatnonzero(np.diff(recs["op"])) + 1
    start = 0
    for end in list(cuts) + [len(recs)]:
        yield int(recs["op"][start]), recs[start:end]
        start = end


def poster_main(config: dict, link) -> int:
    """Process: waits for ("connect", pd_handle, region_path, host, port, token, index) on its
    pipe, imports the registrar's PD, connects its own data QP, then posts writes."""
    import select
    from contextlib import ExitStack

    from pipeline.protocol.capabilities import DataConnect
    from shm.ring import CONSUMER, PRODUCER, Ring
    from stages.harness import Inbox
    from stages.records import OP_IMPORT, OP_RELEASE, OP_RELEASED
    from stages.verbs import open_provider
    from stages.verbs.base import MRHandle, SendOpcode

    depth = int(config.get("max_outstanding", 256))
    with ExitStack() as stack:
        writes_in = stack.enter_context(Ring.attach(config["writes"], WRITE_DTYPE,
                                                    role=CONSUMER))
        comps_out = stack.enter_context(Ring.attach(config["completions"], COMPLETION_DTYPE,
                                                    role=PRODUCER))
        ctx = stack.enter_context(open_provider(config["transport"]).open_device())
        link.ready()
        op, pd_handle, path, host, port, token, index = link.recv()
        if op != "connect":
            raise ValueError(f"poster expected connect, got {op}")
        pd = ctx.import_pd(pd_handle)
        cq = ctx.create_cq(2 * depth + 16)
        qp = pd.create_qp(cq, cq, max_send_wr=depth, max_recv_wr=1)
        ctx.connect(qp, host, port, DataConnect(token, index).encode(), timeout=10.0)
        link.send("connected")
        imported: dict[int, object] = {}

        def post(wr_id, laddr, length, lkey, raddr, rkey, signaled):
            qp.post_send(wr_id, SendOpcode.RDMA_WRITE, laddr, length, lkey,
                         remote_addr=raddr, rkey=rkey, signaled=signaled)

        poster = Poster(post, max_outstanding=depth, max_bandwidth=config.get("max_bandwidth", 0))
        inbox = Inbox()
        stack.callback(inbox.close)     # threads end before the rings close
        inbox.watch("writes", writes_in)
        writes_done = False
        wait = 0.0
        while not (writes_done and not poster.outstanding and not poster.backlog):
            timeout = wait if wait > 0 else None
            readable, _, _ = select.select([inbox.fileno(), cq.fileno()], [], [], timeout)
            now = time.monotonic()
            out = []
            if cq.fileno() in readable or len(cq):
                ids = []
                while True:
                    wcs = cq.poll(64)
                    if not wcs:
                        break
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
                    if op_code == OP_IMPORT:
                        for r in seg:
                            h = MRHandle(pd_handle.provider, pd_handle.name, int(r["lkey"]),
                                         int(r["rkey"]), int(r["local_addr"]),
                                         int(r["length"]), int(r["pages"]),
                                         slot=int(r["zero_pages"]), path=path,
                                         file_offset=int(r["remote_addr"]))
                            imported[h.lkey] = pd.import_mr(h)
                    elif op_code == OP_RELEASE:
                        for r in seg:
                            imported.pop(int(r["lkey"])).close()
                        out.append(records(COMPLETION_DTYPE, len(seg), op=OP_RELEASED,
                                           lkey=seg["lkey"]))
                    else:
                        comps, wait = poster.on_writes(seg, now)
                        out.append(comps)
            if wait > 0 and not readable:
                comps, wait = poster.pump(time.monotonic())
                out.append(comps)
            out = [o for o in out if len(o)]
            if out:
                comps_out.push(np.concatenate(out))
        for mr in imported.values():
            mr.close()
        qp.disconnect()
        ctx.close()            # un-imports the PD: the registrar may now deregister
        comps_out.close_write()
        link.send("figures", {"writes_posted": poster.writes_posted,
                              "bytes_posted": poster.bytes_posted, "busy_ns": poster.busy_ns})
    return 0
