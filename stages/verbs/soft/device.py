"""Device, protection domain and memory regions of the soft provider.

Keys: an MR's lkey equals its rkey (as on most HCAs), a random non-zero 32-bit value unique in
its PD in this process (QEMU reads an rkey of 0 as "not registered"). A PD resolves both local
SGEs and incoming remote writes through its key table, which holds the MRs registered in it here
and the MRs imported into it here. An MR counts the work requests that use it; deregistering
(or un-importing) one that is in use fails with EBUSY instead of pulling memory from under a
transfer.
"""

from __future__ import annotations

import errno
import secrets
import threading

from shm.errors import TransportError
from stages.verbs import base
from stages.verbs.base import Access, MRHandle, PDHandle, closed_error
from stages.verbs.soft import faulting, memory
from stages.verbs.soft.cq import SoftCQ
from stages.verbs.soft.pdtable import PDTable

PROVIDER = "soft"
DEVICE = "soft0"


class SoftMR(base.MR):
    """A registered region (pinned unless ON_DEMAND), or an import of one registered in
    another process."""

    def __init__(self, pd: SoftPD, key: int, addr: int, length: int, access: Access, *,
                 local_address: int, mapping: memory.FileMapping | None = None,
                 handle: MRHandle | None = None) -> None:
        self.pd = pd
        self.lkey = self.rkey = key
        self.addr = addr
        self.length = length
        self.access = Access(access)
        self.imported = handle is not None
        self.local_address = local_address  # where the memory is mapped in this process
        self._mapping = mapping
        self._handle = handle
        self._slot = handle.slot if handle else -1
        self._bytes: memoryview | None = None      # made on first use (see _view)
        self.inflight = 0  # work requests using this MR (guarded by pd._lock)
        self.on_demand = bool(self.access & Access.ON_DEMAND)  # populate what a write targets
        self.remote_write = bool(self.access & Access.REMOTE_WRITE)  # (a Flag test is slow)
        self._faults: faulting.FaultMap | None = None
        self._backing_held = False

    @property
    def _view(self) -> memoryview:
        """The MR's bytes, made when first asked for: a source chunk's MR is only ever a
        local key, and making a view costs a fifth of what registering one does."""
        view = self._bytes
        if view is None:
            view = self._bytes = memory.view(self.local_address, self.length)
        return view

    def slice(self, addr: int, length: int) -> memoryview | None:
        """The bytes ``[addr, addr+length)`` of this MR's address space, or None if outside."""
        offset = addr - self.addr
        if offset < 0 or length < 0 or offset + length > self.length:
            return None
        return self._view[offset:offset + length]

    def fault_in(self, address: int, length: int) -> None:
        """The responder is about to write ``[address, address+length)`` (local addresses) of
        this on-demand MR: fault it in, and fault ahead of it (``faulting``)."""
        if self._faults is None:
            self._faults = faulting.FaultMap(self)
        self._faults.fault_in(address, length)

    def prefetch(self) -> None:
        """Fault the whole region in now; writes into it then skip their own faulting."""
        if self._closed or not self.on_demand:
            return
        memory.populate(self.local_address, self.length)
        self.on_demand = False       # every page is in memory

    def export(self) -> MRHandle:
        if self._closed:
            raise closed_error("MR")
        if self._handle is not None:
            return self._handle
        return self.pd.export_mrs([self])[0]

    def _make_handle(self, table: PDTable, path: str, file_offset: int) -> MRHandle:
        self._handle = MRHandle(PROVIDER, table.name, self.lkey, self.rkey, self.addr,
                                self.length, int(self.access), slot=self._slot, path=path,
                                file_offset=file_offset)
        return self._handle

    def close(self) -> None:
        pd = self.pd
        with pd._lock:
            if self._closed:
                return
            if self.inflight:
                raise TransportError(f"MR {self.lkey:#x} is used by {self.inflight} work "
                                     "request(s) in flight", errno=errno.EBUSY)
            if not self.imported and self._slot >= 0:
                pd._table.remove(self._slot)  # EBUSY while another process holds an import
            self._closed = True
            pd._mrs.pop(self.lkey, None)
        if self._bytes is not None:
            self._bytes.release()
        if self.imported:
            pd._table.release(self._slot)
            self._mapping.close()
        else:
            if self._backing_held:
                memory.BACKINGS.release(self.local_address, self.length)
            if not self.access & Access.ON_DEMAND:
                memory.PINS.unpin(self.addr, self.length)


