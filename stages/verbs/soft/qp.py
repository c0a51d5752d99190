"""RC queue pair of the soft provider: send and receive queues, completions, errors.

The QP owns the verbs state; ``link.Link`` owns the socket and its two threads. Everything here
runs under ``qp.lock``, which the link's writer waits on as a condition, except a poster's inline
send (``link.send_claimed``), which holds the socket, not the lock.

Invariants:
- ``sq`` holds the posted send WRs not yet completed, in posting (= sequence) order, as
  entries of consecutive sequences: a ``SendWR`` each, or a ``sendq.WriteRun`` for the WRITEs
  of one ``post_writes`` call (retired in part when an ACK lands inside it); ``tx_next`` is the
  sequence of the next WR to transmit. A WR is completed by a cumulative ACK
  from the peer's responder (RC: completion means the data is placed) or by an error.
- Completions come in posting order; a signaled one retires the unsignaled WRs before it, and
  slots (``sq_used``, ``rq_used``) are freed when those completions are polled.
- In ERR, every WR still queued and every WR posted later completes with WR_FLUSH_ERR.
- The responder executes the peer's requests strictly in sequence (``expected``); after an RNR
  NAK it drops requests until the NAKed one is sent again. A WRITE_BATCH is its writes in
  order: dropped whole unless it starts at ``expected``, and a write failing its checks is
  NAKed after the ones before it are placed.
"""

from __future__ import annotations

import errno
import itertools
import secrets
import struct
import threading
import time
from collections import deque

import numpy as np

from shm.errors import TransportError
from stages.verbs import base
from stages.verbs.base import (
    SEND_WC_OPCODE,
    WRITE_WR_DTYPE,
    Access,
    QPState,
    SendOpcode,
    WCOpcode,
    WCStatus,
    WorkCompletion,
    closed_error,
)
from stages.verbs.soft import batch, sendq, wire
from stages.verbs.soft.link import INLINE_MAX, IOV_MAX
from stages.verbs.soft.sendq import SendWR

_qp_numbers = itertools.count(secrets.randbelow(1 << 20) + 1)
RNR_BACKOFF_MIN, RNR_BACKOFF_MAX = 0.001, 0.02  # seconds; doubled per retry of a WR


class RecvWR:
    __slots__ = ("wr_id", "view", "length", "mr")

    def __init__(self, wr_id, view, length, mr):
        self.wr_id, self.view, self.length, self.mr = wr_id, view, length, mr


