"""RC queue pair of the soft provider: send and receive queues, completions, errors.

The QP owns the verbs state; ``link.Link`` owns the socket and its two threads. Everything here
runs under ``qp.lock``, which the link's writer waits on as a condition.

Invariants:
- ``sq`` holds the posted send WRs not yet completed, in posting (= sequence) order;
  ``tx_next`` is the sequence of the next one to transmit. A WR is completed by a cumulative ACK
  from the peer's responder (RC: completion means the data is placed) or by an error.
- Completions come in posting order; a signaled one retires the unsignaled WRs before it, and
  slots (``sq_used``, ``rq_used``) are freed when those completions are polled.
- In ERR, every WR still queued and every WR posted later completes with WR_FLUSH_ERR.
- The responder executes the peer's requests strictly in sequence (``expected``); after an RNR
  NAK it drops requests until the NAKed one is sent again.
"""

from __future__ import annotations

import errno
import itertools
import secrets
import threading
import time
from collections import deque

from pipeline.errors import TransportError
from stages.verbs import base
from stages.verbs.base import (
    SEND_WC_OPCODE,
    Access,
    QPState,
    SendOpcode,
    WCOpcode,
    WCStatus,
    WorkCompletion,
    closed_error,
)
from stages.verbs.soft import memory, wire
from stages.verbs.soft.link import INLINE_MAX

_qp_numbers = itertools.count(secrets.randbelow(1 << 20) + 1)
RNR_BACKOFF_MIN, RNR_BACKOFF_MAX = 0.001, 0.02  # seconds; doubled per retry of a WR


class SendWR:
    __slots__ = ("seq", "wr_id", "opcode", "view", "length", "remote_addr", "rkey", "signaled",
                 "mr", "rnr_left", "rnr_count", "bad")

    def __init__(self, seq, wr_id, opcode, view, length, remote_addr, rkey, signaled, mr,
                 rnr_left):
        self.seq, self.wr_id, self.opcode, self.view = seq, wr_id, opcode, view
        self.length, self.remote_addr, self.rkey = length, remote_addr, rkey
        self.signaled, self.mr, self.rnr_left, self.rnr_count = signaled, mr, rnr_left, 0
        self.bad = mr is None  # a local protection error, reported when its turn comes


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
        self.sq: deque[SendWR] = deque()
        self.rq: deque[RecvWR] = deque()
        self.sq_used = self.rq_used = 0
        self.next_seq = self.tx_next = 0
        self.rnr_until = 0.0  # monotonic time before which nothing is (re)transmitted
        self.unsignaled_done = 0  # completed unsignaled WRs awaiting a signaled one
        self.expected = 0  # responder: sequence of the next request to execute
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

    def post_send(self, wr_id: int, opcode: SendOpcode, addr: int, length: int, lkey: int, *,
                  remote_addr: int = 0, rkey: int = 0, signaled: bool = True) -> None:
        opcode = SendOpcode(opcode)
        if opcode not in SEND_WC_OPCODE:
            raise ValueError(f"the soft provider posts RDMA_WRITE and SEND, not {opcode.name}")
        if not 0 <= length <= wire.MAX_MESSAGE:
            raise ValueError(f"message length {length} out of range")
        with self.lock:
            if self._closed:
                raise closed_error("QP")
            if self._state in (QPState.RESET, QPState.INIT, QPState.RTR):
                raise TransportError("cannot post a send on a QP that is not connected",
                                     errno=errno.EINVAL)
            if self.sq_used >= self.max_send_wr:
                raise TransportError(f"send queue full ({self.max_send_wr} WRs outstanding)",
                                     errno=errno.ENOMEM, hint="poll the send CQ")
            self.sq_used += 1
            with self.pd._lock:
                mr, view = self._resolve(addr, length, lkey, Access.NONE)
                if mr is not None:
                    mr.inflight += 1
            wr = SendWR(self.next_seq, wr_id, opcode, view, length, remote_addr, rkey,
                        signaled, mr, self.rnr_retry)
            self.next_seq += 1
            self.sq.append(wr)
            if self._state == QPState.ERR:
                self._flush()
            elif self.sq[0] is wr and wr.bad:
                self._fail_front(WCStatus.LOC_PROT_ERR)
            elif not self._send_inline(wr):
                self.lock.notify_all()

    def _send_inline(self, wr: SendWR) -> bool:
        """Transmit a WR from the caller's thread when the link is idle (saves a wake)."""
        if (wr.bad or wr.length > INLINE_MAX or self.tx_next != wr.seq or self.link is None
                or time.monotonic() < self.rnr_until):
            return False
        kind = wire.WRITE if wr.opcode == SendOpcode.RDMA_WRITE else wire.SEND
        bufs = [wire.frame(kind, wr.seq, remote_addr=wr.remote_addr, rkey=wr.rkey,
                           length=wr.length)]
        if wr.length:
            bufs.append(wr.view)
        if not self.link.try_send_now(bufs):
            return False
        self.tx_next += 1
        return True

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

    def _complete_send(self, wr: SendWR, status: WCStatus) -> None:
        self._release(wr.mr)
        self.unsignaled_done += 1
        if wr.signaled or status != WCStatus.SUCCESS:
            wc = WorkCompletion(wr.wr_id, status, SEND_WC_OPCODE[wr.opcode], wr.length,
                                self.qp_num)
            self.send_cq._push(wc, self, True, self.unsignaled_done)
            self.unsignaled_done = 0

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
        while self.sq:
            self._complete_send(self.sq.popleft(), WCStatus.WR_FLUSH_ERR)
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
        self._complete_send(self.sq.popleft(), status)
        self._enter_error()

    # -- requester side, called by the link's reader -------------------------------------
    def on_ack(self, seq: int) -> None:
        sq = self.sq
        while sq and sq[0].seq <= seq:
            self._complete_send(sq.popleft(), WCStatus.SUCCESS)
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
                if mr is not None and mr.access & Access.REMOTE_WRITE:
                    view = mr.slice(remote_addr, length)
                if view is None:
                    self._nak(seq, wire.NAK_REM_ACCESS)
                    self._enter_error()
                    return None
                mr.inflight += 1
            if mr.on_demand:
                memory.populate(mr.local_address + (remote_addr - mr.addr), length)
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
            for wr in self.sq:
                self._release(wr.mr)
            for rwr in self.rq:
                self._release(rwr.mr)
            self.sq.clear()
            self.rq.clear()
        self.send_cq._detach(self)
        self.recv_cq._detach(self)
        with self.pd._lock:
            self.pd._qps.discard(self)
