"""The control channel: an in-memory source/destination pair walks whole dialogues."""

from collections import deque

import pytest

from pipeline.protocol.capabilities import KNOWN_FLAGS, Capabilities, Capability
from pipeline.protocol.channel import ControlChannel, Role, Slot, State
from pipeline.protocol.codec import encode
from pipeline.protocol.messages import (
    Compress,
    CompressMessage,
    DestBlock,
    ErrorMessage,
    MessageType,
    QemuFileMessage,
    RamBlocksRequestMessage,
    RamBlocksResultMessage,
    ReadyMessage,
    Register,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    RegisterResult,
    RegisterResultMessage,
    UnregisterFinishedMessage,
    UnregisterRequestMessage,
)
from pipeline.protocol.records import (
    Configuration,
    EndOfSection,
    Eof,
    FileHeader,
    Hook,
    MemSize,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
    VmDescription,
)
from pipeline.protocol.stream import StreamReader, StreamWriter
from pipeline.session.policy import PeerPolicy
from shm.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

T = MessageType
MiB = 1 << 20
BLOCKS = (RamBlockInfo("pc.ram", 64 * MiB), RamBlockInfo("vga.vram", 256 << 10))
LENGTHS = [b.length for b in BLOCKS]


class RNR(AssertionError):
    """A SEND found no posted RECV: a real RC QP with rnr_retry 0 fails the connection."""


class Wire:
    """Both receive queues in memory: a SEND lands in the peer's oldest posted RECV."""

    def __init__(self):
        self.rq = {Role.SOURCE: deque(), Role.DESTINATION: deque()}
        self.inbox = {Role.SOURCE: deque(), Role.DESTINATION: deque()}

    def transmit(self, sender, data):
        to = sender.peer
        if not self.rq[to]:
            raise RNR(f"{sender.name} sent with no RECV posted at the {to.name}")
        self.inbox[to].append((data, self.rq[to].popleft()))


class Side:
    """One coordinator, reduced to what the channel's docstring says it does."""

    def __init__(self, wire, channel):
        self.wire, self.ch = wire, channel

    def post(self):
        self.wire.rq[self.ch.role].extend(self.ch.take_recv_posts())

    def send(self, msg):
        data = self.ch.send(msg)
        self.post()                      # RECVs first, then the SEND
        self.wire.transmit(self.ch.role, data)

    def grant(self):
        self.wire.transmit(self.ch.role, self.ch.grant())

    def recv(self):
        data, slot = self.wire.inbox[self.ch.role].popleft()
        msg = self.ch.receive(data, slot)
        self.post()
        return msg

    def pending(self):
        return len(self.wire.inbox[self.ch.role])


EVERYTHING = Capabilities(flags=KNOWN_FLAGS)


def connect(requested, supported=EVERYTHING, block_lengths=LENGTHS):
    wire = Wire()
    src = Side(wire, ControlChannel(Role.SOURCE))
    dst = Side(wire, ControlChannel(Role.DESTINATION))
    private = src.ch.initiate(requested, block_lengths=block_lengths)
    src.post()                                       # slot 0 before rdma_connect
    reply = dst.ch.accept(private, supported)
    dst.post()
    agreement = src.ch.established(reply)
    return wire, src, dst, agreement


def credit(src, dst):
    """The destination grants one message and the source takes the READY."""
    dst.grant()
    assert isinstance(src.recv(), ReadyMessage)


def send_request(src, dst, msg):
    credit(src, dst)
    src.send(msg)
    return dst.recv()


class Destination:
    """The destination's coordinator loop, driven one received message at a time."""

    def __init__(self, side, pin_all):
        self.side, self.pin_all = side, pin_all
        self.reader = StreamReader({"dev": 100_000})
        self.events, self.zeroed, self.registered = [], [], []

    def on(self, msg):
        ch = self.side.ch
        if isinstance(msg, QemuFileMessage):
            self.reader.feed(msg.data)
            for event in self.reader.events():
                self.events.append(event)
                if isinstance(event, Hook):
                    ch.begin_registration()
        elif isinstance(msg, RamBlocksRequestMessage):
            self.side.send(RamBlocksResultMessage(tuple(
                DestBlock(0x7F0000000000 + i * 0x100000000, sum(LENGTHS[:i]), length,
                          0xA000 + i if self.pin_all else 0)
                for i, length in enumerate(LENGTHS))))
        elif isinstance(msg, RegisterRequestMessage):
            self.registered.extend(msg.records)
            self.side.send(RegisterResultMessage(tuple(
                RegisterResult(0xB000 + r.current_index, 0x7F0000000000) for r in msg.records)))
        elif isinstance(msg, CompressMessage):
            self.zeroed.append(msg.compress)
        elif isinstance(msg, UnregisterRequestMessage):
            self.side.send(UnregisterFinishedMessage(msg.repeat))


