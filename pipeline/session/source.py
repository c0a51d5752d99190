"""The source of a migration as a sans-IO state machine: events in, actions out, time passed in.

    setup      Connect -> Connected: the policy is fixed; the stream header and ram START
               (MEM_SIZE, then a HOOK and RAM BLOCKS on rdma:); pin-all's block rkeys go to
               the registrar
    active     round r: ram PART; on rdma: a HOOK opens a registration window in which the
               registrar's REGISTER / COMPRESS / UNREGISTER requests become control messages
               until it reports the round DRAINED (then REGISTER FINISHED); inline carriers
               send the round's pages themselves (SendPages). Then the round's page bitmap
               (round sections), a dirty-log sync and the convergence rule: another round,
               switchover, or give up
    device     the destination settles (it hashed every round so far: READY), the guest is
               paused, the final round (ram END), the guest's device section, the digest, EOF
               and VMDESCRIPTION; then the destination's confirmation
    completed  the commit point: the destination confirmed (READY after EOF on rdma:,
               SHUT(0) on tcp:, a file closed whole); with a peer that granted none of our
               extensions (QEMU's protocol version 1: one QP, one registration per message,
               1 MiB chunks, no digest, no round sections) the whole stream sent, as QEMU's
               source does, and the RAM unverified. From here on nothing resumes the guest

Before the commit point any failure or cancel answers AbortPeer, ResumeGuest (if the guest
was paused) and the final state, once. A session that is final ignores everything but
reports; an event the session did not ask for is a ``LocalProtocolError`` that fails it.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from pipeline.config import MigrationConfig
from pipeline.protocol.messages import (
    Compress,
    CompressMessage,
    RamBlocksRequestMessage,
    RamBlocksResultMessage,
    Register,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    RegisterResultMessage,
    UnregisterFinishedMessage,
    UnregisterRequestMessage,
)
from pipeline.protocol.records import (
    PAGE_SIZE,
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
from pipeline.section_writer import DeviceSections, write_header
from pipeline.sections import MACHINE, RAM_SID, ROUND_SECTION, ROUND_SID
from pipeline.session import actions as act
from pipeline.session import events as ev
from pipeline.session.convergence import AutoConverge, Convergence, Decision, RoundResult
from pipeline.session.policy import PeerPolicy, stream_policy
from pipeline.session.states import SOURCE_TRANSITIONS, SourceState, StateMachine
from pipeline.stats import MigrationStats
from shm.errors import LocalProtocolError, MigrationError, RemoteProtocolError
from stages.records import (
    ALL_CHUNKS,
    ANSWER,
    COMPRESS_REQUEST,
    DRAINED_REQUEST,
    REGISTER_REQUEST,
    UNREGISTER_REQUEST,
    Request,
    records,
)

FIRST_REGISTER_BATCH = 16     # then doubled up to the policy's register_batch
SWITCHOVER_S = 0.1            # a switchover with nothing left to send: 26-41 ms idle, more busy
SETTLE_TIMEOUT_S = 120.0      # the destination hashing the rounds so far (GiB per 0.1-0.3 s)
CONFIRM_TIMEOUT_S = 60.0      # the destination verifying the RAM and resuming the guest
FINAL_HASH_S = 0.5e-6         # per page left: the destination hashes the last round's pages
                              # (two threads, gathered) before it can verify and resume

# The event each asking action produces.
ANSWERS = {
    act.Connect: ev.Connected, act.ReceiveControl: ev.ControlReceived,
    act.AwaitCredit: ev.CreditGranted, act.AwaitStage: ev.StageRecords,
    act.SyncDirtyLog: ev.Synced, act.ReadRoundPages: ev.RoundPages, act.SendPages: ev.PagesSent,
    act.PauseGuest: ev.GuestPaused, act.ComputeDigest: ev.DigestReady,
    act.AwaitConfirmation: ev.Confirmed,
}
TUNABLE = {"downtime-limit", "x-max-rounds", "x-keep-going"}
MACHINES = (MACHINE, "none")   # what a source writes: ours, or QEMU's -M none (one block "ram")


class SourceSession:
    """One outgoing migration of the RAM blocks ``blocks`` ((idstr, length) pairs).

    ``inline``: pages travel in the stream (``tcp:``, ``file:``) rather than by RDMA WRITE;
    ``snapshot``: a ``file:`` save, the guest paused before the first round. ``stats`` is
    updated as the migration goes; the driver adds the byte counters it owns
    (``control_bytes``) before it hands the session an event.
    """

    def __init__(self, config: MigrationConfig, blocks, *, inline: bool = False,
                 snapshot: bool = False, stats: MigrationStats | None = None) -> None:
        self.config = config
        self.machine = config.machine or MACHINE
        if self.machine not in MACHINES:
            raise ValueError(f"machine {self.machine!r}: a source is one of "
                             f"{', '.join(MACHINES)}")
        self.blocks = tuple(RamBlockInfo(name, length) for name, length in blocks)
        self.inline = inline
        self.snapshot = snapshot
        self.setup_written = False
        self.stats = stats or MigrationStats()
        self.sm = StateMachine("source", SOURCE_TRANSITIONS)
        self.conv = Convergence(config.downtime_limit_ms, config.max_rounds, config.keep_going)
        self.throttle = AutoConverge(
            config.throttle_initial, config.throttle_increment, config.throttle_max,
            config.throttle_threshold, config.throttle_tailslow) if config.auto_converge else None
        self.policy: PeerPolicy | None = stream_policy(
            "file" if snapshot else "tcp", self.machine) if inline else None
        self.writer = StreamWriter()
        self.sections = DeviceSections()      # every device section written, for VMDESCRIPTION
        self.dest_blocks: tuple = ()
        self.round = 0
        self.final_round = False
        self.paused = False
        self.committed = False
        self.confirming = False               # EOF sent: waiting for the destination's verdict
        self.device: tuple[str, bytes] | None = None
        self._expect: type | None = None       # the event the last asking action produces
        self._work: deque[np.ndarray] = deque()   # registrar requests not yet served
        self._reply: tuple[str, np.ndarray | None] | None = None   # what the reply answers
        self._register_step = 0                # 0: no REGISTER run is being served
        self._round_t0 = 0.0
        self._round_ctrl0 = 0

    # -- the interface -------------------------------------------------------------------
    @property
    def state(self) -> SourceState:
        return self.sm.state

    @property
    def final(self) -> bool:
        return self.sm.final

    @property
    def reason(self) -> str:
        """Why the migration failed or was cancelled ("" otherwise)."""
        return self.sm.reason

    def start(self, now: float) -> list:
        total = sum(b.length for b in self.blocks)
        self.stats.update(start_time=now, total_bytes=total, remaining_bytes=total)
        out = self._to(SourceState.SETUP, now)
        if self.inline:
            return out + self._ask(act.Connect(None))
        request = PeerPolicy.request(pin_all=self.config.pin_all,
                                     chunk_size=self.config.chunk_size,
                                     extensions=self.config.extensions)
        return out + self._ask(act.Connect(request, tuple(b.length for b in self.blocks)))

    def handle(self, event, now: float) -> list:
        """The actions ``event`` calls for (empty once the session is final)."""
        if self.final:
            return []
        try:
            if isinstance(event, ev.Cancel):
                if self.confirming:     # too late: the destination may run the guest already
                    return []
                return self._cancel(now)
            if isinstance(event, ev.Failed):
                return self._fail(event.reason, now)
            if isinstance(event, ev.SetParameter):
                return self._set(event)
            if self._expect is None or not isinstance(event, self._expect):
                wanted = self._expect.__name__ if self._expect else "nothing"
                raise LocalProtocolError(f"source session in state {self.state.value} got "
                                         f"{type(event).__name__}, waiting for {wanted}")
            self._expect = None
            return self._HANDLERS[type(event)](self, event, now)
        except MigrationError as exc:
            return self._fail(str(exc), now)

    # -- states --------------------------------------------------------------------------
    def _to(self, state: SourceState, now: float, reason: str = "") -> list:
        self.sm.to(state, now, reason)
        self.stats.update(**self.sm.figures(now))
        return [act.StateChanged(state.value, reason)]

    def _ask(self, action) -> list:
        self._expect = ANSWERS[type(action)]
        return [action]

    def _fail(self, reason: str, now: float) -> list:
        reason = reason.splitlines()[0] if reason else "failed"
        if self.committed or self.final:
            return []
        self._expect = None
        self.stats.update(runs_on="source")
        out: list = [act.AbortPeer()]
        if self.throttle is not None and self.throttle.percentage:
            out.append(act.ThrottleGuest(0))     # the guest runs on here at its own speed
        if self.paused:
            out.append(act.ResumeGuest())
            self.paused = False
        state = (SourceState.CANCELLED if self.state is SourceState.CANCELLING
                 else SourceState.FAILED)
        return out + self._to(state, now, reason)

    def _cancel(self, now: float) -> list:
        if self.state is SourceState.NONE:
            return self._to(SourceState.CANCELLED, now, "cancelled")
        out = self._to(SourceState.CANCELLING, now)
        return out + self._fail("cancelled", now)

    def _set(self, event: ev.SetParameter) -> list:
        if event.name not in TUNABLE:
            raise ValueError(f"parameter {event.name!r} cannot change while migrating "
                             f"(these can: {', '.join(sorted(TUNABLE))})")
        if event.name == "downtime-limit":
            self.conv.limit_s = event.value / 1000.0
        elif event.name == "x-max-rounds":
            self.conv.max_rounds = event.value
        else:
            self.conv.keep_going = bool(event.value)
        return []

    # -- setup ---------------------------------------------------------------------------
    def _on_connected(self, event: ev.Connected, now: float) -> list:
        if self.inline:
            if self.snapshot:           # a file: the guest pauses before the first round
                return self._ask(act.PauseGuest())
            return self._write_setup(now)
        self.policy = self._check_policy(dataclasses.replace(
            PeerPolicy.from_agreement(event.capabilities), machine=self.machine))
        # No data QP granted (token 0): QEMU's version 1, the writes go on the control QP.
        return [act.ConnectDataPath(self.policy.session_token)] + self._write_setup(now)

    def _write_setup(self, now: float) -> list:
        self.setup_written = True
        out: list = []
        w = self.writer
        write_header(w, self.machine, return_path=self.policy.return_path)
        w.write_event(SectionHeader(SectionType.SECTION_START, RAM_SID, RAM_IDSTR, 0,
                                    RAM_VERSION))
        w.write_event(MemSize(self.blocks))
        if self.inline:
            self._end_section()
            out.append(self._flush())
            return out + self._setup_done(now)
        w.hook()
        out.append(self._flush())
        out.append(act.SendControl(RamBlocksRequestMessage()))
        return out + self._ask(act.ReceiveControl())

    def _check_policy(self, policy: PeerPolicy) -> PeerPolicy:
        cfg = self.config
        if policy.chunk_size != cfg.chunk_size:
            raise RemoteProtocolError(f"the destination refused chunk size {cfg.chunk_size}",
                                      hint="use --chunk-size 1M with this destination")
        if cfg.pin_all and not policy.pin_all:
            raise RemoteProtocolError("the destination declined rdma-pin-all")
        return policy

    def _on_ram_blocks(self, msg: RamBlocksResultMessage, now: float) -> list:
        dest = msg.blocks
        if len(dest) != len(self.blocks) or any(
                d.length != b.length for d, b in zip(dest, self.blocks, strict=False)):
            raise RemoteProtocolError(
                "ram blocks mismatch: the destination has blocks "
                f"{[d.length for d in dest]}, the source {[b.length for b in self.blocks]}",
                hint="start both sides with the same RAM size")
        self.dest_blocks = dest
        out: list = []
        if self.policy.pin_all:
            out.append(act.PushAnswers(records(
                ANSWER, len(dest), block=np.arange(len(dest)), chunk=ALL_CHUNKS,
                rkey=[d.remote_rkey for d in dest],
                remote_base=[d.remote_host_addr for d in dest])))
        out.append(act.SendControl(RegisterFinishedMessage()))
        self._end_section()
        return out + self._setup_done(now)

    def _setup_done(self, now: float) -> list:
        self.stats.update(setup_end=now)
        return self._to(SourceState.ACTIVE, now) + self._start_round(now)

    # -- rounds --------------------------------------------------------------------------
    def _start_round(self, now: float) -> list:
        self.round += 1
        self._round_t0 = now
        self._round_ctrl0 = self.stats.control_bytes
        section = SectionType.SECTION_END if self.final_round else SectionType.SECTION_PART
        self.writer.write_event(SectionHeader(section, RAM_SID, RAM_IDSTR))
        if self.inline:
            return [self._flush()] + self._ask(act.SendPages(self.round))
        self.writer.hook()
        return [self._flush(), act.CommandScanner(self.round, self.final_round)] + \
            self._ask(act.AwaitStage())

    def _on_pages_sent(self, event: ev.PagesSent, now: float) -> list:
        self._end_section()
        out = [self._flush()]
        data = event.pages - event.zero_pages
        self.stats.add_stage(pages_scanned=event.pages, zero_pages=event.zero_pages,
                             scanner_busy_s=event.scan_s, bytes_written=data * PAGE_SIZE)
        self.stats.add(duplicate_pages=event.zero_pages, normal_pages=data)
        self._record_round(now, 0, event.pages, event.zero_pages)
        return out + self._round_done(now)

    def _on_stage_records(self, event: ev.StageRecords, now: float) -> list:
        self._work.append(event.records)
        return self._serve(now)

    def _serve(self, now: float) -> list:
        """Turn queued registrar requests into control messages until one needs a reply,
        the queue is empty (wait for more) or the round drained."""
        out: list = []
        while self._work:
            reqs = self._work[0]
            op = int(reqs["op"][0])
            same = np.flatnonzero(reqs["op"] != op)
            n = int(same[0]) if len(same) else len(reqs)
            batch = reqs[:n]
            if op != Request.REGISTER:
                self._register_step = 0
            if op == Request.COMPRESS:
                self._consume(n)
                out += [act.SendControl(CompressMessage(Compress(
                    int(q["block"]), self.dest_blocks[int(q["block"])].offset + int(q["offset"]),
                    int(q["length"])))) for q in batch.view(COMPRESS_REQUEST)]
                self.stats.add_stage(compress_sent=n)
            elif op == Request.REGISTER:
                return out + self._request_registration(batch.view(REGISTER_REQUEST))
            elif op == Request.UNREGISTER:
                part = batch[:self.policy.register_batch].view(UNREGISTER_REQUEST)
                self._consume(len(part))
                self._reply = ("unregister", part)
                out.append(act.SendControl(UnregisterRequestMessage(tuple(
                    Register(int(q["chunk"]), int(q["block"])) for q in part))))
                return out + self._ask(act.ReceiveControl())
            elif op == Request.DRAINED:
                if int(batch[0]["round"]) != self.round:
                    raise LocalProtocolError(f"round {int(batch[0]['round'])} drained during "
                                             f"round {self.round}")
                self._consume(1)
                if self._work:
                    raise LocalProtocolError("the registrar sent requests after its round "
                                             "drained")
                return out + self._on_drained(batch.view(DRAINED_REQUEST)[0], now)
            else:
                raise LocalProtocolError(f"the registrar sent request op {op}")
        return out + self._ask(act.AwaitStage())

    def _consume(self, n: int) -> None:
        head = self._work[0]
        if n >= len(head):
            self._work.popleft()
        else:
            self._work[0] = head[n:]

    def _request_registration(self, batch: np.ndarray) -> list:
        # Small first, then doubling: the destination registers every chunk of a request
        # before it answers, and no write of the batch can start before the answer.
        limit = self.policy.register_batch
        step = self._register_step or min(FIRST_REGISTER_BATCH, limit)
        part = batch[:step]
        self._consume(len(part))
        self._register_step = min(2 * step, limit)
        cs = self.config.chunk_size
        self._reply = ("register", part)
        recs = tuple(Register(self.dest_blocks[int(q["block"])].offset + int(q["chunk"]) * cs,
                              int(q["block"])) for q in part)
        return [act.SendControl(RegisterRequestMessage(recs))] + self._ask(act.ReceiveControl())

    def _on_reply(self, msg, now: float) -> list:
        kind, part = self._reply
        self._reply = None
        out: list = []
        if kind == "register":
            if not isinstance(msg, RegisterResultMessage):
                raise RemoteProtocolError(f"expected REGISTER RESULT, got {type(msg).__name__}")
            results = msg.results
            if len(results) != len(part):
                raise RemoteProtocolError(f"REGISTER RESULT holds {len(results)} results for "
                                          f"a {len(part)}-record request")
            out.append(act.PushAnswers(records(
                ANSWER, len(part), block=part["block"], chunk=part["chunk"],
                rkey=[x.rkey for x in results], remote_base=[x.host_addr for x in results])))
            self.stats.add_stage(chunks_registered=len(part))
        else:
            if not isinstance(msg, UnregisterFinishedMessage):
                raise RemoteProtocolError(f"expected UNREGISTER FINISHED, got "
                                          f"{type(msg).__name__}")
            self.stats.add_stage(chunks_unregistered=len(part))
        return out + self._serve(now)

    def _on_drained(self, drained: np.void, now: float) -> list:
        out = [act.SendControl(RegisterFinishedMessage())]
        self._end_section()
        rdma = int(drained["bytes_written"])
        zero = int(drained["zero_pages"])
        pages = int(drained["dirty_pages"])
        st = self.stats
        st.add_stage(pages_scanned=pages, zero_pages=zero, bytes_written=rdma,
                     writes_posted=int(drained["writes_posted"]))
        st.set_stage(scanner_busy_s=int(drained["scan_ns"]) / 1e9,
                     poster_busy_s=int(drained["post_ns"]) / 1e9,
                     registrar_busy_s=int(drained["reg_ns"]) / 1e9)
        st.add(rdma_bytes=rdma, duplicate_pages=zero, normal_pages=pages - zero)
        self._record_round(now, rdma, pages, zero)
        if self.policy.round_sections:
            return out + self._ask(act.ReadRoundPages(self.round))
        return out + self._round_done(now)

    def _on_round_pages(self, event: ev.RoundPages, now: float) -> list:
        """The pages the round sent, named after its REGISTER FINISHED (so they have all
        landed): the destination hashes them while the next round runs. Instance r and
        section id ROUND_SID + r - 1: one layout per (name, instance) in VMDESCRIPTION."""
        self.sections.write(self.writer, ROUND_SID + self.round - 1, ROUND_SECTION, "pages",
                            event.body, instance_id=self.round)
        return self._round_done(now)

    def _record_round(self, now: float, rdma: int, pages: int, zero: int) -> None:
        st = self.stats
        secs = now - self._round_t0
        sent = rdma + st.control_bytes - self._round_ctrl0
        st.add_round({"round": self.round, "start": round(self._round_t0 - st.start_time, 4),
                          "seconds": round(secs, 4), "bytes": sent, "pages": pages,
                          "zero-pages": zero, "remaining": 0})
        st.update(round=self.round, mbps=sent * 8 / 1e6 / secs if secs > 0 else 0.0)

    def _round_done(self, now: float) -> list:
        if self.final_round:
            return self._finish_stream(now)
        return self._ask(act.SyncDirtyLog(self.round))

    def _on_synced(self, event: ev.Synced, now: float) -> list:
        """QEMU's rule, with two corrections. The bandwidth is the rate the round cleared
        dirty pages at (runs merged across clean pages send more bytes than that), and the
        expected downtime counts the switchover's own work (pause, device state, the last
        hashes, resume), which grows with the pages left. And the first round, one
        sequential pass over all of RAM, clears pages far faster than later rounds of
        scattered pages can: never switch over on its figure alone while pages are dirty."""
        dirty = event.dirty_pages
        last = self.stats.rounds[-1]
        secs = last["seconds"]
        cleared = last["pages"] * PAGE_SIZE
        extra_s = SWITCHOVER_S + (dirty * FINAL_HASH_S if self.policy.round_sections else 0.0)
        allowance = int(extra_s * cleared / secs) if secs > 0 else 0
        decision = self.conv.after_round(RoundResult(self.round, cleared, secs,
                                                     dirty * PAGE_SIZE + allowance))
        if decision is Decision.SWITCHOVER and self.round == 1 and dirty:
            decision = Decision.ITERATE
        rate = dirty / secs if secs > 0 else 0.0
        st = self.stats
        st.amend_round(**{"remaining": dirty * PAGE_SIZE, "dirty-pages-rate": round(rate)})
        st.add(dirty_sync_count=1)
        st.update(remaining_bytes=dirty * PAGE_SIZE, dirty_pages_rate=rate,
                  expected_downtime_ms=min(self.conv.expected_downtime_s, 1e9) * 1e3)
        if decision is Decision.ITERATE:
            return self._throttle(dirty * PAGE_SIZE, last["bytes"]) + self._start_round(now)
        if decision is Decision.GIVE_UP:
            raise MigrationError(self.conv.explain(rate * PAGE_SIZE))
        return self._switchover(now)

    def _throttle(self, dirtied: int, sent: int) -> list:
        """Auto-converge: throttle the guest harder when it dirties too much (QEMU's rule)."""
        if self.throttle is None or self.paused:
            return []
        pct = self.throttle.after_round(dirtied, sent)
        if pct is None:
            return []
        self.stats.update(cpu_throttle_percentage=pct)
        return [act.ThrottleGuest(pct)]

    # -- switchover ----------------------------------------------------------------------
    def _switchover(self, now: float) -> list:
        out = self._to(SourceState.DEVICE, now)
        self.final_round = True
        if self.paused:                     # a snapshot: paused from the start
            return out + self._start_round(now)
        if self.policy.round_sections:
            # The last round's page bitmap in a message of its own, then its READY, which
            # the destination grants once it has hashed every round so far: that hashing
            # stays out of the downtime. The guest runs meanwhile; what it dirties goes in
            # the final round.
            return out + [self._flush()] + self._ask(act.AwaitCredit(SETTLE_TIMEOUT_S))
        return out + self._ask(act.PauseGuest())

    def _on_credit(self, event: ev.CreditGranted, now: float) -> list:
        return self._ask(act.PauseGuest())

    def _on_paused(self, event: ev.GuestPaused, now: float) -> list:
        self.paused = True
        self.device = (event.device_section, event.state)
        self.stats.update(pause_time=now)
        if not self.setup_written:      # a snapshot: setup and every round run paused
            return self._write_setup(now)
        return self._start_round(now)

    def _finish_stream(self, now: float) -> list:
        if not self.policy.own_sections:      # QEMU's machine: its RAM alone
            return self._end_stream(now)
        self.sections.guest(self.writer, *self.device)
        if self.policy.verified:
            return self._ask(act.ComputeDigest())
        return self._end_stream(now)

    def _on_digest(self, event: ev.DigestReady, now: float) -> list:
        self.sections.digest(self.writer, event.digest)
        return self._end_stream(now)

    def _end_stream(self, now: float) -> list:
        if self.policy.verified and self.policy.own_sections:
            self.sections.device_digest(self.writer)
        out = [self._flush()]
        # EOF and VMDESCRIPTION: small, one QEMU FILE message
        self.sections.end(self.writer, self.machine)
        out.append(self._flush())
        self.stats.update(remaining_bytes=0)
        if self.inline or self.policy.ready_after_eof:
            self.confirming = True
            return out + self._ask(act.AwaitConfirmation(CONFIRM_TIMEOUT_S))
        # QEMU's version 1: the destination confirms nothing, and QEMU's source is done here.
        self.stats.update(verification=self.policy.unverified)
        return out + self._commit(now, verified=None)

    def _on_confirmed(self, event: ev.Confirmed, now: float) -> list:
        # A file is verified when it is restored; the destination's confirmation (SHUT(0),
        # READY after EOF) says the RAM verified, when it had our digest to verify it by. A
        # two-phase destination then waits for our COMMIT to run the guest: it goes out after
        # the commit point, never before.
        checked = self.policy.verified and self.policy.own_sections   # our digest went out
        verified = None if self.snapshot or not checked else True
        if not self.policy.own_sections:
            how = ("the file is whole" if self.snapshot
                   else "the destination confirmed it loaded the stream")
            self.stats.update(verification=f"RAM not verified: machine type '{self.machine}' "
                                           f"carries no RAM digest; {how}")
        done = self._commit(now, verified=verified)
        if self.snapshot or not self.policy.two_phase:
            return done
        return [act.SendCommit()] + done

    def _commit(self, now: float, *, verified: bool | None) -> list:
        """The destination confirmed: the migration is complete, whatever happens next."""
        self.committed = True
        self.paused = False
        self.stats.update(resume_time=now, verified=verified,
                          runs_on="nowhere: saved" if self.snapshot else "destination")
        return self._to(SourceState.COMPLETED, now)

    # -- control messages ----------------------------------------------------------------
    def _on_control(self, event: ev.ControlReceived, now: float) -> list:
        msg = event.message
        if self._reply is not None:
            return self._on_reply(msg, now)
        if isinstance(msg, RamBlocksResultMessage) and not self.dest_blocks:
            return self._on_ram_blocks(msg, now)
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} in state "
                                  f"{self.state.value}")

    # -- the stream ----------------------------------------------------------------------
    def _end_section(self) -> None:
        self.writer.write_event(EndOfSection())
        self.writer.write_event(SectionFooter(RAM_SID))

    def _flush(self) -> act.SendStream:
        return act.SendStream(tuple(self.writer.flush()))

    _HANDLERS = {
        ev.Connected: _on_connected, ev.ControlReceived: _on_control,
        ev.CreditGranted: _on_credit, ev.StageRecords: _on_stage_records,
        ev.Synced: _on_synced, ev.RoundPages: _on_round_pages, ev.PagesSent: _on_pages_sent,
        ev.GuestPaused: _on_paused, ev.DigestReady: _on_digest, ev.Confirmed: _on_confirmed,
    }