class SoftPD(base.PD):
    """A protection domain; ``imported`` when it was imported from another process."""

    def __init__(self, context: SoftContext, table: PDTable | None = None) -> None:
        self.context = context
        self.imported = table is not None
        self._table = table
        self._lock = threading.RLock()
        self._mrs: dict[int, SoftMR] = {}
        self._qps: set = set()

    def _check(self) -> None:
        if self._closed:
            raise closed_error("PD")

    def _new_key(self) -> int:
        while True:
            key = secrets.randbits(32)
            if key and key not in self._mrs:
                return key

    def _table_for_export(self) -> PDTable:
        with self._lock:
            self._check()
            if self._table is None:
                self._table = PDTable.create()
            return self._table

    def lookup(self, key: int) -> SoftMR | None:
        return self._mrs.get(key)

    def reg_mr(self, address: int, length: int, access: Access) -> SoftMR:
        return self.reg_mrs([(address, length)], access)[0]

    def reg_mrs(self, ranges: list[tuple[int, int]], access: Access) -> list[SoftMR]:
        """One MR per ``(address, length)`` of ``ranges``, as ``reg_mr`` would make each, all
        or none; adjacent ranges are pinned with one mlock call (a REGISTER batch's chunks).
        ON_DEMAND (ODP) pins nothing and is not charged to RLIMIT_MEMLOCK: writes fault their
        target in when they land (``faulting``), as an ODP NIC's page faults do."""
        access = Access(access)
        for address, length in ranges:
            if length <= 0:
                raise ValueError(f"cannot register {length} bytes")
            if address <= 0:
                raise ValueError(f"bad address {address:#x}")
        if access & (Access.REMOTE_WRITE) and not access & Access.LOCAL_WRITE:
            raise TransportError("REMOTE_WRITE access requires LOCAL_WRITE", errno=errno.EINVAL)
        with self._lock:
            self._check()
            if not access & Access.ON_DEMAND:
                memory.PINS.pin_many(ranges)
            out = []
            for address, length in ranges:
                key = self._new_key()
                mr = SoftMR(self, key, address, length, access, local_address=address)
                self._mrs[key] = mr
                out.append(mr)
            return out

    def export_mrs(self, mrs: list[SoftMR]) -> list[MRHandle]:
        """``mr.export()`` of each of ``mrs`` (registered in this PD), with one PD-table
        write for all of those not exported yet."""
        new = [mr for mr in mrs if mr._handle is None]
        for mr in new:
            if mr.pd is not self:
                raise ValueError("export_mrs takes MRs of this PD only")
            if mr._closed:
                raise closed_error("MR")
        found = []
        try:
            for mr in new:
                found.append(memory.BACKINGS.find(mr.local_address, mr.length))
                mr._backing_held = True
        except BaseException:
            for mr in new[:len(found)]:
                memory.BACKINGS.release(mr.local_address, mr.length)
                mr._backing_held = False
            raise
        try:
            table = self._table_for_export()
            with self._lock:
                fresh = [mr for mr in new if mr._slot < 0]
                if fresh:
                    slots = table.add_many([(mr.lkey, mr.rkey, int(mr.access), mr.addr,
                                             mr.length) for mr in fresh])
                    for mr, slot in zip(fresh, slots.tolist(), strict=True):
                        mr._slot = slot
        except BaseException:
            for mr in new:
                memory.BACKINGS.release(mr.local_address, mr.length)
                mr._backing_held = False
            raise
        for mr, (path, file_offset) in zip(new, found, strict=True):
            mr._make_handle(table, path, file_offset)
        return [mr._handle for mr in mrs]

    def import_mr(self, handle: MRHandle) -> SoftMR:
        if handle.provider != PROVIDER:
            raise ValueError(f"a {handle.provider} MR handle cannot be imported by the soft "
                             "provider")
        with self._lock:
            self._check()
            if self._table is None or self._table.name != handle.pd_name:
                raise TransportError(f"the MR belongs to PD {handle.pd_name}; import that PD "
                                     "and import the MR into it", errno=errno.EINVAL)
            if handle.lkey in self._mrs:
                raise TransportError(f"MR {handle.lkey:#x} is already present in this PD",
                                     errno=errno.EEXIST)
            self._table.hold(handle.slot, handle.lkey, handle.rkey, handle.addr, handle.length)
            try:
                mapping = memory.FileMapping(handle.path, handle.file_offset, handle.length)
            except BaseException:
                self._table.release(handle.slot)
                raise
            mr = SoftMR(self, handle.lkey, handle.addr, handle.length, Access(handle.access),
                        local_address=mapping.address, mapping=mapping, handle=handle)
            self._mrs[handle.lkey] = mr
            return mr

    def export(self) -> PDHandle:
        table = self._table_for_export()
        return PDHandle(PROVIDER, table.owner_pid, table.name)

    def create_qp(self, send_cq: SoftCQ, recv_cq: SoftCQ, *, max_send_wr: int,
                  max_recv_wr: int, rnr_retry: int = 0):
        from stages.verbs.soft.qp import SoftQP

        with self._lock:
            self._check()
            qp = SoftQP(self, send_cq, recv_cq, max_send_wr=max_send_wr,
                        max_recv_wr=max_recv_wr, rnr_retry=rnr_retry)
            self._qps.add(qp)
            return qp

    def close(self) -> None:
        # Children are closed without holding the PD lock: a QP's reader thread takes the QP
        # lock and then the PD lock, so holding the PD lock here while closing the QP (which
        # takes the QP lock) would invert that order.
        with self._lock:
            if self._closed:
                return
            qps, mrs = list(self._qps), list(self._mrs.values())
        for qp in qps:
            qp.close()
        for mr in mrs:
            mr.close()  # may raise EBUSY: the PD then stays open, retry later
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._table is not None:
                self._table.close()
        self.context._forget(self)