def stream(src, dst, d, payloads):
    for payload in payloads:
        dst.grant()
        assert isinstance(src.recv(), ReadyMessage)
        src.send(QemuFileMessage(payload))
        d.on(dst.recv())


@pytest.mark.parametrize("pin_all", [True, False], ids=["pin-all", "dynamic"])
def test_full_migration_dialogue(pin_all):
    requested = Capabilities(flags=Capability.PIN_ALL if pin_all else 0)
    wire, src, dst, agreement = connect(requested)
    assert agreement.capabilities.pin_all is pin_all and not agreement.pin_all_declined
    d = Destination(dst, pin_all)
    w = StreamWriter()

    # ram_save_setup: header, configuration, ram START, MEM_SIZE with two blocks, HOOK.
    for event in (FileHeader(), Configuration("pc-q35-9.2"),
                  SectionHeader(SectionType.SECTION_START, 2, "ram", 0, 4), MemSize(BLOCKS)):
        w.write_event(event)
    w.hook()
    stream(src, dst, d, w.flush())
    assert src.ch.state is dst.ch.state is State.WINDOW and src.ch.windows == 1

    # SETUP window: the RAM BLOCKS exchange (slot 1 takes the reply), then REGISTER FINISHED.
    credit(src, dst)
    src.send(RamBlocksRequestMessage())
    assert src.ch.posted_recvs == (Slot.DATA, Slot.READY)
    assert src.ch.awaiting is T.RAM_BLOCKS_RESULT
    d.on(dst.recv())
    result = src.recv()
    assert [b.length for b in result.blocks] == LENGTHS
    assert all(b.remote_rkey for b in result.blocks) is pin_all
    assert src.ch.ram_blocks_exchanged and dst.ch.ram_blocks_exchanged
    d.on(send_request(src, dst, RegisterFinishedMessage()))
    assert src.ch.state is dst.ch.state is State.STREAM

    # One iteration round: EOS + footer, PART, HOOK; in the window REGISTER and COMPRESS.
    for event in (EndOfSection(), SectionFooter(2),
                  SectionHeader(SectionType.SECTION_PART, 2, "ram", 0, 4)):
        w.write_event(event)
    w.hook()
    stream(src, dst, d, w.flush())
    assert dst.ch.state is State.WINDOW and dst.ch.windows == 2
    if not pin_all:
        d.on(send_request(src, dst, RegisterRequestMessage((Register(0x123 * MiB, 0),))))
        reply = src.recv()
        assert reply.results == (RegisterResult(0xB000, 0x7F0000000000),)
        d.on(send_request(src, dst, CompressMessage(Compress(1, 64 * MiB, 256 << 10))))
        assert d.zeroed == [Compress(1, 64 * MiB, 256 << 10)]
    d.on(send_request(src, dst, RegisterFinishedMessage()))

    # The end: EOS, footer, device state larger than one QEMU FILE, EOF, VMDESCRIPTION.
    device = bytes(range(256)) * 390                  # 99840 bytes: four QEMU FILE messages
    description = b'{"page_size": 4096, "devices": []}'
    for event in (EndOfSection(), SectionFooter(2),
                  SectionHeader(SectionType.SECTION_FULL, 3, "dev", 0, 1)):
        w.write_event(event)
    w.write(device.ljust(100_000, b"\0"))
    for event in (SectionFooter(3), Eof(), VmDescription(description)):
        w.write_event(event)
    payloads = w.flush()
    assert len(payloads) == 4 and max(map(len, payloads)) == 32768
    stream(src, dst, d, payloads)
    d.reader.end_of_stream()
    state = [e for e in d.events if type(e).__name__ == "DeviceState"]
    assert state[0].data == device.ljust(100_000, b"\0")
    assert isinstance(d.events[-1], VmDescription)
    src.ch.close()
    dst.ch.close()
    assert src.ch.state is dst.ch.state is State.CLOSED
    assert wire.inbox == {Role.SOURCE: deque(), Role.DESTINATION: deque()}
    src.ch.close()                                   # idempotent


