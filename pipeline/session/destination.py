"""The destination of a migration as a sans-IO state machine: events in, actions out, time
passed in. One session serves every carrier: ``rdma:`` (the stream in QEMU FILE messages,
which the session parses, and registration windows on the control channel) and the stream
carriers ``tcp:`` / ``file:`` (the driver parses the stream and lands the pages; the session
gets every other record).

    setup      the region, if its blocks are given, is created (CreateRegion); Accept: one
               source connects and the peer policy is fixed
    active     the stream: MEM_SIZE creates the region (or checks its layout against the
               stream's) and starts the guest early; a HOOK opens a registration window
               (RAM BLOCKS, REGISTER, COMPRESS, UNREGISTER until REGISTER FINISHED); device
               sections keep the guest's state and the RAM digest; a round's page bitmap
               (rdma:) or the end of a ram section (tcp:, file:) sends pages to the hasher.
               At the end (EOF on rdma:, VMDESCRIPTION on tcp:, the end of a file) the RAM
               is hashed and compared with the source's digest. Then, with a source of
               ours (two-phase), the session confirms (READY after EOF, SHUT(0)), waits
               for the source's COMMIT and resumes the guest; with QEMU's source it resumes
               the guest and confirms as QEMU's destination does (SHUT(0) on the return
               path it opened, or nothing). A peer that granted no digest (QEMU's protocol
               version 1, known at connect time) is not verified: its VMDESCRIPTION is read
               after EOF, then the guest resumed
    completed  the guest runs here

Any failure or cancel before it answers AbortPeer and the final state, once, and never a
resume. Chunk MRs are keyed (source block index, chunk), as both REGISTER and UNREGISTER name
them. A session that is final ignores everything; an event the session did not ask for is a
``LocalProtocolError`` that fails it.
"""

from __future__ import annotations

import zlib

from pipeline.config import MigrationConfig
from pipeline.digest import SIZE, DeviceDigest, chunk_size_for, differing
from pipeline.protocol.capabilities import Digest
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
from pipeline.protocol.records import (
    OPEN_RETURN_PATH,
    PAGE_SIZE,
    Command,
    Configuration,
    DeviceState,
    EndOfSection,
    Eof,
    Hook,
    MemSize,
    VmDescription,
)
from pipeline.protocol.stream import StreamReader
from pipeline.sections import (
    DEVICES_SECTION,
    DIGEST_SECTION,
    GUEST_SECTIONS,
    MACHINE,
    ROUND_SECTION,
    device_codec,
    device_codecs,
)
from pipeline.session import destination_events as de
from pipeline.session.policy import STREAM_POLICY, PeerPolicy
from pipeline.session.states import DESTINATION_TRANSITIONS, DestinationState, StateMachine
from pipeline.stats import MigrationStats
from shm.errors import (
    LocalProtocolError,
    MigrationCancelled,
    MigrationError,
    RemoteProtocolError,
)

D = DestinationState
CARRIERS = ("rdma", "tcp", "file")
UNCHECKED = "the destination never resumes on unchecked memory"
COMMIT_TIMEOUT_S = 30.0    # the source's COMMIT follows our confirmation by one round trip


