"""The control channel as a sans-IO state machine (the h11 way): bytes in, messages out.

One ``ControlChannel`` per side of one RC connection. The caller owns the QP, the clock and the
waiting; the channel says what may happen next and refuses what may not. Roles: ``SOURCE`` is
the connector and stream writer (it sends QEMU FILE and requests), ``DESTINATION`` the stream
reader (it grants READY and answers). On a return-path connection the side that writes that
stream takes the SOURCE role.

Invariants:
- credit: the receiver grants exactly one message per READY; QEMU FILE and every request need
  that credit, replies (REGISTER RESULT, RAM BLOCKS RESULT, UNREGISTER FINISHED) and ERROR do not;
- RECV slots: the channel keeps a model of the RECVs posted on our QP, in order (the receive
  queue is FIFO: the next SEND lands in the oldest posted RECV). Each call that needs a RECV
  queues it; ``take_recv_posts()`` hands them out, and the caller posts them *before* it
  transmits anything. Slot 0 (READY) takes READY on the source and every request or QEMU FILE on
  the destination; slot 1 (DATA) takes the reply to a request; slot 2 (CONTROL) is the send
  buffer and is never posted for RECV;
- registration window: opened on the source by sending a QEMU FILE whose payload ends with the
  HOOK record be64(0x80) (``StreamWriter`` never ends any other payload with those 8 bytes); on
  the destination by ``begin_registration()`` when its stream parser meets that HOOK in the
  QEMU FILE just received (so a payload from QEMU that ends with those bytes by chance does
  not open one, and a HOOK QEMU split over two messages when its 32 KiB buffer filled does,
  after the second). Inside it: COMPRESS,
  REGISTER / UNREGISTER REQUEST, RAM BLOCKS REQUEST (first window only, once, before any of the
  others) and REGISTER FINISHED; no QEMU FILE;
- COMMIT (ours, only with RAM_DIGEST agreed) is the source's last message: it spends the READY
  the destination grants after EOF once it verified the RAM, and tells it to run the guest;
- any protocol error moves the channel to ``ERROR`` for good: every later call raises, except
  ``abort()`` (which hands out the one best-effort ERROR message) and ``close()`` (a no-op).

Source, in order (``post``/``send``/``wait`` are the caller's verbs)::

    ch = ControlChannel(Role.SOURCE)
    private = ch.initiate(Capabilities(flags=...), block_lengths=[...])
    post(ch.take_recv_posts())                   # slot 0, before rdma_connect
    agreement = ch.established(connect(private)) # log agreement.warnings
    for each message m (QEMU FILE payloads from StreamWriter.flush(), then in the window
                        RamBlocksRequest / RegisterRequest / Compress / RegisterFinished):
        while ch.credit == 0:                    # wait for READY
            ch.receive(*wait_recv())             # (bytes, slot)
        out = ch.send(m); post(ch.take_recv_posts()); send(out)   # [1, 0] or [0]
        if ch.awaiting:                          # a request: wait for its reply in slot 1
            reply = ch.receive(*wait_recv())
    ch.close()                                   # at the end; on failure: abort() below

Destination, in order::

    ch = ControlChannel(Role.DESTINATION)
    reply = ch.accept(connect_request.private_data, supported)
    accept(reply); post(ch.take_recv_posts())   # slot 0
    stream:  send(ch.grant()); msg = ch.receive(*wait_recv()); post(ch.take_recv_posts())
             feed msg.data to StreamReader; on its Hook event: ch.begin_registration()
    window:  same grant / receive / post; answer requests at once with ch.send(reply)
             (no READY needed); REGISTER FINISHED puts the channel back in STREAM
    ch.close() after QEMU_VM_EOF

On any failure, either side: ``out = ch.abort()``; if ``out`` is not None, send it (no READY
needed, best effort), then tear the connection down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum, IntEnum

from pipeline.protocol.capabilities import (
    Agreement,
    Capabilities,
    Capability,
    accept_reply,
    negotiate,
)
from pipeline.protocol.codec import decode, encode
from pipeline.protocol.messages import (
    ErrorMessage,
    Message,
    MessageType,
    QemuFileMessage,
    RamBlocksResultMessage,
    ReadyMessage,
    RegisterRequestMessage,
    RegisterResultMessage,
    UnregisterFinishedMessage,
)
from pipeline.protocol.records import HOOK_RECORD
from shm.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = ["Role", "Slot", "State", "ControlChannel", "HOOK_RECORD"]


class Role(Enum):
    """SOURCE: connector and stream writer; DESTINATION: stream reader, grants READY."""

    SOURCE = "SOURCE"
    DESTINATION = "DESTINATION"

    @property
    def peer(self) -> Role:
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


class Slot(IntEnum):
    """QEMU's control buffer indices (``RDMA_WRID_READY/DATA/CONTROL``)."""

    READY = 0
    DATA = 1
    CONTROL = 2