def test_pin_all_declined_falls_back_to_dynamic():
    _, src, dst, agreement = connect(Capabilities(flags=Capability.PIN_ALL),
                                     supported=Capabilities())
    assert agreement.pin_all_declined and not src.ch.capabilities.pin_all
    assert dst.ch.capabilities == src.ch.capabilities == Capabilities()


def window(multi=False, setup_done=True, pin_all=False):
    """A pair inside a registration window (the second one unless ``setup_done`` is False)."""
    flags = (Capability.MULTI_REGISTER if multi else 0) | (Capability.PIN_ALL if pin_all else 0)
    wire, src, dst, _ = connect(Capabilities(flags=flags))
    d = Destination(dst, pin_all)
    w = StreamWriter()
    w.write_event(FileHeader())
    w.write_event(SectionHeader(SectionType.SECTION_START, 2, "ram", 0, 4))
    w.write_event(MemSize(BLOCKS))
    w.hook()
    stream(src, dst, d, w.flush())
    if setup_done:
        d.on(send_request(src, dst, RamBlocksRequestMessage()))
        src.recv()
        d.on(send_request(src, dst, RegisterFinishedMessage()))
        for event in (EndOfSection(), SectionFooter(2),
                      SectionHeader(SectionType.SECTION_PART, 2, "ram", 0, 4)):
            w.write_event(event)
        w.hook()
        stream(src, dst, d, w.flush())
    return wire, src, dst, d


def test_multi_register_needs_the_extension_and_one_result_per_record():
    records = (Register(0, 0), Register(MiB, 0), Register(0, 1))
    _, src, dst, d = window(multi=False)
    credit(src, dst)
    with pytest.raises(LocalProtocolError, match="MULTI_REGISTER"):
        src.send(RegisterRequestMessage(records))
    assert src.ch.state is State.ERROR

    _, src, dst, d = window(multi=True)
    d.on(send_request(src, dst, RegisterRequestMessage(records)))
    assert [r.rkey for r in src.recv().results] == [0xB000, 0xB000, 0xB001]

    # A QEMU-shaped reply (one result, repeat 3) to a multi-record request is refused.
    _, src, dst, d = window(multi=True)
    send_request(src, dst, RegisterRequestMessage(records))
    qemu_style = encode(RegisterResultMessage((RegisterResult(1, 2),), 3))
    with pytest.raises(RemoteProtocolError, match="1 results for 3 records"):
        src.ch.receive(qemu_style, Slot.DATA)
    with pytest.raises(LocalProtocolError, match="1 results for 3 records"):
        dst.ch.send(RegisterResultMessage((RegisterResult(1, 2),), 3))


def test_unregister_round_trip_and_repeat_echo():
    _, src, dst, d = window()
    d.on(send_request(src, dst, UnregisterRequestMessage((Register(0x123, 0),) * 2)))
    assert src.recv() == UnregisterFinishedMessage(2)
    src_bad, dst_bad = window()[1:3]
    send_request(src_bad, dst_bad, UnregisterRequestMessage((Register(0x123, 0),) * 2))
    with pytest.raises(RemoteProtocolError, match="repeat 1: must echo the request's 2"):
        src_bad.ch.receive(encode(UnregisterFinishedMessage(1)))


@pytest.mark.parametrize("blocks, words", [
    ((DestBlock(1, 0, 64 * MiB),), ["1 blocks, the source has 2", "mismatch"]),
    ((DestBlock(1, 0, 64 * MiB), DestBlock(2, 0, 4096)), ["block 1 length 4096", "262144"]),
])
def test_ram_blocks_result_must_match_our_blocks(blocks, words):
    _, src, dst, d = window(setup_done=False)
    send_request(src, dst, RamBlocksRequestMessage())
    dst.send(RamBlocksResultMessage(blocks))        # the destination cannot know our lengths
    with pytest.raises(RemoteProtocolError) as info:
        src.recv()
    for word in words:
        assert word in str(info.value)
    assert src.ch.state is State.ERROR


def test_pin_all_needs_rkeys():
    _, src, dst, _ = window(setup_done=False, pin_all=True)
    send_request(src, dst, RamBlocksRequestMessage())
    zero = RamBlocksResultMessage(tuple(DestBlock(1, 0, n) for n in LENGTHS))
    with pytest.raises(LocalProtocolError, match="block 0 remote_rkey 0 with rdma-pin-all"):
        dst.ch.send(zero)
    with pytest.raises(RemoteProtocolError, match="remote_rkey 0"):
        src.ch.receive(encode(zero), Slot.DATA)


