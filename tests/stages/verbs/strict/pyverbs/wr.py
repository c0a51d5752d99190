"""The strict double's ``pyverbs.wr``: SGE, RecvWR, SendWR, counted as pyverbs 44 leaks them."""

from __future__ import annotations

from pyverbs import enums as e
from pyverbs.pyverbs_error import PyverbsUserError

ALLOCATED = {"SendWR": 0, "SGE": 0, "RecvWR": 0}     # made so far (never freed in v44)


class SGE:
    def __init__(self, addr, length, lkey) -> None:
        ALLOCATED["SGE"] += 1
        self.addr, self.length, self.lkey = addr, length, lkey


class RecvWR:
    def __init__(self, wr_id=0, num_sge=0, sg=None, next_wr=None) -> None:
        ALLOCATED["RecvWR"] += 1
        if num_sge < 1 or not sg:
            raise PyverbsUserError("strict double: a receive WR of one SGE at least")
        self.wr_id, self.num_sge = wr_id, num_sge
        self._sg = (sg[0].addr, sg[0].length, sg[0].lkey)       # copied, as in C
        self._next = next_wr

    @property
    def next_wr(self):
        return self._next

    @next_wr.setter
    def next_wr(self, val) -> None:
        if val is None:
            raise TypeError("next_wr cannot be None")
        self._next = val


class SendWR:
    def __init__(self, wr_id=0, opcode=e.IBV_WR_SEND, num_sge=0, imm_data=0, sg=None,
                 send_flags=e.IBV_SEND_SIGNALED, next_wr=None) -> None:
        ALLOCATED["SendWR"] += 1
        if num_sge < 1 or sg is None:
            raise PyverbsUserError("A WR needs at least one SGE")
        self.wr_id, self.opcode, self.num_sge, self.imm_data = wr_id, opcode, num_sge, imm_data
        self.send_flags = send_flags
        self._copied = (sg[0].addr, sg[0].length, sg[0].lkey)     # copy_sg_array, as in C
        self._sge = None
        self._remote = (0, 0)
        self._next = next_wr

    @property
    def _sg(self) -> tuple:
        sge = self._sge                 # after ``sg_list = sge``: that SGE's live fields
        return self._copied if sge is None else (sge.addr, sge.length, sge.lkey)

    @property
    def next_wr(self):
        return self._next

    @next_wr.setter
    def next_wr(self, val) -> None:
        if val is None:
            raise TypeError("next_wr cannot be None")
        self._next = val

    @property
    def sg_list(self):
        raise AttributeError("sg_list is write-only")

    @sg_list.setter
    def sg_list(self, val) -> None:
        if val is None:
            raise TypeError("sg_list cannot be None")
        self._sge = val     # v44: send_wr.sg_list = val.sge, a pointer to the SGE, no copy

    def set_wr_rdma(self, rkey, addr) -> None:
        self._remote = (rkey, addr)