class SoftContext(base.Context):
    """The soft device: one per process is plenty, more are allowed."""

    def __init__(self) -> None:
        self.name = DEVICE
        self._lock = threading.Lock()
        self._children: list = []

    def _adopt(self, child):
        with self._lock:
            if self._closed:
                child.close()
                raise closed_error("context")
            self._children.append(child)
        return child

    def _forget(self, child) -> None:
        with self._lock:
            if child in self._children:
                self._children.remove(child)

    def alloc_pd(self) -> SoftPD:
        return self._adopt(SoftPD(self))

    def import_pd(self, handle: PDHandle) -> SoftPD:
        if handle.provider != PROVIDER:
            raise ValueError(f"a {handle.provider} PD handle cannot be imported by the soft "
                             "provider")
        return self._adopt(SoftPD(self, PDTable.open(handle.name)))

    def create_cq(self, depth: int) -> SoftCQ:
        return self._adopt(SoftCQ(self, depth))

    def listen(self, host: str, port: int, backlog: int = 5):
        from stages.verbs.soft.cm import SoftListener

        return self._adopt(SoftListener(self, host, port, backlog))

    def connect(self, qp, host: str, port: int, private_data: bytes = b"",
                timeout: float = 10.0) -> bytes:
        from stages.verbs.soft.cm import connect

        if self._closed:
            raise closed_error("context")
        return connect(self, qp, host, port, private_data, timeout)

    def close(self) -> None:
        if self._closed:
            return
        # Listeners and PDs (with their QPs and MRs) before the CQs those QPs use.
        order = sorted(list(self._children), key=lambda c: isinstance(c, SoftCQ))
        for child in order:
            child.close()
        self._closed = True


class SoftProvider(base.Provider):
    """Userspace verbs over TCP; needs no RDMA device."""

    name = PROVIDER

    def list_devices(self) -> list[str]:
        return [DEVICE]

    def open_device(self, name: str | None = None, *, peer: str | None = None) -> SoftContext:
        if name not in (None, DEVICE):
            raise TransportError(f"no soft device {name!r}; the soft provider has {DEVICE}",
                                 errno=errno.ENODEV)
        return SoftContext()
