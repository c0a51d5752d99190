"""An incremental parser of QEMU's migration stream: bytes in, ``records`` events out.

Feed bytes in any pieces (``feed``), pull events (``next_event`` returns ``NEED_DATA`` until a
whole record is buffered), and call ``end_of_stream`` when the bytes end. Each event covers one
contiguous byte range and is parsed all at once, so a short buffer never half-consumes a record.
Bad input raises ``RemoteProtocolError`` naming what was wrong and the stream offset, and the
parser stays failed (every later call raises the same error).

Checks, following QEMU's loader (savevm.c ``qemu_loadvm_state``, ram.c ``ram_load_precopy``):
magic and version 3; CONFIGURATION (with its known subsections) only right after the header;
PART / END name a section that START opened; every section's data ends with a FOOTER of its id;
RAM records carry exactly one of MEM_SIZE, ZERO, PAGE, EOS, HOOK (CONTINUE only with PAGE /
ZERO, and only after a block was named), block names come from MEM_SIZE, pages lie inside their
block, zero pages fill with 0; nothing but VMDESCRIPTION may follow EOF.
With ``bulk=True`` (streams with pages inline), back-to-back PAGE or ZERO records with CONTINUE
come out as one ``ram_batch.PageBatch`` / ``ZeroBatch`` per run buffered, checked with numpy
(the first record that does not fit the run is parsed alone, with the checks above). Error
messages name the stream offset and the section being read (or the last one read).
With ``describe=True`` a device section with no codec is read by the stream's own
VMDESCRIPTION (``vmstate``): the parser holds the bytes from that section on (nothing reads
them) until the buffer ends with a whole VMDESCRIPTION (over ``tcp:`` it comes last, before the
source waits for the return path), then measures every held section by it and goes on; the
description is ``description`` from then on. A device codec may be keyed ``(idstr, instance)``
as well as by idstr.
Not supported: MEM_SIZE's extra per-block fields (postcopy page size, x-ignore-shared GPA) and
the XBZRLE, multifd and mapped-ram records (none of which QEMU allows with RDMA).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pipeline.protocol.buffer import Buffer, BufferReadError
from pipeline.protocol.ram_batch import batch_from, count_records
from pipeline.protocol.records import (
    FILE_MAGIC,
    FILE_VERSION,
    HEADER,
    PAGE_SIZE,
    RAM_IDSTR,
    RAM_VERSION,
    U8,
    U16,
    U64,
    Command,
    Configuration,
    DeviceState,
    EndOfSection,
    Eof,
    Event,
    FileHeader,
    Hook,
    MemSize,
    Page,
    RamBlockInfo,
    RamFlag,
    SectionFooter,
    SectionHeader,
    SectionType,
    Subsection,
    VmDescription,
    ZeroPage,
)
from pipeline.protocol.vmstate import describe_devices, find_description, section_length
from shm.errors import RemoteProtocolError

__all__ = ["StreamParser", "NEED_DATA", "DeviceCodec"]

# A device codec tells the parser how long a section's state is: a fixed byte count, or a
# function of (the bytes buffered from the start of the state, the section's version_id) that
# returns the length, or None while it needs more bytes.
DeviceCodec = int | Callable[[bytes, int], "int | None"]


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

_HEADER, _TOP, _RAM, _DEVICE, _FOOTER, _AFTER_EOF, _DONE, _HOLD = range(8)
_PHASE_NAMES = ("the file header", "a section type", "a RAM record", "device state",
                "a section footer", "VMDESCRIPTION or the end", "the end",
                "the VMDESCRIPTION that describes the device sections held")
_COMPACT_AT = 1 << 16
HOLD_MAX = 64 << 20        # device state held for a VMDESCRIPTION (a pc's is ~100 KiB)
_BATCH_FLAGS = (int(RamFlag.PAGE | RamFlag.CONTINUE), int(RamFlag.ZERO | RamFlag.CONTINUE))
# configuration subsections of a fixed size (savevm.c): target page bits, the source's UUID
_CONFIG_SUBSECTIONS = {"configuration/target-page-bits": 4, "configuration/uuid": 16}


class StreamParser:
    """Parse one migration stream. ``devices`` maps a section idstr to its ``DeviceCodec``."""

    def __init__(self, devices: Mapping[str, DeviceCodec] | None = None, *,
                 page_size: int = PAGE_SIZE, bulk: bool = False,
                 describe: bool = False) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size {page_size} is not a power of two")
        self.devices = dict(devices or {})
        self.page_size = page_size
        self.bulk = bulk
        self.describe = describe
        self.description: dict | None = None   # the VMDESCRIPTION, once read (describe=True)
        self._buf = bytearray()
        self._pos = 0                     # parse position in _buf
        self._base = 0                    # stream offset of _buf[0]
        self._phase = _HEADER
        self._sections: dict[int, tuple[str, int, int]] = {}   # id -> idstr, instance, version
        self._current: SectionHeader | None = None
        self._last_section: SectionHeader | None = None
        self._blocks: dict[str, int] = {}
        self._last_block: str | None = None
        self._seen_section = False
        self._error: RemoteProtocolError | None = None

    @property
    def offset(self) -> int:
        """Stream offset of the next byte to parse."""
        return self._base + self._pos

    @property
    def blocks(self) -> dict[str, int]:
        """RAM blocks (idstr -> used_length) from the last MEM_SIZE record."""
        return dict(self._blocks)

    @property
    def finished(self) -> bool:
        """True once EOF (and any VMDESCRIPTION) has been parsed."""
        return self._phase in (_AFTER_EOF, _DONE)

    def trailing(self) -> bytes:
        """The bytes fed after the VMDESCRIPTION (a source of ours' commit token)."""
        return bytes(self._buf[self._pos:]) if self._phase == _DONE else b""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        try:
            if self._pos >= _COMPACT_AT:
                del self._buf[:self._pos]
                self._base += self._pos
                self._pos = 0
            self._buf += data
        except BufferError:
            # A batch event still views these bytes (ram_batch hands out views, not copies):
            # leave them to it and go on in a new buffer.
            self._buf = self._buf[self._pos:] + data
            self._base += self._pos
            self._pos = 0

    def next_event(self) -> Event | _NeedData:
        """The next whole record as an event, or ``NEED_DATA``."""
        self._check()
        buf = Buffer(self._buf)
        buf.seek(self._pos)
        try:
            event = self._step(buf)
        except BufferReadError:
            return NEED_DATA
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        if not isinstance(event, FileHeader):
            self._seen_section = True
        self._pos = buf.tell()
        return event

    def events(self):
        """Every event parseable from what was fed so far."""
        while (event := self.next_event()) is not NEED_DATA:
            yield event

    def end_of_stream(self) -> None:
        """The bytes ended: refuse a stream cut short (or with bytes left unparsed)."""
        self._check()
        if self._phase in (_AFTER_EOF, _DONE) and self._pos == len(self._buf):
            return
        self._error = RemoteProtocolError(
            f"migration stream truncated at offset {self._base + len(self._buf)} "
            f"({self.where()}): expected {_PHASE_NAMES[self._phase]} at offset {self.offset}")
        raise self._error

    def where(self) -> str:
        """The section being parsed, or the last one parsed: for messages."""
        head = self._current or self._last_section
        if head is None:
            return "before any section" if self._phase != _HEADER else "in the file header"
        kind = head.section_type.name.removeprefix("SECTION_")
        name = f"section {head.idstr!r} {kind} (id {head.section_id})"
        if self._phase in (_AFTER_EOF, _DONE):
            return f"after QEMU_VM_EOF, last {name}"
        return f"in {name}" if self._current is not None else f"after {name}"

    # -- internals -----------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(str(self._error))

    def _fail(self, at: int, what: str) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"migration stream offset {self._base + at} ({self.where()}): {what}")

    def _idstr(self, buf: Buffer, what: str) -> str:
        at = buf.tell()
        n = buf.pull_u8()
        raw = buf.pull_bytes(n, what)
        if n == 0:
            raise self._fail(at, f"empty {what}")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise self._fail(at, f"{what} {raw!r} is not UTF-8") from None

    def _step(self, buf: Buffer) -> Event:
        phase = self._phase
        if phase == _HEADER:
            at = buf.tell()
            magic, version = buf.pull_struct(HEADER, "file header")
            if magic != FILE_MAGIC:
                raise self._fail(at, f"file magic {magic:#010x}, must be {FILE_MAGIC:#010x}")
            if version != FILE_VERSION:
                raise self._fail(at, f"file version {version}, must be {FILE_VERSION}")
            self._phase = _TOP
            return FileHeader(version)
        if phase == _TOP:
            return self._top(buf)
        if phase == _RAM:
            return self._ram(buf)
        if phase == _DEVICE:
            return self._device(buf)
        if phase == _HOLD:
            return self._held(buf)
        if phase == _FOOTER:
            at = buf.tell()
            kind, sid = buf.pull_u8(), buf.pull_u32()
            expected = self._current.section_id
            if kind != SectionType.SECTION_FOOTER:
                raise self._fail(at, f"byte {kind:#04x} where the footer of section {expected} "
                                     "(0x7e) must be")
            if sid != expected:
                raise self._fail(at, f"footer of section {sid}, expected {expected}")
            self._last_section, self._current = self._current, None
            self._phase = _TOP
            return SectionFooter(sid)
        at = buf.tell()
        kind = buf.pull_u8()
        if phase == _AFTER_EOF and kind == SectionType.VMDESCRIPTION:
            n = buf.pull_u32()
            event = VmDescription(buf.pull_bytes(n, "VMDESCRIPTION"))
            event.description()   # refuse what is not a JSON object
            self._phase = _DONE
            return event
        raise self._fail(at, f"byte {kind:#04x} after "
                             f"{'QEMU_VM_EOF' if phase == _AFTER_EOF else 'VMDESCRIPTION'}")

    def _top(self, buf: Buffer) -> Event:
        at = buf.tell()
        kind = buf.pull_u8()
        first = not self._seen_section
        if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            sid = buf.pull_u32()
            idstr = self._idstr(buf, "section idstr")
            instance, version = buf.pull_u32(), buf.pull_u32()
            if idstr == RAM_IDSTR and instance == 0 and version != RAM_VERSION:
                raise self._fail(at, f"section ram version {version}, must be {RAM_VERSION}")
            self._sections[sid] = (idstr, instance, version)
            return self._open(SectionHeader(SectionType(kind), sid, idstr, instance, version))
        if kind in (SectionType.SECTION_PART, SectionType.SECTION_END):
            sid = buf.pull_u32()
            if sid not in self._sections:
                raise self._fail(at, f"{SectionType(kind).name} of section {sid}, which no "
                                     "SECTION_START opened")
            idstr, instance, version = self._sections[sid]
            return self._open(SectionHeader(SectionType(kind), sid, idstr, instance, version))
        if kind == SectionType.CONFIGURATION:
            if not first:
                raise self._fail(at, "QEMU_VM_CONFIGURATION must follow the file header")
            raw = buf.pull_bytes(buf.pull_u32(), "machine name")
            try:
                name = raw.decode()
            except UnicodeDecodeError:
                raise self._fail(at, f"machine name {raw!r} is not UTF-8") from None
            return Configuration(name, self._subsections(buf))
        if kind == SectionType.COMMAND:
            cmd, n = buf.pull_struct(U16, "command")[0], buf.pull_struct(U16, "length")[0]
            return Command(cmd, buf.pull_bytes(n, "command data"))
        if kind == SectionType.EOF:
            self._phase = _AFTER_EOF
            return Eof()
        name = SectionType(kind).name if kind in SectionType._value2member_map_ else "unknown"
        raise self._fail(at, f"section type {kind:#04x} ({name}) is not valid here")

    def _subsections(self, buf: Buffer) -> tuple[Subsection, ...]:
        """The configuration's subsections: a 0x05 byte starts one (so the byte after the
        configuration must be there before it is complete, as in QEMU's loader)."""
        subs = []
        while True:
            at = buf.tell()
            if buf.pull_u8() != SectionType.SUBSECTION:
                buf.seek(at)
                return tuple(subs)
            idstr = self._idstr(buf, "subsection idstr")
            version = buf.pull_u32()
            start = buf.tell()
            if idstr == "configuration/capabilities":      # be32 n, n x (u8 len, name)
                for _ in range(buf.pull_u32()):
                    buf.pull_bytes(buf.pull_u8(), "capability")
                length = buf.tell() - start
                buf.seek(start)
            elif idstr in _CONFIG_SUBSECTIONS:
                length = _CONFIG_SUBSECTIONS[idstr]
            else:
                raise self._fail(at, f"configuration subsection {idstr!r} is unknown")
            subs.append(Subsection(idstr, version, buf.pull_bytes(length, "subsection")))

    def _open(self, header: SectionHeader) -> SectionHeader:
        self._current = header
        is_ram = header.idstr == RAM_IDSTR and header.instance_id == 0
        self._phase = _RAM if is_ram else _DEVICE
        return header

    def _device(self, buf: Buffer) -> Event:
        head = self._current
        at = buf.tell()
        codec = self.devices.get((head.idstr, head.instance_id), self.devices.get(head.idstr))
        if codec is None:
            full = head.section_type == SectionType.SECTION_FULL
            if self.describe and self.description is None and full:
                self._phase = _HOLD       # until the VMDESCRIPTION at the end says its layout
                return self._held(buf)
            described = " and the stream's VMDESCRIPTION does not describe it" \
                if self.description is not None else ""
            raise self._fail(at, f"section {head.section_id} {head.idstr!r} (instance "
                                 f"{head.instance_id}): no device codec is registered"
                                 f"{described}")
        if isinstance(codec, int):
            n = codec
        else:
            n = codec(bytes(self._buf[at:]), head.version_id)
            if n is None:
                raise BufferReadError("device state")
        if not isinstance(n, int) or n < 0:
            raise TypeError(f"device codec for {head.idstr!r} returned {n!r}")
        data = buf.pull_bytes(n, "device state")
        self._phase = _FOOTER
        return DeviceState(head.section_id, head.idstr, data)

    def _held(self, buf: Buffer) -> Event:
        """Nothing until the buffer ends with a whole VMDESCRIPTION; then every section it
        describes gets a codec, and the held section is read by its own."""
        held = len(self._buf) - buf.tell()
        found = find_description(self._buf[buf.tell():])
        if found is None and held > HOLD_MAX:
            raise self._fail(buf.tell(), f"{held} bytes after section "
                                         f"{self._current.idstr!r}, which no codec reads, and "
                                         "still no VMDESCRIPTION to read it by")
        if found is None:
            raise BufferReadError("the stream's VMDESCRIPTION")
        self.description = found[1]
        for key, desc in describe_devices(found[1]).items():
            self.devices.setdefault(key, lambda data, version, d=desc: section_length(data, d))
        self._phase = _DEVICE
        return self._device(buf)

    def _ram(self, buf: Buffer) -> Event:
        at = buf.tell()
        if self.bulk and self._last_block is not None and buf.remaining >= 8:
            batch = self._batch(buf, at)
            if batch is not None:
                return batch
        raw = buf.pull_struct(U64, "RAM record")[0]
        mask = self.page_size - 1
        flags, addr = raw & mask, raw & ~mask
        main = flags & ~RamFlag.CONTINUE
        if main == RamFlag.MEM_SIZE and flags == main:
            return self._mem_size(buf, at, addr)
        if main in (RamFlag.HOOK, RamFlag.EOS) and flags == main:
            if addr:
                raise self._fail(at, f"{RamFlag(main).name} record with address {addr:#x}")
            if main == RamFlag.EOS:
                self._phase = _FOOTER
                return EndOfSection()
            return Hook()
        if main in (RamFlag.PAGE, RamFlag.ZERO):
            continued = bool(flags & RamFlag.CONTINUE)
            if continued:
                if self._last_block is None:
                    raise self._fail(at, "RAM_SAVE_FLAG_CONTINUE before any block was named")
                block = self._last_block
            else:
                block = self._idstr(buf, "RAMBlock idstr")
            length = self._blocks.get(block)
            if length is None:
                raise self._fail(at, f"RAMBlock {block!r} not found (not in MEM_SIZE)")
            if addr + self.page_size > length:
                raise self._fail(at, f"page at {addr:#x} lies outside RAMBlock {block!r} of "
                                     f"{length:#x} bytes")
            if main == RamFlag.PAGE:
                event = Page(block, addr, buf.pull_bytes(self.page_size, "page"), continued)
            else:
                fill = buf.pull_struct(U8, "zero page fill")[0]
                if fill != 0:
                    raise self._fail(at, f"zero page of {block!r} at {addr:#x} with fill "
                                         f"{fill}, must be 0")
                event = ZeroPage(block, addr, fill, continued)
            self._last_block = block
            return event
        names = "|".join(f.name for f in RamFlag if f & flags) or "none"
        raise self._fail(at, f"RAM record flags {flags:#x} ({names}): not a record we accept "
                             "(exactly one of MEM_SIZE, ZERO, PAGE, EOS, HOOK; CONTINUE only "
                             "with PAGE or ZERO)")

    def _batch(self, buf: Buffer, at: int):
        """A PageBatch / ZeroBatch of the CONTINUE records buffered at ``at``, or None."""
        flags = int.from_bytes(self._buf[at:at + 8], "big") & (self.page_size - 1)
        if flags not in _BATCH_FLAGS:
            return None
        zero = flags == _BATCH_FLAGS[1]
        block = self._last_block
        n = count_records(self._buf, at, len(self._buf), zero=zero,
                          block_length=self._blocks[block], page_size=self.page_size)
        if n == 0:
            return None
        event = batch_from(self._buf, at, n, block, zero=zero, page_size=self.page_size)
        buf.seek(at + n * (9 if zero else 8 + self.page_size))
        return event

    def _mem_size(self, buf: Buffer, at: int, total: int) -> MemSize:
        blocks = []
        left = total
        while left:
            bat = buf.tell()
            idstr = self._idstr(buf, "RAMBlock idstr")
            length = buf.pull_struct(U64, "RAMBlock length")[0]
            if length == 0 or length > left or length % self.page_size:
                raise self._fail(bat, f"RAMBlock {idstr!r} length {length:#x}: must be a "
                                      f"non-zero page multiple <= the {left:#x} bytes left of "
                                      f"MEM_SIZE {total:#x}")
            if any(b.idstr == idstr for b in blocks):
                raise self._fail(bat, f"RAMBlock {idstr!r} listed twice in MEM_SIZE")
            blocks.append(RamBlockInfo(idstr, length))
            left -= length
        self._blocks = {b.idstr: b.length for b in blocks}
        return MemSize(tuple(blocks))