class DestinationSession:
    """One incoming migration over ``carrier`` (``rdma``, ``tcp`` or ``file``).

    ``blocks`` ((idstr, length) pairs): create the region before the source connects
    (``prealloc``: faulted in) and hold the stream to that layout; else the stream's MEM_SIZE
    decides it. ``session_token``: what the source's data QPs must present (rdma:).
    ``label`` names the stream in every failure (``file:PATH``). ``stats`` is updated as the
    migration goes; the driver adds the counters it owns (bytes, pages landed).
    """

    def __init__(self, config: MigrationConfig, *, carrier: str = "rdma",
                 blocks=None, prealloc: bool = False, session_token: int = 1,
                 label: str = "", stats: MigrationStats | None = None) -> None:
        if carrier not in CARRIERS:
            raise ValueError(f"carrier {carrier!r}: use one of {', '.join(CARRIERS)}")
        self.config = config
        self.carrier = carrier
        self.inline = carrier != "rdma"
        self.spec = tuple((name, int(length)) for name, length in blocks) if blocks else None
        self.prealloc = prealloc
        self.session_token = session_token
        self.label = label
        self.stats = stats or MigrationStats()
        self.sm = StateMachine("destination", DESTINATION_TRANSITIONS)
        self.policy: PeerPolicy | None = STREAM_POLICY if self.inline else None
        # describe: a QEMU machine's device sections are read by the stream's VMDESCRIPTION
        self.reader = None if self.inline else StreamReader(
            {**device_codecs(), ROUND_SECTION: device_codec}, describe=True)
        self.region: tuple[de.RegionBlock, ...] | None = None
        self.region_chunk = 0                 # the region's chunk size
        self.order: tuple[de.RegionBlock, ...] = ()   # the region's blocks in MEM_SIZE order
        self.chunks: dict[tuple[int, int], int] = {}  # (source block index, chunk) -> rkey
        self.window = False                   # inside a registration window
        self.settle = False                   # a round's pages were named, no HOOK after
        self.guest_started = False
        self.guest_device: tuple[str, bytes] | None = None
        self.digests: bytes | None = None
        self.devices = DeviceDigest()         # every device section received so far
        self.device_check: tuple[bytes, bytes] | None = None   # (the source's, ours)
        self.description: dict | None = None  # VMDESCRIPTION, once seen
        self.verified: bool | None = None
        self.machine: str | None = None       # the stream's machine type (its CONFIGURATION)
        self.return_path = False              # the source opened QEMU's return path (tcp:)
        self.resumed = False                  # the guest runs here (not yet confirmed)
        self.committing = False               # confirmed, the guest not yet resumed (two-phase)
        self.error: MigrationError | None = None
        self._expect = None                   # the event(s) the last asking action produces
        self._mem_size: MemSize | None = None  # waiting for its region
        self._register: tuple | None = None   # (request, [(key, block)], new keys)
        self._verify: tuple | None = None     # (chunk size, chunks, differing) at the end

    # -- the interface -------------------------------------------------------------------
    @property
    def state(self) -> DestinationState:
        return self.sm.state

    @property
    def final(self) -> bool:
        return self.sm.final

    @property
    def reason(self) -> str:
        return self.sm.reason

    @property
    def two_phase(self) -> bool:
        """Confirm, then run the guest on the source's COMMIT (a file has no source to ask)."""
        return (self.carrier != "file" and self.ours and self.policy is not None
                and self.policy.two_phase)

    def start(self, now: float) -> list:
        self.stats.update(start_time=now)
        out = self._to(D.SETUP, now)
        if self.spec is not None:
            self.region_chunk = self.config.chunk_size
            return out + self._ask(de.CreateRegion(self.spec, self.region_chunk, self.prealloc))
        return out + self._accept()

    def handle(self, event, now: float) -> list:
        """The actions ``event`` calls for (empty once the session is final)."""
        if self.final:
            return []
        try:
            if isinstance(event, de.Cancel):
                if self.committing:     # too late: the source may have committed already
                    return []
                return self._fail(MigrationCancelled("incoming migration cancelled"), now,
                                  cancelled=True)
            if isinstance(event, de.Failed):
                return self._fail(MigrationError(event.reason or "failed"), now, named=True)
            expect = self._expect
            if expect is None or not isinstance(event, expect):
                wanted = (" or ".join(e.__name__ for e in expect) if isinstance(expect, tuple)
                          else expect.__name__ if expect else "nothing")
                raise LocalProtocolError(f"destination session in state {self.state.value} "
                                         f"got {type(event).__name__}, waiting for {wanted}")
            self._expect = None
            return self._HANDLERS[type(event)](self, event, now)
        except MigrationError as exc:
            return self._fail(exc, now)

    # -- states --------------------------------------------------------------------------
    def _to(self, state: DestinationState, now: float, reason: str = "") -> list:
        self.sm.to(state, now, reason)
        self.stats.update(**self.sm.figures(now))
        return [de.StateChanged(state.value, reason)]

    def _ask(self, action) -> list:
        self._expect = de.ANSWERS[type(action)]
        return [action]

    def _fail(self, error: MigrationError, now: float, *, cancelled: bool = False,
              named: bool = False) -> list:
        """``named``: the error already names the stream (the driver's own)."""
        if self.final:
            return []
        if self.label and not named:
            error.message = f"{self.label}: {error.message}"
            error.args = (error.message,)
        self.error = error
        self._expect = None
        reason = str(error).splitlines()[0] if str(error) else "failed"
        state = D.CANCELLED if cancelled else D.FAILED
        # Resumed but not confirmed: the source will resume its guest, so this one stops.
        out: list = [de.StopGuest()] if self.resumed else []
        return out + [de.AbortPeer()] + self._to(state, now, reason)

    # -- setup ---------------------------------------------------------------------------
    def _accept(self) -> list:
        if self.inline:
            return self._ask(de.Accept(None))
        return self._ask(de.Accept(PeerPolicy.supported(
            chunk_size=self.config.chunk_size, session_token=self.session_token,
            extensions=self.config.extensions)))

    def _on_accepted(self, event: de.Accepted, now: float) -> list:
        if not self.inline:
            self.policy = PeerPolicy.from_agreement(event.capabilities)
            if self.region is not None and self.policy.chunk_size != self.region_chunk:
                raise RemoteProtocolError(f"source chunk size {self.policy.chunk_size} differs "
                                          f"from this destination's {self.region_chunk}")
        return self._to(D.ACTIVE, now) + self._next(now)

    def _on_region(self, event: de.RegionCreated, now: float) -> list:
        self.region = event.blocks
        if self._mem_size is None:            # created from the given blocks, at start
            return self._accept()
        mem_size, self._mem_size = self._mem_size, None
        return self._layout(mem_size) + self._next(now)

    def _on_mem_size(self, rec: MemSize) -> list:
        if self.region is None:
            self._mem_size = rec
            self.region_chunk = (self.config.chunk_size if self.inline
                                 else self.policy.chunk_size)
            return self._ask(de.CreateRegion(tuple((b.idstr, b.length) for b in rec.blocks),
                                             self.region_chunk))
        return self._layout(rec)

    def _layout(self, rec: MemSize) -> list:
        """Hold the stream's blocks to the region's: the same names and lengths."""
        mine = [(b.idstr, b.length) for b in self.region]
        theirs = [(b.idstr, b.length) for b in rec.blocks]
        if sorted(mine) != sorted(theirs):
            names = {name for name, _ in mine}
            missing = [name for name, _ in theirs if name not in names]
            if missing and not self.inline:
                raise RemoteProtocolError(f"RAMBlock '{missing[0]}' not found on the "
                                          "destination",
                                          hint="start both sides with the same RAM blocks")
            raise RemoteProtocolError(f"ram blocks mismatch: the stream has {theirs}, this "
                                      f"destination {mine}",
                                      hint="start both sides with the same RAM size")
        by_name = {b.idstr: b for b in self.region}
        self.order = tuple(by_name[b.idstr] for b in rec.blocks)
        self.stats.update(total_bytes=rec.total)
        if self.carrier == "file" or self.guest_started or not self.ours:
            return []            # a restore starts its guest only once the RAM verified
        self.guest_started = True
        return [de.StartGuest()]

    # -- the stream ----------------------------------------------------------------------
    def _next(self, now: float) -> list:
        """Go on reading the stream: the records left of the last QEMU FILE message, then
        the next message (rdma:); the next record (tcp:, file:)."""
        if self.inline:
            return self._ask(de.ReadStream())
        out: list = []
        while (rec := self.reader.next_event()) is not NEED_DATA:
            out += self._record(rec, 0, now)
            if self._expect is not None or self.final:
                return out
        if self.settle:
            # The source sends the last round's pages alone just before it pauses the guest:
            # the READY for its next message waits until every round so far is hashed, so
            # that the hashing is done before the downtime starts.
            self.settle = False
            out.append(de.SettleHashes())
        return out + self._ask(de.AwaitMessage())

    def _on_stream_record(self, event: de.StreamRecord, now: float) -> list:
        out = self._record(event.record, event.offset, now)
        if self._expect is not None or self.final:
            return out
        return out + self._next(now)

    def _on_stream_ended(self, event: de.StreamEnded, now: float) -> list:
        if self.description is None:
            raise RemoteProtocolError(
                f"migration stream ends after QEMU_VM_EOF at offset {event.offset} without "
                "its VMDESCRIPTION: the stream is cut short")
        return self._finish()

    @property
    def ours(self) -> bool:
        """The stream is an rdma-pipeline machine's: a guest of ours, digests to verify by.
        Any other machine type (QEMU's) is recorded, its RAM unverified, no guest run."""
        return self.machine in (None, MACHINE)

    def _on_configuration(self, rec: Configuration) -> list:
        """QEMU's check: given a machine type, refuse another."""
        wanted = self.config.machine
        if wanted and rec.name != wanted:
            raise RemoteProtocolError(f"Machine type received is '{rec.name}' and local is "
                                      f"'{wanted}'", hint=f"start incoming with --machine "
                                      f"{rec.name}, or without --machine to take any")
        self.machine = rec.name
        return []

    def _record(self, rec, at: int, now: float) -> list:
        """One record of the stream (pages aside: they land in RAM without the session)."""
        if isinstance(rec, Configuration):
            return self._on_configuration(rec)
        if isinstance(rec, Command):
            if rec.cmd == OPEN_RETURN_PATH:
                self.return_path = True
            return []
        if isinstance(rec, MemSize):
            return self._on_mem_size(rec)
        if isinstance(rec, Hook):
            if self.inline:
                raise RemoteProtocolError(
                    f"migration stream offset {at}: a HOOK record in a {self.carrier}: stream "
                    "(pages travel inline here; only rdma: registers memory)")
            self.settle = False
            self.window = True
            return [de.OpenWindow()] + self._ask(de.AwaitMessage())
        if isinstance(rec, DeviceState):
            return self._on_device_state(rec)
        if isinstance(rec, EndOfSection):
            return [de.HashLanded(self._names())] if self.inline else []
        if isinstance(rec, Eof):
            self.stats.update(pause_time=now)
            if not self.inline and (self.policy.verified or not self._buffered()):
                return self._finish()
            # QEMU's source: its VMDESCRIPTION follows (QEMU's destination reads it too), and
            # may need another QEMU FILE message, which waits for our READY.
        elif isinstance(rec, VmDescription):
            self.description = rec.description()
            if self.carrier != "file":
                return self._finish()   # nothing more comes (tcp: the source waits for SHUT)
        return []

    def _on_device_state(self, rec: DeviceState) -> list:
        """Keep the guest's state and the RAM digest (framed: be32 length, then the body);
        every section before the device digest is folded into ours."""
        body = bytes(rec.data[4:])
        if rec.idstr == DEVICES_SECTION:
            self.device_check = (body, self.devices.digest())
            return []
        self.devices.add(rec.idstr, bytes(rec.data))
        if rec.idstr == ROUND_SECTION:
            return self._on_round_pages(body)
        if rec.idstr in GUEST_SECTIONS:
            self.guest_device = (rec.idstr, body)
        elif rec.idstr == DIGEST_SECTION:
            self.digests = body
        return []

    def _on_round_pages(self, body: bytes) -> list:
        """The pages a finished round wrote (every write has landed: its REGISTER FINISHED
        came first): hashed in the background while the next round runs."""
        if not self.policy.round_sections or self.region is None:
            raise RemoteProtocolError("round page bitmaps without page-hash verification")
        try:
            size = len(zlib.decompress(body))        # checked here, unpacked by the hasher
        except zlib.error as exc:
            raise RemoteProtocolError(f"bad round page bitmap: {exc}") from None
        if size != sum(-(-(b.length // PAGE_SIZE) // 8) for b in self.order):
            raise RemoteProtocolError(f"round page bitmap of {size} bytes does not fit the "
                                      "RAM blocks")
        self.settle = True
        return [de.HashRound(body, self._names())]

    def _buffered(self) -> int:
        """Stream bytes received and not parsed yet (rdma:)."""
        return self.reader.bytes_received - self.reader.parser.offset

    def _names(self) -> tuple[str, ...]:
        return tuple(b.idstr for b in self.order)

    # -- the registration window ---------------------------------------------------------
    def _on_control(self, event: de.ControlReceived, now: float) -> list:
        msg = event.message
        if self.window:
            return self._window(msg, now)
        if not isinstance(msg, QemuFileMessage):
            raise RemoteProtocolError(f"expected QEMU FILE, got {type(msg).__name__}")
        self.reader.feed(msg.data)
        return self._next(now)

    def _window(self, msg, now: float) -> list:
        if isinstance(msg, RegisterFinishedMessage):
            self.window = False
            return self._next(now)
        if isinstance(msg, RamBlocksRequestMessage):
            if self.policy.pin_all:
                # On demand (ODP): pinning all of RAM up front would fault in every page,
                # even those that stay zero; each write's range is faulted in when it lands.
                return self._ask(de.PinBlocks(tuple((b.address, b.length) for b in self.order)))
            return self._ram_blocks((0,) * len(self.order))
        if isinstance(msg, RegisterRequestMessage):
            return self._on_register(msg)
        if isinstance(msg, CompressMessage):
            return self._on_compress(msg)
        if isinstance(msg, UnregisterRequestMessage):
            return self._on_unregister(msg)
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} in a registration window")

    def _ram_blocks(self, rkeys) -> list:
        blocks = tuple(DestBlock(b.address, b.offset, b.length, rkey)
                       for b, rkey in zip(self.order, rkeys, strict=True))
        return [de.Reply(RamBlocksResultMessage(blocks))] + self._ask(de.AwaitMessage())

    def _on_pinned(self, event: de.BlocksPinned, now: float) -> list:
        return self._ram_blocks(event.rkeys)

    def _block(self, index: int) -> de.RegionBlock:
        if not 0 <= index < len(self.order):
            raise RemoteProtocolError(f"block index {index} out of range "
                                      f"({len(self.order)} blocks)")
        return self.order[index]

    def _on_register(self, msg: RegisterRequestMessage) -> list:
        """One result per record, in order. Every record is checked before anything is
        registered; only chunks not registered yet are registered (one MR each), and a chunk
        asked for twice, or registered before, keeps its MR."""
        cs = self.region_chunk
        wanted: list = []
        new: dict[tuple[int, int], tuple[int, int]] = {}
        for rec in msg.records:
            blk = self._block(rec.current_index)
            addr = rec.current_addr - blk.offset
            if not 0 <= addr < blk.length:
                raise RemoteProtocolError(f"REGISTER address {rec.current_addr:#x} is outside "
                                          f"block {blk.idstr}")
            first = addr // cs
            key = (rec.current_index, first)
            wanted.append((key, blk))
            if key not in self.chunks and key not in new:
                end = min(blk.length, (first + 1 + rec.chunks) * cs)
                new[key] = (blk.address + first * cs, end - first * cs)
        self._register = (msg, wanted, tuple(new))
        if new:
            return self._ask(de.RegisterChunks(tuple((key, a, n) for key, (a, n) in new.items())))
        return self._register_reply()

    def _on_registered(self, event: de.ChunksRegistered, now: float) -> list:
        keys = self._register[2]
        if len(keys) != len(event.rkeys):
            raise LocalProtocolError(f"{len(event.rkeys)} rkeys for {len(keys)} chunks")
        self.chunks.update(zip(keys, event.rkeys, strict=True))
        return self._register_reply()

    def _register_reply(self) -> list:
        msg, wanted, _ = self._register
        self._register = None
        results = tuple(RegisterResult(self.chunks[key], blk.address) for key, blk in wanted)
        if len(results) > 1 and not self.policy.multi_register:
            results = results[:1]
        return ([de.Reply(RegisterResultMessage(results, repeat=len(msg.records)))]
                + self._ask(de.AwaitMessage()))

    def _on_compress(self, msg: CompressMessage) -> list:
        c = msg.compress
        blk = self._block(c.block_idx)
        start = c.offset - blk.offset
        if (start < 0 or start + c.length > blk.length or start % PAGE_SIZE
                or c.length % PAGE_SIZE):
            raise RemoteProtocolError(f"COMPRESS range {c.offset:#x}+{c.length:#x} is outside "
                                      f"block {blk.idstr} or not page-aligned")
        return [de.ZeroRange(blk.idstr, start, c.length)] + self._ask(de.AwaitMessage())

    def _on_unregister(self, msg: UnregisterRequestMessage) -> list:
        keys = tuple(dict.fromkeys(key for r in msg.records
                                   if (key := (r.current_index, r.chunk)) in self.chunks))
        for key in keys:
            del self.chunks[key]
        out: list = [de.DeregisterChunks(keys)] if keys else []
        out.append(de.Reply(UnregisterFinishedMessage(len(msg.records))))
        return out + self._ask(de.AwaitMessage())

    # -- the end -------------------------------------------------------------------------
    def _finish(self) -> list:
        """Hash the RAM to compare it with the source's digest (the driver computes, the
        session decides)."""
        expected = self.digests
        if expected is None and not self.ours:
            self.stats.update(verification=f"RAM not verified: the stream (machine type "
                              f"'{self.machine}') carries no RAM digest, as no QEMU stream "
                              "does; RAM recorded as received, no guest resumed")
            return self._ask(de.Confirm(self.inline or self.policy.ready_after_eof))
        if not self.policy.verified:      # decided at connect time: no digest comes
            self.verified = None
            self.stats.update(verified=None, verification=self.policy.unverified)
            return self._resume()
        if expected is None:
            what = "stream carried" if self.inline else "source sent"
            raise RemoteProtocolError(f"the {what} no RAM digest: cannot verify the RAM",
                                      hint=UNCHECKED)
        if self.region is None:
            raise RemoteProtocolError("the stream carried no MEM_SIZE: no RAM to verify")
        if self.inline:
            lengths = [b.length for b in self.order]
            cs = chunk_size_for(lengths, len(expected) // SIZE)
            if cs is None or len(expected) % SIZE:
                raise RemoteProtocolError(f"the RAM digest ({len(expected)} bytes) does not "
                                          f"fit RAM blocks of {lengths} bytes")
            digest = Digest.PAGE_HASH
        else:
            cs = self.region_chunk
            digest = Digest.PAGE_HASH if self.policy.digest == Digest.PAGE_HASH \
                else Digest.SHA256
        cp = cs // PAGE_SIZE
        chunks = [(b.idstr, c) for b in self.order
                  for c in range(-(-(b.length // PAGE_SIZE) // cp))]
        self._verify = (cs, chunks, None)
        return self._ask(de.HashRam(self._names(), cs, digest))

    def _on_hashed(self, event: de.RamHashed, now: float) -> list:
        cs, chunks, _ = self._verify
        bad = differing(event.digests, self.digests, chunks)
        self.verified = not bad
        self.stats.update(verified=self.verified)
        if not bad:
            return self._resume()
        self._verify = (cs, chunks, bad)
        name, chunk = bad[0]
        if self.inline and chunk >= 0:
            return self._ask(de.LocateChunk(name, chunk, cs))
        raise _refusal(bad, ", ".join(f"{n} chunk {c}" for n, c in bad[:4]))

    def _on_located(self, event: de.Located, now: float) -> list:
        bad = self._verify[2]
        name, chunk = bad[0]
        rest = ", ".join(f"{n} chunk {c}" for n, c in bad[1:4])
        where = f"{name} chunk {chunk}{event.origin}" + (f"; also {rest}" if rest else "")
        raise _refusal(bad, where)

    def _resume(self) -> list:
        if self.guest_device is None:
            raise RemoteProtocolError("the stream carried no guest device state")
        if self.policy.verified:          # else no device digest comes either
            self._check_devices()
        if self.two_phase:      # verified: say so, and run the guest once the source commits
            return self._ask(de.Confirm())
        return self._load()

    def _load(self) -> list:
        self.guest_started = True
        return self._ask(de.LoadGuest(*self.guest_device))

    def _check_devices(self) -> None:
        if self.device_check is None:
            what = "stream carried" if self.inline else "source sent"
            raise RemoteProtocolError(f"the {what} no device-state digest: cannot verify the "
                                      "guest's state", hint=UNCHECKED)
        theirs, ours = self.device_check
        if theirs != ours:
            self.verified = False
            self.stats.update(verified=False)
            raise MigrationError("device state verification failed: the device sections "
                                 "differ from what the source sent; the guest was not resumed")

    def _on_resumed(self, event: de.GuestResumed, now: float) -> list:
        self.resumed = True
        self.committing = False
        self.stats.update(resume_time=now)
        if self.two_phase:
            return self._to(D.COMPLETED, now)
        return self._ask(de.Confirm(self.inline or self.policy.ready_after_eof))

    def _on_confirmed(self, event: de.ConfirmSent, now: float) -> list:
        if self.two_phase:
            self.committing = True
            return self._ask(de.AwaitCommit(COMMIT_TIMEOUT_S))
        return self._to(D.COMPLETED, now)

    def _on_committed(self, event: de.Committed, now: float) -> list:
        return self._load()

    _HANDLERS = {
        de.RegionCreated: _on_region, de.Accepted: _on_accepted,
        de.ControlReceived: _on_control, de.StreamRecord: _on_stream_record,
        de.StreamEnded: _on_stream_ended, de.ChunksRegistered: _on_registered,
        de.BlocksPinned: _on_pinned, de.RamHashed: _on_hashed, de.Located: _on_located,
        de.GuestResumed: _on_resumed, de.ConfirmSent: _on_confirmed,
        de.Committed: _on_committed,
    }


def _refusal(bad: list, where: str) -> MigrationError:
    return MigrationError(f"RAM verification failed: {len(bad)} chunk(s) differ ({where}); "
                          "the guest was not resumed")
