"""A replay of QEMU's rdma: source as migration/rdma.c behaves, for the destination's tests.

No code of ours speaks for it: its control channel is QEMU's ``exchange_send`` /
``exchange_recv`` written out over a soft-provider QP (three 512 KiB slots, slot 0 posted
before connecting, a READY awaited before every message but the first's, every SEND
signaled and waited for), and its stream is a QEMUFile: a 32 KiB buffer that goes out as a
QEMU FILE message when it fills, mid-record if so, and on each flush. What it does:

- connects with 8 bytes of private data, version 1 and no flag, then (``return_path``: the
  return-path capability) opens the second connection of its return path and grants READY on
  it at once, as QEMU's return-path thread does when it starts reading;
- header, configuration ``none``, MIG_CMD_OPEN_RETURN_PATH, a device section padded so that
  the SETUP HOOK's 8 bytes fall over the 32 KiB boundary (two QEMU FILE messages), ram START
  and MEM_SIZE;
- SETUP window: RAM BLOCKS, REGISTER FINISHED; a round: REGISTER (one record, repeat 1, the
  address translated into the destination's ram_addr space, padding left as garbage), RDMA
  WRITEs on the one QP (every one signaled), COMPRESS for a zero chunk never registered,
  UNREGISTER of a chunk (its number passed through the translation, as QEMU does) and the
  same chunk registered and written again; FINISH window; EOS, QEMU's ``-M none`` device
  sections (``timer``, ``globalstate``: no codec of ours reads them, the VMDESCRIPTION does),
  EOF, VMDESCRIPTION;
- no READY is expected after EOF: it waits for SHUT on its return path, then disconnects
  (without a return path it disconnects as soon as its last message is sent).

``RAM`` is what the source's RAM holds at the end: the destination's must equal it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
import threading
import time

import numpy as np

from pipeline.protocol.codec import decode, encode
from pipeline.protocol.messages import (
    CONTROL_MAX_BUFFER,
    Compress,
    CompressMessage,
    MessageType,
    QemuFileMessage,
    RamBlocksRequestMessage,
    ReadyMessage,
    Register,
    RegisterFinishedMessage,
    RegisterRequestMessage,
    UnregisterRequestMessage,
)
from pipeline.protocol.records import (
    HOOK_RECORD,
    RAM_IDSTR,
    RAM_VERSION,
    Command,
    Configuration,
    DeviceState,
    EndOfSection,
    Eof,
    FileHeader,
    MemSize,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
    VmDescription,
    encode_event,
)
from pipeline.protocol.return_path import ReturnPathReader
from pipeline.section_writer import DeviceSections
from pipeline.sections import SYNTHETIC_SECTION as DEVICE_SECTION
from stages.verbs.base import Access, SendOpcode

MIB = 1 << 20
BLOCKS = (("pc.ram", 2 * MIB), ("vga.vram", 256 * 1024))
OFFSETS = (0, 2 * MIB)                   # the source's ram_addr offsets
IO_BUF_SIZE = 32768
MIG_CMD_OPEN_RETURN_PATH = 1
QEMU_CAPS = struct.pack(">II", 1, 0)      # RDMACapabilities: version 1, no flag
WRID_SEND, WRID_RECV, WRID_WRITE = 2000, 4000, 1
TIMEOUT_S = 10.0
HOOK_CUT = 3                             # HOOK bytes in the first of the two messages


# What QEMU's -M none saves after RAM: two device sections, read by the VMDESCRIPTION alone
# (this destination has no codec for either).
DEVICES = (
    {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
     "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8},
                {"name": "unused", "type": "buffer", "size": 8}]},
    {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1,
     "fields": [{"name": "size", "type": "uint32", "size": 4},
                {"name": "runstate", "type": "buffer", "size": 100}]},
)
RUNSTATE = b"running".ljust(100, b"\0")


def machine_none_devices() -> list:
    bodies = (struct.pack(">q", 123456789) + bytes(8), struct.pack(">I", 8) + RUNSTATE)
    out = []
    for sid, (dev, body) in enumerate(zip(DEVICES, bodies, strict=True), start=3):
        out += [SectionHeader(SectionType.SECTION_FULL, sid, dev["name"], 0, dev["version"]),
                DeviceState(sid, dev["name"], body), SectionFooter(sid)]
    return out


def ram() -> dict[str, np.ndarray]:
    """The source's RAM at the end of the replay."""
    rng = np.random.default_rng(14)
    pc = np.zeros(BLOCKS[0][1], np.uint8)
    pc[:MIB] = rng.integers(1, 256, MIB, dtype=np.uint8)     # chunk 1 stays zero: COMPRESS
    pc[5 * 4096:6 * 4096] = 7                                # dirtied again in round 2
    vga = rng.integers(0, 256, BLOCKS[1][1], dtype=np.uint8)
    return {"pc.ram": pc, "vga.vram": vga}


