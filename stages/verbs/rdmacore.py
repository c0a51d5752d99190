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

Importing a PD needs the exporter's command fd: the exporter serves it with SCM_RIGHTS on an
abstract unix socket named in the handle (``fdpass``; no ptrace rights, which Yama's
``ptrace_scope=1`` refuses between sibling processes). The importing context is re-based onto
that fd (``ibv_import_device``), so it must not own objects yet: import the PD first, then
create CQs and QPs on the same context. Only some providers can import a PD (mlx5 can; rxe,
siw, irdma, bnxt_re and efa cannot): ``pd.shareable`` tries it once on a private import in this
process, and the stages run in "proxy" mode where it fails (see ``stages.registrar``).

On-demand paging: ``Context.odp_write`` comes from the device's ODP capabilities; without them
an ON_DEMAND registration pins instead. ``MR.prefetch`` is ``ibv_advise_mr(PREFETCH_WRITE,
FLUSH)``: an ODP responder answers a write into an unmapped page with RNR NAK, so writers keep
an RNR retry count that survives that (the poster's is 7, "forever").

Send WRs: ``sq_sig_all=0`` (only WRs asked for complete), and the SendWR/SGE objects of a QP
are made once and reused (pyverbs 44 never frees them: about 73 bytes per object). The QP's
state is ``ibv_query_qp``'s, which sees an asynchronous move to ERR; ``qp.qp_state`` is only
what the last modify set.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time

from shm.errors import TransportError, TransportUnsupported
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
from stages.verbs.rdmacore_device import (  # noqa: F401 - probe, device_address: re-exported
    active_ports,
    device_address,
    has_active_port,
    no_device_message,
    odp_write,
    probe,
    route_device,
)
from stages.verbs.rdmacore_fdpass import FdServer, receive_fd
from stages.verbs.soft.memory import pin_error

PROVIDER = "verbs"
DEVICE_ENV = "RDMA_PIPELINE_DEVICE"     # the device to use when none is named (--device)
_WC_OPCODES = {int(op) for op in WCOpcode}


class VerbsMR(base.MR):
    def __init__(self, pd: VerbsPD, mr, addr: int, length: int, access: Access,
                 imported: bool) -> None:
        self.pd, self._mr = pd, mr
        self.lkey, self.rkey = mr.lkey, mr.rkey
        self.addr, self.length, self.access, self.imported = addr, length, access, imported

    def export(self) -> MRHandle:
        return MRHandle(PROVIDER, self.pd.context.name, self.lkey, self.rkey, self.addr,
                        self.length, int(self.access), mr_handle=self._mr.handle)

    def prefetch(self) -> None:
        """ibv_advise_mr(PREFETCH_WRITE, FLUSH) over the whole region: the device maps its
        pages now, so writes into it meet no page fault (an RNR NAK on ODP)."""
        if self._closed or not self.access & Access.ON_DEMAND:
            return
        v = self.pd.context.v
        with errors("cannot prefetch MR"):
            self.pd.pd.advise_mr(v.e._IBV_ADVISE_MR_ADVICE_PREFETCH_WRITE,
                                 v.e._IBV_ADVISE_MR_FLAG_FLUSH,
                                 [v.wr.SGE(self.addr, self.length, self.lkey)])

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
        # An error completion's opcode is undefined (mlx5 leaves it unset): SEND stands in.
        return [WorkCompletion(wc.wr_id, WCStatus(wc.status),
                               WCOpcode(wc.opcode) if wc.opcode in _WC_OPCODES
                               and wc.status == 0 else WCOpcode.SEND, wc.byte_len, wc.qp_num)
                for wc in wcs]

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
                                   cap=cap, sq_sig_all=0)     # pyverbs' default 1 signals all
            attr = v.qp.QPAttr()
            attr.qp_access_flags = int(Access.LOCAL_WRITE | Access.REMOTE_WRITE
                                       | Access.REMOTE_READ)
            self.qp = v.qp.QP(pd.pd, init, attr)  # RC with attributes: returned in INIT
        self.qp_num = self.qp.qp_num
        self._wrs = WRPool(v, max_send_wr)
        self._recv_wrs: dict[tuple[int, int, int], object] = {}
        self._post_lock = threading.Lock()      # the pooled WRs are filled, then posted

    @property
    def state(self) -> QPState:
        v = self._v
        with errors("cannot query QP"):
            attr, _init = self.qp.query(v.e.IBV_QP_STATE)
        return QPState(attr.qp_state)

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
        with self._post_lock, errors("cannot post send"):
            self.qp.post_send(self._wrs.fill([(wr_id, addr, remote_addr, length, lkey, rkey,
                                               signaled)], int(opcode)))

    def post_writes(self, wrs) -> None:
        """One ibv_post_send of a chained WR list (pyverbs' ``SendWR(next_wr=...)``). On a
        failure the WRs before the bad one are posted, as ibv_post_send leaves them."""
        if getattr(wrs, "dtype", None) != WRITE_WR_DTYPE or wrs.ndim != 1:
            raise ValueError("post_writes takes a 1-d array of WRITE_WR_DTYPE records")
        if not len(wrs):
            return
        rows = wrs.tolist()
        with self._post_lock, errors("cannot post writes"):
            for start in range(0, len(rows), self._wrs.size):
                self.qp.post_send(self._wrs.fill(rows[start:start + self._wrs.size],
                                                 int(SendOpcode.RDMA_WRITE)))

    def post_recv(self, wr_id: int, addr: int, length: int, lkey: int) -> None:
        v = self._v
        with self._post_lock, errors("cannot post receive"):
            wr = self._recv_wrs.get((addr, length, lkey))
            if wr is None:          # a control link re-posts the same few buffers
                wr = self._recv_wrs[addr, length, lkey] = v.wr.RecvWR(
                    wr_id, 1, [v.wr.SGE(addr, length, lkey)])
            wr.wr_id = wr_id
            self.qp.post_recv(wr)

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


