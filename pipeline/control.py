"""The control QP of one side: three 512 KiB buffers, send and receive CQs, a ControlChannel.

``ControlLink`` is the thin I/O layer over ``pipeline.protocol.channel.ControlChannel``: it posts
the RECVs the channel asks for before transmitting anything, copies each outgoing message into a
send buffer (slot 2, or a small second one beside the three) and hands every received message
to the channel, which checks it. QEMU waits for each SEND's completion before it goes on; the
destination's replies and READYs here do not (``wait=False``): a buffer is reused only once its
SEND completed (one send queue completes in order), so a reply and the READY after it go out
back to back instead of a round trip apart each, which is what a registration costs. Waits are
sliced (``SLICE`` seconds) and call ``check()`` between slices, so a cancelled migration or a
dead stage interrupts any wait. Every message sent or received can be traced as a JSON line
``{"t", "dir", "hex"}``. With QEMU's protocol version 1 the RDMA WRITEs share the QP
(``share_send_cq``): the thread posting them polls the send CQ and hands our SEND completions
back.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import queue
import time
from collections import deque

from pipeline.protocol.channel import NEEDS_CREDIT, ControlChannel, Role, Slot
from pipeline.protocol.messages import CONTROL_MAX_BUFFER, ErrorMessage
from shm.errors import RemoteProtocolError, TransportError
from stages.poster import FOREIGN_WR_ID
from stages.verbs.base import Access, SendOpcode

WRID_SEND = 2000          # + the send buffer's index (0: slot 2, 1: the small one)
WRID_RECV = 4000
SLICE = 0.1
QP_DEPTH = 512
SMALL_SEND = 64 << 10     # the second send buffer: any reply, READY, ERROR, COMMIT fits
CONTROL_PINNED = 3 * CONTROL_MAX_BUFFER + SMALL_SEND   # what one side's control link pins


class ControlTrace:
    """JSON lines of every control message, times relative to the first."""

    def __init__(self, path: str | None) -> None:
        self._f = open(path, "w", buffering=1) if path else None  # noqa: SIM115
        self._t0 = time.monotonic()

    def __call__(self, direction: str, data: bytes) -> None:
        if self._f is not None:
            self._f.write(json.dumps({"t": round(time.monotonic() - self._t0, 6),
                                      "dir": direction, "hex": bytes(data).hex()}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ControlLink:
    """One side's control connection; ``close()`` is idempotent and releases children first."""

    def __init__(self, ctx, pd, role: Role, *, check=lambda: None,
                 trace: ControlTrace | None = None, timeout: float = 30.0) -> None:
        self.ctx, self.pd = ctx, pd
        self.channel = ControlChannel(role)
        self.check = check
        self.trace = trace or ControlTrace(None)
        self.timeout = timeout
        self.bytes_sent = 0
        self._closed = False
        self._mem = mmap.mmap(-1, CONTROL_PINNED)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self._addr = [base + i * CONTROL_MAX_BUFFER for i in range(3)]
        # send buffers: (offset in _mem, size); a deque of the indexes whose SEND is in flight
        self._send_bufs = ((Slot.CONTROL * CONTROL_MAX_BUFFER, CONTROL_MAX_BUFFER),
                           (3 * CONTROL_MAX_BUFFER, SMALL_SEND))
        self._in_flight: deque[int] = deque()
        self.mr = pd.reg_mr(base, CONTROL_PINNED, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        self.send_cq = ctx.create_cq(3 * QP_DEPTH)
        self.recv_cq = ctx.create_cq(3 * QP_DEPTH)
        self.qp_depth = QP_DEPTH
        self.qp = pd.create_qp(self.send_cq, self.recv_cq, max_send_wr=QP_DEPTH, max_recv_wr=3)
        self.send_wr_id = WRID_SEND
        self._sends: queue.Queue | None = None    # SEND completions, when the CQ is shared
        self._held = None                          # one taken from it while waiting

    def share_send_cq(self):
        """RDMA WRITEs go on this QP too (QEMU's protocol version 1: one QP), posted and
        polled by another thread: from now on our SENDs carry a wr_id it hands back through
        the returned callable (``stages.poster.serve_writes``'s ``foreign``)."""
        self.send_wr_id = FOREIGN_WR_ID + WRID_SEND
        self._sends = queue.Queue()
        return self._sends.put

    # -- low level -----------------------------------------------------------------------
    def post_recvs(self) -> None:
        for slot in self.channel.take_recv_posts():
            self.qp.post_recv(WRID_RECV + int(slot), self._addr[slot], CONTROL_MAX_BUFFER,
                              self.mr.lkey)

    def _wait(self, cq, what: str, timeout: float | None = None):
        """The next completion of ``cq`` (None: of our SENDs, on a shared send CQ)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            wc = self._poll(cq)
            if wc is not None:
                if not wc.ok:
                    raise TransportError(
                        f"control {what} failed with {wc.status.name}: the connection to the "
                        "peer is broken")
                return wc
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"no control {what} within {self.timeout:g} s: the peer "
                                     "stopped answering")
            if cq is not None:
                cq.wait(min(SLICE, left))
            else:
                try:
                    self._held = self._sends.get(timeout=min(SLICE, left))
                except queue.Empty:
                    pass

    def _poll(self, cq):
        if cq is not None:
            wcs = cq.poll(1)
            return wcs[0] if wcs else None
        wc, self._held = self._held, None
        if wc is None:
            try:
                wc = self._sends.get_nowait()
            except queue.Empty:
                pass
        return wc

    def transmit(self, data: bytes, timeout: float | None = None, *, wait: bool = True) -> None:
        """Copy ``data`` into a free send buffer and SEND it; unless ``wait`` is False, wait
        for every send completion (this one's last). On a send CQ shared with the writes
        (QEMU's version 1) every SEND is waited for, in slot 2."""
        shared = self._sends is not None
        free = [i for i, (_, size) in enumerate(self._send_bufs)
                if i not in self._in_flight and len(data) <= size and not (shared and i)]
        while not free:             # the fitting buffers are all in flight: the oldest ends
            self._settle_one(timeout)
            free = [i for i, (_, size) in enumerate(self._send_bufs)
                    if i not in self._in_flight and len(data) <= size and not (shared and i)]
        buf = free[-1]              # the small one when it fits: slot 2 stays for big ones
        start = self._send_bufs[buf][0]
        self._mem[start:start + len(data)] = data
        self.qp.post_send(self.send_wr_id + buf, SendOpcode.SEND,
                          self._addr[0] + start, len(data), self.mr.lkey, signaled=True)
        self._in_flight.append(buf)
        self.trace("send", data)
        self.bytes_sent += len(data)
        if wait or shared:
            while self._in_flight:
                self._settle_one(timeout)

    def _settle_one(self, timeout: float | None) -> None:
        """Wait for the oldest SEND in flight to complete (one send queue completes in
        order); a failed one raises."""
        self._wait(self.send_cq if self._sends is None else None, "send", timeout)
        self._in_flight.popleft()

    def receive(self, timeout: float | None = None):
        """The next message (checked by the channel); an ERROR from the peer raises."""
        wc = self._wait(self.recv_cq, "receive", timeout)
        slot = wc.wr_id - WRID_RECV
        start = slot * CONTROL_MAX_BUFFER
        data = self._mem[start:start + wc.byte_len]
        self.trace("recv", data)
        msg = self.channel.receive(data, Slot(slot))
        if isinstance(msg, ErrorMessage):
            if msg.reason:            # a peer of ours says why
                raise RemoteProtocolError(f"the {self.channel.role.peer.name.lower()} failed "
                                          f"the migration: {msg.reason}")
            raise RemoteProtocolError("the peer sent ERROR: it is failing the migration")
        return msg

    # -- source --------------------------------------------------------------------------
    def send(self, msg) -> None:
        """Wait for READY credit if needed, then send ``msg`` (no reply awaited)."""
        while self.channel.credit == 0 and msg.TYPE in NEEDS_CREDIT:
            self.receive()
        out = self.channel.send(msg)
        self.post_recvs()
        self.transmit(out)

    def wait_credit(self, timeout: float | None = None) -> None:
        """Block until the destination grants READY for the next message."""
        while self.channel.credit == 0:
            self.receive(timeout)

    def request(self, msg):
        """Send a request and return its reply."""
        self.send(msg)
        return self.receive()

    def send_stream(self, payloads: list[bytes]) -> None:
        from pipeline.protocol.messages import QemuFileMessage

        for p in payloads:
            self.send(QemuFileMessage(p))

    # -- destination ---------------------------------------------------------------------
    def grant_and_receive(self, timeout: float | None = None):
        """Send READY and return the one message it lets the source send."""
        self.post_recvs()
        self.transmit(self.channel.grant(), wait=False)
        msg = self.receive(timeout)
        self.post_recvs()
        return msg

    def reply(self, msg) -> None:
        out = self.channel.send(msg)
        self.post_recvs()
        self.transmit(out, wait=False)

    # -- teardown ------------------------------------------------------------------------
    def abort(self, reason: str = "") -> None:
        """Best-effort ERROR to the peer (QEMU's cleanup rule; a peer of ours is told
        ``reason``), never raises."""
        try:
            data = self.channel.abort(reason)
            if data is not None:
                self.transmit(data, timeout=1.0)
        except Exception:  # noqa: BLE001 - best effort on a failing connection
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:                        # a last reply still on its way is delivered first
            while self._in_flight:
                self._settle_one(1.0)
        except Exception:  # noqa: BLE001 - a broken connection has nothing left to deliver
            pass
        for step in (self.qp.disconnect, self.qp.close, self.mr.close, self.send_cq.close,
                     self.recv_cq.close):
            try:
                step()
            except Exception:  # noqa: BLE001 - teardown continues past a broken connection
                pass
        try:
            self._mem.close()
        except BufferError:
            pass
        self.trace.close()

