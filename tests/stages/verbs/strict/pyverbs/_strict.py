"""The strict pyverbs double: rdma-core v44's class names, signatures and state rules over the
soft provider's transport.

Data moves through ``stages.verbs.soft`` (TCP between processes, one-sided writes placed by
rkey); everything pyverbs adds on top is checked here as a real device and librdmacm would,
and where hardware only misbehaves quietly (a first packet dropped, a later segfault) the double
raises at once, naming the rule:

- devices come from ``STRICT_PYVERBS_DEVICES`` (``name=ip,...``; default ``mlx5_0=127.0.0.1,
  rxe0=127.0.0.2``); an ``mlx5`` device shares PDs (``ibv_import_pd``) and has ODP, others
  have neither. The route to an address picks the device that owns it (else the first).
- a CM id bound to a wildcard address has no device: ``dev_name`` is a NULL dereference (raised
  as ``SystemError``); ``context`` is None unless the id was created from an AddrInfo.
- a QP accepted on (``rdma_accept``) must already be RTR; posting needs RTS; ``qp_state`` is
  the value cached at the last ``modify`` while ``query`` sees an asynchronous move to ERR.
- ``sq_sig_all`` defaults to 1 (every WR completes); with 0 only IBV_SEND_SIGNALED WRs do.
- an error completion's opcode is left unset (a value no ``ibv_wc_opcode`` has).
- a write into a page of an ON_DEMAND MR that no ``advise_mr(PREFETCH_WRITE)`` nor earlier
  fault mapped is answered with RNR NAK (the fault is then serviced): ``rnr_retry`` 0 turns
  that into RNR_RETRY_EXC_ERR.
- ``MR(pd, handle=...)`` needs a handle the exporter's command fd really holds: the command fd
  is a memfd holding the "kernel" object table, passed between processes like the real one.
- an event channel destroyed while CM ids still use it (a listener's channel carries the
  events of the ids it accepted) is a use after free in librdmacm: raised here.
- every ``SendWR``/``SGE``/``RecvWR`` made is counted (pyverbs 44 never frees them).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import select
import socket
import tempfile
import threading
import weakref
from collections import deque

import numpy as np

from pyverbs import cm_enums as ce
from pyverbs import enums as e
from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError, PyverbsUserError

PAGE = 4096
UNSET_OPCODE = 0xFF       # what mlx5 leaves in an error completion's opcode
CONNECT_PRIVATE = 56      # IB CM: the peer receives the whole private-data area, zero padded
ACCEPT_PRIVATE = 196
ALLOCATED = {"SendWR": 0, "SGE": 0, "RecvWR": 0}

_QPS: dict[int, object] = weakref.WeakValueDictionary()    # qp_num -> QP, this process
_handles = itertools.count(0x100 + (os.getpid() & 0xFFF) * 0x1000)


# -- devices -------------------------------------------------------------------------------
def devices() -> dict[str, str]:
    spec = os.environ.get("STRICT_PYVERBS_DEVICES", "mlx5_0=127.0.0.1,rxe0=127.0.0.2")
    out = {}
    for item in spec.split(","):
        name, _, ip = item.partition("=")
        out[name.strip()] = ip.strip()
    return out


def shares_pd(name: str) -> bool:
    return name.startswith("mlx5")


def has_odp(name: str) -> bool:
    return name.startswith("mlx5")


def device_for(host: str) -> str | None:
    """The device that owns ``host`` (None for a wildcard address)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return None
    try:
        ip = socket.getaddrinfo(host, None)[0][4][0]
    except socket.gaierror:
        ip = host
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    devs = devices()
    for name, dev_ip in devs.items():
        if dev_ip == ip:
            return name
    return next(iter(devs))


def marked_fd(marker: str) -> int:
    """A pollable fd whose /proc/self/fd link names ``marker`` (a FIFO, unlinked)."""
    where = tempfile.mkdtemp(prefix="strict-pyverbs-")
    path = os.path.join(where, marker)
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    os.unlink(path)
    os.rmdir(where)
    return fd


def _rdma(msg: str, code: int):
    return PyverbsRDMAError(msg, code)


# -- the "kernel" object table behind a command fd -----------------------------------------
def table_add(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def table_read(fd: int) -> list[dict]:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0).decode()
    return [json.loads(line) for line in data.splitlines() if line]


class DeviceAttr:
    def __init__(self, name: str) -> None:
        self.phys_port_cnt = 1
        self.vendor_id = 0x02C9 if shares_pd(name) else 0
        self.max_qp_wr = 32768
        self.max_cqe = 4194303


