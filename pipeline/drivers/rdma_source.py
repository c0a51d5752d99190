"""The ``rdma:`` source: a control link and the scanner, registrar and poster processes.

``open()`` (on the session's Connect) makes the verbs context and the control link, starts the
stages (their start-up overlaps the connection), connects with the session's capabilities and
waits for the stages. Every later action is one call: a control message, a ring push, a wait
on the registrar's requests or a dirty-log sync. ``close()`` releases in order: stages and
rings first (the poster holds imports of the registrar's MRs), the control link, the context.
"""

from __future__ import annotations

import time

from pipeline.control import ControlLink, ControlTrace
from pipeline.drivers.loop import one_line
from pipeline.drivers.source_common import SourceDriver
from pipeline.protocol.channel import Role
from pipeline.protocol.messages import CommitMessage, ReadyMessage
from pipeline.session import actions as act
from pipeline.session import events as ev
from pipeline.source_pipeline import SourcePipeline
from shm.errors import RemoteProtocolError, StageFailed
from stages.pagehash import pack_round, table_digests
from stages.records import COMMAND, Command, records

CONNECT_TIMEOUT_S = 10.0


class RdmaSource(SourceDriver):
    """One outgoing migration over ``rdma:HOST:PORT``."""

    pipeline: SourcePipeline | None = None
    link: ControlLink | None = None
    pd = None           # the import of the registrar's PD: the control QP's

    def check(self) -> None:
        super().check()
        if self.pipeline is not None and not self.confirming:
            self.pipeline.check()

    def reason(self, exc: BaseException) -> str:
        """A stage that died explains a broken ring or connection better than they do."""
        if self.pipeline is not None and not isinstance(exc, StageFailed):
            dead = self.pipeline.dead_stage()
            if dead is not None:
                return one_line(dead)
        return one_line(exc)

    # -- setup ---------------------------------------------------------------------------
    def _connect(self, action: act.Connect) -> ev.Connected:
        from stages.verbs import open_provider

        cfg = self.config
        ctx = open_provider(cfg.transport).open_device(peer=self.uri.host)   # the route's
        self.stack.callback(ctx.close)
        self.pipeline = self.stack.enter_context(SourcePipeline(self.run_id, cfg, self.guest,
                                                                peer=self.uri.host))
        self.pipeline.start()
        self.pipeline.wait_ready(cfg.stage_timeout)
        # The control QP lives in the registrar's PD: should the destination grant no data
        # QP (QEMU), the RDMA WRITEs of the registrar's MRs go on this QP. A device that cannot
        # share a PD (proxy mode) gets one of ours, registering what the registrar decides.
        shared = self.pipeline.registrar.info["pd"]
        self.pd = ctx.import_pd(shared) if shared is not None else ctx.alloc_pd()
        self.link = ControlLink(ctx, self.pd, Role.SOURCE, check=self.check,
                                trace=ControlTrace(cfg.trace_control))
        self.stack.callback(self.link.close)
        self.stats.update(live_rdma_bytes=self.pipeline.bytes_done)   # progress within rounds
        channel = self.link.channel
        private = channel.initiate(action.capabilities, block_lengths=list(action.block_lengths))
        self.link.trace("connect", private)
        self.link.post_recvs()
        reply = ctx.connect(self.link.qp, self.uri.host, self.uri.port, private,
                            timeout=CONNECT_TIMEOUT_S)
        self.link.trace("accepted", reply)
        agreement = channel.established(reply)
        return ev.Connected(agreement.capabilities)

    def _connect_data(self, action: act.ConnectDataPath) -> None:
        if action.session_token:
            self.pipeline.connect_poster(self.uri.host, self.uri.port, action.session_token)
        else:       # QEMU's protocol version 1: one QP for everything
            self.pipeline.post_on_control_qp(self.pd, self.link)

    # -- control -------------------------------------------------------------------------
    def _counted(self) -> None:
        self.stats.update(control_bytes=self.link.bytes_sent)

    def _send_stream(self, action: act.SendStream) -> None:
        self.link.send_stream(action.payloads)
        self._counted()

    def _send_control(self, action: act.SendControl) -> None:
        self.link.send(action.message)
        self._counted()

    def _receive(self, action: act.ReceiveControl) -> ev.ControlReceived:
        return ev.ControlReceived(self.link.receive(action.timeout))

    def _await_credit(self, action: act.AwaitCredit) -> ev.CreditGranted:
        self.link.wait_credit(action.timeout)
        return ev.CreditGranted()

    def _await_confirmation(self, action: act.AwaitConfirmation) -> ev.Confirmed:
        """Our extension: the destination grants one more READY once it has verified the
        RAM (an ERROR if it refused); the commit point."""
        msg = self.link.receive(action.timeout)
        if not isinstance(msg, ReadyMessage):
            raise RemoteProtocolError(f"expected READY after EOF, got {type(msg).__name__}")
        return ev.Confirmed()

    def send_commit(self) -> None:
        self.link.send(CommitMessage())

    def _abort(self, action: act.AbortPeer) -> None:
        if self.link is not None:
            self.link.abort(self.session.reason)

    # -- stages --------------------------------------------------------------------------
    def _push_answers(self, action: act.PushAnswers) -> None:
        self.pipeline.answers.push(action.records)

    def _command(self, action: act.CommandScanner) -> None:
        op = Command.FINAL if action.final else Command.ROUND
        self.pipeline.commands.push(records(COMMAND, op=op, round=action.round))

    def _await_stage(self, action: act.AwaitStage) -> ev.StageRecords:
        return ev.StageRecords(self.pipeline.next_requests(self.check))

    def _sync(self, action: act.SyncDirtyLog) -> ev.Synced:
        return ev.Synced(self.pipeline.sync(action.round, self.check))

    def _round_pages(self, action: act.ReadRoundPages) -> ev.RoundPages:
        return ev.RoundPages(pack_round(self.pipeline.pages.sent))

    def _digest(self, action: act.ComputeDigest) -> ev.DigestReady:
        """The scanner hashed the final round's pages before it drained."""
        return ev.DigestReady(table_digests(self.pipeline.pages.hashes,
                                            self.guest.region.chunk_pages))

    # -- the end -------------------------------------------------------------------------
    def finish(self) -> None:
        """total-time ended at the commit point, as QEMU's does (before cleanup): stopping
        the stages and unpinning their memory is cleanup, and cannot undo the migration."""
        done = time.monotonic()
        self.link.channel.close()
        try:
            self.pipeline.finish(self.config.stage_timeout)
            self.stats.set_stage(**self.pipeline.figures())
        except Exception as exc:  # noqa: BLE001 - after the commit point: a warning
            self.stats.update(warning=f"after completion: {self.reason(exc)}")
        self.stats.update(cleanup_ms=round((time.monotonic() - done) * 1e3))

    HANDLERS = {
        **SourceDriver.HANDLERS,
        act.Connect: _connect, act.ConnectDataPath: _connect_data,
        act.SendStream: _send_stream, act.SendControl: _send_control,
        act.ReceiveControl: _receive, act.AwaitCredit: _await_credit, act.AbortPeer: _abort,
        act.AwaitConfirmation: _await_confirmation,
        act.PushAnswers: _push_answers, act.CommandScanner: _command,
        act.AwaitStage: _await_stage, act.SyncDirtyLog: _sync,
        act.ReadRoundPages: _round_pages, act.ComputeDigest: _digest,
    }
