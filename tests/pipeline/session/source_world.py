"""A SourceSession's whole world in memory: stages, guest and a peer, all scripted.

``SourceWorld`` carries out every action a ``SourceSession`` answers with, as a driver would,
but with no process, socket or ring: the registrar turns each round's dirty chunks into
REGISTER (for chunks not registered yet), COMPRESS (for zero chunks) and DRAINED records; the
dirty log answers each sync from ``dirty``; the peer answers RAM BLOCKS, REGISTER and
UNREGISTER REQUESTs and confirms at the end. ``peer`` may be replaced by a function that maps a
sent message to its reply, so tests can make the peer misbehave. The clock advances 10 ms an
action.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import MigrationConfig
from pipeline.protocol.capabilities import Capabilities
from pipeline.protocol.messages import (
    DestBlock,
    RamBlocksRequestMessage,
    RamBlocksResultMessage,
    ReadyMessage,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterFinishedMessage,
    UnregisterRequestMessage,
)
from pipeline.session import actions as act
from pipeline.session import events as ev
from pipeline.session.source import SourceSession
from stages.records import (
    COMPRESS_REQUEST,
    DRAINED_REQUEST,
    REGISTER_REQUEST,
    REQUEST_RING,
    UNREGISTER_REQUEST,
    concat,
    records,
)

MIB = 1 << 20
BLOCKS = (("pc.ram", 8 * MIB), ("vga.vram", 2 * MIB))


def granted(pin_all: bool = False, **overrides) -> Capabilities:
    """What an rdma-pipeline destination grants a default request."""
    from pipeline.session.policy import PeerPolicy

    asked = PeerPolicy.request(pin_all=pin_all, chunk_size=MIB)
    fields = dict(flags=asked.flags, chunk_shift=asked.chunk_shift, data_qps=1,
                  session_token=7, digest=asked.digest)
    fields.update(overrides)
    return Capabilities(**fields)


@dataclass
class SourceWorld:
    config: MigrationConfig = field(default_factory=MigrationConfig)
    blocks: tuple = BLOCKS
    capabilities: Capabilities = field(default_factory=granted)
    inline: bool = False
    snapshot: bool = False
    rounds: list = field(default_factory=lambda: [[(0, c) for c in range(8)] + [(1, 0)],
                                                  [(0, 3)], [(1, 1)]])
    zero_chunks: frozenset = frozenset({(1, 1)})   # dirty chunks the scanner finds all zero
    dirty: list = field(default_factory=lambda: [5000, 40, 0])   # pages after each sync
    unregister_after: int = 0      # the registrar unregisters chunk (0, 0) in this round
    peer: object = None            # message -> reply (None: a well-behaved destination)
    now: float = 100.0
    log: list = field(default_factory=list)
    sent: list = field(default_factory=list)
    registered: set = field(default_factory=set)
    guest_running: bool = True
    pushed: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session = SourceSession(self.config, self.blocks, inline=self.inline,
                                     snapshot=self.snapshot)
        self.round_plan = deque()

    # -- running -------------------------------------------------------------------------
    def run(self, interrupt=None, at: int = -1) -> list:
        """Carry out everything; with ``interrupt`` (an event), feed it in place of action
        number ``at`` (which still runs if the session ignores it). Returns every action."""
        queue = deque(self.session.start(self.now))
        n = 0
        while queue:
            action = queue.popleft()
            self.log.append(action)
            self.now += 0.01
            n += 1
            if n - 1 == at and interrupt is not None:
                if self.session.final:      # as run_session: after the end it voids one order
                    continue
                answer = self.session.handle(interrupt, self.now)
                if answer or self.session.final:   # what the session asked before is void
                    queue.clear()
                    queue.extend(answer)
                    continue
                # ignored (a cancel too late to matter): the action goes on
            event = self.carry_out(action)
            if event is not None:
                queue.extend(self.session.handle(event, self.now))
        return self.log

    def carry_out(self, action):
        kind = type(action)
        if kind is act.Connect:
            return ev.Connected(None if self.inline else self.capabilities)
        if kind is act.SendControl:
            self.sent.append(action.message)
            self.reply = self.answer(action.message)
            return None
        if kind is act.ReceiveControl:
            reply, self.reply = self.reply, None
            return ev.ControlReceived(reply if reply is not None else ReadyMessage())
        if kind is act.CommandScanner:
            self.round_plan.append(self.requests(action.round))
            return None
        if kind is act.AwaitStage:
            return ev.StageRecords(self.round_plan.popleft())
        if kind is act.PushAnswers:
            self.pushed.append(action.records)
            return None
        if kind is act.SyncDirtyLog:
            return ev.Synced(self.dirty[action.round - 1])
        if kind is act.SendPages:
            chunk = self.rounds[min(action.round, len(self.rounds)) - 1]
            return ev.PagesSent(256 * len(chunk), 0, 0.001)
        if kind is act.ReadRoundPages:
            return ev.RoundPages(b"bitmap")
        if kind is act.AwaitCredit:
            return ev.CreditGranted()
        if kind is act.PauseGuest:
            self.guest_running = False
            return ev.GuestPaused("rdp-synthetic-guest", b"state")
        if kind is act.ResumeGuest:
            self.guest_running = True
            return None
        if kind is act.ComputeDigest:
            return ev.DigestReady(bytes(32) * 10)
        if kind is act.AwaitConfirmation:
            return ev.Confirmed()
        return None              # StateChanged, SendStream, ConnectDataPath, AbortPeer

    # -- the scripted stages and peer ----------------------------------------------------
    def requests(self, r: int) -> np.ndarray:
        chunks = self.rounds[min(r, len(self.rounds)) - 1]
        out = []
        for block, chunk in chunks:
            if (block, chunk) in self.zero_chunks and (block, chunk) not in self.registered:
                out.append(records(COMPRESS_REQUEST, round=r, block=block,
                                   offset=chunk * MIB, length=MIB, pages=256))
            elif (block, chunk) not in self.registered and not self.session.policy.pin_all:
                self.registered.add((block, chunk))
                out.append(records(REGISTER_REQUEST, round=r, block=block, chunk=chunk,
                                   n_chunks=1))
        if self.unregister_after and r == self.unregister_after:
            out.append(records(UNREGISTER_REQUEST, round=r, block=0, chunk=0))
        out.append(records(DRAINED_REQUEST, round=r, bytes_written=len(chunks) * MIB,
                           writes_posted=len(chunks), dirty_pages=256 * len(chunks)))
        return concat(REQUEST_RING, out)

    def answer(self, msg):
        return self.peer(msg) if self.peer is not None else self.destination(msg)

    def destination(self, msg):
        """A well-behaved destination's reply to ``msg`` (None: it sends none)."""
        if isinstance(msg, RamBlocksRequestMessage):
            base = 0x7F00_0000_0000
            return RamBlocksResultMessage(tuple(
                DestBlock(base + i * 16 * MIB, i * 16 * MIB, length, 99 if
                          self.session.policy.pin_all else 0)
                for i, (_, length) in enumerate(self.blocks)))
        if isinstance(msg, RegisterRequestMessage):
            return RegisterResultMessage(tuple(RegisterResult(1000 + r.current_index, 0x7F00)
                                               for r in msg.records))
        if isinstance(msg, UnregisterRequestMessage):
            return UnregisterFinishedMessage(len(msg.records))
        return None

    # -- what happened -------------------------------------------------------------------
    def states(self) -> list[str]:
        return [a.state for a in self.log if isinstance(a, act.StateChanged)]

    def of(self, kind) -> list:
        return [a for a in self.log if isinstance(a, kind)]