class WRPool:
    """``size`` SendWRs chained once (each one's next is the following one, the last one's is
    NULL), each pointing at its own SGE (pyverbs 44's ``sg_list`` setter stores the SGE's
    address, the constructor copies): ``fill(rows, opcode)`` writes ``rows`` into the *last*
    len(rows) of them and returns the first of those, a chain of exactly that length. pyverbs
    44 never frees a SendWR or SGE it made, so none is made per post."""

    def __init__(self, v, size: int) -> None:
        self.v, self.size = v, size
        with errors("cannot make work requests"):
            self.sges = [v.wr.SGE(0, 0, 0) for _ in range(size)]
            self.wrs: list = []
            nxt = None
            for sge in reversed(self.sges):
                nxt = v.wr.SendWR(opcode=int(SendOpcode.RDMA_WRITE), num_sge=1, sg=[sge],
                                  send_flags=0, next_wr=nxt)
                nxt.sg_list = sge       # points the WR at this SGE: fill() edits it in place
                self.wrs.append(nxt)
            self.wrs.reverse()

    def fill(self, rows: list, opcode: int):
        signaled = self.v.e.IBV_SEND_SIGNALED
        first = self.size - len(rows)
        for i, (wr_id, addr, remote_addr, length, lkey, rkey, sig) in enumerate(rows):
            wr, sge = self.wrs[first + i], self.sges[first + i]
            sge.addr, sge.length, sge.lkey = addr, length, lkey
            wr.wr_id, wr.opcode = wr_id, opcode
            wr.send_flags = signaled if sig else 0
            wr.set_wr_rdma(rkey, remote_addr)
        return self.wrs[first]


class VerbsPD(base.PD):
    def __init__(self, context: VerbsContext, pd, imported: bool, handle: PDHandle | None = None):
        self.context, self.pd, self.imported, self._handle = context, pd, imported, handle
        self._odp = context.odp_write   # ODP for RC writes, or pin (and until refused)
        self._children: list = []
        self._shareable: bool | None = None

    @property
    def shareable(self) -> bool:
        """Whether another process can import this PD (``ibv_import_pd``): tried once, on a
        private import of our own command fd, as rdma-core's test_shared_pd does."""
        if self._shareable is None:
            v = self.context.v
            try:
                ctx = v.device.Context(cmd_fd=os.dup(self.context.ctx.cmd_fd))
            except v.Error:
                self._shareable = False
                return False
            try:
                pd = v.pd.PD(ctx, handle=self.pd.handle)
                pd.unimport()
                self._shareable = True
            except v.Error:
                self._shareable = False
            finally:
                ctx.close()
        return self._shareable

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
        if not 0 <= rnr_retry <= 7:
            raise ValueError(f"rnr_retry is 0..7 (7 = retry forever), not {rnr_retry}")
        qp = VerbsQP(self, send_cq, recv_cq, max_send_wr=max_send_wr, max_recv_wr=max_recv_wr,
                     rnr_retry=rnr_retry)
        self._children.append(qp)
        return qp

    def export(self) -> PDHandle:
        if self._handle is not None:
            return self._handle
        server = self.context.fd_server()
        return PDHandle(PROVIDER, os.getpid(), self.context.name, pd_handle=self.pd.handle,
                        cmd_fd=self.context.ctx.cmd_fd, socket=server.name)

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
        self._fd_server: FdServer | None = None
        self.odp_write = odp_write(v, self.ctx)

    def fd_server(self) -> FdServer:
        """Serves this context's command fd to importers (SCM_RIGHTS), until closed."""
        if self._fd_server is None:
            self._fd_server = FdServer(self.ctx.cmd_fd)
        return self._fd_server

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
        if handle.name != self.name:
            raise TransportError(f"the PD to import is on RDMA device {handle.name}, this "
                                 f"context on {self.name}", errno=errno.EXDEV,
                                 hint=f"pick the device with --device {handle.name}")
        fd = receive_fd(handle.socket)
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
        # PDs (their QPs with the CM ids they accepted, and MRs), then listeners (the event
        # channel those ids used goes last), then CQs, then the device.
        rank = {VerbsPD: 0, VerbsListener: 1, VerbsCQ: 2}
        for child in sorted(self._children, key=lambda c: rank.get(type(c), 0)):
            child.close()
        if self._fd_server is not None:
            self._fd_server.close()
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

    def open_device(self, name: str | None = None, *, peer: str | None = None
                    ) -> VerbsContext:
        """``name``; else $RDMA_PIPELINE_DEVICE; else the device of the route to ``peer``;
        else the first device with an ACTIVE port."""
        v = load()
        names = self.list_devices()
        name = name or os.environ.get(DEVICE_ENV) or None
        if name is None and peer:
            name = route_device(v, peer)
        if not names:
            raise TransportUnsupported("no RDMA device: libibverbs lists none",
                                       errno=errno.ENODEV,
                                       hint="load an RDMA driver or add Soft-RoCE (rdma link "
                                            "add rxe0 type rxe netdev IFACE), or " + HINT)
        if name is None:
            name = next((n for n in names if has_active_port(v, n)), names[0])
        elif name not in names:
            raise TransportError(f"no RDMA device {name!r}; devices: {', '.join(names)}",
                                 errno=errno.ENODEV)
        context = VerbsContext(v, name)
        if not active_ports(v, context.ctx):
            context.close()
            raise TransportUnsupported(f"RDMA device {name} has no ACTIVE port",
                                       errno=errno.ENETDOWN, hint=HINT)
        return context
