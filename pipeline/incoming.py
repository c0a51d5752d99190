"""The destination: listens on ``rdma:HOST:PORT``, answers the control channel, checks, resumes.

``IncomingMigration.run()`` accepts one control connection (capabilities negotiated with
``negotiate``: pin-all, several registrations per message, data QPs with a session token, a
chunk size, the SHA-256 RAM digest), and data-QP connections that present the session's token
(a listener thread accepts them into the same PD, so the soft provider's responder writes
straight into registered RAM, as a NIC would). It then reads the stream: MEM_SIZE creates (or
checks) the RAM region; each HOOK starts a registration loop answering RAM BLOCKS, REGISTER,
COMPRESS (zero-fill, skipping pages already zero) and UNREGISTER until REGISTER FINISHED; the
guest's device state and the RAM digest are kept; the pages each round wrote (the source says
which, once the round's writes have landed) are hashed in the background (``stages.pagehash``),
so at EOF only the final round's pages are left to hash before every chunk is compared,
and only then is the guest resumed from its state and the source told (one READY). On any
failure it sends ERROR, does not resume, and removes what it created.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

import numpy as np

from pipeline.config import MigrationConfig
from pipeline.control import ControlLink
from pipeline.digest import differing, mismatches
from pipeline.protocol.capabilities import (
    Capabilities,
    Capability,
    DataConnect,
    Digest,
    decode_connect,
)
from pipeline.protocol.channel import Role
from pipeline.protocol.messages import (
    CompressMessage,
    DestBlock,
    QemuFileMessage,
    RamBlocksRequestMessage,
    RamBlocksResultMessage,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterFinishedMessage,
    UnregisterRequestMessage,
)
from pipeline.protocol.parser import NEED_DATA
from pipeline.protocol.records import DeviceState, Eof, Hook, MemSize
from pipeline.protocol.stream import StreamReader
from pipeline.sections import DIGEST_SECTION, GUEST_SECTIONS, ROUND_SECTION, device_codec
from pipeline.stats import MigrationStats
from shm.errors import MigrationError, RemoteProtocolError, TransportError
from shm.memory import nonzero_pages
from stages.verbs.base import Access

RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE


class IncomingMigration:
    """One incoming migration; ``run()`` blocks until completed or failed (it raises then)."""

    def __init__(self, uri, config: MigrationConfig, *, run_id: str,
                 blocks: list[tuple[str, int]] | None = None,
                 on_state: Callable[[str, str], None] | None = None,
                 on_listening: Callable[[int], None] | None = None,
                 cancel: threading.Event | None = None, keep_guest: bool = False,
                 corrupt: tuple[int, int] | None = None, accept_timeout: float = 60.0,
                 fault: dict | None = None, guest_watch: float = 0.0,
                 prealloc: bool = False) -> None:
        self.uri = uri
        self.prealloc = prealloc      # fault ``blocks`` in before listening (-mem-prealloc)
        self.config = config
        self.run_id = run_id
        self.blocks_spec = blocks
        self.on_state = on_state or (lambda s, r: None)
        self.on_listening = on_listening or (lambda port: None)
        self.cancel = cancel or threading.Event()
        self.keep_guest = keep_guest
        self.corrupt = corrupt
        self.fault = fault or {}        # test hook: {"kind": "disconnect"|"malformed",
        #                                   "window": n}: misbehave at registration window n
        self.accept_timeout = accept_timeout
        self.stats = MigrationStats()
        self.region = None
        self.guest = None
        self.link: ControlLink | None = None
        self.ctx = None
        self.token = secrets.randbits(63) | 1
        self.chunk_mrs: dict[tuple[int, int], object] = {}
        self.block_mrs: list = []
        self.data_qps: list = []
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._acceptor_error: BaseException | None = None
        self.guest_device: tuple[str, bytes] | None = None   # (section, body) of the guest
        self.guest_watch = guest_watch      # seconds the resumed guest runs before a report
        self.guest_report: dict = {}        # where the guest resumed, and where it stopped
        self.digests: bytes | None = None
        self.hasher = None             # stages.pagehash.PageHasher, at the first round's pages
        self._populator: threading.Thread | None = None   # faults registered chunks in
        self.verified: bool | None = None
        self.resume_time = 0.0
        self.status = "none"

    def _state(self, status: str, reason: str = "") -> None:
        self.status = status
        self.stats.update(status=status, error=reason)
        self.on_state(status, reason)

    def check(self) -> None:
        if self.cancel.is_set():
            from shm.errors import MigrationCancelled

            raise MigrationCancelled("incoming migration cancelled")
        if self._acceptor_error is not None:
            raise self._acceptor_error

    # -- run -----------------------------------------------------------------------------
    def run(self) -> dict:
        from stages.verbs import open_provider

        self.stats.update(start_time=time.monotonic())
        self._state("setup")
        try:
            if self.blocks_spec:
                self._create_region(self.blocks_spec)
                if self.prealloc:
                    self._preallocate()
            self.ctx = open_provider(self.config.transport).open_device()
            self.pd = self.ctx.alloc_pd()
            self.listener = self.ctx.listen(self.uri.host, self.uri.port)
            self.on_listening(self.listener.port)
            self._accept_control()
            self._state("active")
            self._read_stream()
            self._finish()
            self._state("completed")
            if self.guest_watch > 0:
                self.cancel.wait(self.guest_watch)   # let the resumed guest run a little
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, MigrationError) else f"{type(exc).__name__}: {exc}"
            if self.link is not None:
                self.link.abort()
            self._state("cancelled" if "cancelled" in reason else "failed", reason)
            raise
        finally:
            self.stats.update(end_time=time.monotonic(), verified=self.verified)
            self._teardown()
        return self.summary()

    def summary(self) -> dict:
        snap = self.stats.snapshot(time.monotonic())
        snap["verified"] = self.verified
        if self.guest_report:
            snap["guest"] = dict(self.guest_report)
        return snap

    # -- connections ---------------------------------------------------------------------
    def _accept_control(self) -> None:
        deadline = time.monotonic() + self.accept_timeout
        while True:
            self.check()
            try:
                req = self.listener.get_request(timeout=0.2)
            except TransportError:
                if time.monotonic() > deadline:
                    raise TransportError("no source connected within "
                                         f"{self.accept_timeout:g} s") from None
                continue
            if isinstance(decode_connect(req.private_data), DataConnect):
                req.reject()
                continue
            break
        self.link = ControlLink(self.ctx, self.pd, Role.DESTINATION, check=self.check)
        cs = self.config.chunk_size
        flags = (Capability.PIN_ALL | Capability.MULTI_REGISTER | Capability.DATA_QPS
                 | Capability.RAM_DIGEST | Capability.CHUNK_SIZE)
        supported = Capabilities(flags=int(flags), chunk_shift=cs.bit_length() - 1,
                                 data_qps=4, session_token=self.token,
                                 digest=Digest.PAGE_HASH)
        reply = self.link.channel.accept(req.private_data, supported)
        req.accept(self.link.qp, reply)
        self.link.post_recvs()
        caps = self.link.channel.capabilities
        self.caps = caps
        if self.region is not None and caps.chunk_size != self.region.chunk_size:
            raise RemoteProtocolError(f"source chunk size {caps.chunk_size} differs from this "
                                      f"destination's {self.region.chunk_size}")
        self.data_cq = self.ctx.create_cq(64)
        self._acceptor = threading.Thread(target=self._accept_data, name="data-acceptor",
                                          daemon=True)
        self._acceptor.start()

    def _accept_data(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    req = self.listener.get_request(timeout=0.2)
                except TransportError:
                    continue
                try:
                    hello = decode_connect(req.private_data)
                except RemoteProtocolError:
                    req.reject()
                    continue
                if not isinstance(hello, DataConnect) or hello.session_token != self.token:
                    req.reject()
                    continue
                qp = self.pd.create_qp(self.data_cq, self.data_cq, max_send_wr=1,
                                       max_recv_wr=1)
                self.data_qps.append(qp)
                req.accept(qp, b"")
        except BaseException as exc:  # noqa: BLE001 - reported to the main loop by check()
            if not self._stop.is_set():
                self._acceptor_error = exc

    # -- the stream ----------------------------------------------------------------------
    def _read_stream(self) -> None:
        codecs = dict.fromkeys([*GUEST_SECTIONS, DIGEST_SECTION, ROUND_SECTION], device_codec)
        reader = StreamReader(codecs)
        while True:
            msg = self.link.grant_and_receive()
            if not isinstance(msg, QemuFileMessage):
                raise RemoteProtocolError(f"expected QEMU FILE, got {type(msg).__name__}")
            reader.feed(msg.data)
            settle = False        # this message ends with a round's pages, no round after
            for ev in reader.events():
                if isinstance(ev, MemSize):
                    self._on_mem_size(ev)
                elif isinstance(ev, Hook):
                    settle = False
                    self.link.channel.begin_registration()
                    self._registration_loop()
                elif isinstance(ev, DeviceState):
                    if ev.idstr == ROUND_SECTION:
                        self._on_round_pages(bytes(ev.data[4:]))
                        settle = True
                    else:
                        self._on_device_state(ev)
                elif isinstance(ev, Eof):
                    self.stats.update(pause_time=time.monotonic())
                    return
            if reader.next_event() is not NEED_DATA:  # pragma: no cover - events() drained it
                raise RemoteProtocolError("stream parser out of step")
            if settle:
                # The source sends the last round's pages alone just before it pauses the
                # guest: the READY for its next message waits until every round so far is
                # hashed, so that the hashing is done before the downtime starts.
                self.hasher.wait()

    def _on_device_state(self, ev: DeviceState) -> None:
        """Keep the guest's state and the RAM digest (framed: be32 length, then the body)."""
        body = bytes(ev.data[4:])
        if ev.idstr in GUEST_SECTIONS:
            self.guest_device = (ev.idstr, body)
        elif ev.idstr == DIGEST_SECTION:
            self.digests = body

    def _on_round_pages(self, body: bytes) -> None:
        """The pages a finished round wrote (every write has landed: its REGISTER FINISHED
        came first): hash them in the background while the next round runs."""
        if self.caps.digest != Digest.PAGE_HASH or self.region is None:
            raise RemoteProtocolError("round page bitmaps without page-hash verification")
        from stages.pagehash import PageHasher

        try:
            import zlib

            size = len(zlib.decompress(body))        # checked here, unpacked by the hasher
        except Exception as exc:  # noqa: BLE001 - zlib.error
            raise RemoteProtocolError(f"bad round page bitmap: {exc}") from None
        if size != sum(-(-b.nb_pages // 8) for b in self.order):
            raise RemoteProtocolError(f"round page bitmap of {size} bytes does not fit the "
                                      "RAM blocks")
        if self.hasher is None:
            self.hasher = PageHasher([b.view.view(np.uint64).reshape(-1, 512)
                                      for b in self.order])
        self.hasher.submit(body)

    def _preallocate(self) -> None:
        """Fault all of RAM in now, in bulk, before the source connects (what QEMU's
        -mem-prealloc does at start): writes then land in memory already there."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for blk in self.region.blocks:
            if libc.madvise(blk.address, blk.length, 23):      # MADV_POPULATE_WRITE
                blk.view[::4096] = 0                           # older kernel: touch

    def _create_region(self, blocks) -> None:
        from shm.region import RamBlockSpec, RamRegion

        self.region = RamRegion.create(self.run_id, [RamBlockSpec(n, s) for n, s in blocks],
                                       self.config.chunk_size, kind="dstram")

    def _on_mem_size(self, ev: MemSize) -> None:
        if self.region is None:
            self.config_chunk = self.caps.chunk_size
            from shm.region import RamBlockSpec, RamRegion

            self.region = RamRegion.create(
                self.run_id, [RamBlockSpec(b.idstr, b.length) for b in ev.blocks],
                self.caps.chunk_size, kind="dstram")
        names = {b.idstr: b for b in self.region.blocks}
        self.order = []
        for b in ev.blocks:
            if b.idstr not in names:
                raise RemoteProtocolError(f"RAMBlock '{b.idstr}' not found on the destination",
                                          hint="start both sides with the same RAM blocks")
            self.order.append(names[b.idstr])
        self.stats.update(total_bytes=ev.total)
        self._start_guest()

    def _start_guest(self) -> None:
        """Start the destination's guest process now, idle until ``_resume`` loads its state
        (so starting a process is not part of the downtime); it becomes the guest the stream
        names (``pipeline.guest.factory.incoming_guest_main``)."""
        from stages.harness import StageProcess

        if self.guest is not None:
            return
        self.guest = StageProcess("dst-guest", "pipeline.guest.factory:"
                                  "incoming_guest_main", {"region": self.region.name})
        self.guest.start()

    def _registration_loop(self) -> None:
        if self.fault.get("window") == self.link.channel.windows:
            if self.fault["kind"] == "disconnect":
                self.link.qp.disconnect()          # the connection is cut
            elif self.fault["kind"] == "malformed":
                self.link.post_recvs()
                self.link.transmit(b"\x00\x00\x00\x05\x00\x00\x00\x02bad")  # READY, len 5
            self.cancel.wait(30.0)
            raise MigrationError(f"test fault {self.fault['kind']} injected")
        while True:
            msg = self.link.grant_and_receive()
            if isinstance(msg, RegisterFinishedMessage):
                return
            if isinstance(msg, RamBlocksRequestMessage):
                self.link.reply(RamBlocksResultMessage(tuple(self._dest_blocks())))
            elif isinstance(msg, RegisterRequestMessage):
                results = tuple(self._register(msg.records))
                if len(results) > 1 and not self.caps.multi_register:
                    results = results[:1]
                self.link.reply(RegisterResultMessage(results, repeat=len(msg.records)))
            elif isinstance(msg, CompressMessage):
                self._compress(msg.compress)
            elif isinstance(msg, UnregisterRequestMessage):
                for r in msg.records:
                    mr = self.chunk_mrs.pop((r.current_index, r.chunk), None)
                    if mr is not None:
                        mr.close()
                self.link.reply(UnregisterFinishedMessage(len(msg.records)))
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} in a registration "
                                          "window")

    def _block(self, index: int):
        if not 0 <= index < len(self.order):
            raise RemoteProtocolError(f"block index {index} out of range "
                                      f"({len(self.order)} blocks)")
        return self.order[index]

    def _dest_blocks(self) -> list[DestBlock]:
        out = []
        for blk in self.order:
            rkey = 0
            if self.caps.pin_all:
                # On demand (ODP): pinning all of RAM up front would fault in every page,
                # 0.6 s per GiB here, even the pages that stay zero and are never written;
                # each write's target range is faulted in, in bulk, when it arrives.
                mr = self.pd.reg_mr(blk.address, blk.length, RW | Access.ON_DEMAND)
                self.block_mrs.append(mr)
                rkey = mr.rkey
            out.append(DestBlock(blk.address, blk.offset, blk.length, rkey))
        return out

    def _register(self, recs) -> list[RegisterResult]:
        """One result per REGISTER record, in order. Every record is checked before anything
        is registered; the chunks not registered yet get one MR and rkey each, all made by one
        ``reg_mrs`` call (adjacent chunks pinned together), and a chunk asked for twice, or
        registered before, keeps its MR."""
        wanted = []
        new: dict[tuple[int, int], tuple[int, int]] = {}
        for rec in recs:
            blk = self._block(rec.current_index)
            addr = rec.current_addr - blk.offset
            if not 0 <= addr < blk.length:
                raise RemoteProtocolError(f"REGISTER address {rec.current_addr:#x} is outside "
                                          f"block {blk.idstr}")
            first = addr // blk.chunk_size
            key = (blk.index, first)
            wanted.append((key, blk))
            if key not in self.chunk_mrs and key not in new:
                start = first * blk.chunk_size
                end = min(blk.length, (first + 1 + rec.chunks) * blk.chunk_size)
                new[key] = (blk.address + start, end - start)
        if new:
            mrs = self.pd.reg_mrs(list(new.values()), RW | Access.ON_DEMAND)
            for key, mr in zip(new, mrs, strict=True):
                self.chunk_mrs[key] = mr
                self._populate_ahead(mr)
        return [RegisterResult(self.chunk_mrs[key].rkey, blk.address) for key, blk in wanted]

    def _populate_ahead(self, mr) -> None:
        """Fault a newly registered chunk in from a helper thread. Pinning it before answering
        (a plain mlock) held every REGISTER RESULT for 0.6 ms a chunk of page faults, and no
        write of the batch could start meanwhile; registered on demand, the answer leaves at
        once, the helper faults chunks in in the order they were asked for, and the few
        writes that overtake it fault in their own range (the soft responder does that)."""
        if self._populator is None:
            import queue

            self._populate_queue = queue.Queue()
            self._populator = threading.Thread(target=self._populate_loop, daemon=True,
                                               name="populate")
            self._populator.start()
        self._populate_queue.put(mr)

    def _populate_loop(self) -> None:
        while (mr := self._populate_queue.get()) is not None:
            try:
                mr.prefetch()      # ibv_advise_mr PREFETCH_WRITE: then writes skip faulting
            except Exception:  # noqa: BLE001 - deregistered meanwhile: nothing to fault in
                pass

    def _compress(self, c) -> None:
        blk = self._block(c.block_idx)
        start = c.offset - blk.offset
        if start < 0 or start + c.length > blk.length or start % 4096 or c.length % 4096:
            raise RemoteProtocolError(f"COMPRESS range {c.offset:#x}+{c.length:#x} is outside "
                                      f"block {blk.idstr} or not page-aligned")
        pages = blk.view[start:start + c.length].view(np.uint64).reshape(-1, 512)
        # Only pages in memory can hold data; reading the others would allocate them.
        nonzero = nonzero_pages(pages, np.arange(len(pages)))
        if nonzero.any():
            pages[nonzero] = 0

    # -- the end -------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.corrupt is not None:     # test hook: damage one page before the check
            b, page = self.corrupt
            self.region.blocks[b].view[page * 4096] ^= 0xFF
            if self.hasher is not None:  # as if the final round's write had brought it
                at = [blk is self.region.blocks[b] for blk in self.order].index(True)
                self.hasher.submit([np.array([page] if i == at else [], np.int64)
                                    for i in range(len(self.order))])
        if self.digests is None:
            raise RemoteProtocolError("the source sent no RAM digest: cannot verify the RAM",
                                      hint="the destination never resumes on unchecked memory")
        if self.caps.digest == Digest.PAGE_HASH:
            bad = self._page_hash_mismatches()
        else:
            bad = mismatches(self.region, self.digests)
        self.verified = not bad
        if bad:
            where = ", ".join(f"{n} chunk {c}" for n, c in bad[:4])
            raise MigrationError(f"RAM verification failed: {len(bad)} chunk(s) differ "
                                 f"({where}); the guest was not resumed")
        if self.guest_device is None:
            raise RemoteProtocolError("the stream carried no guest device state")
        self._resume()
        self.resume_time = time.monotonic()
        self.stats.update(resume_time=self.resume_time)
        # Our extension: one more READY says "verified and resumed" to the source.
        self.link.post_recvs()
        self.link.transmit(self.link.channel.grant())
        self.link.channel.close()

    def _page_hash_mismatches(self) -> list[tuple[str, int]]:
        """(block idstr, chunk) of every chunk whose page hashes differ from the source's."""
        from stages.pagehash import PageHasher, table_digests

        if self.hasher is None:        # no round page bitmaps came: nothing was hashed yet
            self.hasher = PageHasher([b.view.view(np.uint64).reshape(-1, 512)
                                      for b in self.order])
        tables = self.hasher.wait()
        cp = self.region.chunk_size // 4096
        chunks = [(blk.idstr, c) for blk, table in zip(self.order, tables, strict=True)
                  for c in range(-(-len(table) // cp))]
        return differing(table_digests(tables, cp), self.digests, chunks)

    def _resume(self) -> None:
        self.guest.wait_ready(30.0)
        self.guest.send("load", *self.guest_device)
        msg = self.guest.recv(30.0, what="resume")
        self.guest_report["resumed"] = msg[2] if len(msg) > 2 else {}

    def _teardown(self) -> None:
        self._stop.set()
        if self._populator is not None:     # before the region it faults in goes away
            self._populate_queue.put(None)
            self._populator.join(5.0)
        if self.hasher is not None:
            self.hasher.close()
        if self._acceptor is not None:
            self._acceptor.join(2.0)
        if self.guest is not None and not self.keep_guest:
            try:
                self.stop_guest()
            except Exception:  # noqa: BLE001 - the region is unlinked below regardless
                pass
        for qp in self.data_qps:
            for step in (qp.disconnect, qp.close):
                try:
                    step()
                except Exception:  # noqa: BLE001
                    pass
        if self.link is not None:
            self.link.close()
        if self.ctx is not None:
            try:
                self.ctx.close()
            except Exception:  # noqa: BLE001 - an MR still busy: the process exit frees it
                pass
        if self.region is not None and (self.guest is None or not self.keep_guest):
            self.region.close()
            self.region.unlink()

    def stop_guest(self) -> dict | None:
        if self.guest is None:
            return None
        state = None
        if self.guest.pid is not None and self.guest.alive:
            try:
                if not self.guest.info:
                    self.guest.wait_ready(30.0)
                self.guest.send("stop")
                state = self.guest.recv(5.0, what="stop")[1]
                if state and self.guest_report:
                    self.guest_report["stopped"] = state
            except MigrationError:
                pass
        self.guest.stop(2.0)
        self.guest.close()
        self.guest = None
        return state


def incoming_main(config: dict, link) -> int:
    """Stage-process entry for a destination started by ``run`` (``rdma:``, or ``tcp:`` when
    ``config["scheme"]`` says so): reports ("ready", port=...), ("state", status, reason) and
    finally ("result", summary); ("cancel",) on the pipe cancels it."""
    from pipeline.uri import URI

    scheme = config.get("scheme", "rdma")
    if scheme == "tcp":
        from pipeline.inline_incoming import StreamIncoming as incoming_class
    else:
        incoming_class = IncomingMigration

    cfg = MigrationConfig(**config["config"])
    cancel = threading.Event()

    def listen_parent() -> None:
        try:
            while True:
                msg = link.recv()
                if msg and msg[0] == "cancel":
                    cancel.set()
                    return
        except (EOFError, OSError):
            cancel.set()

    threading.Thread(target=listen_parent, daemon=True).start()
    corrupt = tuple(config["corrupt"]) if config.get("corrupt") else None
    fault = config.get("fault")
    uri = URI(scheme, config["host"], int(config["port"]))
    mig = incoming_class(uri, cfg, run_id=config["run_id"], blocks=config.get("blocks"),
                         cancel=cancel, corrupt=corrupt, fault=fault,
                         guest_watch=float(config.get("guest_watch", 0)),
                         prealloc=bool(config.get("prealloc")),
                         on_listening=lambda port: link.ready(port=port),
                         on_state=lambda s, r: link.send("state", s, r))
    try:
        summary = mig.run()
    except BaseException:
        link.send("result", mig.summary())
        raise
    link.send("result", summary)
    return 0
