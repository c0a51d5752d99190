"""The TCP connection under a connected soft QP: a writer thread and a reader thread.

The writer is the only thread that sends. It batches, in one sendmsg(), the responder's pending
ACK and NAKs and as many requests as are ready (a 28-byte header, then the payload straight
from registered memory). The reader is the only thread that receives: it applies ACKs and NAKs
to the send queue and executes the peer's requests, reading each payload with recv_into directly
into the target MR or RECV buffer (no intermediate copy), as a NIC's responder would, without the
application's help. Neither thread ever waits for the other to send, so two QPs saturating a
connection in both directions cannot deadlock. Nothing polls: the writer sleeps on the QP's
condition (with a timeout only while an RNR backoff runs), the reader in recv.
"""

from __future__ import annotations

import socket
import threading
import time

from stages.verbs.base import QPState, SendOpcode
from stages.verbs.soft import wire

IOV_MAX = 512
BATCH_BYTES = 8 << 20
SOCKET_BUFFER = 4 << 20
JOIN_TIMEOUT = 5.0


def tune(sock: socket.socket) -> None:
    """Socket options for a QP connection: big buffers, no Nagle, dead-peer detection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3),
                       ("TCP_USER_TIMEOUT", 10_000)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    sock.settimeout(None)


def sendall(sock: socket.socket, bufs: list) -> None:
    """sendmsg() every buffer, resuming after partial sends."""
    while bufs:
        sent = sock.sendmsg(bufs[:IOV_MAX])
        i = 0
        while i < len(bufs):
            size = len(bufs[i])
            if sent < size:
                if sent:
                    bufs[i] = memoryview(bufs[i])[sent:]
                break
            sent -= size
            i += 1
        del bufs[:i]


class Link:
    """The connection of one QP; started by ``qp.attach``, stopped by ``close``."""

    def __init__(self, qp, sock: socket.socket) -> None:
        self.qp = qp
        self.sock = sock
        self._closing = False
        self._write_shut = False
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name=f"soft-qp{qp.qp_num:#x}-tx")
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"soft-qp{qp.qp_num:#x}-rx")

    def start(self) -> None:
        self._writer.start()
        self._reader.start()

    def wind_down(self) -> None:
        """The QP entered ERR (lock held): the writer sends what is pending, then FIN."""
        self.qp.lock.notify_all()

    # -- writer --------------------------------------------------------------------------
    def _collect(self, bufs: list) -> None:
        qp = self.qp
        i = qp.tx_next - qp.sq[0].seq
        size = 0
        while i < len(qp.sq) and len(bufs) < IOV_MAX - 2 and size < BATCH_BYTES:
            wr = qp.sq[i]
            if wr.bad:
                break  # reported as LOC_PROT_ERR when it reaches the front
            kind = wire.WRITE if wr.opcode == SendOpcode.RDMA_WRITE else wire.SEND
            bufs.append(wire.frame(kind, wr.seq, remote_addr=wr.remote_addr, rkey=wr.rkey,
                                   length=wr.length))
            if wr.length:
                bufs.append(wr.view)
            size += wr.length
            qp.tx_next += 1
            i += 1

    def _next_batch(self) -> list | None:
        """Frames to send now, waiting for some; None when the writer is done."""
        qp = self.qp
        with qp.lock:
            while True:
                if self._closing:
                    return None
                bufs: list = []
                if qp.ack_due is not None:
                    bufs.append(wire.frame(wire.ACK, qp.ack_due))
                    qp.ack_due = None
                if qp.control:
                    bufs.extend(qp.control)
                    qp.control.clear()
                wait = None
                if qp.state == QPState.RTS and qp.tx_next < qp.next_seq:
                    now = time.monotonic()
                    if now < qp.rnr_until:
                        wait = qp.rnr_until - now
                    else:
                        self._collect(bufs)
                if bufs:
                    return bufs
                if qp.state == QPState.ERR:
                    return None
                qp.lock.wait(wait)

    def _write_loop(self) -> None:
        try:
            while (bufs := self._next_batch()) is not None:
                sendall(self.sock, bufs)
            if not self._closing:
                self.sock.shutdown(socket.SHUT_WR)  # goodbye: the peer's reader sees EOF
        except OSError:
            self.qp.link_lost()

    # -- reader --------------------------------------------------------------------------
    def _recv_exact(self, view: memoryview) -> bool:
        sock = self.sock
        while len(view):
            n = sock.recv_into(view, len(view), socket.MSG_WAITALL)
            if n == 0:
                return False
            view = view[n:]
        return True

    def _discard(self, length: int, scratch: memoryview) -> bool:
        while length:
            n = min(length, len(scratch))
            if not self._recv_exact(scratch[:n]):
                return False
            length -= n
        return True

    def _read_loop(self) -> None:
        qp = self.qp
        header = bytearray(wire.FRAME.size)
        hview = memoryview(header)
        scratch = memoryview(bytearray(256 << 10))
        try:
            while self._recv_exact(hview):
                kind, flags, _, seq, remote_addr, rkey, length = wire.FRAME.unpack(header)
                if kind == wire.ACK:
                    with qp.lock:
                        qp.on_ack(seq)
                elif kind == wire.NAK:
                    with qp.lock:
                        qp.on_nak(seq, flags)
                elif kind in wire.REQUESTS:
                    with qp.lock:
                        placed = qp.accept_request(kind, seq, remote_addr, rkey, length)
                    if placed is None:
                        if not self._discard(length, scratch):
                            break
                        continue
                    view, target = placed
                    ok = self._recv_exact(view)
                    with qp.lock:
                        if ok:
                            qp.request_done(seq, length, target)
                        else:
                            qp.request_aborted(target)
                    if not ok:
                        break
                else:
                    break  # not our protocol: treat as a broken connection
        except OSError:
            pass
        finally:
            qp.link_lost()

    def close(self) -> None:
        """Stop both threads and close the socket (the QP is being destroyed)."""
        with self.qp.lock:
            self._closing = True
            self.qp.lock.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for thread in (self._writer, self._reader):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(JOIN_TIMEOUT)
        self.sock.close()