class Slots:
    """One RDMAContext's QP, CQs and three control slots (``RDMA_WRID_READY/DATA/CONTROL``)."""

    def __init__(self, ctx, pd) -> None:
        self.mem = mmap.mmap(-1, 3 * CONTROL_MAX_BUFFER)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.addr = [base + i * CONTROL_MAX_BUFFER for i in range(3)]
        self.mr = pd.reg_mr(base, 3 * CONTROL_MAX_BUFFER, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        self.send_cq, self.recv_cq = ctx.create_cq(1536), ctx.create_cq(1536)
        self.qp = pd.create_qp(self.send_cq, self.recv_cq, max_send_wr=512, max_recv_wr=3)
        self.ready_expected = False
        self.writes_in_flight = 0
        self.sent: list[bytes] = []          # every control message, as sent

    def post(self, slot: int) -> None:
        self.qp.post_recv(WRID_RECV + slot, self.addr[slot], CONTROL_MAX_BUFFER, self.mr.lkey)

    def _poll(self, cq, want):
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for wc in cq.poll(1):      # one at a time: the rest stay for the next wait
                if not wc.ok:
                    raise ConnectionError(f"completion {wc.wr_id} failed: {wc.status.name}")
                if (wc.wr_id & 0xFFFF) == WRID_WRITE:
                    self.writes_in_flight -= 1       # qemu_rdma_poll: a write completed
                    if want is None and not self.writes_in_flight:
                        return wc
                    continue
                if want is not None and want(wc):
                    return wc
            if want is None and not self.writes_in_flight:
                return None
            if time.monotonic() > deadline:
                raise TimeoutError("no completion")
            cq.wait(0.1)

    def recv(self, slot: int):
        wc = self._poll(self.recv_cq, lambda wc: wc.wr_id == WRID_RECV + slot)
        start = slot * CONTROL_MAX_BUFFER
        return decode(self.mem[start:start + wc.byte_len])

    def transmit(self, data: bytes) -> None:
        start = 2 * CONTROL_MAX_BUFFER
        self.mem[start:start + len(data)] = data
        self.qp.post_send(WRID_SEND, SendOpcode.SEND, self.addr[2], len(data), self.mr.lkey)
        self.sent.append(bytes(data))
        self._poll(self.send_cq, lambda wc: wc.wr_id == WRID_SEND)

    def exchange_send(self, data: bytes, reply: bool = False):
        """QEMU's exchange_send: READY first, the reply's RECV and slot 0 again, the SEND,
        then the reply from slot 1."""
        if self.ready_expected:
            msg = self.recv(0)
            assert isinstance(msg, ReadyMessage), msg
        if reply:
            self.post(1)
        self.post(0)
        self.transmit(data)
        self.ready_expected = True
        return self.recv(1) if reply else None

    def exchange_recv(self):
        """QEMU's exchange_recv: READY, then the next message in slot 0 (re-posted)."""
        self.transmit(encode(ReadyMessage()))
        msg = self.recv(0)
        self.post(0)
        return msg

    def drain(self) -> None:
        self._poll(self.send_cq, None)

    def close(self) -> None:
        for step in (self.qp.disconnect, self.qp.close, self.mr.close, self.send_cq.close,
                     self.recv_cq.close):
            try:
                step()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass


class QemuFile:
    """QEMUFile's write side over rdma: a 32 KiB buffer, sent when full and on flush."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.buf = bytearray()
        self.messages: list[bytes] = []      # every QEMU FILE payload sent

    def put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), IO_BUF_SIZE - len(self.buf))
            self.buf += view[:n]
            view = view[n:]
            if len(self.buf) == IO_BUF_SIZE:
                self.flush()

    def event(self, *events) -> None:
        for e in events:
            self.put(encode_event(e))

    def flush(self) -> None:
        if self.buf:
            payload, self.buf = bytes(self.buf), bytearray()
            self.messages.append(payload)
            self.slots.exchange_send(encode(QemuFileMessage(payload)))


class QemuRdmaSource(threading.Thread):
    """The replay, in a thread; ``error`` says how it ended, ``shut`` what the return path
    said (0: completed)."""

    def __init__(self, port: int, *, return_path: bool = True) -> None:
        super().__init__(daemon=True, name="scripted-source")
        self.port = port
        self.return_path = return_path
        self.error: BaseException | None = None
        self.shut: int | None = None
        self.replies: list = []
        self.main: Slots | None = None
        self.file: QemuFile | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc

    def _connect(self, ctx, slots: Slots) -> bytes:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                return ctx.connect(slots.qp, "127.0.0.1", self.port, QEMU_CAPS, timeout=TIMEOUT_S)
            except Exception:
                if self.stop.is_set() or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _run(self) -> None:
        from stages.verbs import open_provider

        ctx = open_provider("soft").open_device()
        src = ram()
        try:
            pd = ctx.alloc_pd()
            main = self.main = Slots(ctx, pd)
            main.post(0)                                   # before rdma_connect
            reply = self._connect(ctx, main)
            assert struct.unpack_from(">II", reply) == (1, 0), reply.hex()
            main.ready_expected = True                     # the destination's READY first
            rp = None
            if self.return_path:
                rp = Slots(ctx, pd)                        # the return path's connection
                rp.post(0)
                self._connect(ctx, rp)
                rp.transmit(encode(ReadyMessage()))        # its reader starts at once
            local = {name: self._local(pd, data) for name, data in src.items()}
            f = self.file = QemuFile(main)
            self._setup(f, main)
            self._round(f, main, src, local)
            f.event(SectionHeader(SectionType.SECTION_END, 2, RAM_IDSTR))
            self._window(f, main)
            f.event(EndOfSection(), SectionFooter(2), *machine_none_devices(), Eof(),
                    VmDescription(json.dumps({"page_size": 4096,
                                              "devices": list(DEVICES)}).encode()))
            f.flush()
            if rp is not None:
                msg = rp.recv(0)                           # QEMU's destination: SHUT
                rp.post(0)
                reader = ReturnPathReader()
                reader.feed(msg.data)
                self.shut = reader.next_message().shut_status
                self.stop.wait(TIMEOUT_S)                  # until the test has looked
            # Without a return path QEMU's source is done: it disconnects at once.
            for slots in (rp, main):
                if slots is not None:
                    slots.close()
            for mr, _ in local.values():
                mr.close()
        finally:
            try:
                ctx.close()
            except Exception:  # noqa: BLE001
                pass

    @staticmethod
    def _local(pd, data: np.ndarray):
        addr = data.ctypes.data
        return pd.reg_mr(addr, len(data), Access.LOCAL_WRITE), addr

    def _setup(self, f: QemuFile, main: Slots) -> None:
        head = b"".join(encode_event(e) for e in (
            FileHeader(), Configuration("none"), Command(MIG_CMD_OPEN_RETURN_PATH)))
        ram_start = b"".join(encode_event(e) for e in (
            SectionHeader(SectionType.SECTION_START, 2, RAM_IDSTR, 0, RAM_VERSION),
            MemSize(tuple(RamBlockInfo(n, x) for n, x in BLOCKS))))
        state = json.dumps({"pages_written": 0}).encode()
        base = len(head) + len(self._device(state)) + len(ram_start)
        pad = IO_BUF_SIZE - HOOK_CUT - base             # the HOOK straddles the boundary
        f.put(head + self._device(state + b" " * pad) + ram_start)
        assert len(f.buf) == IO_BUF_SIZE - HOOK_CUT
        f.put(HOOK_RECORD)                               # registration_start(SETUP)
        f.flush()
        assert f.messages[-2].endswith(HOOK_RECORD[:HOOK_CUT])
        assert f.messages[-1] == HOOK_RECORD[HOOK_CUT:]
        self.dest = main.exchange_send(encode(RamBlocksRequestMessage()), reply=True).blocks
        main.exchange_send(encode(RegisterFinishedMessage()))
        f.event(EndOfSection(), SectionFooter(2))

    @staticmethod
    def _device(state: bytes) -> bytes:
        class Sink:
            def __init__(self):
                self.out = b""

            def write_event(self, e):
                self.out += encode_event(e)

        sink = Sink()
        DeviceSections().guest(sink, DEVICE_SECTION, state)
        return sink.out

    def _window(self, f: QemuFile, main: Slots) -> None:
        f.put(HOOK_RECORD)
        f.flush()
        main.drain()
        main.exchange_send(encode(RegisterFinishedMessage()))

    def _translate(self, block: int, src_addr: int) -> int:
        return src_addr - OFFSETS[block] + self.dest[block].offset

    def _register(self, main: Slots, block: int, chunk: int) -> tuple[int, int]:
        """REGISTER REQUEST as qemu_rdma_write_one sends it: one record, repeat 1, the
        chunk's first address translated, chunks 0, the padding left as garbage."""
        rec = Register(self._translate(block, OFFSETS[block] + chunk * MIB), block, 0)
        data = bytearray(encode(RegisterRequestMessage((rec,))))
        data[16 + 12:16 + 16] = b"\xde\xad\xbe\xef"
        result = main.exchange_send(bytes(data), reply=True)
        assert result.repeat == 1 and len(result.results) == 1, result
        self.replies.append(result)
        return result.results[0].rkey, result.results[0].host_addr

    def _write(self, main: Slots, local, block: int, name: str, start: int, length: int,
               key: tuple[int, int]) -> None:
        rkey, base = key
        mr, addr = local[name]
        chunk = start // MIB
        wr_id = WRID_WRITE | block << 16 | chunk << 30
        main.qp.post_send(wr_id, SendOpcode.RDMA_WRITE, addr + start, length, mr.lkey,
                          remote_addr=base + start, rkey=rkey, signaled=True)
        main.writes_in_flight += 1

    def _round(self, f: QemuFile, main: Slots, src, local) -> None:
        f.event(SectionHeader(SectionType.SECTION_PART, 2, RAM_IDSTR))
        f.put(HOOK_RECORD)                                 # registration_start(ROUND)
        f.flush()
        pc = self._register(main, 0, 0)
        self._write(main, local, 0, "pc.ram", 0, MIB, pc)
        # pc.ram chunk 1: zero and never registered: COMPRESS, no write.
        main.exchange_send(encode(CompressMessage(Compress(
            0, self._translate(0, OFFSETS[0] + MIB), MIB))))
        vga = self._register(main, 1, 0)
        self._write(main, local, 1, "vga.vram", 0, 64 * 1024, vga)
        main.drain()
        # UNREGISTER of vga.vram chunk 0, its chunk number through the translation.
        rec = Register(self._translate(1, 0), 1, 0)
        reply = main.exchange_send(encode(UnregisterRequestMessage((rec,))), reply=True)
        assert reply.TYPE is MessageType.UNREGISTER_FINISHED and reply.repeat == 1
        self.unregistered = True
        vga = self._register(main, 1, 0)                   # remote_keys[] cleared: again
        self._write(main, local, 1, "vga.vram", 0, BLOCKS[1][1], vga)
        self._write(main, local, 0, "pc.ram", 5 * 4096, 4096, pc)    # cached rkey
        main.drain()
        main.exchange_send(encode(RegisterFinishedMessage()))
        f.event(EndOfSection(), SectionFooter(2))
