"""The ``rdma:`` destination driver: listens on ``rdma:HOST:PORT`` and carries out a
``DestinationSession``'s actions over verbs.

It owns the verbs context and PD, the listener, the control link (``ControlLink``: READY
credit, the registration windows' replies), a thread accepting data-QP connections that
present the session's token into the same PD (so the soft provider's responder writes
incoming RDMA WRITEs straight into registered RAM, as a NIC would) and the second control
connection QEMU's source opens for its return path (return-path capability: negotiated as
the first, and the way QEMU's source hears SHUT(0) at the end), the chunk MRs keyed
(source block index, chunk), a thread faulting newly registered chunks in ahead of their
writes, the page hasher, the guest process and the region. The session decides; this driver
moves bytes and keeps handles.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time

from pipeline.control import ControlLink, ControlTrace
from pipeline.drivers.destination_common import DestinationDriver
from pipeline.protocol.capabilities import (
    Capabilities,
    Capability,
    DataConnect,
    decode_connect,
    negotiate,
)
from pipeline.protocol.channel import ControlChannel, Role
from pipeline.protocol.messages import CommitMessage, QemuFileMessage
from pipeline.protocol.return_path import SHUT_OK, shut
from pipeline.session import destination_events as de
from pipeline.session.destination import DestinationSession
from shm.errors import RemoteProtocolError, TransportError
from stages.verbs.base import Access

RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE
POLL_S = 0.2          # how long a wait for a connection request blocks between checks


class RdmaDestination(DestinationDriver):
    """One incoming ``rdma:`` migration; ``run()`` blocks until completed (the summary) or
    not (it raises)."""

    def __init__(self, uri, config, *, trace: ControlTrace | None = None, **kw) -> None:
        self.trace = trace                       # every control message, as a JSON line
        self.token = secrets.randbits(63) | 1    # what the source's data QPs present
        self.ctx = self.pd = self.listener = self.link = self.data_cq = None
        self.chunk_mrs: dict[tuple[int, int], object] = {}   # (source block index, chunk)
        self.block_mrs: list = []
        self.data_qps: list = []
        self.supported: Capabilities | None = None   # what this side grants
        self.granted = Capabilities()                  # what it granted the source
        self.return_path: ControlLink | None = None   # QEMU's second connection, if opened
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._acceptor_error: BaseException | None = None
        self._populator: threading.Thread | None = None
        self._populate_queue: queue.Queue | None = None
        self._populate_gen = 0         # registration windows opened so far
        self._rounds_named = 0         # round sections received (a source of ours sends them)
        super().__init__(uri, config, **kw)

    def create_session(self, blocks, prealloc: bool) -> DestinationSession:
        return DestinationSession(self.config, carrier="rdma", blocks=blocks,
                                  prealloc=prealloc, session_token=self.token, stats=self.stats)

    def check(self) -> None:
        super().check()
        if self._acceptor_error is not None:
            raise self._acceptor_error
        self._count_bytes()

    def _count_bytes(self) -> None:
        """What crossed so far: the stream's bytes, and the RDMA WRITEs' where the device
        shows them (the soft provider counts what lands; a NIC's one-sided writes are
        invisible here, as to QEMU's destination)."""
        qps = [*self.data_qps, *([self.link.qp] if self.link is not None else [])]
        landed = sum(getattr(qp, "bytes_written", 0) for qp in qps)
        stream = self.session.reader.bytes_received if self.session.reader is not None else 0
        self.stats.update(rdma_bytes=landed, control_bytes=stream)

    def summary(self) -> dict:
        self._count_bytes()
        return super().summary()

    # -- connections ---------------------------------------------------------------------
    def open_device(self) -> None:
        from stages.verbs import open_provider

        self.ctx = open_provider(self.config.transport).open_device(peer=self.uri.host)
        self._stack.callback(self._close_ctx)
        self.pd = self.ctx.alloc_pd()
        self.listener = self.ctx.listen(self.uri.host, self.uri.port)
        self._stack.callback(self.listener.close)

    def _close_ctx(self) -> None:
        try:
            self.ctx.close()
        except Exception:  # noqa: BLE001 - an MR still busy: the process exit frees it
            pass

    def _accept(self, a: de.Accept):
        self.open_device()
        self.on_listening(self.listener.port)
        req = self._control_request()
        self.supported = a.capabilities
        self.link = ControlLink(self.ctx, self.pd, Role.DESTINATION, check=self.check,
                                trace=self.trace)
        self._stack.callback(self.link.close)
        reply = self.link.channel.accept(req.private_data, a.capabilities)
        req.accept(self.link.qp, reply)
        self.granted = self.link.channel.capabilities
        self.link.post_recvs()
        self.data_cq = self.ctx.create_cq(64)
        self._stack.callback(self._close_data_qps)
        self._acceptor = threading.Thread(target=self._accept_data, name="data-acceptor",
                                          daemon=True)
        self._stack.callback(self._stop_acceptor)
        self._acceptor.start()
        return de.Accepted(self.link.channel.capabilities)

    def _control_request(self):
        """The first connection request that is not a data QP's."""
        deadline = time.monotonic() + self.accept_timeout
        while True:
            self.check()
            try:
                req = self.listener.get_request(timeout=POLL_S)
            except TransportError:
                if time.monotonic() > deadline:
                    raise TransportError("no source connected within "
                                         f"{self.accept_timeout:g} s") from None
                continue
            if isinstance(decode_connect(req.private_data), DataConnect):
                req.reject()
                continue
            return req

    def _accept_data(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    req = self.listener.get_request(timeout=POLL_S)
                except TransportError:
                    continue
                try:
                    hello = decode_connect(req.private_data)
                except RemoteProtocolError:
                    req.reject()
                    continue
                if isinstance(hello, Capabilities) and self.return_path is None:
                    self._accept_return_path(req, hello)
                    continue
                if (not isinstance(hello, DataConnect) or hello.session_token != self.token
                        or not self.granted.has(Capability.DATA_QPS)):
                    req.reject()          # (QEMU's version 1 has one QP: no data QP either)
                    continue
                qp = self.pd.create_qp(self.data_cq, self.data_cq, max_send_wr=1,
                                       max_recv_wr=1)
                self.data_qps.append(qp)
                req.accept(qp, b"")
        except BaseException as exc:  # noqa: BLE001 - reported to the main loop by check()
            if not self._stop.is_set():
                self._acceptor_error = exc

    def _accept_return_path(self, req, request: Capabilities) -> None:
        """QEMU's return path: a control connection negotiated as the first, on which this
        side writes the stream (the SOURCE role) and QEMU's source grants READY."""
        caps = negotiate(request, self.supported)
        link = ControlLink(self.ctx, self.pd, Role.SOURCE, check=self.check)
        try:
            link.channel = ControlChannel(Role.SOURCE, capabilities=caps)
            link.post_recvs()                     # slot 0, for QEMU's READY
            req.accept(link.qp, caps.encode())
        except BaseException:
            link.close()
            raise
        self.return_path = link

    def _stop_acceptor(self) -> None:
        self._stop.set()
        if self._acceptor.ident is not None:
            self._acceptor.join(2.0)

    def _close_data_qps(self) -> None:
        if self.return_path is not None:
            self.return_path.close()
        for qp in self.data_qps:
            for step in (qp.disconnect, qp.close):
                try:
                    step()
                except Exception:  # noqa: BLE001 - teardown goes on past a broken connection
                    pass

    # -- the control channel -------------------------------------------------------------
    def _await_message(self, a: de.AwaitMessage):
        return de.ControlReceived(self.link.grant_and_receive())

    def _open_window(self, a: de.OpenWindow):
        self.link.channel.begin_registration()
        self._populate_gen += 1      # the rounds before have landed whole: stop faulting for them

    def _reply(self, a: de.Reply):
        self.link.reply(a.message)

    def _confirm(self, a: de.Confirm):
        self.check()
        if self.return_path is not None:
            # What QEMU's destination sends as it ends: SHUT(0), on the return path.
            self.return_path.send(QemuFileMessage(shut(SHUT_OK)))
        if a.ready_after_eof:
            # Our extension: one more READY says "verified" to the source. A two-phase
            # session waits for the COMMIT that READY lets through before it runs the guest.
            self.link.post_recvs()
            self.link.transmit(self.link.channel.grant())
        if not self.session.two_phase:
            self.link.channel.close()
        return de.ConfirmSent()

    def _await_commit(self, a: de.AwaitCommit):
        msg = self.link.receive(a.timeout)
        if not isinstance(msg, CommitMessage):
            raise RemoteProtocolError(f"expected COMMIT after READY, got {type(msg).__name__}")
        self.link.channel.close()
        return de.Committed()

    def _abort_peer(self, a: de.AbortPeer):
        for link in (self.link, self.return_path):
            if link is not None:
                link.abort(self.session.reason)

    # -- memory --------------------------------------------------------------------------
    def _ram_access(self, need: int, what: str):
        """The access of a guest-RAM registration of ``need`` bytes, once it is known to fit
        the pin budget (x-odp off: each registration pins, as QEMU's do; the budget is
        x-pin-budget or what RLIMIT_MEMLOCK leaves, read at the first registration, after the
        control link's buffers are pinned). TransportError, in one line, past it."""
        if self.config.odp:
            return RW | Access.ON_DEMAND
        if not hasattr(self, "_pin_budget"):
            from stages.pinbudget import pin_budget

            if self.config.memlock_limit:
                from stages.harness import limit_memlock

                limit_memlock(self.config.memlock_limit)
            self._pin_budget = pin_budget(self.config.pin_budget, pins=True)
            self._pinned = 0
        from stages.pinbudget import check_fits

        budget, why = self._pin_budget
        check_fits("destination", budget, why, need, what, self._pinned)
        self._pinned += need
        return RW

    def _register_chunks(self, a: de.RegisterChunks):
        """One ``reg_mrs`` call for every new chunk (adjacent chunks pinned together), each
        with its own MR and rkey."""
        need = sum(length for _key, _addr, length in a.ranges)
        access = self._ram_access(need, f"the {len(a.ranges)} chunk(s) of a REGISTER request "
                                        "(the source's pin budget is larger: lower its "
                                        "x-pin-budget)")
        try:
            mrs = self.pd.reg_mrs([(addr, length) for _key, addr, length in a.ranges], access)
        except BaseException:
            self._unpinned(need)
            raise
        for (key, _addr, _length), mr in zip(a.ranges, mrs, strict=True):
            self.chunk_mrs[key] = mr
            if not self._rounds_named:
                self._populate_ahead(mr)
        return de.ChunksRegistered(tuple(mr.rkey for mr in mrs))

    def _unpinned(self, length: int) -> None:
        if not self.config.odp:
            self._pinned -= length

    def _deregister_chunks(self, a: de.DeregisterChunks):
        for key in a.keys:
            mr = self.chunk_mrs.pop(key, None)
            if mr is not None:
                mr.close()
                self._unpinned(mr.length)

    def _pin_blocks(self, a: de.PinBlocks):
        # On demand (ODP): pinning all of RAM up front would fault in every page, 0.6 s per
        # GiB here, even the pages that stay zero and are never written; each write's
        # target range is faulted in, in bulk, when it arrives.
        access = self._ram_access(sum(length for _addr, length in a.ranges),
                                  "all RAM blocks for rdma-pin-all")
        rkeys = []
        for addr, length in a.ranges:
            mr = self.pd.reg_mr(addr, length, access)
            self.block_mrs.append(mr)
            rkeys.append(mr.rkey)
        return de.BlocksPinned(tuple(rkeys))

    def _populate_ahead(self, mr) -> None:
        """Fault a newly registered chunk in from a helper thread. Pinning it before answering
        (a plain mlock) held every REGISTER RESULT for 0.6 ms a chunk of page faults, and no
        write of the batch could start meanwhile; registered on demand, the answer leaves at
        once, the helper faults chunks in in the order they were asked for, and the few
        writes that overtake it fault in their own range (the soft responder does that)."""
        if self._populator is None:
            self._populate_queue = queue.Queue()
            self._populator = threading.Thread(target=self._populate_loop, daemon=True,
                                               name="populate")
            self._stack.callback(self._stop_populator)   # before the region it faults in
            self._populator.start()
        self._populate_queue.put((self._populate_gen, mr))

    def _hash_round(self, a: de.HashRound):
        """A round's pages, named by a source of ours once they all landed: the first round,
        RAM's first pass, is over. Chunks registered from then on take a few scattered
        writes each (a busy guest's), which fault in their own pages: faulting whole chunks
        in ahead for them held the rest of each chunk in memory, zero, for nothing (about 19
        MiB in round 2 of the default 512 MiB guest; end to end the time is the same)."""
        self._rounds_named += 1
        return DestinationDriver._hash_round(self, a)

    def _populate_loop(self) -> None:
        """Fault in the chunks of the current round only: once the next window opens, every
        write of the rounds before has landed (faulting in its own range), and what is left of
        their chunks is pages no write touched. Faulting those in anyway cost the two cores
        35 ms of round 2 (512 MiB half zero) and did nothing for the writes."""
        while (item := self._populate_queue.get()) is not None:
            gen, mr = item
            if gen != self._populate_gen:
                continue
            try:
                mr.prefetch()      # ibv_advise_mr PREFETCH_WRITE: then writes skip faulting
            except Exception:  # noqa: BLE001 - deregistered meanwhile: nothing to fault in
                pass

    def _stop_populator(self) -> None:
        self._populate_queue.put(None)
        if self._populator.ident is not None:
            self._populator.join(5.0)

    CARRY = {
        **DestinationDriver.CARRY,
        de.Accept: _accept, de.AwaitMessage: _await_message, de.OpenWindow: _open_window,
        de.Reply: _reply, de.Confirm: _confirm, de.AwaitCommit: _await_commit,
        de.AbortPeer: _abort_peer,
        de.RegisterChunks: _register_chunks, de.DeregisterChunks: _deregister_chunks,
        de.PinBlocks: _pin_blocks, de.HashRound: _hash_round,
    }
