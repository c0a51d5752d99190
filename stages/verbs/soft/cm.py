"""Connection manager of the soft provider.

A listener is a TCP listening socket. A connection begins with one exchange on the accepted
socket: the active side sends REQ with its private data, the passive side answers REP with its
own (or REJ), and the socket then belongs to the two QPs (see ``link``). Every address that
getaddrinfo returns is tried in turn, as QEMU does with rdma_getaddrinfo; IPv6 link-local
scopes (``fe80::1%eth0``) resolve through getaddrinfo as well. Listening on ``::`` accepts IPv4
too.
"""

from __future__ import annotations

import errno
import select
import socket
import time

from shm.errors import TransportError
from stages.verbs import base
from stages.verbs.base import (
    MAX_ACCEPT_PRIVATE_DATA,
    MAX_CONNECT_PRIVATE_DATA,
    QPState,
    check_private_data,
    closed_error,
)
from stages.verbs.soft import wire
from stages.verbs.soft.link import Link, tune

HANDSHAKE_TIMEOUT = 10.0  # a connection that sends no REQ in this time is dropped


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed during handshake")
        data += chunk
    return bytes(data)


def _read_cm(sock: socket.socket) -> tuple[int, bytes]:
    magic, version, kind, size = wire.CM_HEADER.unpack(_recv_exact(sock, wire.CM_HEADER.size))
    if magic != wire.CM_MAGIC or version != wire.CM_VERSION:
        raise TransportError("the peer does not speak the soft provider's connection protocol",
                             errno=errno.EPROTO, hint="both ends must use --transport soft")
    return kind, _recv_exact(sock, size)


def _check_qp(context, qp) -> None:
    from stages.verbs.soft.qp import SoftQP

    if not isinstance(qp, SoftQP) or qp.pd.context is not context:
        raise ValueError("the QP must come from this soft context")
    if qp.state != QPState.INIT or qp.link is not None:
        raise TransportError(f"QP is {qp.state.name}, not INIT: it cannot be connected",
                             errno=errno.EINVAL)


def _addresses(host: str, port: int, passive: bool) -> list:
    try:
        return socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                  0, socket.AI_PASSIVE if passive else 0)
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve {host!r}: {exc.strerror}",
                             errno=errno.EHOSTUNREACH) from None


class SoftConnectRequest(base.ConnectRequest):
    """An incoming connection waiting for ``accept`` or ``reject``."""

    def __init__(self, context, sock: socket.socket, private_data: bytes, peer) -> None:
        self.context = context
        self.private_data = private_data
        self.peer = peer
        self._sock: socket.socket | None = sock

    def _take(self) -> socket.socket:
        if self._sock is None:
            raise TransportError("this connection request was already answered",
                                 errno=errno.EINVAL)
        sock, self._sock = self._sock, None
        return sock

    def accept(self, qp, private_data: bytes = b"") -> None:
        data = check_private_data(private_data, MAX_ACCEPT_PRIVATE_DATA, "accept")
        _check_qp(self.context, qp)
        sock = self._take()
        try:
            sock.sendall(wire.cm_message(wire.CM_REP, data))
            tune(sock)
            qp.attach(Link(qp, sock))
        except BaseException:
            sock.close()
            raise

    def reject(self, private_data: bytes = b"") -> None:
        data = check_private_data(private_data, MAX_ACCEPT_PRIVATE_DATA, "reject")
        sock = self._take()
        try:
            sock.sendall(wire.cm_message(wire.CM_REJ, data))
        except OSError:
            pass
        finally:
            sock.close()


class SoftListener(base.Listener):
    """A listening TCP socket; ``port`` is the bound port (ask for 0 to get a free one)."""

    def __init__(self, context, host: str, port: int, backlog: int = 5) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        self.context = context
        self.host = host
        errors = []
        for family, kind, proto, _name, sockaddr in _addresses(host, port, passive=True):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(sockaddr)
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                errors.append(exc)
                continue
            self._sock = sock
            self.port = sock.getsockname()[1]
            return
        exc = errors[0] if errors else OSError(errno.EADDRNOTAVAIL, "no address")
        raise TransportError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             errno=exc.errno) from None

    def get_request(self, timeout: float | None = None) -> SoftConnectRequest:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise closed_error("listener")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._sock], [], [], left)
            if not readable:
                raise TransportError(f"no connection request within {timeout} s",
                                     errno=errno.ETIMEDOUT)
            try:
                conn, peer = self._sock.accept()
            except OSError:
                continue
            conn.settimeout(HANDSHAKE_TIMEOUT if left is None else max(left, 1.0))
            try:
                kind, data = _read_cm(conn)
                if kind != wire.CM_REQ:
                    raise TransportError("expected a connection request", errno=errno.EPROTO)
            except (OSError, TransportError, ValueError):
                conn.close()  # a stray or broken client: keep waiting for a real one
                continue
            return SoftConnectRequest(self.context, conn, data, peer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        self.context._forget(self)


def connect(context, qp, host: str, port: int, private_data: bytes, timeout: float) -> bytes:
    """Connect ``qp`` to a listener at ``host:port``; returns the accepter's private data."""
    data = check_private_data(private_data, MAX_CONNECT_PRIVATE_DATA, "connect")
    _check_qp(context, qp)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    deadline = time.monotonic() + timeout
    failure: OSError | None = None
    for family, kind, proto, _name, sockaddr in _addresses(host, port, passive=False):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(sockaddr)
            sock.sendall(wire.cm_message(wire.CM_REQ, data))
            reply, reply_data = _read_cm(sock)
        except (OSError, TransportError) as exc:
            sock.close()
            if isinstance(exc, TransportError):
                raise
            failure = exc
            continue
        if reply == wire.CM_REJ:
            sock.close()
            raise TransportError(f"the peer at {where} rejected the connection",
                                 errno=errno.ECONNREFUSED)
        if reply != wire.CM_REP:
            sock.close()
            raise TransportError(f"unexpected reply from {where}", errno=errno.EPROTO)
        try:
            tune(sock)
            qp.attach(Link(qp, sock))
        except BaseException:
            sock.close()
            raise
        return reply_data
    if isinstance(failure, TimeoutError) or isinstance(failure, socket.timeout):
        raise TransportError(f"no answer from {where} within {timeout} s",
                             errno=errno.ETIMEDOUT) from None
    if isinstance(failure, ConnectionRefusedError):
        raise TransportError(f"connection to {where} refused: nothing listens there",
                             errno=errno.ECONNREFUSED,
                             hint="start the destination (rdma-pipeline incoming) first, or "
                                  "check the address and port") from None
    err = failure.errno if failure is not None else errno.EHOSTUNREACH
    why = failure.strerror if failure is not None and failure.strerror else "unreachable"
    raise TransportError(f"cannot connect to {where}: {why}", errno=err) from None
