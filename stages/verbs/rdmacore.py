"""The ``verbs`` provider: the same interface over rdma-core's pyverbs (hardware or Soft-RoCE).

pyverbs is imported only when a device is listed or opened, so ``import stages.verbs`` works
without it. QPs are created unconnected on the caller's PD and CQs and connected through
librdmacm as *external* QPs (``rdma_init_qp_attr`` for each state change, as rdma-core's
``tests/base_rdmacm.py`` does), which is what lets a RECV be posted before connecting. The
connection manager lives in ``rdmacore_cm``; what both use (loading pyverbs, turning its errors
into TransportError, finding a new channel's fd) in ``rdmacore_base``.

pyverbs exposes neither a completion channel's fd nor an event channel's fd; both are found as
the descriptor that appeared in /proc/self/fd while the object was created (under a lock, and
checked by what it points to).

Importing a PD needs the exporter's command fd: the handle carries the exporter's pid and fd
number, and the importer fetches it with pidfd_getfd(2) (same user, ptrace access). The
importing context is re-based onto that fd (``ibv_import_device``), so it must not own objects
yet: import the PD first, then create CQs and QPs on the same context.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import time

from shm.errors import TransportError, TransportUnsupported
from shm.memory import libc
from stages.verbs import base
from stages.verbs.base import (
    WRITE_WR_DTYPE,
    Access,
    MRHandle,
    PDHandle,
    QPState,
    SendOpcode,
    WCOpcode,
    WCStatus,
    WorkCompletion,
    closed_error,
)
from stages.verbs.rdmacore_base import HINT, errors, load, new_fd
from stages.verbs.rdmacore_cm import VerbsListener, connect
from stages.verbs.soft.memory import pin_error

PROVIDER = "verbs"
_SYS_pidfd_getfd = 438


def no_device_message(exc: Exception) -> str:
    if not os.path.isdir("/sys/class/infiniband"):
        return (f"no RDMA device: this kernel has no InfiniBand/RDMA support (libibverbs: "
                f"{exc}, ENOSYS)")
    return f"no RDMA device: libibverbs cannot list devices ({exc})"


class VerbsMR(base.MR):
    def __init__(self, pd: VerbsPD, mr, addr: int, length: int, access: Access,
                 imported: bool) -> None:
        self.pd, self._mr = pd, mr
        self.lkey, self.rkey = mr.lkey, mr.rkey
        self.addr, self.length, self.access, self.imported = addr, length, access, imported

    def export(self) -> MRHandle:
        return MRHandle(PROVIDER, self.pd.context.name, self.lkey, self.rkey, self.addr,
                        self.length, int(self.access), mr_handle=self._mr.handle)

    def close(self) -> None:
        if self._closed:
            return
        with errors("cannot deregister MR"):
            if self.imported:
                self._mr.unimport()
            self._mr.close()
        self._closed = True


class VerbsCQ(base.CQ):
    def __init__(self, context: VerbsContext, depth: int) -> None:
        v = context.v
        self.context, self.depth, self._v = context, depth, v
        with errors("cannot create CQ"):
            self._channel, self._fd = new_fd(lambda: v.cq.CompChannel(context.ctx),
                                              "infinibandevent")
            self.cq = v.cq.CQ(context.ctx, depth, None, self._channel, 0)
            self.cq.req_notify()
        self._held: list[WorkCompletion] = []

    def _consume_event(self, timeout: float | None) -> bool:
        readable, _, _ = select.select([self._fd], [], [], timeout)
        if not readable:
            return False
        self._channel.get_cq_event(self.cq)
        self.cq.ack_events(1)
        self.cq.req_notify()
        return True

    def _poll_raw(self, n: int) -> list[WorkCompletion]:
        _count, wcs = self.cq.poll(n)
        return [WorkCompletion(wc.wr_id, WCStatus(wc.status), WCOpcode(wc.opcode), wc.byte_len,
                               wc.qp_num) for wc in wcs]

    def poll(self, n: int = 16) -> list[WorkCompletion]:
        if self._closed:
            raise closed_error("CQ")
        out, self._held = self._held[:n], self._held[n:]
        with errors("cannot poll CQ"):
            if len(out) < n:
                out += self._poll_raw(n - len(out))
            if len(out) < n and self._consume_event(0):
                out += self._poll_raw(n - len(out))  # keeps the fd quiet once the CQ is empty
        return out

    def fileno(self) -> int:
        return self._fd

    def __len__(self) -> int:
        return len(self._held)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with errors("cannot wait on CQ"):
            while True:
                if self._held:
                    return True
                self._held = self._poll_raw(self.depth)  # held for the next poll()
                if self._held:
                    return True
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._consume_event(left) and deadline is not None \
                        and time.monotonic() >= deadline:
                    return False

    def close(self) -> None:
        if self._closed:
            return
        with errors("cannot destroy CQ"):
            self.cq.close()
            self._channel.close()
        self._closed = True


class VerbsQP(base.QP):
    def __init__(self, pd: VerbsPD, send_cq: VerbsCQ, recv_cq: VerbsCQ, *, max_send_wr: int,
                 max_recv_wr: int, rnr_retry: int) -> None:
        v = pd.context.v
        self._v, self.pd, self.send_cq, self.recv_cq = v, pd, send_cq, recv_cq
        self.rnr_retry = rnr_retry
        self.cmid = self._channel = None
        with errors("cannot create QP"):
            cap = v.qp.QPCap(max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=1,
                             max_recv_sge=1)
            init = v.qp.QPInitAttr(qp_type=v.e.IBV_QPT_RC, scq=send_cq.cq, rcq=recv_cq.cq,
                                   cap=cap)
            attr = v.qp.QPAttr()
            attr.qp_access_flags = int(Access.LOCAL_WRITE | Access.REMOTE_WRITE
                                       | Access.REMOTE_READ)
            self.qp = v.qp.QP(pd.pd, init, attr)  # RC with attributes: returned in INIT
        self.qp_num = self.qp.qp_num

    @property
    def state(self) -> QPState:
        return QPState(self.qp.qp_state)

    def to_rts(self, cmid) -> None:
        """Walk INIT, RTR, RTS with the attributes the connection manager resolved."""
        v = self._v
        with errors("cannot connect QP"):
            for state in (v.e.IBV_QPS_INIT, v.e.IBV_QPS_RTR, v.e.IBV_QPS_RTS):
                attr, mask = cmid.init_qp_attr(state)
                if state == v.e.IBV_QPS_RTS:
                    attr.rnr_retry = self.rnr_retry
                self.qp.modify(attr, mask)

    def post_send(self, wr_id: int, opcode: SendOpcode, addr: int, length: int, lkey: int, *,
                  remote_addr: int = 0, rkey: int = 0, signaled: bool = True) -> None:
        v = self._v
        flags = v.e.IBV_SEND_SIGNALED if signaled else 0
        with errors("cannot post send"):
            sge = v.wr.SGE(addr, length, lkey)
            wr = v.wr.SendWR(wr_id=wr_id, opcode=int(opcode), num_sge=1, sg=[sge],
                             send_flags=flags)
            if opcode == SendOpcode.RDMA_WRITE:
                wr.set_wr_rdma(rkey, remote_addr)
            self.qp.post_send(wr)

    def post_writes(self, wrs) -> None:
        """One ibv_post_send of a chained WR list (pyverbs' ``SendWR(next_wr=...)``). On a
        failure the WRs before the bad one are posted, as ibv_post_send leaves them."""
        if getattr(wrs, "dtype", None) != WRITE_WR_DTYPE or wrs.ndim != 1:
            raise ValueError("post_writes takes a 1-d array of WRITE_WR_DTYPE records")
        if not len(wrs):
            return
        v = self._v
        write, signaled = int(SendOpcode.RDMA_WRITE), v.e.IBV_SEND_SIGNALED
        chain = []  # keeps every SendWR alive until the post: each points at the next's struct
        with errors("cannot post writes"):
            nxt = None
            for wr_id, addr, remote_addr, length, lkey, rkey, sig in reversed(wrs.tolist()):
                wr = v.wr.SendWR(wr_id=wr_id, opcode=write, num_sge=1,
                                 sg=[v.wr.SGE(addr, length, lkey)],
                                 send_flags=signaled if sig else 0, next_wr=nxt)
                wr.set_wr_rdma(rkey, remote_addr)
                chain.append(wr)
                nxt = wr
            self.qp.post_send(nxt)

    def post_recv(self, wr_id: int, addr: int, length: int, lkey: int) -> None:
        v = self._v
        with errors("cannot post receive"):
            self.qp.post_recv(v.wr.RecvWR(wr_id, 1, [v.wr.SGE(addr, length, lkey)]))

    def disconnect(self) -> None:
        v = self._v
        with errors("cannot disconnect"):
            attr = v.qp.QPAttr(qp_state=v.e.IBV_QPS_ERR)
            self.qp.modify(attr, v.e.IBV_QP_STATE)  # an external QP is ours to move to ERR
            if self.cmid is not None:
                self.cmid.disconnect()

    def close(self) -> None:
        if self._closed:
            return
        with errors("cannot destroy QP"):
            self.qp.close()
            for obj in (self.cmid, self._channel):
                if obj is not None:
                    obj.close()
        self._closed = True


class VerbsPD(base.PD):
    def __init__(self, context: VerbsContext, pd, imported: bool, handle: PDHandle | None = None):
        self.context, self.pd, self.imported, self._handle = context, pd, imported, handle
        self._odp = True      # until the device refuses an ON_DEMAND registration
        self._children: list = []

    def reg_mr(self, address: int, length: int, access: Access) -> VerbsMR:
        v = self.context.v
        access = Access(access)
        if access & Access.ON_DEMAND and not self._odp:
            access &= ~Access.ON_DEMAND
        try:
            with errors(f"cannot register {length} bytes"):
                mr = v.mr.MR(self.pd, length, int(access), address=address)
        except TransportError as exc:
            if access & Access.ON_DEMAND and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                # A device without ODP: pin the pages instead (QEMU falls back the other way,
                # to ODP when pinning is not supported), and stop asking this PD for ODP.
                self._odp = False
                return self.reg_mr(address, length, access & ~Access.ON_DEMAND)
            if exc.errno in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
                raise pin_error(length, exc.errno) from None  # names RLIMIT_MEMLOCK if so
            raise
        child = VerbsMR(self, mr, address, length, Access(access), imported=False)
        self._children.append(child)
        return child

    def import_mr(self, handle: MRHandle) -> VerbsMR:
        if handle.provider != PROVIDER:
            raise ValueError(f"a {handle.provider} MR handle cannot be imported by pyverbs")
        v = self.context.v
        with errors("cannot import MR"):
            mr = v.mr.MR(self.pd, handle=handle.mr_handle, address=handle.addr)
        child = VerbsMR(self, mr, handle.addr, handle.length, Access(handle.access),
                        imported=True)
        self._children.append(child)
        return child

    def create_qp(self, send_cq: VerbsCQ, recv_cq: VerbsCQ, *, max_send_wr: int,
                  max_recv_wr: int, rnr_retry: int = 0) -> VerbsQP:
        qp = VerbsQP(self, send_cq, recv_cq, max_send_wr=max_send_wr, max_recv_wr=max_recv_wr,
                     rnr_retry=rnr_retry)
        self._children.append(qp)
        return qp

    def export(self) -> PDHandle:
        if self._handle is not None:
            return self._handle
        return PDHandle(PROVIDER, os.getpid(), self.context.name, pd_handle=self.pd.handle,
                        cmd_fd=self.context.ctx.cmd_fd)

    def close(self) -> None:
        if self._closed:
            return
        # QPs before MRs, both before the PD.
        for child in sorted(self._children, key=lambda c: not isinstance(c, VerbsQP)):
            child.close()
        with errors("cannot deallocate PD"):
            if self.imported:
                self.pd.unimport()
            self.pd.close()
        self._closed = True


class VerbsContext(base.Context):
    def __init__(self, v, name: str) -> None:
        self.v, self.name = v, name
        with errors(f"cannot open {name}"):
            self.ctx = v.device.Context(name=name)
        self._children: list = []

    def _adopt(self, child):
        self._children.append(child)
        return child

    def alloc_pd(self) -> VerbsPD:
        with errors("cannot allocate PD"):
            return self._adopt(VerbsPD(self, self.v.pd.PD(self.ctx), imported=False))

    def create_cq(self, depth: int) -> VerbsCQ:
        return self._adopt(VerbsCQ(self, depth))

    def import_pd(self, handle: PDHandle) -> VerbsPD:
        if handle.provider != PROVIDER:
            raise ValueError(f"a {handle.provider} PD handle cannot be imported by pyverbs")
        if self._children:
            raise TransportError("import the PD before creating anything else on this context",
                                 errno=errno.EBUSY)
        pidfd = os.pidfd_open(handle.owner_pid)
        try:
            fd = libc.syscall(_SYS_pidfd_getfd, pidfd, handle.cmd_fd, 0)
            if fd < 0:
                err = ctypes.get_errno()
                raise TransportError(f"cannot fetch the exporter's command fd: "
                                     f"{os.strerror(err)}", errno=err)
        finally:
            os.close(pidfd)
        with errors("cannot import the device"):
            imported = self.v.device.Context(cmd_fd=fd)
        self.ctx.close()
        self.ctx = imported  # everything this context creates now shares the exporter's file
        with errors("cannot import PD"):
            pd = self.v.pd.PD(self.ctx, handle=handle.pd_handle)
        return self._adopt(VerbsPD(self, pd, imported=True, handle=handle))

    def listen(self, host: str, port: int, backlog: int = 5):
        return self._adopt(VerbsListener(self, host, port, backlog))

    def connect(self, qp: VerbsQP, host: str, port: int, private_data: bytes = b"",
                timeout: float = 10.0) -> bytes:
        return connect(self, qp, host, port, private_data, timeout)

    def close(self) -> None:
        if self._closed:
            return
        # Listeners, then PDs (their QPs and MRs), then CQs, then the device.
        rank = {VerbsPD: 1, VerbsCQ: 2}
        for child in sorted(self._children, key=lambda c: rank.get(type(c), 0)):
            child.close()
        with errors("cannot close the device"):
            self.ctx.close()
        self._closed = True


class VerbsProvider(base.Provider):
    """rdma-core's pyverbs; TransportUnsupported (one line) where there is no RDMA device."""

    name = PROVIDER

    def list_devices(self) -> list[str]:
        v = load()
        try:
            devices = v.device.get_device_list()
        except v.RDMAError as exc:
            raise TransportUnsupported(no_device_message(exc), errno=errno.ENOSYS,
                                       hint=HINT) from None
        return [d.name.decode() if isinstance(d.name, bytes) else d.name for d in devices]

    def open_device(self, name: str | None = None) -> VerbsContext:
        v = load()
        names = self.list_devices()
        if not names:
            raise TransportUnsupported("no RDMA device: libibverbs lists none",
                                       errno=errno.ENODEV,
                                       hint="load an RDMA driver or add Soft-RoCE (rdma link "
                                            "add rxe0 type rxe netdev IFACE), or " + HINT)
        if name is None:
            name = names[0]
        elif name not in names:
            raise TransportError(f"no RDMA device {name!r}; devices: {', '.join(names)}",
                                 errno=errno.ENODEV)
        context = VerbsContext(v, name)
        if not active_ports(v, context.ctx):
            context.close()
            raise TransportUnsupported(f"RDMA device {name} has no ACTIVE port",
                                       errno=errno.ENETDOWN, hint=HINT)
        return context


def active_ports(v, ctx) -> list[int]:
    """Port numbers of ``ctx`` in state ACTIVE."""
    with errors("cannot query the device"):
        count = ctx.query_device().phys_port_cnt
        return [port for port in range(1, count + 1)
                if ctx.query_port(port).state == v.e.IBV_PORT_ACTIVE]


def probe() -> str | None:
    """None when pyverbs sees a device with an ACTIVE port; otherwise why not, in one line.

    Tests skip on this (pyverbs missing, the ``get_device_list`` error of kernels without
    InfiniBand, no device, no ACTIVE port); the CLI can print it.
    """
    try:
        v = load()
    except TransportUnsupported as exc:
        return str(exc)
    try:
        devices = v.device.get_device_list()
    except v.RDMAError as exc:
        return no_device_message(exc)
    if not devices:
        return "no RDMA device: libibverbs lists none"
    for device in devices:
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        try:
            ctx = v.device.Context(name=name)
        except v.Error:
            continue
        try:
            if active_ports(v, ctx):
                return None
        except TransportError:
            continue
        finally:
            ctx.close()
    return "no RDMA device has an ACTIVE port"