class State(Enum):
    """Sentinel states of the conversation, the same on both sides."""

    CONNECTING = "CONNECTING"     # capabilities not exchanged yet
    STREAM = "STREAM"             # QEMU FILE traffic
    WINDOW = "WINDOW"             # registration window: between HOOK and REGISTER FINISHED
    AWAIT_REPLY = "AWAIT_REPLY"   # inside a window, a request waits for its reply
    CLOSED = "CLOSED"
    ERROR = "ERROR"


T = MessageType
S, D = Role.SOURCE, Role.DESTINATION
# state -> sender -> message type -> next state (HOOK, credit and reply checks come on top)
TRANSITIONS: dict[State, dict[Role, dict[MessageType, State]]] = {
    State.STREAM: {S: {T.QEMU_FILE: State.STREAM, T.COMMIT: State.STREAM}, D: {}},
    State.WINDOW: {
        S: {T.COMPRESS: State.WINDOW, T.REGISTER_REQUEST: State.AWAIT_REPLY,
            T.UNREGISTER_REQUEST: State.AWAIT_REPLY, T.RAM_BLOCKS_REQUEST: State.AWAIT_REPLY,
            T.REGISTER_FINISHED: State.STREAM},
        D: {},
    },
    State.AWAIT_REPLY: {
        S: {},
        D: {T.REGISTER_RESULT: State.WINDOW, T.RAM_BLOCKS_RESULT: State.WINDOW,
            T.UNREGISTER_FINISHED: State.WINDOW},
    },
}
REPLY_TO = {T.REGISTER_REQUEST: T.REGISTER_RESULT, T.RAM_BLOCKS_REQUEST: T.RAM_BLOCKS_RESULT,
            T.UNREGISTER_REQUEST: T.UNREGISTER_FINISHED}
NEEDS_CREDIT = frozenset({T.QEMU_FILE, T.COMPRESS, T.REGISTER_REQUEST, T.UNREGISTER_REQUEST,
                          T.RAM_BLOCKS_REQUEST, T.REGISTER_FINISHED, T.COMMIT})
_NEEDS_BLOCKS = frozenset({T.COMPRESS, T.REGISTER_REQUEST, T.UNREGISTER_REQUEST,
                           T.REGISTER_FINISHED})
_SENDER = {t: S for t in NEEDS_CREDIT} | {t: D for t in REPLY_TO.values()} | {T.READY: D}
_READY = encode(ReadyMessage())
_ERROR = encode(ErrorMessage())


