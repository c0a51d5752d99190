"""The strict double's ``pyverbs.cmid``: the connection manager over the soft provider's."""

from __future__ import annotations

import errno
import os
import select
import threading
from collections import deque

from pyverbs import cm_enums as ce
from pyverbs import enums as e
from pyverbs._kernel import _QPS, ACCEPT_PRIVATE, CONNECT_PRIVATE, _rdma, device_for, marked_fd
from pyverbs.pyverbs_error import PyverbsError, PyverbsUserError
from pyverbs.qp import QPAttr


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