def test_error_from_the_source_while_the_destination_waits():
    wire, src, dst, d = window()
    dst.grant()
    src.recv()
    error = src.ch.abort()
    assert error == encode(ErrorMessage()) and src.ch.abort() is None   # sent once
    wire.transmit(Role.SOURCE, error)
    assert isinstance(dst.recv(), ErrorMessage)
    assert dst.ch.state is State.ERROR and dst.ch.received_error
    assert dst.ch.abort() is None                      # never answer an ERROR with one
    for ch in (src.ch, dst.ch):
        with pytest.raises(LocalProtocolError, match="state ERROR"):
            ch.send(QemuFileMessage(b""))
        with pytest.raises(LocalProtocolError, match="state ERROR"):
            ch.receive(encode(ReadyMessage()))
        ch.close()                                     # a no-op, not an error
        assert ch.state is State.ERROR


@pytest.mark.parametrize("ours", [True, False], ids=["our peer", "QEMU's"])
def test_an_error_says_why_only_to_a_peer_of_ours(ours):
    """QEMU's ERROR is empty; with RAM_DIGEST agreed (both ends ours) it carries the reason."""
    if ours:
        wire, src, dst, _ = connect(PeerPolicy.request(pin_all=False, chunk_size=1 << 20),
                                    PeerPolicy.supported(chunk_size=1 << 20, session_token=1))
    else:
        wire, src, dst, _ = connect(Capabilities())
    out = dst.ch.abort("cannot pin 16.0 MiB")
    assert out == encode(ErrorMessage("cannot pin 16.0 MiB" if ours else ""))
    wire.transmit(Role.DESTINATION, out)
    data, slot = wire.inbox[Role.SOURCE].popleft()
    msg = src.ch.receive(data, slot)
    assert msg == ErrorMessage("cannot pin 16.0 MiB" if ours else "")
    assert str(src.ch.error).endswith("sent ERROR: cannot pin 16.0 MiB" if ours else "sent ERROR")


def test_error_from_the_destination_lands_in_the_reply_slot():
    wire, src, dst, d = window()
    send_request(src, dst, RegisterRequestMessage((Register(0, 0),)))
    wire.transmit(Role.DESTINATION, dst.ch.abort())   # e.g. ibv_reg_mr failed
    data, slot = wire.inbox[Role.SOURCE].popleft()
    assert slot is Slot.DATA
    assert isinstance(src.ch.receive(data, slot), ErrorMessage)
    assert src.ch.state is State.ERROR and src.ch.abort() is None


def test_a_peer_protocol_error_sticks():
    wire, src, dst, d = window()
    dst.grant()
    src.recv()
    with pytest.raises(RemoteProtocolError, match="header len 5"):
        dst.ch.receive(encode(QemuFileMessage(b"abcde"))[:-1])      # a short message
    assert dst.ch.state is State.ERROR
    with pytest.raises(LocalProtocolError, match="first error: .*header len"):
        dst.ch.grant()
    assert dst.ch.abort() == encode(ErrorMessage())


def test_recv_posts_discipline():
    ch = ControlChannel(Role.SOURCE)
    ch.initiate(Capabilities())
    with pytest.raises(LocalProtocolError, match="take_recv_posts"):
        ch.established(Capabilities().encode())
    ch = ControlChannel(Role.DESTINATION, capabilities=Capabilities())
    with pytest.raises(LocalProtocolError, match="take_recv_posts"):
        ch.grant()
    assert ch.state is State.ERROR                     # misuse is sticky too
    ch = ControlChannel(Role.DESTINATION, capabilities=Capabilities())
    assert ch.take_recv_posts() == (Slot.READY,) and ch.take_recv_posts() == ()
    ch.grant()
    with pytest.raises(LocalProtocolError, match="slot DATA but the oldest posted RECV is "
                                                 "slot READY"):
        ch.receive(encode(QemuFileMessage(b"x")), Slot.DATA)


def test_a_message_with_no_recv_posted_is_an_rnr():
    _, src, dst, _ = connect(Capabilities())
    credit(src, dst)                                    # the source's slot 0 is consumed
    assert src.ch.posted_recvs == ()
    with pytest.raises(RemoteProtocolError, match="no RECV posted"):
        src.ch.receive(encode(ReadyMessage()))