class SoftQP(base.QP):
    """An RC QP; unconnected (INIT) until the connection manager attaches a socket."""

    def __init__(self, pd, send_cq, recv_cq, *, max_send_wr: int, max_recv_wr: int,
                 rnr_retry: int = 0) -> None:
        if max_send_wr < 1 or max_recv_wr < 0:
            raise ValueError("max_send_wr must be >= 1 and max_recv_wr >= 0")
        if not 0 <= rnr_retry <= 7:
            raise ValueError(f"rnr_retry is 0..7 (7 = retry forever), not {rnr_retry}")
        if send_cq.context is not pd.context or recv_cq.context is not pd.context:
            raise ValueError("the CQs and the PD belong to different contexts")
        self.pd = pd
        self.send_cq, self.recv_cq = send_cq, recv_cq
        self.max_send_wr, self.max_recv_wr, self.rnr_retry = max_send_wr, max_recv_wr, rnr_retry
        self.qp_num = next(_qp_numbers) & 0xFFFFFF
        self.lock = threading.Condition(threading.Lock())
        self._state = QPState.INIT
        self.sq: deque = deque()  # SendWR and sendq.WriteRun entries
        self.rq: deque[RecvWR] = deque()
        self.sq_used = self.rq_used = 0
        self.next_seq = self.tx_next = 0
        self.rnr_until = 0.0  # monotonic time before which nothing is (re)transmitted
        self.unsignaled_done = 0  # completed unsignaled WRs awaiting a signaled one
        self.expected = 0  # responder: sequence of the next request to execute
        self.bytes_written = 0  # responder: RDMA WRITE payload bytes landed in our MRs
        self.ack_due: int | None = None  # responder: highest executed sequence not yet acked
        self.control: list[bytes] = []  # responder: NAK frames to send
        self.link = None
        send_cq._attach(self)
        recv_cq._attach(self)

    @property
    def state(self) -> QPState:
        return self._state

    # -- posting -------------------------------------------------------------------------
    def _resolve(self, addr: int, length: int, lkey: int, need: Access) -> tuple:
        mr = self.pd.lookup(lkey)
        if mr is None or (need and not mr.access & need):
            return None, None
        view = mr.slice(addr, length)
        return (mr, view) if view is not None else (None, None)

    def _check_postable(self) -> None:
        if self._closed:
            raise closed_error("QP")
        if self._state in (QPState.RESET, QPState.INIT, QPState.RTR):
            raise TransportError("cannot post a send on a QP that is not connected",
                                 errno=errno.EINVAL)

    def _sq_full(self, posted: str = "") -> TransportError:
        return TransportError(f"send queue full ({self.max_send_wr} WRs outstanding){posted}",
                              errno=errno.ENOMEM, hint="poll the send CQ")

    def post_send(self, wr_id: int, opcode: SendOpcode, addr: int, length: int, lkey: int, *,
                  remote_addr: int = 0, rkey: int = 0, signaled: bool = True) -> None:
        if type(opcode) is not SendOpcode:  # (an enum call costs a microsecond)
            opcode = SendOpcode(opcode)
        if opcode not in SEND_WC_OPCODE:
            raise ValueError(f"the soft provider posts RDMA_WRITE and SEND, not {opcode.name}")
        if not 0 <= length <= wire.MAX_MESSAGE:
            raise ValueError(f"message length {length} out of range")
        desc = b""
        if opcode == SendOpcode.RDMA_WRITE:
            try:
                desc = wire.DESC.pack(remote_addr, rkey, length)
            except struct.error:
                raise ValueError(f"remote address {remote_addr:#x} or rkey {rkey:#x} out of "
                                 "range") from None
        with self.lock:
            self._check_postable()
            if self.sq_used >= self.max_send_wr:
                raise self._sq_full()
            self.sq_used += 1
            with self.pd._lock:
                mr, view = self._resolve(addr, length, lkey, Access.NONE)
                if mr is not None:
                    mr.inflight += 1
            wr = SendWR(self.next_seq, wr_id, opcode, view, length, remote_addr, rkey,
                        signaled, mr, self.rnr_retry, desc)
            self.next_seq += 1
            self.sq.append(wr)
            inline = self._posted()
        if inline is not None:
            inline[0].send_claimed(*inline[1:])

    def post_writes(self, wrs: np.ndarray) -> None:
        """Post an array of RDMA WRITEs (``WRITE_WR_DTYPE``) under one lock; each behaves as
        if posted by ``post_send``, and a full send queue raises ENOMEM after posting the WRs
        that fit (ibv_post_send's bad_wr)."""
        if not isinstance(wrs, np.ndarray) or wrs.dtype != WRITE_WR_DTYPE or wrs.ndim != 1:
            raise ValueError("post_writes takes a 1-d array of WRITE_WR_DTYPE records")
        n = len(wrs)
        if n and int(wrs["length"].max()) > wire.MAX_MESSAGE:
            raise ValueError(f"a message length is over {wire.MAX_MESSAGE}")
        inline = None
        with self.lock:
            self._check_postable()
            take = min(n, self.max_send_wr - self.sq_used)
            if take:
                with self.pd._lock:
                    self.sq.extend(sendq.write_runs(self.pd, wrs[:take], self.next_seq,
                                                    self.rnr_retry, self._bad_write))
                self.sq_used += take
                self.next_seq += take
                inline = self._posted()
        if inline is not None:
            inline[0].send_claimed(*inline[1:])
        if take < n:
            raise self._sq_full(f": posted {take} of {n} writes")

    def _bad_write(self, seq: int, wr) -> SendWR:
        """The entry of a WRITE whose local SGE failed its checks."""
        return SendWR(seq, int(wr["wr_id"]), SendOpcode.RDMA_WRITE, None, int(wr["length"]),
                      int(wr["remote_addr"]), int(wr["rkey"]), bool(wr["signaled"]), None,
                      self.rnr_retry)

    def _posted(self):
        """New WRs are queued: flush them in ERR, fail a bad one whose turn it is, or send.

        Returns ``(link, frames, start, end)`` for the caller to pass to
        ``link.send_claimed`` once it has released the lock, or None."""
        if self._state == QPState.ERR:
            self._flush()
        elif self.sq[0].bad:
            self._fail_front(WCStatus.LOC_PROT_ERR)
        else:
            return self._kick()
        return None

    def _kick(self):
        """Claim the link for an inline send of the pending WRs when it is idle (saves a
        thread hand-off), else wake the writer."""
        link = self.link
        if (link is not None and time.monotonic() >= self.rnr_until
                and sendq.entry_at(self.sq, self.tx_next)[0].length_at(self.tx_next)
                <= INLINE_MAX and link.claim()):
            start, bufs = self.tx_next, []
            batch.collect(self, bufs, max_bytes=INLINE_MAX, max_iov=IOV_MAX)
            if bufs:
                return link, bufs, start, self.tx_next
            link.sending = False
        self.lock.notify_all()
        return None

    def post_recv(self, wr_id: int, addr: int, length: int, lkey: int) -> None:
        if length < 0:
            raise ValueError(f"receive length {length} out of range")
        with self.lock:
            if self._closed:
                raise closed_error("QP")
            if self.rq_used >= self.max_recv_wr:
                raise TransportError(f"receive queue full ({self.max_recv_wr} WRs posted)",
                                     errno=errno.ENOMEM, hint="poll the receive CQ")
            self.rq_used += 1
            with self.pd._lock:
                mr, view = self._resolve(addr, length, lkey, Access.LOCAL_WRITE)
                if mr is not None:
                    mr.inflight += 1
            self.rq.append(RecvWR(wr_id, view, length, mr))
            if self._state == QPState.ERR:
                self._flush()

    # -- completions (under self.lock) ---------------------------------------------------
    def _release(self, mr) -> None:
        if mr is not None:
            with self.pd._lock:
                mr.inflight -= 1

    def _release_each(self, mrs) -> None:
        """Drop one in-flight reference per entry of ``mrs`` (None entries skipped)."""
        counts: dict = {}
        for mr in mrs:
            if mr is not None:
                counts[mr] = counts.get(mr, 0) + 1
        self._release_counts(counts)

    def _release_counts(self, counts: dict) -> None:
        if counts:
            with self.pd._lock:
                for mr, count in counts.items():
                    mr.inflight -= count

    def _pop_sends(self, last: int) -> list:
        """Take the WRs up to sequence ``last`` off the send queue, as ``(entry, a, b)``
        pieces (a run's writes ``a .. b-1`` by index), splitting a run ``last`` lies in."""
        sq, pieces = self.sq, []
        while sq and sq[0].seq <= last:
            entry = sq[0]
            if type(entry) is SendWR:
                pieces.append((sq.popleft(), 0, 1))
            elif entry.end - 1 <= last:
                pieces.append((sq.popleft(), entry.done, entry.end - entry.seq0))
            else:
                stop = last + 1 - entry.seq0
                pieces.append((entry, entry.done, stop))
                entry.done, entry.seq = stop, last + 1
                break
        return pieces

    def _complete_sends(self, pieces: list, status: WCStatus) -> None:
        """Complete the ``(entry, a, b)`` pieces of ``_pop_sends`` (oldest first): one CQ push
        for all of their completions."""
        counts: dict = {}
        items, done, qp_num = [], self.unsignaled_done, self.qp_num
        failed = status != WCStatus.SUCCESS
        write = SEND_WC_OPCODE[SendOpcode.RDMA_WRITE]
        for entry, a, b in pieces:
            entry.release_into(counts, a, b)
            if type(entry) is SendWR:
                done += 1
                if entry.signaled or failed:
                    wc = WorkCompletion(entry.wr_id, status, SEND_WC_OPCODE[entry.opcode],
                                        entry.length, qp_num)
                    items.append((wc, self, True, done))
                    done = 0
                continue
            # A run: a completion per signaled write (per write when failing), each retiring
            # the unsignaled ones before it.
            where = np.arange(b - a) if failed else np.flatnonzero(entry.signaled[a:b])
            if not len(where):
                done += b - a
                continue
            retire = np.diff(where, prepend=-1)
            retire[0] += done
            at = where + a
            lengths = entry.cum[at + 1] - entry.cum[at]
            items += [(WorkCompletion(wr_id, status, write, length, qp_num), self, True, count)
                      for wr_id, length, count in zip(entry.wr_id[at].tolist(),
                                                      lengths.tolist(), retire.tolist(),
                                                      strict=True)]
            done = b - a - 1 - int(where[-1])
        self.unsignaled_done = done
        self._release_counts(counts)
        if items:
            self.send_cq._push_many(items)

    def _complete_recv(self, rwr: RecvWR, status: WCStatus, byte_len: int = 0) -> None:
        self._release(rwr.mr)
        wc = WorkCompletion(rwr.wr_id, status, WCOpcode.RECV, byte_len, self.qp_num)
        self.recv_cq._push(wc, self, False, 1)

    def _retire(self, is_send: bool, count: int) -> None:
        with self.lock:
            if is_send:
                self.sq_used -= count
            else:
                self.rq_used -= count

    def _flush(self) -> None:
        if self.sq:
            self._complete_sends(self._pop_sends(self.next_seq), WCStatus.WR_FLUSH_ERR)
        while self.rq:
            self._complete_recv(self.rq.popleft(), WCStatus.WR_FLUSH_ERR)

    def _enter_error(self) -> None:
        """Move to ERR: flush both queues and let the link say goodbye."""
        if self._state == QPState.ERR:
            return
        self._state = QPState.ERR
        self._flush()
        self.lock.notify_all()
        if self.link is not None:
            self.link.wind_down()

    def _fail_front(self, status: WCStatus) -> None:
        self._complete_sends(self._pop_sends(self.sq[0].seq), status)
        self._enter_error()

    # -- requester side, called by the link's reader -------------------------------------
    def on_ack(self, seq: int) -> None:
        sq = self.sq
        if sq and sq[0].seq <= seq:  # the queue holds consecutive sequence numbers
            self._complete_sends(self._pop_sends(seq), WCStatus.SUCCESS)
        if sq and sq[0].bad and self._state == QPState.RTS:
            self._fail_front(WCStatus.LOC_PROT_ERR)

    def on_nak(self, seq: int, reason: int) -> None:
        self.on_ack(seq - 1)
        if self._state != QPState.RTS or not self.sq or self.sq[0].seq != seq:
            return
        wr = self.sq[0]
        if reason != wire.NAK_RNR:
            self._fail_front(wire.NAK_STATUS.get(reason, WCStatus.REM_OP_ERR))
            return
        if self.rnr_retry != 7:
            if wr.rnr_left == 0:
                self._fail_front(WCStatus.RNR_RETRY_EXC_ERR)
                return
            wr.rnr_left -= 1
        delay = min(RNR_BACKOFF_MIN * (1 << min(wr.rnr_count, 10)), RNR_BACKOFF_MAX)
        wr.rnr_count += 1
        self.tx_next = seq
        self.rnr_until = time.monotonic() + delay
        self.lock.notify_all()

    # -- responder side, called by the link's reader -------------------------------------
    def _nak(self, seq: int, reason: int) -> None:
        self.control.append(wire.frame(wire.NAK, seq, flags=reason))
        self.lock.notify_all()

    def accept_request(self, kind: int, seq: int, remote_addr: int, rkey: int, length: int):
        """Where the payload of an incoming request goes: ``(view, target)`` or None to drop.

        ``target`` is the MR written into (its in-flight count is held until ``request_done``)
        or the RecvWR consumed.
        """
        if self._state != QPState.RTS or seq != self.expected:
            return None
        if kind == wire.WRITE:
            with self.pd._lock:
                mr = self.pd.lookup(rkey)
                view = None
                if mr is not None and mr.remote_write:
                    view = mr.slice(remote_addr, length)
                if view is None:
                    self._nak(seq, wire.NAK_REM_ACCESS)
                    self._enter_error()
                    return None
                mr.inflight += 1
            if mr.on_demand:
                mr.fault_in(mr.local_address + (remote_addr - mr.addr), length)
            return view, mr
        if not self.rq:
            self._nak(seq, wire.NAK_RNR)
            return None
        rwr = self.rq.popleft()
        if rwr.view is None:
            self._complete_recv(rwr, WCStatus.LOC_PROT_ERR)
            self._nak(seq, wire.NAK_REM_OP)
            self._enter_error()
            return None
        if length > rwr.length:
            self._complete_recv(rwr, WCStatus.LOC_LEN_ERR)
            self._nak(seq, wire.NAK_REM_INV_REQ)
            self._enter_error()
            return None
        return rwr.view[:length], rwr

    def request_aborted(self, target) -> None:
        """The connection broke while the payload was arriving."""
        if isinstance(target, RecvWR):
            self._complete_recv(target, WCStatus.WR_FLUSH_ERR)
        else:
            self._release(target)

    def request_done(self, seq: int, length: int, target) -> None:
        """The payload of request ``seq`` is placed: complete a RECV, schedule the ACK."""
        if isinstance(target, RecvWR):
            if self._state == QPState.RTS:
                self._complete_recv(target, WCStatus.SUCCESS, length)
            else:
                self._complete_recv(target, WCStatus.WR_FLUSH_ERR)
        else:
            self._release(target)
        self.expected = seq + 1
        self.ack_due = seq  # sent by the link when it has read what is there (coalesced)

    def accept_batch(self, first: int, descs: np.ndarray):
        """Where the payloads of a WRITE_BATCH go: ``(k, views, mrs)`` or None to drop it.

        The first ``k`` writes pass the checks; their MRs (``mrs``) stay in flight until
        ``batch_done``. A batch that does not start at ``expected`` is dropped whole."""
        if self._state != QPState.RTS or first != self.expected:
            return None
        with self.pd._lock:
            k, views, mrs, ranges = batch.remote_targets(self.pd, descs)
        batch.populate(ranges)  # on-demand MRs: fault the written ranges in before the data
        return k, views, mrs

    def batch_done(self, first: int, count: int, k: int, mrs: list) -> None:
        """The first ``k`` writes of a batch of ``count`` are placed; NAK write ``k`` if it
        failed its checks (the rest of the batch is dropped)."""
        self._release_each(mrs)
        if k:
            self.expected = first + k
            self.ack_due = first + k - 1
        if k < count:
            self._nak(first + k, wire.NAK_REM_ACCESS)
            self._enter_error()

    def batch_aborted(self, mrs: list) -> None:
        """The connection broke while a batch's payloads were arriving."""
        self._release_each(mrs)

    # -- connection ----------------------------------------------------------------------
    def attach(self, link) -> None:
        """Called by the connection manager: the QP is connected (RTS)."""
        with self.lock:
            if self._closed:
                raise closed_error("QP")
            if self._state != QPState.INIT or self.link is not None:
                raise TransportError(f"QP is {self._state.name}, not INIT: it cannot be "
                                     "connected again", errno=errno.EINVAL)
            self.link = link
            self._state = QPState.RTS
        link.start()

    def link_lost(self) -> None:
        """The connection broke or the peer went away: flush everything."""
        with self.lock:
            self._enter_error()

    def disconnect(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._enter_error()

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._state = QPState.ERR
            link, self.link = self.link, None
            self.lock.notify_all()
        if link is not None:
            link.close()
        with self.lock:
            # No flush completions on destroy (as ibv_destroy_qp); just drop the references.
            counts: dict = {}
            for entry in self.sq:
                entry.release_rest(counts)
            self._release_counts(counts)
            for rwr in self.rq:
                self._release(rwr.mr)
            self.sq.clear()
            self.rq.clear()
        self.send_cq._detach(self)
        self.recv_cq._detach(self)
        with self.pd._lock:
            self.pd._qps.discard(self)