class ODPCaps:
    def __init__(self, name: str) -> None:
        odp = has_odp(name)
        self.general_caps = e.IBV_ODP_SUPPORT if odp else 0
        self.rc_odp_caps = (e.IBV_ODP_SUPPORT_SEND | e.IBV_ODP_SUPPORT_RECV
                            | e.IBV_ODP_SUPPORT_WRITE | e.IBV_ODP_SUPPORT_READ) if odp else 0
        self.uc_odp_caps = self.ud_odp_caps = 0


class DeviceAttrEx:
    def __init__(self, name: str) -> None:
        self.orig_attr = DeviceAttr(name)
        self.odp_caps = ODPCaps(name)


class PortAttr:
    state = e.IBV_PORT_ACTIVE
    gid_tbl_len = 2


class GID:
    def __init__(self, text: str) -> None:
        self.gid = text

    def __str__(self) -> str:
        return self.gid


class Device:
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.node_type = 1


def get_device_list() -> list[Device]:
    return [Device(name) for name in devices()]


class Context:
    """``Context(name=...)``, ``Context(cmd_fd=...)`` (ibv_import_device) or ``Context(cmid=)``."""

    def __init__(self, **kwargs) -> None:
        from stages.verbs.soft.device import SoftContext

        self._children: list = []
        self._closed = False
        if "cmd_fd" in kwargs:
            self._fd = kwargs["cmd_fd"]
            header = table_read(self._fd)
            if not header or "device" not in header[0]:
                raise _rdma("Failed to import device", errno.EINVAL)
            self.name = header[0]["device"]
            self.imported = True
        else:
            name = kwargs.get("name")
            if name is None and kwargs.get("cmid") is not None:
                name = kwargs["cmid"].dev_name
            if isinstance(name, bytes):
                name = name.decode()
            if name not in devices():
                raise PyverbsUserError(f"Device {name} not found")
            self.name = name
            self._fd = os.memfd_create(f"uverbs-{name}", os.MFD_CLOEXEC)
            table_add(self._fd, {"device": name})
            self.imported = False
        self.soft = SoftContext()

    @property
    def cmd_fd(self) -> int:
        return self._fd

    def query_device(self) -> DeviceAttr:
        return DeviceAttr(self.name)

    def query_device_ex(self, ex_input=None) -> DeviceAttrEx:
        return DeviceAttrEx(self.name)

    def query_port(self, port_num) -> PortAttr:
        if port_num != 1:
            raise _rdma(f"Failed to query port {port_num}", errno.EINVAL)
        return PortAttr()

    def query_gid(self, port_num, index) -> GID:
        """Index 0: the link-local GID; 1: the RoCE v2 GID of the device's IPv4 address."""
        if index == 0:
            return GID("fe80:0000:0000:0000:0000:0000:0000:0001")
        a, b, c, d = (int(x) for x in devices()[self.name].split("."))
        return GID(f"0000:0000:0000:0000:0000:ffff:{a << 8 | b:04x}:{c << 8 | d:04x}")

    def close(self) -> None:
        if self._closed:
            return
        for child in reversed(list(self._children)):
            child.close()
        self.soft.close()
        os.close(self._fd)
        self._closed = True


# -- PD and MR ------------------------------------------------------------------------------
class PD:
    def __init__(self, creator, **kwargs) -> None:
        from stages.verbs.base import PDHandle

        if not isinstance(creator, Context):
            raise PyverbsUserError("strict double: a PD is made on a Context")
        self.ctx, self._closed, self._children = creator, False, []
        self.odp: dict[int, np.ndarray] = {}       # lkey -> page residency of an ODP MR
        self.mrs: dict[int, MR] = {}
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


# -- CQ --------------------------------------------------------------------------------------
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


# -- QP --------------------------------------------------------------------------------------
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

    def __init__(self, qp_state=e.IBV_QPS_INIT, cur_qp_state=e.IBV_QPS_RESET) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        self.qp_state, self.cur_qp_state = qp_state, cur_qp_state


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


# -- work requests ---------------------------------------------------------------------------
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


# -- connection manager ----------------------------------------------------------------------
class AddrInfo:
    def __init__(self, src=None, dst=None, src_service=None, dst_service=None, port_space=0,
                 flags=0) -> None:
        self.src, self.dst, self.src_service, self.dst_service = src, dst, src_service, dst_service
        self.port_space, self.flags = port_space, flags


class ConnParam:
    def __init__(self, resources=1, depth=1, flow_control=0, retry=5, rnr_retry=5, srq=0,
                 qp_num=0, data_len=0) -> None:
        self.resources, self.depth, self.retry, self.rnr_retry = resources, depth, retry, rnr_retry
        self.qp_num, self.data_len = qp_num, data_len
        self._data = b""

    def set_private_data(self, data) -> None:
        n = min(self.data_len, len(data))
        if n:
            self._data = bytes(data[:n])

    @property
    def private_data(self) -> bytes:
        return self._data


