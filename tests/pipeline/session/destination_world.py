"""A DestinationSession's whole world in memory: the driver's answers scripted, the source's
stream and control messages built as our source builds them.

``DestinationWorld`` carries out every action a ``DestinationSession`` answers with, as a
driver would, with no process, socket or region: regions get made-up addresses, registrations
rkeys counting up from 0x100, the hash of the RAM is whatever ``mine`` says (the source's
digest by default: the RAM verifies), the guest resumes at once. An asking action that needs
input (a control message, a stream record) waits until the test ``feed``s it; ``answers``
may replace the answer to any asking action type, to make a step fail. The clock advances
10 ms an action. ``Rounds`` writes the source's side of the stream.
"""

from __future__ import annotations

import json
from collections import deque

from pipeline.config import MigrationConfig
from pipeline.digest import DeviceDigest
from pipeline.protocol.capabilities import negotiate
from pipeline.protocol.messages import QemuFileMessage
from pipeline.protocol.records import (
    RAM_IDSTR,
    RAM_VERSION,
    DeviceState,
    EndOfSection,
    MemSize,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
)
from pipeline.protocol.stream import StreamWriter
from pipeline.section_writer import DeviceSections, write_header
from pipeline.sections import (
    DEVICES_SECTION,
    DEVICES_SID,
    DIGEST_SECTION,
    DIGEST_SID,
    GUEST_SID,
    RAM_SID,
    ROUND_SECTION,
    ROUND_SID,
    frame,
)
from pipeline.sections import SYNTHETIC_SECTION as DEVICE_SECTION
from pipeline.session import destination_events as de
from pipeline.session.destination import DestinationSession
from pipeline.session.policy import PeerPolicy

MIB = 1 << 20
BLOCKS = (("pc.ram", 4 * MIB), ("vga.vram", 256 * 1024))
CHUNKS = 4 + 1                                  # 1 MiB chunks of both blocks
DIGEST = bytes(range(32)) * CHUNKS
GUEST_STATE = json.dumps({"pages_written": 7}).encode()
START, PART, END, FULL = (SectionType.SECTION_START, SectionType.SECTION_PART,
                          SectionType.SECTION_END, SectionType.SECTION_FULL)


def addresses(blocks) -> tuple[de.RegionBlock, ...]:
    """A region of ``blocks`` as the driver reports it: ram_addr offsets in order, mappings
    far apart."""
    out, offset = [], 0
    for i, (name, length) in enumerate(blocks):
        out.append(de.RegionBlock(name, offset, length, 0x7F00_0000_0000 - i * (1 << 32)))
        offset += length
    return tuple(out)


def ours(pin_all: bool = False, chunk_size: int = MIB, extensions: bool = True):
    """The effective capabilities of our source against what the session grants."""
    def accept(supported):
        return negotiate(PeerPolicy.request(pin_all=pin_all, chunk_size=chunk_size,
                                            extensions=extensions), supported)
    return accept


class DestinationWorld:
    def __init__(self, carrier: str = "rdma", *, config: MigrationConfig | None = None,
                 blocks=None, capabilities=None, label: str = "") -> None:
        self.session = DestinationSession(config or MigrationConfig(), carrier=carrier,
                                          blocks=blocks, session_token=0x5EED, label=label)
        self.capabilities = capabilities or ours()
        self.actions: list = []
        self.inbox: deque = deque()
        self.waiting = None
        self.mine: bytes | None = None       # this side's digest; None: the source's
        self.answers: dict = {}              # asking action type -> event (or a function)
        self.next_rkey = 0x100
        self.t = 0.0

    # -- driving -------------------------------------------------------------------------
    def start(self) -> DestinationWorld:
        self._run(self.session.start(self.t))
        return self

    def feed(self, *items) -> DestinationWorld:
        """Control messages (rdma:) or stream records / StreamEnded (tcp:, file:)."""
        self.inbox.extend(items)
        self._resume()
        return self

    def tell(self, event) -> list:
        """Hand the session ``event`` now (Cancel, Failed, or one it did not ask for)."""
        self.waiting = None
        out = self.session.handle(event, self._tick())
        self._run(out)
        return out

    def _tick(self) -> float:
        self.t += 0.01
        return self.t

    def _resume(self) -> None:
        if self.waiting is None:
            return
        action, self.waiting = self.waiting, None
        event = self._answer(action)
        if event is None:
            self.waiting = action
            return
        self._run(self.session.handle(event, self._tick()))

    def _run(self, actions) -> None:
        queue = deque(actions)
        while queue:
            action = queue.popleft()
            self.actions.append(action)
            if not isinstance(action, de.ASKING):
                continue
            assert not queue, f"{action} is not the last action of its answer"
            event = self._answer(action)
            if event is None:
                self.waiting = action
                return
            queue.extend(self.session.handle(event, self._tick()))

    def _answer(self, action):
        if type(action) in self.answers:
            answer = self.answers[type(action)]
            return answer(action) if callable(answer) else answer
        if isinstance(action, de.CreateRegion):
            return de.RegionCreated(addresses(action.blocks))
        if isinstance(action, de.Accept):
            caps = None if action.capabilities is None else self.capabilities(
                action.capabilities)
            return de.Accepted(caps)
        if isinstance(action, de.AwaitMessage):
            return de.ControlReceived(self.inbox.popleft()) if self.inbox else None
        if isinstance(action, de.ReadStream):
            return self.inbox.popleft() if self.inbox else None
        if isinstance(action, de.RegisterChunks):
            return de.ChunksRegistered(tuple(self._rkey() for _ in action.ranges))
        if isinstance(action, de.PinBlocks):
            return de.BlocksPinned(tuple(self._rkey() for _ in action.ranges))
        if isinstance(action, de.HashRam):
            return de.RamHashed(self.session.digests if self.mine is None else self.mine)
        if isinstance(action, de.LocateChunk):
            return de.Located(": its pages came from stream bytes 100..4204 of section 'ram'")
        if isinstance(action, de.LoadGuest):
            return de.GuestResumed({"pages_written": 7})
        if isinstance(action, de.Confirm):
            return de.ConfirmSent()
        if isinstance(action, de.AwaitCommit):
            return de.Committed()
        raise AssertionError(f"no answer for {action}")

    def _rkey(self) -> int:
        self.next_rkey += 1
        return self.next_rkey

    # -- looking -------------------------------------------------------------------------
    def of(self, kind) -> list:
        return [a for a in self.actions if isinstance(a, kind)]

    @property
    def states(self) -> list[str]:
        return [a.state for a in self.of(de.StateChanged)]

    @property
    def replies(self) -> list:
        return [a.message for a in self.of(de.Reply)]