def test_misuse_of_roles_and_handshake():
    src = ControlChannel(Role.SOURCE)
    with pytest.raises(LocalProtocolError, match="capabilities are not exchanged"):
        src.send(QemuFileMessage(b""))
    assert src.abort() is None                          # never connected: no ERROR to send
    dst = ControlChannel(Role.DESTINATION)
    with pytest.raises(LocalProtocolError, match="for the SOURCE"):
        dst.initiate(Capabilities())
    dst = ControlChannel(Role.DESTINATION)
    with pytest.raises(RemoteProtocolError, match="version 2"):
        dst.accept(Capabilities(version=2).encode(), Capabilities())
    assert dst.state is State.ERROR
    with pytest.raises(TypeError):
        ControlChannel("SOURCE")
    with pytest.raises(TypeError):
        ControlChannel(Role.SOURCE, capabilities=Capabilities()).send(b"bytes")


def test_close_inside_a_window_is_refused():
    _, src, dst, _ = window()
    with pytest.raises(LocalProtocolError, match="abort\\(\\) instead"):
        src.ch.close()
    assert src.ch.state is State.ERROR


def test_a_payload_ending_like_a_hook_does_not_open_the_destinations_window():
    # QEMU may, by chance, end a payload with those 8 bytes inside device state: only the
    # destination's parser can tell, so its window opens on begin_registration().
    _, src, dst, _ = connect(Capabilities())
    dst.grant()
    src.recv()
    src.ch._state = State.STREAM                    # pretend a QEMU source (no HOOK rule)
    dst.ch.receive(encode(QemuFileMessage(bytes(7) + b"\x80")))
    dst.post()
    assert dst.ch.state is State.STREAM
    dst.ch.grant()                                  # the stream simply goes on
    with pytest.raises(LocalProtocolError, match="must come in the QEMU FILE just received"):
        dst.ch.begin_registration()


# -- every out-of-order message, refused by the sender and by the receiver -------------------

SAMPLES = {
    T.QEMU_FILE: QemuFileMessage(b"\x02\x00\x00\x00\x02"),
    T.COMPRESS: CompressMessage(Compress(0, 0, MiB)),
    T.REGISTER_REQUEST: RegisterRequestMessage((Register(0, 0),)),
    T.UNREGISTER_REQUEST: UnregisterRequestMessage((Register(0, 0),)),
    T.RAM_BLOCKS_REQUEST: RamBlocksRequestMessage(),
    T.REGISTER_FINISHED: RegisterFinishedMessage(),
    T.REGISTER_RESULT: RegisterResultMessage((RegisterResult(1, 0x1000),)),
    T.RAM_BLOCKS_RESULT: RamBlocksResultMessage(tuple(DestBlock(1, 0, n) for n in LENGTHS)),
    T.UNREGISTER_FINISHED: UnregisterFinishedMessage(1),
    T.READY: ReadyMessage(),
}
SOURCE_SENDS = {T.QEMU_FILE, T.COMPRESS, T.REGISTER_REQUEST, T.UNREGISTER_REQUEST,
                T.RAM_BLOCKS_REQUEST, T.REGISTER_FINISHED}


def stream_with_credit():
    _, src, dst, _ = connect(Capabilities())
    credit(src, dst)
    return src, dst


def stream_without_credit():
    _, src, dst, _ = connect(Capabilities())
    return src, dst


def setup_window_with_credit():
    _, src, dst, _ = window(setup_done=False)
    credit(src, dst)
    return src, dst


def round_window_with_credit():
    _, src, dst, _ = window()
    credit(src, dst)
    return src, dst


def awaiting(request):
    def build():
        _, src, dst, _ = window(setup_done=request is not T.RAM_BLOCKS_REQUEST)
        send_request(src, dst, SAMPLES[request])
        return src, dst
    return build


# scenario -> (builder, what may be sent now: by the source, by the destination)
SCENARIOS = {
    "stream": (stream_with_credit, {T.QEMU_FILE}, set()),
    "stream, no credit": (stream_without_credit, set(), {T.READY}),
    "setup window": (setup_window_with_credit, {T.RAM_BLOCKS_REQUEST}, set()),
    "round window": (round_window_with_credit,
                     {T.COMPRESS, T.REGISTER_REQUEST, T.UNREGISTER_REQUEST,
                      T.REGISTER_FINISHED}, set()),
    "awaiting REGISTER RESULT": (awaiting(T.REGISTER_REQUEST), set(), {T.REGISTER_RESULT}),
    "awaiting RAM BLOCKS RESULT": (awaiting(T.RAM_BLOCKS_REQUEST), set(),
                                   {T.RAM_BLOCKS_RESULT}),
    "awaiting UNREGISTER FINISHED": (awaiting(T.UNREGISTER_REQUEST), set(),
                                     {T.UNREGISTER_FINISHED}),
}
CASES = [(s, t) for s in SCENARIOS for t in SAMPLES]


