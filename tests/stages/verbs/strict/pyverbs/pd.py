"""The strict double's ``pyverbs.pd``: PD (allocated or imported by handle), advise_mr."""

from __future__ import annotations

import errno

import numpy as np

from pyverbs import enums as e
from pyverbs._kernel import PAGE, _handles, _rdma, shares_pd, table_add, table_read
from pyverbs.device import Context
from pyverbs.pyverbs_error import PyverbsUserError


class PD:
    def __init__(self, creator, **kwargs) -> None:
        from stages.verbs.base import PDHandle

        if not isinstance(creator, Context):
            raise PyverbsUserError("strict double: a PD is made on a Context")
        self.ctx, self._closed, self._children = creator, False, []
        self.odp: dict[int, np.ndarray] = {}       # lkey -> page residency of an ODP MR
        self.mrs: dict[int, object] = {}           # lkey -> pyverbs.mr.MR
        if "handle" in kwargs:
            handle = kwargs["handle"]
            if not shares_pd(creator.name):
                raise _rdma("Failed to import PD", errno.EOPNOTSUPP)
            found = [r for r in table_read(creator.cmd_fd) if r.get("pd") == handle]
            if not found:
                raise _rdma("Failed to import PD", errno.EINVAL)
            self.soft = creator.soft.import_pd(PDHandle("soft", 0, found[0]["table"]))
            self._handle, self.imported = handle, True
        else:
            self.soft = creator.soft.alloc_pd()
            self._handle, self.imported = None, False
        creator._children.append(self)

    @property
    def handle(self) -> int:
        if self._handle is None:
            name = self.soft.export().name
            self._handle = next(_handles)
            table_add(self.ctx.cmd_fd, {"pd": self._handle, "table": name})
        return self._handle

    def advise_mr(self, advise, flags, sg_list) -> int:
        from stages.verbs.soft.memory import populate

        for sge in sg_list:
            pages = self.odp.get(sge.lkey)
            mr = self.mrs.get(sge.lkey)
            if pages is None or mr is None:
                raise _rdma("Failed to advise MR", errno.EOPNOTSUPP)
            if advise == e._IBV_ADVISE_MR_ADVICE_PREFETCH_WRITE:
                start = sge.addr - mr.addr
                if start < 0 or start + sge.length > mr.length:
                    raise _rdma("Failed to advise MR", errno.EFAULT)
                populate(sge.addr, sge.length)
                pages[start // PAGE:-(-(start + sge.length) // PAGE)] = True
        return 0

    def unimport(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        for child in reversed(list(self._children)):
            child.close()
        self.soft.close()
        self._closed = True
