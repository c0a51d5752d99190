"""A SourceSession and a DestinationSession wired back to back in memory, with no process.

Each side runs as its driver would (``actions`` in order; an asking action's result handed
back), here as a generator that yields whenever it waits for the other side. Control messages
cross as bytes through two real ``ControlChannel``s, so READY credit, registration windows and
ERROR follow the protocol's own rules. What is not the wire is scripted: the source's stages,
dirty log and guest are ``SourceWorld``'s; the destination's region, registrations, hashing and
guest answer at once, its RAM hashing to the source's digest unless ``corrupt``.

A side that ends (its session final, nothing queued) closes its end: the other side's next wait
on the wire raises ``TransportError``, as a broken connection does. ``interrupt`` replaces the
k-th action of one side by an event (``Failed``: a stage or transport failing there; ``Cancel``:
the user), exactly as a driver replaces an action that raised.
"""

from __future__ import annotations

import zlib
from collections import deque

from source_world import MIB, SourceWorld

from pipeline.protocol.channel import NEEDS_CREDIT, ControlChannel, Role
from pipeline.protocol.messages import (
    CommitMessage,
    ErrorMessage,
    QemuFileMessage,
    ReadyMessage,
)
from pipeline.session import actions as act
from pipeline.session import destination_events as de
from pipeline.session import events as ev
from pipeline.session.destination import DestinationSession
from shm.errors import MigrationError, RemoteProtocolError, TransportError
from shm.memory import PAGE_SIZE

WAIT = "wait"


class Wire:
    """Bytes in flight one way, and whether the sender's end is closed."""

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.closed = False


