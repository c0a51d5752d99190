"""The strict double's ``pyverbs.mr``: MR (registered, or imported by a real handle)."""

from __future__ import annotations

import errno

import numpy as np

from pyverbs import enums as e
from pyverbs._kernel import PAGE, _handles, _rdma, has_odp, table_add, table_read
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsUserError


class MR:
    def __init__(self, creator, length=0, access=0, address=None, implicit=False,
                 **kwargs) -> None:
        from stages.verbs.base import Access, MRHandle

        if not isinstance(creator, PD):
            raise PyverbsUserError("strict double: an MR is made on a PD")
        self.pd, self._closed, self._handle = creator, False, None
        if "handle" in kwargs:
            handle = kwargs["handle"]
            found = [r for r in table_read(creator.ctx.cmd_fd) if r.get("mr") == handle]
            if not handle or not found:
                raise _rdma("Failed to import MR", errno.ENOENT)
            fields = dict(found[0]["soft"])
            self.soft = creator.soft.import_mr(MRHandle(**fields))
            self._handle = handle
        else:
            if address is None:
                raise PyverbsUserError("strict double: register memory you own (address=)")
            if access & e.IBV_ACCESS_ON_DEMAND and not has_odp(creator.ctx.name):
                raise _rdma("Failed to register a MR", errno.EOPNOTSUPP)
            try:
                self.soft = creator.soft.reg_mr(address, length, Access(access))
            except Exception as exc:  # noqa: BLE001 - the kernel's answer, as an errno
                raise _rdma("Failed to register a MR", getattr(exc, "errno", None)
                            or errno.ENOMEM) from None
            if access & e.IBV_ACCESS_ON_DEMAND:
                creator.odp[self.soft.lkey] = np.zeros(-(-length // PAGE), bool)
        self.addr, self.length = self.soft.addr, self.soft.length
        creator.mrs[self.soft.lkey] = self
        creator._children.append(self)

    lkey = property(lambda self: self.soft.lkey)
    rkey = property(lambda self: self.soft.rkey)

    @property
    def handle(self) -> int:
        if self._handle is None:
            h = self.soft.export()
            self._handle = next(_handles)
            table_add(self.pd.ctx.cmd_fd, {"mr": self._handle, "soft": {
                "provider": h.provider, "pd_name": h.pd_name, "lkey": h.lkey, "rkey": h.rkey,
                "addr": h.addr, "length": h.length, "access": h.access, "slot": h.slot,
                "path": h.path, "file_offset": h.file_offset}})
        return self._handle

    def unimport(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.soft.close()
        except Exception as exc:  # noqa: BLE001 - EBUSY and the like, as pyverbs reports them
            raise _rdma("Failed to dereg MR", getattr(exc, "errno", None) or errno.EBUSY) \
                from None
        self.pd.mrs.pop(self.soft.lkey, None)
        self.pd.odp.pop(self.soft.lkey, None)
        self._closed = True