class Rounds:
    """The source's stream, written as our source writes it: ``setup``, ``round`` (a HOOK per
    round on rdma:), ``round_pages``, ``end``; each returns QEMU FILE messages (rdma:) or the
    stream records (``records=True``)."""

    def __init__(self, blocks=BLOCKS, *, records: bool = False) -> None:
        self.blocks = tuple(RamBlockInfo(n, length) for n, length in blocks)
        self.w = StreamWriter()
        self.sections = DeviceSections()
        self.devices = DeviceDigest()        # the records path's device sections so far
        self.records = records
        self.log: list = []
        self.n = 0
        self.open = False                    # a ram section waits for its end

    def _event(self, event) -> None:
        if self.records:
            self.log.append(event)
        else:
            self.w.write_event(event)

    def _flush(self) -> list:
        if self.records:
            out, self.log = [de.StreamRecord(e, i) for i, e in enumerate(self.log)], []
            return out
        return [QemuFileMessage(p) for p in self.w.flush()]

    def setup(self, hook: bool = True) -> list:
        if self.records:
            from pipeline.protocol.records import Configuration, FileHeader

            self._event(FileHeader())
            self._event(Configuration("rdma-pipeline"))
        else:
            write_header(self.w)
        self._event(SectionHeader(START, RAM_SID, RAM_IDSTR, 0, RAM_VERSION))
        self._event(MemSize(self.blocks))
        self.open = True
        if hook and not self.records:
            self.w.hook()
        else:
            self.end_section()
        return self._flush()

    def end_section(self) -> None:
        """The open ram section's end (after its window on rdma:)."""
        if self.open:
            self._event(EndOfSection())
            self._event(SectionFooter(RAM_SID))
            self.open = False

    def round(self, final: bool = False) -> list:
        """The header of the next round, then its HOOK (rdma:)."""
        self.end_section()
        self.open = True
        self._event(SectionHeader(END if final else PART, RAM_SID, RAM_IDSTR))
        if not self.records:
            self.w.hook()
        return self._flush()

    def round_pages(self, body: bytes) -> None:
        """After a round's REGISTER FINISHED: its section end and page bitmap."""
        self.n += 1
        self.end_section()
        self._device(ROUND_SID + self.n - 1, ROUND_SECTION, body, self.n)

    def _device(self, sid: int, idstr: str, body: bytes, instance: int = 0) -> None:
        """One device section, as our source writes it (records: its DeviceState alone)."""
        if self.records:
            self.devices.add(idstr, frame(body))
            self._event(DeviceState(sid, idstr, frame(body)))
        else:
            self.sections.write(self.w, sid, idstr, "body", body, instance_id=instance)

    def flush(self) -> list:
        return self._flush()

    def end(self, *, guest: bool = True, digest: bytes | None = DIGEST,
            devices: bytes | None = b"") -> list:
        """The final round's section end, the guest, the digest, the device digest (b"": of
        what came before, as our source writes it; None: none), EOF, VMDESCRIPTION."""
        self.end_section()
        if guest:
            self._device(GUEST_SID, DEVICE_SECTION, GUEST_STATE)
        if digest is not None:
            self._device(DIGEST_SID, DIGEST_SECTION, digest)
        if devices is not None:
            mine = self.devices if self.records else self.sections.devices
            self._device(DEVICES_SID, DEVICES_SECTION, devices or mine.digest())
        if self.records:
            from pipeline.protocol.records import Eof, VmDescription

            self._event(Eof())
            self._event(VmDescription(b"{}"))
        else:
            self.sections.end(self.w)
        return self._flush()
