"""The TCP connection under a connected soft QP: a writer thread and a reader thread.

The reader is the only thread that receives: it applies ACKs and NAKs to the send queue and
executes the peer's requests, reading each payload with recv_into directly into the target MR or
RECV buffer (no intermediate copy), as a NIC's responder would, without the application's help.

A WRITE_BATCH is read with one header read, one descriptor read and recvmsg_into calls that
scatter the payloads straight into the MRs (``batch``).

The writer is the only thread that sends *blocking*. It batches, in one sendmsg(), leftovers,
the responder's ACK and NAKs and as many requests as are ready (a 28-byte header, then the
payload straight from registered memory; each run of consecutive WRITEs as one WRITE_BATCH).
To save thread hand-offs, requests (at posting, up to ``INLINE_MAX``; outside the QP lock,
holding the socket through ``sending``) and ACKs (from the reader) are also sent inline, but
only with MSG_DONTWAIT
(the kernel takes what fits in the socket buffer), under the QP lock and while the writer is
idle (``sending`` false, no ``prefix``); what a partial inline send leaves over becomes the
``prefix`` the writer sends before anything else. So bytes
never interleave, requests leave in sequence order, and no thread but the writer ever waits for
the socket: two QPs saturating a connection in both directions cannot deadlock.

ACKs are cumulative and coalesced: the reader acks when it has nothing more to read, or every
``ACK_EVERY`` requests / ``ACK_BYTES`` bytes while streaming. Nothing polls: the writer sleeps on
the QP's condition (with a timeout only while an RNR backoff runs), the reader in recv.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from stages.verbs.base import QPState
from stages.verbs.soft import batch, wire

IOV_MAX = 1024  # Linux's UIO_MAXIOV: buffers in one sendmsg
BATCH_BYTES = 8 << 20
INLINE_MAX = 4 << 20  # bounds how long an inline copy holds the QP lock
ACK_EVERY, ACK_BYTES = 16, 4 << 20
JOIN_TIMEOUT = 5.0


def tune(sock: socket.socket) -> None:
    """Socket options for a QP connection: no Nagle, dead-peer detection.

    Buffer sizes are left to the kernel's autotuning, which measured faster here than fixed
    SO_SNDBUF/SO_RCVBUF (those cap the receive window at rmem_max)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3),
                       ("TCP_USER_TIMEOUT", 10_000)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    sock.settimeout(None)


def _advance(bufs: list, sent: int) -> None:
    """Drop the first ``sent`` bytes of ``bufs`` (in place)."""
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


def sendall(sock: socket.socket, bufs: list) -> None:
    """sendmsg() every buffer, resuming after partial sends."""
    while bufs:
        _advance(bufs, sock.sendmsg(bufs[:IOV_MAX]))