class CMEventChannel:
    def __init__(self) -> None:
        self.fd = marked_fd("rdma_cm")
        self._events: deque = deque()
        self._lock = threading.Lock()
        self.ids: set = set()
        self._closed = False

    def post(self, event) -> None:
        with self._lock:
            if self._closed:
                return
            self._events.append(event)
            os.write(self.fd, b"e")

    def take(self):
        select.select([self.fd], [], [])
        with self._lock:
            os.read(self.fd, 1)
            return self._events.popleft()

    def close(self) -> None:
        if self._closed:
            return
        live = [i for i in self.ids if not i._closed]
        if live:
            raise PyverbsError(f"strict double: event channel destroyed while {len(live)} CM "
                               "id(s) use it (use after free in librdmacm)")
        self._closed = True
        os.close(self.fd)


_EVENT_NAMES = {v: k[len("RDMA_CM_EVENT_"):] for k, v in vars(ce).items()
                if k.startswith("RDMA_CM_EVENT_")}


class _Event:
    def __init__(self, kind, cmid=None, private_data=b"", request=None, device=None) -> None:
        self.kind, self.cmid, self.data, self.request, self.device = (
            kind, cmid, private_data, request, device)


class CMEvent:
    def __init__(self, channel) -> None:
        self._event = channel.take()
        self._acked = False

    @property
    def event_type(self):
        return self._event.kind

    @property
    def private_data(self):
        return self._event.data

    def event_str(self) -> str:
        return _EVENT_NAMES.get(self._event.kind, "UNKNOWN")

    def ack_cm_event(self) -> None:
        if self._acked:
            raise PyverbsError("strict double: CM event acked twice")
        self._acked = True

    def close(self) -> None:
        pass


def _padded(data: bytes, size: int) -> bytes:
    return bytes(data) + bytes(size - len(data))


