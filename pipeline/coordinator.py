"""The source coordinator: the one process that speaks the control channel.

It creates the rings, starts the scanner, registrar and poster (``stages.harness``), connects
the control QP (capabilities in private data), hands the poster what it needs to connect its own
data QP (DATA_QPS: the destination's session token), and runs the migration:

    SETUP    header, ram START, MEM_SIZE, HOOK | RAM BLOCKS | REGISTER FINISHED, EOS, FOOTER
    rounds   ram PART, HOOK | REGISTER/COMPRESS/UNREGISTER as the registrar asks, until the
             poster drained the round | REGISTER FINISHED, EOS, FOOTER; then a dirty-log sync
             and the convergence rule decide: another round, switchover, or give up
    FINISH   pause the guest, ram END, HOOK | the final round | REGISTER FINISHED, EOS, FOOTER,
             guest device state, RAM digest, EOF; then wait for the destination's READY (it
             verified and resumed) or its ERROR (it refused)

Any failure (stage death, transport, protocol, cancel) sends ERROR best-effort, stops every
stage within the deadline, unlinks every ring and resumes the guest if it was paused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from pipeline.config import PAGE_SIZE, MigrationConfig
from pipeline.control import ControlLink, ControlTrace
from pipeline.digest import chunk_digests
from pipeline.errors import (
    MigrationCancelled,
    MigrationError,
    RemoteProtocolError,
    StageFailed,
)
from pipeline.migration_state import (
    Convergence,
    Decision,
    MigrationStateMachine,
    RoundResult,
    State,
)
from pipeline.protocol.capabilities import Capabilities, Capability, Digest
from pipeline.protocol.channel import Role
from pipeline.protocol.messages import (
    Compress,
    CompressMessage,
    RamBlocksRequestMessage,
    ReadyMessage,
    Register,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    UnregisterRequestMessage,
)
from pipeline.protocol.records import (
    RAM_IDSTR,
    RAM_VERSION,
    EndOfSection,
    MemSize,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
)
from pipeline.protocol.stream import StreamWriter
from pipeline.sections import RAM_SID, DeviceSections, write_header
from pipeline.stats import MigrationStats
from stages.pagehash import ROUND_SECTION, ROUND_SID, pack_round, table_digests
from stages.records import (
    ANSWER,
    COMMAND,
    COMPRESS_REQUEST,
    DRAINED_REQUEST,
    REGISTER_REQUEST,
    UNREGISTER_REQUEST,
    Command,
    Request,
    records,
)
from stages.registrar import ALL_CHUNKS

MAX_REGISTER_BATCH = 512
FIRST_REGISTER_BATCH = 16     # then doubled up to MAX_REGISTER_BATCH
SWITCHOVER_S = 0.1            # a switchover with nothing left to send: 26-41 ms idle, more busy
SETTLE_TIMEOUT_S = 120.0      # the destination hashing the rounds so far (GiB per 0.1-0.3 s)
FINAL_HASH_S = 0.5e-6         # per page left: the destination hashes the last round's pages
                              # (two threads, gathered) before it can verify and resume


class SourceMigration:
    """One outgoing migration of ``guest`` (started; a SyntheticGuest or a KvmGuestProcess)
    to ``uri``; ``run()`` blocks."""

    def __init__(self, uri, config: MigrationConfig, guest, *, run_id: str,
                 stats: MigrationStats | None = None,
                 on_state: Callable[[str, str], None] | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.uri = uri
        self.config = config
        self.guest = guest
        self.run_id = run_id
        self.stats = stats or MigrationStats()
        self.sm = MigrationStateMachine()
        self.on_state = on_state or (lambda state, reason: None)
        self.cancel = cancel or threading.Event()
        self.conv = Convergence(config.downtime_limit_ms, config.max_rounds, config.keep_going)
        self.writer = StreamWriter()
        self.sections = DeviceSections()     # every device section written, for VMDESCRIPTION
        self.pipeline = None
        self.link: ControlLink | None = None
        self.paused = False
        self.page_hash = False          # the destination verifies page hashes (negotiated)

    # -- state ---------------------------------------------------------------------------
    def _to(self, state: State, reason: str = "") -> None:
        now = time.monotonic()
        self.sm.to(state, now, reason)
        changes = {"status": state.value}
        if state in (State.COMPLETED, State.FAILED, State.CANCELLED):
            changes["end_time"] = now
        if reason:
            changes["error"] = reason
        self.stats.update(**changes)
        self.on_state(state.value, reason)

    def check(self) -> None:
        """Raise if cancelled, or if a stage or the guest died."""
        if self.cancel.is_set():
            raise MigrationCancelled("migration cancelled")
        if self.pipeline is not None:
            self.pipeline.check()
        self.guest.check()

    # -- the whole migration -------------------------------------------------------------
    def run(self) -> dict:
        from pipeline.source_pipeline import SourcePipeline

        self.stats.update(start_time=time.monotonic(),
                          total_bytes=self.guest.region.total_length,
                          guest=self.guest.kind, dirty_tracking=self.guest.tracking)
        self._to(State.SETUP)
        try:
            self.pipeline = SourcePipeline(self.run_id, self.config, self.guest)
            self.pipeline.start()
            self._connect()
            self.pipeline.wait_ready(self.config.stage_timeout)
            self.pipeline.connect_poster(self.uri.host, self.uri.port,
                                         self.link.channel.capabilities.session_token)
            self._setup()
            self._to(State.ACTIVE)
            self._iterate()
            self._to(State.DEVICE)
            self._switchover()
            # total-time ends here, as QEMU's does (migration_calculate_complete, before
            # cleanup): the destination runs the guest; stopping the stages and unpinning
            # their memory is cleanup.
            done = time.monotonic()
            self.pipeline.finish(self.config.stage_timeout)
            self.stats.stages.__dict__.update(self.pipeline.figures())
            self._to(State.COMPLETED)
            self.stats.update(end_time=done, cleanup_ms=round((time.monotonic() - done) * 1e3))
        except BaseException as exc:
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._teardown()
        return self.stats.snapshot(time.monotonic())

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, MigrationCancelled | KeyboardInterrupt):
            state, reason = State.CANCELLED, "cancelled"
        else:
            state = State.FAILED
            reason = str(exc) if isinstance(exc, MigrationError) else \
                f"{type(exc).__name__}: {exc}"
            if self.pipeline is not None and not isinstance(exc, StageFailed):
                dead = self.pipeline.dead_stage()
                if dead is not None:
                    reason = str(dead)
        if self.link is not None:
            self.link.abort()
        if self.paused:
            try:
                self.guest.resume()
                self.paused = False
            except MigrationError:
                pass
        if not self.sm.final:
            self._to(state, reason.splitlines()[0] if reason else state.value)

    def _teardown(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        if self.link is not None:
            self.link.close()
            self.ctx.close()

    # -- setup ---------------------------------------------------------------------------
    def _connect(self) -> None:
        from stages.verbs import open_provider

        cfg = self.config
        self.ctx = open_provider(cfg.transport).open_device()
        self.pd = self.ctx.alloc_pd()
        self.link = ControlLink(self.ctx, self.pd, Role.SOURCE, check=self.check,
                                trace=ControlTrace(cfg.trace_control))
        flags = Capability.DATA_QPS | Capability.MULTI_REGISTER | Capability.RAM_DIGEST
        shift = cfg.chunk_size.bit_length() - 1
        if cfg.pin_all:
            flags |= Capability.PIN_ALL
        if shift != 20:
            flags |= Capability.CHUNK_SIZE
        caps = Capabilities(flags=int(flags), chunk_shift=shift, data_qps=1,
                            digest=Digest.PAGE_HASH)
        blocks = self.guest.region.blocks
        private = self.link.channel.initiate(caps, block_lengths=[b.length for b in blocks])
        self.link.post_recvs()
        reply = self.ctx.connect(self.link.qp, self.uri.host, self.uri.port, private,
                                 timeout=10.0)
        agreement = self.link.channel.established(reply)
        got = agreement.capabilities
        if not got.has(Capability.DATA_QPS):
            raise RemoteProtocolError("the destination does not accept separate data QPs "
                                      "(DATA_QPS): it is not an rdma-pipeline destination")
        if got.chunk_size != cfg.chunk_size:
            raise RemoteProtocolError(f"the destination refused chunk size {cfg.chunk_size}",
                                      hint="use --chunk-size 1M with this destination")
        self.pin_all = got.pin_all
        self.multi = got.multi_register
        self.digest = got.has(Capability.RAM_DIGEST)
        # Page hashes, kept round by round by both sides: only the final round is hashed
        # while the guest is paused (stages.pagehash).
        self.page_hash = self.digest and got.digest == Digest.PAGE_HASH
        if cfg.pin_all and not got.pin_all:
            raise RemoteProtocolError("the destination declined rdma-pin-all")

    def _setup(self) -> None:
        w = self.writer
        blocks = self.guest.region.blocks
        write_header(w)        # magic, version, CONFIGURATION
        w.write_event(SectionHeader(SectionType.SECTION_START, RAM_SID, RAM_IDSTR, 0,
                                    RAM_VERSION))
        w.write_event(MemSize(tuple(RamBlockInfo(b.idstr, b.length) for b in blocks)))
        w.hook()
        self.link.send_stream(w.flush())
        result = self.link.request(RamBlocksRequestMessage())
        dest = result.blocks
        if len(dest) != len(blocks) or any(d.length != b.length
                                           for d, b in zip(dest, blocks, strict=False)):
            raise RemoteProtocolError(
                "ram blocks mismatch: the destination has blocks "
                f"{[d.length for d in dest]}, the source {[b.length for b in blocks]}",
                hint="start both sides with the same RAM size")
        self.dest_blocks = dest
        if self.pin_all:
            ans = records(ANSWER, len(dest), block=np.arange(len(dest)),
                          chunk=ALL_CHUNKS, rkey=[d.remote_rkey for d in dest],
                          remote_base=[d.remote_host_addr for d in dest])
            self.pipeline.answers.push(ans)
        self.link.send(RegisterFinishedMessage())
        w.write_event(EndOfSection())
        w.write_event(SectionFooter(RAM_SID))
        self.stats.update(setup_end=time.monotonic(), control_bytes=self.link.bytes_sent)

    # -- rounds --------------------------------------------------------------------------
    def _iterate(self) -> None:
        r = 0
        while True:
            r += 1
            sent, secs = self._round(r, SectionType.SECTION_PART, Command.ROUND)
            dirty = self.pipeline.sync(r, self.check)
            # The rule's bandwidth is the rate the round cleared dirty pages at (runs merged
            # across clean pages send more bytes than that), and the expected downtime counts
            # the switchover's own work (pause, device state, last hashes, resume), which
            # grows with the pages left (the destination hashes them before it verifies).
            # The first round, one sequential pass over all of RAM, clears pages far faster
            # than later rounds of scattered pages can: never switch over on its figure alone
            # while pages are dirty (it promised 300 ms and delivered 500 with a busy guest).
            cleared = self.stats.rounds[-1]["pages"] * PAGE_SIZE
            extra_s = SWITCHOVER_S + (dirty * FINAL_HASH_S if self.page_hash else 0.0)
            allowance = int(extra_s * cleared / secs) if secs > 0 else 0
            decision = self.conv.after_round(RoundResult(r, cleared, secs,
                                                         dirty * PAGE_SIZE + allowance))
            if decision is Decision.SWITCHOVER and r == 1 and dirty:
                decision = Decision.ITERATE
            rate = dirty / secs if secs > 0 else 0.0
            self.stats.rounds[-1] = {**self.stats.rounds[-1], "remaining": dirty * PAGE_SIZE,
                                     "dirty-pages-rate": round(rate)}   # replaced, not mutated
            self.stats.update(dirty_sync_count=self.stats.dirty_sync_count + 1,
                              remaining_bytes=dirty * PAGE_SIZE, dirty_pages_rate=rate,
                              expected_downtime_ms=min(self.conv.expected_downtime_s, 1e9) * 1e3)
            if decision is Decision.SWITCHOVER:
                self.rounds = r
                return
            if decision is Decision.GIVE_UP:
                raise MigrationError(self.conv.explain(rate * PAGE_SIZE))

    def _round(self, r: int, section: SectionType, cmd: int) -> tuple[int, float]:
        t0 = time.monotonic()
        ctrl0 = self.link.bytes_sent
        w = self.writer
        w.write_event(SectionHeader(section, RAM_SID, RAM_IDSTR))
        w.hook()
        self.link.send_stream(w.flush())
        self.pipeline.commands.push(records(COMMAND, op=cmd, round=r))
        drained = self._registration_window(r)
        self.link.send(RegisterFinishedMessage())
        w.write_event(EndOfSection())
        w.write_event(SectionFooter(RAM_SID))
        if self.page_hash:
            self._round_pages(w, r)
        secs = time.monotonic() - t0
        rdma = int(drained["bytes_written"])
        st = self.stats
        zero = int(drained["zero_pages"])
        fig = st.stages
        fig.pages_scanned += int(drained["dirty_pages"])
        fig.zero_pages += zero
        fig.scanner_busy_s = int(drained["scan_ns"]) / 1e9
        fig.poster_busy_s = int(drained["post_ns"]) / 1e9
        fig.registrar_busy_s = int(drained["reg_ns"]) / 1e9
        fig.writes_posted += int(drained["writes_posted"])
        fig.bytes_written += rdma
        sent = rdma + self.link.bytes_sent - ctrl0
        st.rounds.append({"round": r, "start": round(t0 - st.start_time, 4),
                          "seconds": round(secs, 4), "bytes": sent,
                          "pages": int(drained["dirty_pages"]), "zero-pages": zero, "remaining": 0})
        st.update(round=r, rdma_bytes=st.rdma_bytes + rdma, control_bytes=self.link.bytes_sent,
                  duplicate_pages=st.duplicate_pages + zero,
                  normal_pages=st.normal_pages + int(drained["dirty_pages"]) - zero,
                  mbps=sent * 8 / 1e6 / secs if secs > 0 else 0.0)
        return sent, secs

    def _registration_window(self, r: int) -> np.void:
        """Serve the registrar's requests until the poster drained round ``r``."""
        while True:
            reqs = self.pipeline.next_requests(self.check)
            ops = reqs["op"]
            i = 0
            while i < len(reqs):
                j = i + 1
                while j < len(reqs) and ops[j] == ops[i]:
                    j += 1
                batch = reqs[i:j]
                op = int(ops[i])
                if op == Request.REGISTER:
                    self._register(batch.view(REGISTER_REQUEST))
                elif op == Request.COMPRESS:
                    for q in batch.view(COMPRESS_REQUEST):
                        d = self.dest_blocks[int(q["block"])]
                        self.link.send(CompressMessage(Compress(
                            int(q["block"]), d.offset + int(q["offset"]), int(q["length"]))))
                    self.stats.stages.compress_sent += len(batch)
                elif op == Request.UNREGISTER:
                    recs = tuple(Register(int(q["chunk"]), int(q["block"]))
                                 for q in batch.view(UNREGISTER_REQUEST))
                    for k in range(0, len(recs), 1 if not self.multi else MAX_REGISTER_BATCH):
                        part = recs[k:k + (1 if not self.multi else MAX_REGISTER_BATCH)]
                        self.link.request(UnregisterRequestMessage(part))
                    self.stats.stages.chunks_unregistered += len(batch)
                elif op == Request.DRAINED:
                    if int(batch[0]["round"]) != r:
                        raise MigrationError(f"round {int(batch[0]['round'])} drained during "
                                             f"round {r}")
                    return batch.view(DRAINED_REQUEST)[0]
                i = j

    def _register(self, batch: np.ndarray) -> None:
        cs = self.config.chunk_size
        step = FIRST_REGISTER_BATCH if self.multi else 1
        k = 0
        while k < len(batch):
            # Small first: the destination pins (faults in) every chunk of a request before
            # it answers, and no write of the batch can start before the answer.
            part = batch[k:k + step]
            k += len(part)
            if self.multi:
                step = min(2 * step, MAX_REGISTER_BATCH)
            recs = tuple(
                Register(self.dest_blocks[int(q["block"])].offset + int(q["chunk"]) * cs,
                         int(q["block"]))
                for q in part)
            reply = self.link.request(RegisterRequestMessage(recs))
            results = reply.results
            if len(results) == 1 and len(part) > 1:
                raise RemoteProtocolError("REGISTER RESULT holds one result for a "
                                          f"{len(part)}-record request")
            ans = records(ANSWER, len(part), block=part["block"], chunk=part["chunk"],
                          rkey=[x.rkey for x in results],
                          remote_base=[x.host_addr for x in results])
            self.pipeline.answers.push(ans)
        self.stats.stages.chunks_registered += len(batch)

    def _round_pages(self, w, r: int) -> None:
        """Tell the destination which pages the round just drained sent (after its REGISTER
        FINISHED, so they have all landed): it hashes them while the next round runs."""
        body = pack_round(self.pipeline.pages.sent)
        # instance r, section id ROUND_SID + r - 1: one layout per (name, instance) in
        # VMDESCRIPTION, and one section id per instance, as QEMU has
        self.sections.write(w, ROUND_SID + r - 1, ROUND_SECTION, "pages", body, instance_id=r)

    # -- switchover ----------------------------------------------------------------------
    def _switchover(self) -> None:
        if self.page_hash:
            # The last round's page bitmap in a message of its own, then its READY, which the
            # destination grants once it has hashed every round so far: that hashing (55 ms
            # per GiB of an idle guest's first round) stays out of the downtime. The guest
            # runs meanwhile; what it dirties goes in the final round.
            self.link.send_stream(self.writer.flush())
            self.link.wait_credit(timeout=SETTLE_TIMEOUT_S)
        state = self.guest.pause()
        self.paused = True
        pause = self.guest.paused_at
        self.stats.update(pause_time=pause)
        r = self.rounds + 1
        digests: list[bytes] = []
        hasher = None
        if self.digest and not self.page_hash:
            # RAM is frozen now: hash it while the final round is being sent.
            hasher = threading.Thread(target=lambda: digests.append(
                chunk_digests(self.guest.region)), name="ram-digest", daemon=True)
            hasher.start()
        self._round(r, SectionType.SECTION_END, Command.FINAL)
        w = self.writer
        sections = self.sections
        # the synthetic or the KVM guest's section
        sections.guest(w, self.guest.device_section, state.to_bytes())
        if self.page_hash:         # the scanner hashed the final round before it drained
            sections.digest(w, table_digests(self.pipeline.pages.hashes,
                                             self.guest.region.chunk_pages))
        elif hasher is not None:
            hasher.join()
            if not digests:
                raise MigrationError("hashing the source RAM failed")
            sections.digest(w, digests[0])
        self.link.send_stream(w.flush())
        sections.end(w)        # EOF and VMDESCRIPTION: small, so in one QEMU FILE message
        self.link.send_stream(w.flush())
        self.stats.update(control_bytes=self.link.bytes_sent, remaining_bytes=0)
        if self.digest:
            # Our extension: the destination grants one more READY once it has verified the
            # RAM and resumed the guest (an ERROR if it refused).
            msg = self.link.receive(timeout=60.0)
            if not isinstance(msg, ReadyMessage):
                raise RemoteProtocolError(f"expected READY after EOF, got {msg!r}")
        self.stats.update(resume_time=time.monotonic(), verified=bool(self.digest))
        self.link.channel.close()
