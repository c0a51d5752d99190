"""The strict double's ``pyverbs.cq``: CompChannel (a pollable fd), CQ, WC."""

from __future__ import annotations

import os
import select
import threading
from collections import deque

from pyverbs import enums as e
from pyverbs._kernel import UNSET_OPCODE, marked_fd
from pyverbs.pyverbs_error import PyverbsError


class CompChannel:
    def __init__(self, context) -> None:
        self.ctx = context
        self.fd = marked_fd("infinibandevent")
        self._ready: deque = deque()
        self._lock = threading.Lock()
        self._closed = False

    def notify(self, cq) -> None:
        with self._lock:
            if self._closed:
                return
            self._ready.append(cq)
            os.write(self.fd, b"e")

    def get_cq_event(self, expected_cq) -> None:
        select.select([self.fd], [], [])
        with self._lock:
            os.read(self.fd, 1)
            cq = self._ready.popleft()
        if cq is not expected_cq:
            raise PyverbsError("strict double: the CQ event is for another CQ")
        cq.num_events += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def _soft_cq_class():
    from stages.verbs.soft.cq import SoftCQ

    class NotifyingCQ(SoftCQ):
        owner = None

        def _push(self, *args) -> None:
            super()._push(*args)
            self.owner._completed()

        def _push_many(self, items) -> None:
            super()._push_many(items)
            if items:
                self.owner._completed()

    return NotifyingCQ


class WC:
    def __init__(self, wr_id=0, status=0, opcode=0, vendor_err=0, byte_len=0, qp_num=0,
                 src_qp=0, imm_data=0, wc_flags=0, pkey_index=0, slid=0, sl=0,
                 dlid_path_bits=0) -> None:
        self.wr_id, self.status, self.opcode, self.vendor_err = wr_id, status, opcode, vendor_err
        self.byte_len, self.qp_num, self.src_qp = byte_len, qp_num, src_qp


class CQ:
    def __init__(self, context, cqe, cq_context=None, channel=None, comp_vector=0) -> None:
        self.ctx, self.channel = context, channel
        self.soft = context.soft._adopt(_soft_cq_class()(context.soft, cqe))
        self.soft.owner = self
        self._armed = False
        self._lock = threading.Lock()
        self.num_events = 0
        self._closed = False
        context._children.append(self)

    def _completed(self) -> None:
        with self._lock:
            armed, self._armed = self._armed, False
        if armed and self.channel is not None:
            self.channel.notify(self)

    def req_notify(self, solicited_only=False) -> None:
        with self._lock:
            self._armed = True
        if len(self.soft):          # completions already waiting: the event fires at once
            self._completed()

    def ack_events(self, num_events) -> None:
        self.num_events -= num_events

    def poll(self, num_entries=1):
        wcs = []
        for wc in self.soft.poll(num_entries):
            status = int(wc.status)
            opcode = int(wc.opcode) if status == e.IBV_WC_SUCCESS else UNSET_OPCODE
            wcs.append(WC(wr_id=wc.wr_id, status=status, opcode=opcode,
                          byte_len=wc.byte_len, qp_num=wc.qp_num))
        return len(wcs), wcs

    def close(self) -> None:
        if self._closed:
            return
        if self.num_events:
            raise PyverbsError(f"strict double: {self.num_events} CQ event(s) not acked "
                               "(ibv_destroy_cq would hang)")
        self.soft.close()
        self._closed = True