class CMID:
    def __init__(self, creator=None, qp_init_attr=None, pd=None, port_space=ce.RDMA_PS_TCP,
                 listen_id=None) -> None:
        self.ctx = None
        self._closed = False
        self._device: str | None = None
        self._listener = self._thread = self._request = self._qp = None
        self._children: list[CMID] = []
        self._parent = None
        self._remote_known = False
        self._stop = threading.Event()
        if isinstance(creator, CMEventChannel):
            self.event_channel = creator
        elif isinstance(creator, CMEvent):
            event = creator._event
            if listen_id is None or event.kind != ce.RDMA_CM_EVENT_CONNECT_REQUEST:
                raise PyverbsUserError("strict double: a CMID from a CONNECT_REQUEST event "
                                       "needs listen_id")
            self.event_channel = listen_id.event_channel    # child events: listener's channel
            self.ctx = listen_id.ctx
            self._request, self._device = event.request, event.device
            self._remote_known = True
            self._parent = listen_id
            listen_id._children.append(self)
        else:
            raise PyverbsUserError("strict double: CMIDs are made on an event channel or from "
                                   "a connect request event")
        self.event_channel.ids.add(self)

    @property
    def context(self):
        return self.ctx

    @property
    def dev_name(self) -> str:
        if self._device is None:
            raise SystemError("strict double: id->verbs is NULL on this CM id (bound to a "
                              "wildcard address, or not resolved): pyverbs would segfault")
        return self._device

    # -- passive ----------------------------------------------------------------------------
    def bind_addr(self, info) -> None:
        self._bound = (info.src or "0.0.0.0", int(info.src_service or 0))
        self._device = device_for(info.src or "")

    def listen(self, backlog=0) -> None:
        from stages.verbs.soft.device import SoftContext

        host, port = self._bound
        self._cm_ctx = SoftContext()
        try:
            self._listener = self._cm_ctx.listen(host, port, max(backlog, 1))
        except Exception as exc:  # noqa: BLE001
            self._cm_ctx.close()
            raise _rdma("Failed to listen", getattr(exc, "errno", None) or errno.EADDRINUSE) \
                from None
        self._thread = threading.Thread(target=self._take_requests, daemon=True,
                                        name="strict-cm-listen")
        self._thread.start()

    def _take_requests(self) -> None:
        from shm.errors import TransportError

        while not self._stop.is_set():
            try:
                req = self._listener.get_request(timeout=0.1)
            except TransportError:
                continue
            except Exception:  # noqa: BLE001 - the listener closed under us
                return
            local = req._sock.getsockname()[0]
            self.event_channel.post(_Event(ce.RDMA_CM_EVENT_CONNECT_REQUEST, self,
                                           _padded(req.private_data, CONNECT_PRIVATE), req,
                                           device_for(local)))

    def accept(self, param=None) -> None:
        qp = _QPS.get(param.qp_num) if param is not None else None
        if qp is None:
            raise _rdma("Failed to accept", errno.EINVAL)
        if qp.qp_state not in (e.IBV_QPS_RTR, e.IBV_QPS_RTS):
            raise _rdma("strict double: rdma_accept of an external QP that is not RTR yet "
                        "(librdmacm moves its own QPs to RTR first; the first packets would "
                        "be dropped)", errno.EINVAL)
        self._check_device(qp)
        req, self._request = self._request, None
        req.context = qp.soft.pd.context
        try:
            req.accept(qp.soft, param.private_data)
        except Exception as exc:  # noqa: BLE001
            raise _rdma("Failed to accept", getattr(exc, "errno", None) or errno.EINVAL) \
                from None
        self._qp = qp
        self.event_channel.post(_Event(ce.RDMA_CM_EVENT_ESTABLISHED, self))

    def reject(self, private_data=None) -> None:
        req, self._request = self._request, None
        if req is None:
            raise _rdma("Failed to Reject", errno.EINVAL)
        req.reject(bytes(private_data or b""))

    # -- active -----------------------------------------------------------------------------
    def resolve_addr(self, info, timeout_ms=2000) -> None:
        self._dst = (info.dst, int(info.dst_service or 0))
        self._device = device_for(info.dst)
        if self._device is None:
            raise _rdma("Failed to Resolve address", errno.EADDRNOTAVAIL)
        self.event_channel.post(_Event(ce.RDMA_CM_EVENT_ADDR_RESOLVED, self))

    def resolve_route(self, timeout_ms=2000) -> None:
        self.event_channel.post(_Event(ce.RDMA_CM_EVENT_ROUTE_RESOLVED, self))

    def connect(self, param=None) -> None:
        qp = _QPS.get(param.qp_num) if param is not None else None
        if qp is None:
            raise _rdma("Failed to Connect", errno.EINVAL)
        self._check_device(qp)
        host, port = self._dst
        self._thread = threading.Thread(target=self._connect, args=(qp, host, port,
                                                                    param.private_data),
                                        daemon=True, name="strict-cm-connect")
        self._thread.start()

    def _connect(self, qp, host, port, data) -> None:
        from stages.verbs.soft.cm import connect

        try:
            reply = connect(qp.soft.pd.context, qp.soft, host, port, data, 10.0)
        except Exception as exc:  # noqa: BLE001 - reported as the CM would
            kind = (ce.RDMA_CM_EVENT_REJECTED if getattr(exc, "errno", 0) == errno.ECONNREFUSED
                    else ce.RDMA_CM_EVENT_UNREACHABLE)
            self.event_channel.post(_Event(kind, self))
            return
        self._qp, self._remote_known = qp, True
        self.event_channel.post(_Event(ce.RDMA_CM_EVENT_CONNECT_RESPONSE, self,
                                       _padded(reply, ACCEPT_PRIVATE)))

    def establish(self) -> None:
        if self._qp is None or self._qp.qp_state != e.IBV_QPS_RTS:
            raise _rdma("Failed to Complete an active connection request", errno.EINVAL)

    def _check_device(self, qp) -> None:
        if qp.device != self.dev_name:
            raise _rdma(f"strict double: QP {qp.qp_num} is on {qp.device} but the connection "
                        f"is on {self.dev_name}", errno.EINVAL)

    def init_qp_attr(self, qp_state):
        if qp_state in (e.IBV_QPS_RTR, e.IBV_QPS_RTS) and not self._remote_known:
            raise _rdma("Failed to get QP attributes", errno.EINVAL)
        attr = QPAttr(qp_state=qp_state)
        mask = e.IBV_QP_STATE
        if qp_state == e.IBV_QPS_INIT:
            attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
            mask |= e.IBV_QP_ACCESS_FLAGS | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT
        elif qp_state == e.IBV_QPS_RTR:
            attr.dest_qp_num, attr.path_mtu = 1, 3
            mask |= (e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN | e.IBV_QP_RQ_PSN
                     | e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
        elif qp_state == e.IBV_QPS_RTS:
            attr.timeout, attr.retry_cnt, attr.rnr_retry = 14, 7, 0
            mask |= (e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
                     | e.IBV_QP_SQ_PSN | e.IBV_QP_MAX_QP_RD_ATOMIC)
        return attr, mask

    def disconnect(self) -> None:
        if self._qp is None:
            raise _rdma("Failed to Disconnect", errno.EINVAL)
        self._qp.soft.disconnect()

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._cm_ctx.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(15.0)
        if self._request is not None:
            self._request.reject(b"")
            self._request = None
        self._closed = True
