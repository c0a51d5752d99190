"""Connection manager of the pyverbs provider: listen, accept and connect external QPs.

Asynchronous librdmacm on an event channel whose fd is found as ``new_fd`` finds completion
channels, so every wait has a timeout. The passive side walks its QP through INIT, RTR and RTS
*before* it accepts (librdmacm's own ``rdma_accept`` moves a QP it owns to RTR first;
accepting with the QP still in INIT drops the peer's first packets), then waits for
ESTABLISHED; the active side
resolves address and route, connects, and on CONNECT_RESPONSE walks its QP to RTS and calls
``establish``. Events of several connections on one listener are taken in order; one
connection is set up at a time.

The device follows the connection: a resolved (or accepted) CM id names its device
(``dev_name``) and the QP must live on it, else the connection fails saying which device the
route uses. A CM id bound to a wildcard address has no device at all (pyverbs would dereference
NULL), so a listener never asks its own id. Accepted ids receive their events on the
listener's event channel, so that channel is closed only after the last of them (``Channel``).
"""

from __future__ import annotations

import errno
import select

from shm.errors import TransportError
from stages.verbs import base
from stages.verbs.base import MAX_ACCEPT_PRIVATE_DATA, MAX_CONNECT_PRIVATE_DATA, check_private_data
from stages.verbs.rdmacore_base import errors, new_fd


def wait_cm_event(v, channel, fd: int, expected: int, timeout: float):
    """The next CM event, which must be ``expected``; the caller acks it."""
    readable, _, _ = select.select([fd], [], [], timeout)
    if not readable:
        raise TransportError(f"no connection-manager event within {timeout} s",
                             errno=errno.ETIMEDOUT)
    event = v.cm.CMEvent(channel)
    if event.event_type == expected:
        return event
    name = event.event_str()
    kind = event.event_type
    event.ack_cm_event()
    if kind == v.ce.RDMA_CM_EVENT_REJECTED:
        raise TransportError("the peer rejected the connection", errno=errno.ECONNREFUSED,
                             hint="check that the destination listens on that address")
    raise TransportError(f"connection manager reported {name}", errno=errno.ECONNABORTED)


class Channel:
    """An event channel shared by a listener and the ids it accepted: closed by the last."""

    def __init__(self, v) -> None:
        with errors("cannot open an event channel"):
            self.channel, self.fd = new_fd(v.cm.CMEventChannel, "rdma_cm")
        self.users = 1

    def hold(self) -> Channel:
        self.users += 1
        return self

    def close(self) -> None:
        self.users -= 1
        if self.users == 0:
            with errors("cannot close an event channel"):
                self.channel.close()


def check_device(cmid, context, what: str) -> None:
    """The connection's device (the CM id's) must be the QP's."""
    with errors("cannot read the connection's device"):
        device = cmid.dev_name
    if device != context.name:
        raise TransportError(f"{what} goes through RDMA device {device}, but the QP is on "
                             f"{context.name}", errno=errno.EXDEV,
                             hint=f"use --device {device}, or RDMA_PIPELINE_DEVICE={device}")


class VerbsConnectRequest(base.ConnectRequest):
    def __init__(self, listener: VerbsListener, cmid, private_data: bytes) -> None:
        self.listener, self._cmid, self.private_data = listener, cmid, private_data

    def accept(self, qp, private_data: bytes = b"") -> None:
        data = check_private_data(private_data, MAX_ACCEPT_PRIVATE_DATA, "accept")
        v, cmid = self.listener.v, self._take()
        qp.cmid, qp._channel = cmid, self.listener.channel.hold()   # closed with the QP
        try:
            check_device(cmid, qp.pd.context, "the connection request")
            qp.to_rts(cmid)                 # RTR and RTS before the peer hears "accepted"
        except BaseException:
            with errors("cannot reject the connection"):
                cmid.reject()               # the requester hears now, not after its timeout
            raise
        with errors("cannot accept the connection"):
            param = v.cm.ConnParam(resources=2, depth=2, rnr_retry=qp.rnr_retry,
                                   qp_num=qp.qp_num, data_len=len(data))
            param.set_private_data(data)
            cmid.accept(param)
        event = wait_cm_event(v, self.listener.channel.channel, self.listener.channel.fd,
                               v.ce.RDMA_CM_EVENT_ESTABLISHED, 10.0)
        event.ack_cm_event()

    def _take(self):
        if self._cmid is None:
            raise TransportError("this connection request was already answered",
                                 errno=errno.EINVAL)
        cmid, self._cmid = self._cmid, None
        return cmid

    def reject(self, private_data: bytes = b"") -> None:
        data = check_private_data(private_data, MAX_ACCEPT_PRIVATE_DATA, "reject")
        cmid = self._take()
        with errors("cannot reject the connection"):
            cmid.reject(private_data=data or None)      # pyverbs 44: reject(private_data=None)
            cmid.close()