class ControlChannel:
    """One side of the control channel; see the module docstring for the call sequence."""

    def __init__(self, role: Role, *, capabilities: Capabilities | None = None,
                 block_lengths: Sequence[int] | None = None) -> None:
        """``capabilities`` given: the handshake was done elsewhere, start in STREAM."""
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, got {role!r}")
        self.role = role
        self.capabilities = Capabilities()
        self.block_lengths = None if block_lengths is None else tuple(block_lengths)
        self._state = State.CONNECTING
        self._credit = 0
        self._awaiting: tuple[MessageType, int] | None = None
        self._windows = 0
        self._ram_blocks_done = False
        self._stream_last = False       # DESTINATION: the last message was a QEMU FILE
        self._requested: Capabilities | None = None
        self._rq: deque[Slot] = deque()
        self._to_post: list[Slot] = []
        self._connected = False
        self.received_error = False
        self.sent_error = False
        self.error: ProtocolError | None = None
        if capabilities is not None:
            self._start(capabilities)

    # -- views ---------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def credit(self) -> int:
        """READY credits granted and not used yet (0 or 1)."""
        return self._credit

    @property
    def awaiting(self) -> MessageType | None:
        """The reply type the pending request waits for, if any."""
        return REPLY_TO[self._awaiting[0]] if self._awaiting else None

    @property
    def windows(self) -> int:
        """Registration windows opened so far (the first is the SETUP window)."""
        return self._windows

    @property
    def ram_blocks_exchanged(self) -> bool:
        return self._ram_blocks_done

    @property
    def posted_recvs(self) -> tuple[Slot, ...]:
        """Our model of the RECVs on the QP, oldest first (after ``take_recv_posts``)."""
        return tuple(self._rq)

    @property
    def sendable(self) -> frozenset[MessageType]:
        """The types ``send`` accepts now (payload rules aside)."""
        return frozenset(t for t in _SENDER if t is not T.READY and _SENDER[t] is self.role
                         and self._why_not(self.role, t) is None)

    # -- handshake -----------------------------------------------------------------------------
    def initiate(self, requested: Capabilities, *,
                 block_lengths: Sequence[int] | None = None) -> bytes:
        """SOURCE: the private data for ``rdma_connect``; queues the slot-0 RECV to post first."""
        self._expect(Role.SOURCE, State.CONNECTING, "initiate")
        if self._requested is not None:
            self._local("initiate", "already initiated")
        self._requested = requested
        if block_lengths is not None:
            self.block_lengths = tuple(block_lengths)
        self._queue(Slot.READY)
        return requested.encode()

    def established(self, reply: bytes) -> Agreement:
        """SOURCE: check the destination's reply private data; the channel enters STREAM."""
        self._expect(Role.SOURCE, State.CONNECTING, "established")
        if self._requested is None:
            self._local("established", "call initiate() first")
        with self._failing():
            agreement = accept_reply(self._requested, Capabilities.decode(reply))
        self.capabilities = agreement.capabilities
        self._state = State.STREAM
        self._connected = True
        return agreement

    def accept(self, request: bytes, supported: Capabilities) -> bytes:
        """DESTINATION: the reply private data for ``rdma_accept``; queues the slot-0 RECV."""
        self._expect(Role.DESTINATION, State.CONNECTING, "accept")
        with self._failing():
            reply = negotiate(Capabilities.decode(request), supported)
        self._start(reply)
        return reply.encode()

    def _start(self, capabilities: Capabilities) -> None:
        self.capabilities = capabilities
        self._state = State.STREAM
        self._connected = True
        if not self._rq and Slot.READY not in self._to_post:
            self._queue(Slot.READY)

    # -- the conversation ----------------------------------------------------------------------
    def take_recv_posts(self) -> tuple[Slot, ...]:
        """The RECVs to post now, in this order, before transmitting anything."""
        posts, self._to_post = tuple(self._to_post), []
        self._rq.extend(posts)
        return posts

    def send(self, msg: Message) -> bytes:
        """Check that we may send ``msg`` now, update the state, and return its bytes."""
        mtype = getattr(msg, "TYPE", None)
        if not isinstance(mtype, MessageType):
            raise TypeError(f"not a control message: {msg!r}")
        self._usable(f"send {mtype.name}")
        if mtype is T.READY:
            self._local(f"send {mtype.name}", "use grant() for READY")
        if mtype is T.ERROR:
            self._local(f"send {mtype.name}", "use abort() for ERROR")
        with self._failing():
            self._advance(self.role, msg, LocalProtocolError)
        if self.role is Role.SOURCE and mtype in NEEDS_CREDIT:
            # QEMU's exchange_send: the reply's RECV (slot 1) first, then slot 0 again.
            if mtype in REPLY_TO:
                self._queue(Slot.DATA)
            self._queue(Slot.READY)
        return encode(msg)

    def grant(self) -> bytes:
        """DESTINATION: a READY that lets the source send exactly one message."""
        self._usable("grant READY")
        if self.role is not Role.DESTINATION:
            self._local("grant READY", "only the DESTINATION grants; the SOURCE waits for READY")
        why = self._why_not(Role.DESTINATION, T.READY)
        if why:
            self._local("grant READY", why)
        if Slot.READY not in self._rq:
            self._local("grant READY", "no slot-0 RECV is posted (the SEND would hit RNR)")
        self._credit = 1
        self._stream_last = False
        return _READY

    def receive(self, data: bytes | bytearray | memoryview, slot: Slot | None = None) -> Message:
        """Decode one received message (its RECV completion's bytes) and check it fits now.

        ``slot`` is the buffer it arrived in (from the wr_id); when given, it must be the
        oldest posted RECV. An ERROR is returned (not raised) and leaves the channel in ERROR.
        """
        self._usable("receive")
        with self._failing():
            if not self._rq:
                raise RemoteProtocolError(
                    f"{self.role.name} received a message in state {self._state.name} with no "
                    "RECV posted: the peer sent without a READY (a real QP fails with RNR)")
            posted = self._rq.popleft()
            if slot is not None and Slot(slot) is not posted:
                raise LocalProtocolError(
                    f"{self.role.name} receive: completion in slot {Slot(slot).name} but the "
                    f"oldest posted RECV is slot {posted.name}")
            msg = decode(data)
            self._on_receive(msg)
        return msg

    def begin_registration(self) -> None:
        """DESTINATION: the stream parser met HOOK in the QEMU FILE just received (its 8
        bytes may have begun in the one before)."""
        self._usable("begin_registration")
        if self.role is not Role.DESTINATION:
            self._local("begin_registration", "the SOURCE's window opens when it sends the HOOK")
        if self._state is not State.STREAM or not self._stream_last:
            self._local("begin_registration", "the HOOK record must come in the QEMU FILE just "
                                              "received, before the next READY")
        self._stream_last = False
        self._windows += 1
        self._state = State.WINDOW

    def abort(self, reason: str = "") -> bytes | None:
        """Enter ERROR for good; the ERROR message to send best-effort, or None if not due.

        None when the peer already sent ERROR, we already sent one, or we never connected
        (QEMU's ``qemu_rdma_cleanup`` rule). ERROR needs no READY. A peer of ours (RAM_DIGEST
        agreed) is told ``reason``; QEMU gets its empty ERROR.
        """
        if self._state is State.CLOSED:
            return None
        due = self._connected and not (self.received_error or self.sent_error)
        self._state = State.ERROR
        if not due:
            return None
        self.sent_error = True
        if reason and self.capabilities.has(Capability.RAM_DIGEST):
            return encode(ErrorMessage(reason))
        return _ERROR

    def close(self) -> None:
        """End cleanly (idempotent). Refused inside a registration window: use ``abort()``."""
        if self._state in (State.CLOSED, State.ERROR):
            return
        if self._state in (State.WINDOW, State.AWAIT_REPLY):
            self._local("close", "a registration window is open; abort() instead")
        self._state = State.CLOSED

    # -- internals -----------------------------------------------------------------------------
    def _queue(self, slot: Slot) -> None:
        self._to_post.append(slot)

    def _local(self, event: str, why: str) -> None:
        exc = LocalProtocolError(
            f"{self.role.name} cannot {event} in state {self._state.name}: {why}")
        self._fail(exc)
        raise exc

    def _fail(self, exc: ProtocolError) -> None:
        if self._state is not State.ERROR:
            self.error = exc
        self._state = State.ERROR

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """A ProtocolError inside moves the channel to ERROR, then propagates."""
        try:
            yield
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def _expect(self, role: Role, state: State, event: str) -> None:
        self._usable(event, connecting=True)
        if self.role is not role:
            self._local(event, f"{event}() is for the {role.name}")
        if self._state is not state:
            self._local(event, f"only in state {state.name}")

    def _usable(self, event: str, connecting: bool = False) -> None:
        if self._state is State.ERROR:
            first = f" (first error: {self.error})" if self.error else ""
            raise LocalProtocolError(
                f"{self.role.name} cannot {event} in state ERROR: the channel failed "
                f"earlier{first}")
        if self._state is State.CLOSED:   # stays CLOSED: there is nothing left to fail
            raise LocalProtocolError(f"{self.role.name} cannot {event}: the channel is closed")
        if self._state is State.CONNECTING and not connecting:
            self._local(event, "capabilities are not exchanged yet")
        if self._to_post:
            self._local(event, "RECVs are queued: call take_recv_posts() and post them first")

    def _why_not(self, sender: Role, t: MessageType) -> str | None:
        """Why ``sender`` may not send a ``t`` now (None: it may), payload aside."""
        state = self._state
        if t is T.READY:
            if sender is not Role.DESTINATION:
                return "only the DESTINATION sends READY"
            if state is State.AWAIT_REPLY:
                return "the pending request must be answered before the next READY"
            if state not in (State.STREAM, State.WINDOW):
                return f"no READY in state {state.name}"
            if self._credit:
                return "a READY is already outstanding (one message per READY)"
            return None
        if _SENDER.get(t) is not sender:
            return f"only the {_SENDER[t].name} sends {t.name}" if t in _SENDER else \
                f"{t.name} is never sent this way"
        allowed = TRANSITIONS.get(state, {}).get(sender, {})
        if state is State.AWAIT_REPLY and t is not self.awaiting:
            return f"waiting for {self.awaiting.name} to {self._awaiting[0].name}"
        if t not in allowed:
            if t is T.QEMU_FILE:
                return "no QEMU FILE may pass between the HOOK and REGISTER FINISHED"
            if t in REPLY_TO.values():
                return "no request is waiting for it"
            return "only inside a registration window (after the HOOK record)"
        if t in NEEDS_CREDIT and not self._credit:
            return "no READY credit: wait for READY"
        if t is T.COMMIT and not self.capabilities.has(Capability.RAM_DIGEST):
            return "COMMIT is rdma-pipeline's, for a peer that agreed to RAM_DIGEST"
        if t is T.RAM_BLOCKS_REQUEST and (self._windows != 1 or self._ram_blocks_done):
            return "RAM BLOCKS REQUEST belongs to the SETUP window (the first), once"
        if t in _NEEDS_BLOCKS and not self._ram_blocks_done:
            return "the RAM BLOCKS exchange must come first in the SETUP window"
        return None

    def _advance(self, sender: Role, msg: Message, exc: type[ProtocolError]) -> None:
        t = msg.TYPE
        why = self._why_not(sender, t)
        if why:
            verb = "send" if sender is self.role else "receive"
            raise exc(f"{self.role.name} cannot {verb} {t.name} in state "
                      f"{self._state.name}: {why}")
        if isinstance(msg, RegisterRequestMessage) and msg.repeat > 1 \
                and not self.capabilities.multi_register:
            raise exc(f"REGISTER REQUEST repeat {msg.repeat}: more than one record needs "
                      "MULTI_REGISTER (QEMU answers only the first)")
        if self._state is State.AWAIT_REPLY:
            self._check_reply(msg, exc)
        # The checks passed: commit.
        if t in NEEDS_CREDIT:
            self._credit = 0
        nxt = TRANSITIONS[self._state][sender][t]
        if isinstance(msg, QemuFileMessage):
            if self.role is Role.SOURCE and msg.data.endswith(HOOK_RECORD):
                nxt = State.WINDOW
                self._windows += 1
            self._stream_last = self.role is Role.DESTINATION
        if t in REPLY_TO:
            self._awaiting = (t, msg.repeat)
        elif self._state is State.AWAIT_REPLY:
            self._awaiting = None
            if t is T.RAM_BLOCKS_RESULT:
                self._ram_blocks_done = True
        self._state = nxt

    def _check_reply(self, msg: Message, exc: type[ProtocolError]) -> None:
        request, n = self._awaiting
        if isinstance(msg, RegisterResultMessage):
            if msg.repeat != n:
                raise exc(f"REGISTER RESULT repeat {msg.repeat}: must echo the request's {n}")
            if len(msg.results) != n:
                raise exc(f"REGISTER RESULT carries {len(msg.results)} results for {n} records: "
                          "MULTI_REGISTER needs one result per record")
        elif isinstance(msg, UnregisterFinishedMessage) and msg.repeat != n:
            raise exc(f"UNREGISTER FINISHED repeat {msg.repeat}: must echo the request's {n}")
        elif isinstance(msg, RamBlocksResultMessage):
            self._check_blocks(msg, exc)

    def _check_blocks(self, msg: RamBlocksResultMessage, exc: type[ProtocolError]) -> None:
        ours = self.block_lengths
        if ours is not None:
            if len(msg.blocks) != len(ours):
                raise exc(f"RAM BLOCKS RESULT: {len(msg.blocks)} blocks, the source has "
                          f"{len(ours)}: ram blocks mismatch (do the two command lines differ?)")
            for i, (block, length) in enumerate(zip(msg.blocks, ours, strict=True)):
                if block.length != length:
                    raise exc(f"RAM BLOCKS RESULT: block {i} length {block.length}, the source's "
                              f"is {length}: ram blocks mismatch")
        if self.capabilities.pin_all:
            for i, block in enumerate(msg.blocks):
                if block.remote_rkey == 0:
                    raise exc(f"RAM BLOCKS RESULT: block {i} remote_rkey 0 with rdma-pin-all: "
                              "the whole-block rkey is required")

    def _on_receive(self, msg: Message) -> None:
        t = msg.TYPE
        if t is T.ERROR:
            self.received_error = True
            self._state = State.ERROR
            why = f": {msg.reason}" if msg.reason else ""
            self.error = RemoteProtocolError(f"{self.role.peer.name} sent ERROR{why}")
            return
        if t is T.READY:
            why = self._why_not(self.role.peer, T.READY)
            if why:
                raise RemoteProtocolError(
                    f"{self.role.name} cannot receive READY in state {self._state.name}: {why}")
            self._credit = 1
            return
        self._advance(self.role.peer, msg, RemoteProtocolError)
        if self.role is Role.DESTINATION and t in NEEDS_CREDIT:
            self._queue(Slot.READY)   # re-post slot 0 at once; the payload stays valid