class Link:
    """The connection of one QP; started by ``qp.attach``, stopped by ``close``."""

    def __init__(self, qp, sock: socket.socket) -> None:
        self.qp = qp
        self.sock = sock
        self._closing = False
        self.sending = False  # the writer is in a sendmsg (QP lock)
        self.prefix: list = []  # bytes that must go out before anything else (QP lock)
        self._unacked = self._unacked_bytes = 0  # reader only
        self._descs = memoryview(bytearray(wire.MAX_BATCH * wire.DESC.size))  # reader only
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

    def claim(self) -> bool:
        """Take the socket for an inline send outside the QP lock (QP lock held): True when
        nobody is sending and nothing is left over. ``send_claimed`` gives it back."""
        if self.sending or self.prefix or self._closing:
            return False
        self.sending = True
        return True

    def send_claimed(self, bufs: list, start: int, end: int) -> None:
        """Send the frames of requests ``start..end-1`` without blocking, after ``claim`` and
        *without* the QP lock (so the reader can apply ACKs meanwhile); whatever the socket
        does not take is left to the writer."""
        try:
            sent = self.sock.sendmsg(bufs, (), socket.MSG_DONTWAIT)
        except OSError:  # would block, or broken: the writer meets the same error
            sent = 0
        qp = self.qp
        with qp.lock:
            self.sending = False
            if not sent:
                if qp.tx_next == end:  # (an RNR NAK meanwhile rewinds tx_next itself)
                    qp.tx_next = start
            elif sent < sum(map(len, bufs)):
                self.prefix = list(bufs)
                _advance(self.prefix, sent)
            if (self.prefix or not sent or qp.tx_next < qp.next_seq or qp.ack_due is not None
                    or qp.control or qp.state != QPState.RTS or self._closing):
                qp.lock.notify_all()  # the writer waited for us, or has work now

    def try_send_now(self, bufs: list) -> bool:
        """Send ``bufs`` inline without blocking (QP lock held); False if nothing went out.

        Whatever a partial send leaves becomes the prefix the writer sends first.
        """
        if self.sending or self.prefix or self._closing:
            return False
        try:
            sent = self.sock.sendmsg(bufs, (), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False  # the writer meets the same error and fails the link
        if sent == 0:
            return False
        rest = list(bufs)
        _advance(rest, sent)
        if rest:
            self.prefix = rest
            self.qp.lock.notify_all()
        return True

    # -- writer --------------------------------------------------------------------------
    def _collect(self, bufs: list) -> None:
        batch.collect(self.qp, bufs, max_bytes=BATCH_BYTES, max_iov=IOV_MAX)

    def _next_batch(self) -> list | None:
        """Frames to send now, waiting for some; None when the writer is done."""
        qp = self.qp
        with qp.lock:
            while True:
                if self._closing:
                    return None
                if self.sending:  # a poster's inline send holds the socket
                    qp.lock.wait()
                    continue
                bufs, self.prefix = self.prefix, []
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
                    self.sending = True
                    return bufs
                if qp.state == QPState.ERR:
                    return None
                qp.lock.wait(wait)

    def _write_loop(self) -> None:
        try:
            while (bufs := self._next_batch()) is not None:
                sendall(self.sock, bufs)
                with self.qp.lock:
                    self.sending = False
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

    def _flush_ack(self) -> None:
        """Send the pending cumulative ACK now if the socket takes it, else via the writer."""
        qp = self.qp
        self._unacked = self._unacked_bytes = 0
        with qp.lock:
            if qp.ack_due is None:
                return
            if self.try_send_now([wire.frame(wire.ACK, qp.ack_due)]):
                qp.ack_due = None
            else:
                qp.lock.notify_all()

    def _next_header(self, hview: memoryview) -> bool:
        """Read the next frame header; acks what is pending before waiting for one."""
        try:
            n = self.sock.recv_into(hview, len(hview), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            n = -1
        if n == 0:
            return False
        if n > 0:
            return self._recv_exact(hview[n:])
        if self._unacked:
            self._flush_ack()  # nothing more to read for now: tell the requester
        return self._recv_exact(hview)

    def _discard(self, length: int, scratch: memoryview) -> bool:
        while length:
            n = min(length, len(scratch))
            if not self._recv_exact(scratch[:n]):
                return False
            length -= n
        return True

    def _read_batch(self, first: int, count: int, total: int, scratch: memoryview) -> bool:
        """Execute a WRITE_BATCH whose header was read; False when the connection is over."""
        qp = self.qp
        if not 1 <= count <= wire.MAX_BATCH:
            return False  # not our protocol
        if not self._recv_exact(self._descs[:count * wire.DESC.size]):
            return False
        descs = np.frombuffer(self._descs, wire.DESC_DTYPE, count)
        lengths = descs["length"].astype(np.int64)  # native: big-endian sums are slow
        if int(lengths.sum()) != total:
            return False
        with qp.lock:
            placed = qp.accept_batch(first, descs)
        if placed is None:
            return self._discard(total, scratch)
        k, views, mrs = placed
        try:
            ok = batch.recv_scattered(self.sock, views)
        except OSError:
            ok = False
        with qp.lock:
            if ok:
                qp.batch_done(first, count, k, mrs)
                qp.bytes_written += total if k == count else int(lengths[:k].sum())
            else:
                qp.batch_aborted(mrs)
        if not ok:
            return False
        if k < count:  # refused from write k on: the QP is in ERR, drop the rest
            return self._discard(int(lengths[k:].sum()), scratch)
        self._unacked += count
        self._unacked_bytes += total
        if self._unacked >= ACK_EVERY or self._unacked_bytes >= ACK_BYTES:
            self._flush_ack()
        return True

    def _read_loop(self) -> None:
        qp = self.qp
        header = bytearray(wire.FRAME.size)
        hview = memoryview(header)
        scratch = memoryview(bytearray(256 << 10))
        try:
            while self._next_header(hview):
                kind, flags, _, seq, remote_addr, rkey, length = wire.FRAME.unpack(header)
                if kind == wire.ACK:
                    with qp.lock:
                        qp.on_ack(seq)
                elif kind == wire.NAK:
                    with qp.lock:
                        qp.on_nak(seq, flags)
                elif kind == wire.WRITE_BATCH:
                    if not self._read_batch(seq, rkey, length, scratch):
                        break
                elif kind in wire.REQUESTS:
                    with qp.lock:
                        placed = qp.accept_request(kind, seq, remote_addr, rkey, length)
                    if placed is None:
                        if not self._discard(length, scratch):
                            break
                        continue
                    view, target = placed
                    try:
                        ok = self._recv_exact(view)
                    except OSError:     # reset mid-payload: its MR reference must go too
                        ok = False
                    with qp.lock:
                        if ok:
                            qp.request_done(seq, length, target)
                            if kind == wire.WRITE:
                                qp.bytes_written += length
                        else:
                            qp.request_aborted(target)
                    if not ok:
                        break
                    self._unacked += 1
                    self._unacked_bytes += length
                    if self._unacked >= ACK_EVERY or self._unacked_bytes >= ACK_BYTES:
                        self._flush_ack()
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
