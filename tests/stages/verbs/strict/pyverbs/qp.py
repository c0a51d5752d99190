"""The strict double's ``pyverbs.qp``: QPCap, QPInitAttr, QPAttr, QP and their state rules."""

from __future__ import annotations

import errno

import numpy as np

from pyverbs import enums as e
from pyverbs._kernel import _QPS, PAGE, _rdma
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsUserError


class QPCap:
    def __init__(self, max_send_wr=1, max_recv_wr=10, max_send_sge=1, max_recv_sge=1,
                 max_inline_data=0) -> None:
        self.max_send_wr, self.max_recv_wr = max_send_wr, max_recv_wr
        self.max_send_sge, self.max_recv_sge = max_send_sge, max_recv_sge
        self.max_inline_data = max_inline_data


class QPInitAttr:
    def __init__(self, qp_type=4, qp_context=None, scq=None, rcq=None, srq=None, cap=None,
                 sq_sig_all=1) -> None:
        self.qp_type, self.qp_context, self.send_cq, self.recv_cq = qp_type, qp_context, scq, rcq
        self.srq, self.cap, self.sq_sig_all = srq, cap or QPCap(), sq_sig_all


class QPAttr:
    __slots__ = ("qp_state", "cur_qp_state", "qp_access_flags", "rnr_retry", "dest_qp_num",
                 "rq_psn", "sq_psn", "timeout", "retry_cnt", "min_rnr_timer", "max_rd_atomic",
                 "max_dest_rd_atomic", "path_mtu", "port_num", "pkey_index", "ah_attr")

    def __init__(self, qp_state=e.IBV_QPS_INIT, cur_qp_state=e.IBV_QPS_RESET, port_num=1,
                 path_mtu=3) -> None:       # 3: IBV_MTU_1024
        for name in self.__slots__:
            setattr(self, name, 0)
        self.qp_state, self.cur_qp_state = qp_state, cur_qp_state
        self.port_num, self.path_mtu = port_num, path_mtu


_NEXT = {e.IBV_QPS_RESET: {e.IBV_QPS_INIT}, e.IBV_QPS_INIT: {e.IBV_QPS_INIT, e.IBV_QPS_RTR},
         e.IBV_QPS_RTR: {e.IBV_QPS_RTS}, e.IBV_QPS_RTS: {e.IBV_QPS_RTS, e.IBV_QPS_SQD}}