@pytest.mark.parametrize("scenario, mtype", CASES, ids=[f"{s}-{t.name}" for s, t in CASES])
def test_every_message_in_every_state(scenario, mtype):
    build, by_source, by_destination = SCENARIOS[scenario]
    src, dst = build()
    assert src.ch.sendable == by_source
    assert dst.ch.sendable == by_destination - {T.READY}
    sender, receiver = (src, dst) if mtype in SOURCE_SENDS else (dst, src)
    allowed = mtype in (by_source if sender is src else by_destination)
    msg = SAMPLES[mtype]
    if allowed:
        sender.grant() if mtype is T.READY else sender.send(msg)
        assert type(receiver.recv()) is type(msg)
        return
    data = encode(msg)
    with pytest.raises(LocalProtocolError) as info:
        sender.ch.grant() if mtype is T.READY else sender.ch.send(msg)
    assert sender.ch.role.name in str(info.value)
    assert sender.ch.state is State.ERROR
    # The peer, given the same bytes anyway, refuses them too (or has no RECV for them).
    if receiver.ch.posted_recvs:
        with pytest.raises(RemoteProtocolError):
            receiver.ch.receive(data)
        assert receiver.ch.state is State.ERROR
    with pytest.raises(ProtocolError):
        receiver.ch.receive(data)


def test_refusals_name_event_role_and_state():
    src, dst = round_window_with_credit()
    with pytest.raises(LocalProtocolError) as info:
        src.ch.send(QemuFileMessage(b"x"))
    assert str(info.value) == ("SOURCE cannot send QEMU_FILE in state WINDOW: no QEMU FILE may "
                               "pass between the HOOK and REGISTER FINISHED")
    src, dst = stream_with_credit()
    with pytest.raises(LocalProtocolError, match="DESTINATION cannot grant READY in state "
                                                 "STREAM: a READY is already outstanding"):
        dst.ch.grant()


def test_a_second_ready_and_ready_before_the_reply_are_refused():
    _, src, dst, _ = connect(Capabilities())
    credit(src, dst)
    src.ch.take_recv_posts()
    src.ch._rq.append(Slot.READY)                  # as if slot 0 had been re-posted
    with pytest.raises(RemoteProtocolError, match="already outstanding"):
        src.ch.receive(encode(ReadyMessage()))
    src, dst = awaiting(T.REGISTER_REQUEST)()
    with pytest.raises(RemoteProtocolError, match="answered before the next READY"):
        src.ch.receive(encode(ReadyMessage()), Slot.DATA)


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_a_hook_split_over_two_qemu_file_messages_opens_the_window(cut):
    # QEMU's source fills its 32 KiB buffer and may send the HOOK's 8 bytes in two QEMU FILE
    # messages: the window opens on the parser's HOOK event, after the second.
    ch = ControlChannel(Role.DESTINATION)
    ch.accept(Capabilities(flags=1).encode(), Capabilities(flags=1))
    ch.take_recv_posts()
    reader = StreamReader({})
    w = StreamWriter()
    for event in (FileHeader(), Configuration("none"),
                  SectionHeader(SectionType.SECTION_START, 2, "ram", 0, 4), MemSize(BLOCKS)):
        w.write_event(event)
    w.hook()
    data = b"".join(w.flush())
    hooks = 0
    for payload in (data[:len(data) - 8 + cut], data[len(data) - 8 + cut:]):
        ch.grant()
        ch.receive(encode(QemuFileMessage(payload)), Slot.READY)
        ch.take_recv_posts()
        reader.feed(payload)
        for event in reader.events():
            if isinstance(event, Hook):
                hooks += 1
                ch.begin_registration()
    assert hooks == 1 and ch.state is State.WINDOW and ch.windows == 1
    ch.grant()
    assert isinstance(ch.receive(encode(RamBlocksRequestMessage()), Slot.READY),
                      RamBlocksRequestMessage)