class BackToBack:
    def __init__(self, *, interrupt: tuple[str, int, object] | None = None,
                 corrupt: bool = False, **world) -> None:
        self.src = SourceWorld(**world)
        self.session = self.src.session
        self.dst = DestinationSession(self.src.config, carrier="rdma", session_token=0x5EED)
        self.interrupt = interrupt
        self.corrupt = corrupt
        self.to_dst, self.to_src = Wire(), Wire()
        self.src_ch = ControlChannel(Role.SOURCE)
        self.dst_ch = ControlChannel(Role.DESTINATION)
        self.connect_request: bytes | None = None
        self.connect_reply: bytes | None = None
        self.dst_log: list = []
        self.dst_guest_running = False
        self.deadlocked = False
        self.moves = 0
        self.now = 0.0

    # -- the scheduler -------------------------------------------------------------------
    def run(self) -> BackToBack:
        sides = {"source": self._side("source"), "destination": self._side("destination")}
        while sides:
            moves = self.moves
            for name in list(sides):
                try:
                    next(sides[name])
                except StopIteration:
                    del sides[name]
                    (self.to_dst if name == "source" else self.to_src).closed = True
            if sides and self.moves == moves:
                self.deadlocked = True          # neither can go on: a hang in real life
                self.to_dst.closed = self.to_src.closed = True
        return self

    def _side(self, name: str):
        session = self.session if name == "source" else self.dst
        carry = self._source if name == "source" else self._destination
        log = self.src.log if name == "source" else self.dst_log
        queue = deque(session.start(self.now))
        n = 0
        while queue:
            action = queue.popleft()
            log.append(action)
            self.moves += 1
            self.now += 0.001
            who, at, interrupt = self.interrupt or (None, -1, None)
            n += 1
            if (who, at) == (name, n - 1):
                if session.final:     # as run_session: after the end, a failure voids one order
                    continue
                answer = session.handle(interrupt, self.now)
                if answer or session.final:   # it ended the migration: what was asked is void
                    queue.clear()
                    queue.extend(answer)
                    continue
                # ignored (a cancel too late to matter): the action goes on
            try:
                event = yield from carry(action)
            except MigrationError as exc:
                queue.clear()
                event = ev.Failed(str(exc))
            if event is not None:
                queue.extend(session.handle(event, self.now))

    # -- the wire ------------------------------------------------------------------------
    def _receive(self, ch: ControlChannel, wire: Wire):
        while not wire.queue:
            if wire.closed:
                raise TransportError("control receive failed with WR_FLUSH_ERR: the "
                                     "connection to the peer is broken")
            yield WAIT
        self.moves += 1
        msg = ch.receive(wire.queue.popleft())
        ch.take_recv_posts()
        if isinstance(msg, ErrorMessage):
            raise RemoteProtocolError("the peer sent ERROR: it is failing the migration")
        return msg

    def _send(self, msg):
        ch = self.src_ch
        while ch.credit == 0 and msg.TYPE in NEEDS_CREDIT:
            yield from self._receive(ch, self.to_src)
        out = ch.send(msg)
        ch.take_recv_posts()
        self.to_dst.queue.append(out)

    # -- the source's driver -------------------------------------------------------------
    def _source(self, action):
        kind = type(action)
        ch = self.src_ch
        if kind is act.Connect:
            self.connect_request = ch.initiate(action.capabilities,
                                               block_lengths=list(action.block_lengths))
            ch.take_recv_posts()
            while self.connect_reply is None:
                if self.to_src.closed:
                    raise TransportError("connection refused")
                yield WAIT
            return ev.Connected(ch.established(self.connect_reply).capabilities)
        if kind is act.SendStream:
            for payload in action.payloads:
                yield from self._send(QemuFileMessage(payload))
            return None
        if kind is act.SendControl:
            self.src.sent.append(action.message)
            yield from self._send(action.message)
            return None
        if kind is act.ReceiveControl:
            return ev.ControlReceived((yield from self._receive(ch, self.to_src)))
        if kind is act.AwaitConfirmation:
            msg = yield from self._receive(ch, self.to_src)
            if not isinstance(msg, ReadyMessage):
                raise RemoteProtocolError(f"expected READY after EOF, got {msg!r}")
            return ev.Confirmed()
        if kind is act.SendCommit:
            yield from self._send(CommitMessage())
            return None
        if kind is act.AwaitCredit:
            while ch.credit == 0:
                yield from self._receive(ch, self.to_src)
            return ev.CreditGranted()
        if kind is act.AbortPeer:
            data = ch.abort()
            if data is not None:
                self.to_dst.queue.append(data)
            return None
        if kind is act.ReadRoundPages:             # every page of every block sent
            return ev.RoundPages(zlib.compress(b"".join(
                b"\xff" * -(-(length // PAGE_SIZE) // 8) for _, length in self.src.blocks)))
        return self.src.carry_out(action)          # stages, dirty log, guest

    # -- the destination's driver --------------------------------------------------------
    def _destination(self, action):
        kind = type(action)
        ch = self.dst_ch
        if kind is de.Accept:
            while self.connect_request is None:
                if self.to_dst.closed:            # the source ended before it connected
                    raise TransportError("no source connected within the accept timeout")
                yield WAIT
            self.connect_reply = ch.accept(self.connect_request, action.capabilities)
            ch.take_recv_posts()
            return de.Accepted(ch.capabilities)
        if kind is de.AwaitMessage:
            ch.take_recv_posts()
            self.to_src.queue.append(ch.grant())
            return ev.ControlReceived((yield from self._receive(ch, self.to_dst)))
        if kind is de.Reply:
            self.to_src.queue.append(ch.send(action.message))
            ch.take_recv_posts()
            return None
        if kind is de.OpenWindow:
            ch.begin_registration()
            return None
        if kind is de.Confirm:
            ch.take_recv_posts()
            self.to_src.queue.append(ch.grant())
            if not self.dst.two_phase:
                ch.close()
            return de.ConfirmSent()
        if kind is de.AwaitCommit:
            msg = yield from self._receive(ch, self.to_dst)
            if not isinstance(msg, CommitMessage):
                raise RemoteProtocolError(f"expected COMMIT after READY, got {msg!r}")
            ch.close()
            return de.Committed()
        if kind is act.AbortPeer:
            data = ch.abort()
            if data is not None:
                self.to_src.queue.append(data)
            return None
        return self._destination_local(action)

    def _destination_local(self, action):
        kind = type(action)
        if kind is de.CreateRegion:
            return de.RegionCreated(region(action.blocks))
        if kind is de.RegisterChunks:
            return de.ChunksRegistered(tuple(0x100 + i for i in range(len(action.ranges))))
        if kind is de.PinBlocks:
            return de.BlocksPinned(tuple(0x900 + i for i in range(len(action.ranges))))
        if kind is de.HashRam:
            digest = bytes(32) * chunks(self.src.blocks, action.chunk_size)
            if self.corrupt:
                digest = b"\x01" + digest[1:]
            return de.RamHashed(digest)
        if kind is de.LocateChunk:
            return de.Located("")
        if kind is de.LoadGuest:
            self.dst_guest_running = True
            return de.GuestResumed({})
        if kind is de.StopGuest:
            self.dst_guest_running = False
            return None
        return None           # StateChanged, StartGuest, ZeroRange, Deregister, hashing

    # -- what happened -------------------------------------------------------------------
    def dst_states(self) -> list[str]:
        return [a.state for a in self.dst_log if isinstance(a, act.StateChanged)]

    def guests_running(self) -> int:
        return int(self.src.guest_running) + int(self.dst_guest_running)


def region(blocks) -> tuple[de.RegionBlock, ...]:
    out, offset = [], 0
    for i, (name, length) in enumerate(blocks):
        out.append(de.RegionBlock(name, offset, length, 0x7F00_0000_0000 - i * (1 << 32)))
        offset += length
    return tuple(out)


def chunks(blocks, chunk_size: int = MIB) -> int:
    return sum(-(-length // chunk_size) for _, length in blocks)