class QP:
    def __init__(self, creator, init_attr, qp_attr=None) -> None:
        if not isinstance(creator, PD):
            raise PyverbsUserError("strict double: an RC QP is made on a PD")
        scq, rcq = init_attr.send_cq, init_attr.recv_cq
        if init_attr.qp_type != e.IBV_QPT_RC:
            raise PyverbsUserError("strict double: RC QPs only")
        if scq.ctx is not creator.ctx or rcq.ctx is not creator.ctx:
            raise _rdma("Failed to create QP", errno.EINVAL)
        cap = init_attr.cap
        self.pd, self.init_attr = creator, init_attr
        self.soft = creator.soft.create_qp(scq.soft, rcq.soft, max_send_wr=cap.max_send_wr,
                                           max_recv_wr=cap.max_recv_wr, rnr_retry=0)
        self._wrap_responder()
        self._state = e.IBV_QPS_RESET
        self.access = 0
        if qp_attr is not None:   # RC: moved to INIT, as pyverbs does with a qp_attr
            if qp_attr.port_num != 1:       # the device has one port
                self.soft.close()
                raise _rdma("Failed to modify QP state to init", errno.EINVAL)
            self.access = qp_attr.qp_access_flags
            self._state = e.IBV_QPS_INIT
        self._closed = False
        _QPS[self.soft.qp_num] = self
        creator._children.append(self)

    qp_num = property(lambda self: self.soft.qp_num)
    qp_type = property(lambda self: e.IBV_QPT_RC)

    @property
    def qp_state(self):
        return self._state          # ibv_qp->state: what the last modify set

    @property
    def device(self) -> str:
        return self.pd.ctx.name

    def query(self, attr_mask):
        from stages.verbs.base import QPState

        attr = QPAttr(qp_state=self._state)
        if self.soft.state == QPState.ERR:
            attr.qp_state = e.IBV_QPS_ERR
        attr.cur_qp_state = attr.qp_state
        attr.rnr_retry = self.soft.rnr_retry
        return attr, self.init_attr

    def modify(self, qp_attr, comp_mask) -> None:
        if not comp_mask & e.IBV_QP_STATE:
            return
        new = qp_attr.qp_state
        if new == e.IBV_QPS_ERR:
            self._state = new
            self.soft.disconnect()
            return
        if new == e.IBV_QPS_RESET:
            self._state = new
            return
        if new not in _NEXT.get(self._state, ()):
            raise _rdma("Failed to modify QP", errno.EINVAL)
        if new == e.IBV_QPS_RTR and not comp_mask & e.IBV_QP_DEST_QPN:
            raise _rdma("Failed to modify QP", errno.EINVAL)
        if comp_mask & e.IBV_QP_RNR_RETRY:
            if not 0 <= qp_attr.rnr_retry <= 7:
                raise _rdma("Failed to modify QP", errno.EINVAL)
            self.soft.rnr_retry = qp_attr.rnr_retry
        if comp_mask & e.IBV_QP_ACCESS_FLAGS:
            self.access = qp_attr.qp_access_flags
        self._state = new

    def post_send(self, wr, bad_wr=None) -> None:
        from stages.verbs.base import WRITE_WR_DTYPE, SendOpcode

        if self._state < e.IBV_QPS_RTS:
            raise _rdma("Failed to post send", errno.EINVAL)
        chain = []
        while wr is not None:
            chain.append(wr)
            wr = wr._next
        signal_all = bool(self.init_attr.sq_sig_all)
        try:
            if all(w.opcode == e.IBV_WR_RDMA_WRITE for w in chain):
                recs = np.zeros(len(chain), WRITE_WR_DTYPE)
                recs["wr_id"] = [w.wr_id for w in chain]
                recs["addr"] = [w._sg[0] for w in chain]
                recs["length"] = [w._sg[1] for w in chain]
                recs["lkey"] = [w._sg[2] for w in chain]
                recs["remote_addr"] = [w._remote[1] for w in chain]
                recs["rkey"] = [w._remote[0] for w in chain]
                recs["signaled"] = [signal_all or bool(w.send_flags & e.IBV_SEND_SIGNALED)
                                    for w in chain]
                self.soft.post_writes(recs)
                return
            for w in chain:
                addr, length, lkey = w._sg
                rkey, remote = w._remote
                self.soft.post_send(w.wr_id, SendOpcode(w.opcode), addr, length, lkey,
                                    remote_addr=remote, rkey=rkey,
                                    signaled=signal_all
                                    or bool(w.send_flags & e.IBV_SEND_SIGNALED))
        except Exception as exc:  # noqa: BLE001 - as ibv_post_send's return value
            raise _rdma("Failed to post send", getattr(exc, "errno", None) or errno.EINVAL) \
                from None

    def post_recv(self, wr, bad_wr=None) -> None:
        if self._state == e.IBV_QPS_RESET:
            raise _rdma("Failed to post receive", errno.EINVAL)
        while wr is not None:
            addr, length, lkey = wr._sg
            try:
                self.soft.post_recv(wr.wr_id, addr, length, lkey)
            except Exception as exc:  # noqa: BLE001
                raise _rdma("Failed to post receive", getattr(exc, "errno", None)
                            or errno.EINVAL) from None
            wr = wr._next

    def _wrap_responder(self) -> None:
        """RNR NAK for a write into a page of an ODP MR the device has not mapped."""
        from stages.verbs.soft import wire

        soft, pd = self.soft, self.pd
        one, batch = soft.accept_request, soft.accept_batch

        def missing(rkeys, addrs, lengths) -> bool:
            hit = False
            for rkey, addr, length in zip(rkeys, addrs, lengths, strict=True):
                pages, mr = pd.odp.get(int(rkey)), pd.mrs.get(int(rkey))
                if pages is None or mr is None or not length:
                    continue
                start = int(addr) - mr.addr
                if start < 0 or start + int(length) > mr.length:
                    continue
                span = pages[start // PAGE:-(-(start + int(length)) // PAGE)]
                if not span.all():
                    span[:] = True          # the fault is serviced while the requester waits
                    hit = True
            return hit

        def accept_request(kind, seq, remote_addr, rkey, length):
            if kind == wire.WRITE and soft.state == 3 and seq == soft.expected \
                    and missing([rkey], [remote_addr], [length]):
                soft._nak(seq, wire.NAK_RNR)
                return None
            return one(kind, seq, remote_addr, rkey, length)

        def accept_batch(first, descs):
            if soft.state == 3 and first == soft.expected and missing(
                    descs["rkey"].tolist(), descs["remote_addr"].tolist(),
                    descs["length"].tolist()):
                soft._nak(first, wire.NAK_RNR)
                return None
            return batch(first, descs)

        soft.accept_request, soft.accept_batch = accept_request, accept_batch

    def close(self) -> None:
        if self._closed:
            return
        self.soft.close()
        self._closed = True
