"""Scripted sources for the destination drivers' tests: a whole migration of RAM that stays
zero, sent from a thread of the test process, with no stage process.

``rdma_source`` speaks the control channel as our source does (setup window with RAM BLOCKS,
one round that registers a chunk, COMPRESSes a range and unregisters the chunk, connects a
data QP, names the round's pages, then the final round, the guest's state, the digest, EOF,
waits for the READY that confirms, and commits). ``tcp_source`` sends the same over a socket
with the pages inline, waits for SHUT and sends the commit token. Both give up quietly when
the destination fails; each returns a ``Scripted`` thread whose ``error`` says how it ended.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np

from pipeline.control import ControlLink
from pipeline.protocol.capabilities import DataConnect
from pipeline.protocol.channel import Role
from pipeline.protocol.messages import (
    CommitMessage,
    Compress,
    CompressMessage,
    RamBlocksRequestMessage,
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
    Page,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
    ZeroPage,
)
from pipeline.protocol.return_path import COMMIT_TOKEN, SHUT_OK, shut
from pipeline.protocol.stream import StreamWriter
from pipeline.section_writer import DeviceSections, write_header
from pipeline.sections import RAM_SID, ROUND_SECTION, ROUND_SID
from pipeline.sections import SYNTHETIC_SECTION as DEVICE_SECTION
from pipeline.session.policy import PeerPolicy
from stages.pagehash import pack_round, table_digests

MIB = 1 << 20
BLOCKS = (("pc.ram", 2 * MIB), ("vga.vram", 256 * 1024))
GUEST_STATE = json.dumps({"pages_written": 0}).encode()
TIMEOUT_S = 5.0


def zero_digest(chunk_size: int = MIB) -> bytes:
    return table_digests([np.zeros(n // 4096, np.uint64) for _, n in BLOCKS],
                         chunk_size // 4096)


class Scripted(threading.Thread):
    def __init__(self, script, *args) -> None:
        super().__init__(daemon=True, name="scripted-source")
        self.script, self.args = script, args
        self.error: BaseException | None = None
        self.confirmed = False
        self.stop = threading.Event()        # the test is done with it: give up

    def check(self) -> None:
        if self.stop.is_set():
            raise TimeoutError("the test stopped the source")

    def run(self) -> None:
        try:
            self.script(self, *self.args)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc


def _ram_start(w: StreamWriter) -> None:
    write_header(w)
    w.write_event(SectionHeader(SectionType.SECTION_START, RAM_SID, RAM_IDSTR, 0, RAM_VERSION))
    w.write_event(MemSize(tuple(RamBlockInfo(n, x) for n, x in BLOCKS)))


def _end_section(w: StreamWriter) -> None:
    w.write_event(EndOfSection())
    w.write_event(SectionFooter(RAM_SID))


def _end(w: StreamWriter, digest: bytes, sections: DeviceSections | None = None) -> None:
    """The guest, the RAM digest and the device digest (over ``sections`` written before,
    as our source keeps them), EOF and VMDESCRIPTION."""
    sections = sections or DeviceSections()
    sections.guest(w, DEVICE_SECTION, GUEST_STATE)
    sections.digest(w, digest)
    sections.device_digest(w)
    sections.end(w)


def _connect(self: Scripted, ctx, qp, port: int, private: bytes) -> bytes:
    """Connect once the destination listens."""
    from shm.errors import TransportError

    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return ctx.connect(qp, "127.0.0.1", port, private, timeout=TIMEOUT_S)
        except TransportError:
            self.check()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _rdma(self: Scripted, port: int) -> None:
    from stages.verbs import open_provider

    ctx = open_provider("soft").open_device()
    try:
        pd = ctx.alloc_pd()
        link = ControlLink(ctx, pd, Role.SOURCE, timeout=TIMEOUT_S, check=self.check)
        ch = link.channel
        private = ch.initiate(PeerPolicy.request(pin_all=False, chunk_size=MIB),
                              block_lengths=[n for _, n in BLOCKS])
        link.post_recvs()
        caps = ch.established(_connect(self, ctx, link.qp, port, private)).capabilities
        w = StreamWriter()
        _ram_start(w)
        w.hook()
        link.send_stream(w.flush())
        dest = link.request(RamBlocksRequestMessage()).blocks
        link.send(RegisterFinishedMessage())
        _end_section(w)
        cq = ctx.create_cq(4)
        qp = pd.create_qp(cq, cq, max_send_wr=1, max_recv_wr=1)
        ctx.connect(qp, "127.0.0.1", port, DataConnect(caps.session_token, 0).encode(),
                    timeout=TIMEOUT_S)
        w.write_event(SectionHeader(SectionType.SECTION_PART, RAM_SID, RAM_IDSTR))
        w.hook()
        link.send_stream(w.flush())
        link.request(RegisterRequestMessage((Register(dest[0].offset + MIB, 0),)))
        link.send(CompressMessage(Compress(1, dest[1].offset, 8192)))
        link.request(UnregisterRequestMessage((Register(1, 0),)))
        link.send(RegisterFinishedMessage())
        _end_section(w)
        body = pack_round([np.zeros(-(-n // 4096 // 8), np.uint8) for _, n in BLOCKS])
        sections = DeviceSections()
        sections.write(w, ROUND_SID, ROUND_SECTION, "pages", body, instance_id=1)
        link.send_stream(w.flush())                 # alone: its READY waits for the hashes
        w.write_event(SectionHeader(SectionType.SECTION_END, RAM_SID, RAM_IDSTR))
        w.hook()
        link.send_stream(w.flush())
        link.send(RegisterFinishedMessage())
        _end_section(w)
        _end(w, zero_digest(), sections)
        link.send_stream(w.flush())
        link.wait_credit(TIMEOUT_S * 4)               # the READY after EOF: confirmed
        self.confirmed = True
        link.send(CommitMessage())                     # committed: the guest may run there
        self.stop.wait(TIMEOUT_S)        # the destination's send of that READY completes
        qp.disconnect()
    finally:
        try:
            ctx.close()
        except Exception:  # noqa: BLE001
            pass


def rdma_source(port: int) -> Scripted:
    return Scripted(_rdma, port)


def _tcp(self: Scripted, port: int) -> None:
    w = StreamWriter()
    _ram_start(w)
    _end_section(w)
    w.write_event(SectionHeader(SectionType.SECTION_PART, RAM_SID, RAM_IDSTR))
    for i in range(4):
        w.write_event(ZeroPage("pc.ram", i * 4096, 0, i > 0))
    w.write_event(Page("vga.vram", 0, bytes(4096)))
    _end_section(w)
    w.write_event(SectionHeader(SectionType.SECTION_END, RAM_SID, RAM_IDSTR))
    _end_section(w)
    _end(w, zero_digest())
    data = b"".join(w.flush())
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
            break
        except OSError:
            self.check()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with sock:
        sock.sendall(data)
        answer = sock.recv(64)
        self.confirmed = answer == shut(SHUT_OK)
        if self.confirmed:
            sock.sendall(COMMIT_TOKEN)
            self.stop.wait(TIMEOUT_S)    # the destination reads the token before the close


def tcp_source(port: int) -> Scripted:
    return Scripted(_tcp, port)