class VerbsListener(base.Listener):
    def __init__(self, context, host: str, port: int, backlog: int) -> None:
        if not 0 < port <= 65535:
            raise ValueError("the verbs provider listens on an explicit port 1..65535")
        v = self.v = context.v
        self.context, self.host, self.port = context, host, port
        self.channel, self.cmid = Channel(v), None
        try:
            with errors(f"cannot listen on {host}:{port}"):
                self.cmid = v.cm.CMID(creator=self.channel.channel,
                                      port_space=v.ce.RDMA_PS_TCP)
                info = v.cm.AddrInfo(src=host, src_service=str(port),
                                     port_space=v.ce.RDMA_PS_TCP, flags=v.ce.RAI_PASSIVE)
                self.cmid.bind_addr(info)   # a wildcard address leaves the id without device
                self.cmid.listen(backlog)
        except BaseException:
            if self.cmid is not None:
                self.cmid.close()
            self.channel.close()
            raise

    def get_request(self, timeout: float | None = None) -> VerbsConnectRequest:
        v = self.v
        event = wait_cm_event(v, self.channel.channel, self.channel.fd,
                               v.ce.RDMA_CM_EVENT_CONNECT_REQUEST, timeout)
        with errors("cannot take the connection request"):
            child = v.cm.CMID(creator=event, listen_id=self.cmid)
            data = bytes(event.private_data or b"")
            event.ack_cm_event()
        return VerbsConnectRequest(self, child, data)

    def close(self) -> None:
        if self._closed:
            return
        with errors("cannot close the listener"):
            self.cmid.close()
        self.channel.close()        # the ids it accepted may still hold it
        self._closed = True


def connect(context, qp, host: str, port: int, private_data: bytes, timeout: float) -> bytes:
    """Connect the external ``qp`` through librdmacm; returns the accepter's private data."""
    data = check_private_data(private_data, MAX_CONNECT_PRIVATE_DATA, "connect")
    v = context.v
    ms = int(timeout * 1000)
    holder = Channel(v)
    channel, fd = holder.channel, holder.fd
    qp._channel = holder                # closed with the QP, after its CM id
    with errors(f"cannot connect to {host}:{port}"):
        cmid = qp.cmid = v.cm.CMID(creator=channel, port_space=v.ce.RDMA_PS_TCP)
        info = v.cm.AddrInfo(dst=host, dst_service=str(port), port_space=v.ce.RDMA_PS_TCP)
        cmid.resolve_addr(info, ms)
    wait_cm_event(v, channel, fd, v.ce.RDMA_CM_EVENT_ADDR_RESOLVED, timeout).ack_cm_event()
    check_device(cmid, context, f"the route to {host}")
    with errors(f"cannot resolve a route to {host}"):
        cmid.resolve_route(ms)
    wait_cm_event(v, channel, fd, v.ce.RDMA_CM_EVENT_ROUTE_RESOLVED, timeout).ack_cm_event()
    with errors(f"cannot connect to {host}:{port}"):
        param = v.cm.ConnParam(resources=2, depth=2, retry=5, rnr_retry=qp.rnr_retry,
                               qp_num=qp.qp_num, data_len=len(data))
        param.set_private_data(data)
        cmid.connect(param)
    event = wait_cm_event(v, channel, fd, v.ce.RDMA_CM_EVENT_CONNECT_RESPONSE, timeout)
    reply = bytes(event.private_data or b"")
    event.ack_cm_event()
    qp.to_rts(cmid)
    with errors("cannot establish the connection"):
        cmid.establish()
    return reply
