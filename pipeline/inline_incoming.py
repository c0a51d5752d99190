"""The destination of a migration with pages inline: ``incoming tcp:HOST:PORT`` and
``incoming file:PATH`` (restore a snapshot).

``StreamIncoming`` reads the stream (a socket it accepted, or a file) in slices of
``READ_SIZE`` bytes into a bulk ``StreamParser``, which yields runs of PAGE / ZERO records as
numpy batches: a batch lands in the RAM region with one scatter (zero pages are written only
where the region holds data, so untouched memory stays unallocated). It keeps, per page, the
stream offset of the record that last wrote it, so a chunk that fails verification is named
with the bytes of the stream it came from.

Verification is rdma:'s (``stages.pagehash``): at the end of each ram section, and every
``HASH_EVERY`` pages of a long one, the pages written are handed to a ``PageHasher`` thread,
which hashes them from RAM while more arrive. At the end (EOF, then the VMDESCRIPTION we
always send) the SHA-256 of each chunk's page hashes is compared with the source's digest, and
only then is the guest resumed from its device section; ``tcp:`` then sends SHUT(0) on the
return path (SHUT(1) on any failure). ``file:`` refuses a file cut short or with bytes after
its end, in one line naming the byte offset and the section.

The guest process, the region and the teardown are ``IncomingMigration``'s. Over ``tcp:`` the
guest process starts at MEM_SIZE, as over ``rdma:`` (starting it is not part of the downtime);
restoring a file starts it only once the RAM verified.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.config import MigrationConfig
from pipeline.digest import chunk_size_for, differing
from pipeline.incoming import IncomingMigration
from pipeline.protocol.parser import NEED_DATA, StreamParser
from pipeline.protocol.ram_batch import PageBatch, ZeroBatch, page_dtype
from pipeline.protocol.records import (
    RAM_IDSTR,
    DeviceState,
    EndOfSection,
    Eof,
    Hook,
    MemSize,
    Page,
    SectionHeader,
    VmDescription,
    ZeroPage,
)
from pipeline.sections import device_codecs
from pipeline.stream_io import open_source
from shm.errors import MigrationCancelled, MigrationError, RemoteProtocolError
from shm.memory import PAGE_SIZE, nonzero_pages

READ_SIZE = 4 << 20
ROW = page_dtype(PAGE_SIZE).itemsize
ZERO_ROW = 9
HASH_EVERY = 16384         # pages (64 MiB) landed before the hasher gets them mid-section


class StreamIncoming(IncomingMigration):
    """One incoming ``tcp:`` migration or ``file:`` restore; ``run()`` blocks (raises on
    failure, like ``IncomingMigration``)."""

    def __init__(self, uri, config: MigrationConfig, **kw) -> None:
        super().__init__(uri, config, **kw)
        self.source = open_source(uri, self.check, self.accept_timeout)
        self.early_guest = uri.scheme == "tcp"
        self.where: list[np.ndarray] = []       # per block: stream offset of each page's record
        self.section: SectionHeader | None = None
        self.description: dict | None = None
        self.ram_sections = 0
        self.unhashed = 0
        self.landed: list[np.ndarray] = []      # per block: pages written in this section

    def run(self) -> dict:
        self.stats.update(start_time=time.monotonic())
        self._state("setup")
        ok, reason = False, ""
        try:
            if self.blocks_spec:
                self._create_region(self.blocks_spec)
            self.source.open(self.on_listening)
            self._state("active")
            self._load()
            self._finish()
            ok = True
            self._state("completed")
            if self.guest_watch > 0:
                self.cancel.wait(self.guest_watch)   # let the resumed guest run a little
        except BaseException as exc:
            if isinstance(exc, MigrationError) and self.uri.scheme == "file":
                exc.message = f"{self.uri}: {exc.message}"     # which file, on the one line
                exc.args = (exc.message,)
            reason = str(exc) if isinstance(exc, MigrationError) else f"{type(exc).__name__}: {exc}"
            reason = reason.splitlines()[0] if reason else "failed"
            self._state("cancelled" if isinstance(exc, MigrationCancelled | KeyboardInterrupt)
                        else "failed", reason)
            raise
        finally:
            if not ok:
                self.source.done(False, reason)
            self.stats.update(end_time=time.monotonic(), verified=self.verified)
            self._teardown()
            self.source.close()
        return self.summary()

    # -- the stream ----------------------------------------------------------------------
    def _load(self) -> None:
        parser = StreamParser(device_codecs(), bulk=True)
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        done = False
        while True:
            n = self.source.readinto(view)
            if n == 0:
                try:
                    parser.end_of_stream()    # a stream cut short raises here, saying where
                except RemoteProtocolError as exc:
                    if self.uri.scheme == "tcp":
                        exc.message = f"the source closed the connection: {exc.message}"
                        exc.args = (exc.message,)
                    raise
                if not done:
                    raise RemoteProtocolError(
                        f"migration stream ends after QEMU_VM_EOF at offset {parser.offset} "
                        "without its VMDESCRIPTION: the stream is cut short")
                return
            self.stats.update(control_bytes=self.stats.control_bytes + n)
            parser.feed(view[:n])
            while True:
                at = parser.offset
                ev = parser.next_event()
                if ev is NEED_DATA:
                    break
                self._on_event(ev, at)
                done = done or isinstance(ev, VmDescription)
            if done and self.uri.scheme == "tcp":
                return            # the source now waits for our SHUT: nothing more comes

    def _on_event(self, ev, at: int) -> None:
        if isinstance(ev, PageBatch):
            self._pages(ev.block, ev.offsets, ev.data, at, ROW)
        elif isinstance(ev, ZeroBatch):
            self._zeros(ev.block, ev.offsets, at, ZERO_ROW)
        elif isinstance(ev, Page):
            data = np.frombuffer(ev.data, np.uint8).reshape(1, PAGE_SIZE)
            self._pages(ev.block, np.array([ev.offset], np.uint64), data, at, 0)
        elif isinstance(ev, ZeroPage):
            self._zeros(ev.block, np.array([ev.offset], np.uint64), at, 0)
        elif isinstance(ev, EndOfSection):
            self._hash_landed()
        elif isinstance(ev, SectionHeader):
            self.section = ev
            if ev.idstr == RAM_IDSTR:
                self.ram_sections += 1
                if self.fault.get("window") == self.ram_sections:
                    self._inject_fault(self.fault["kind"])
        elif isinstance(ev, MemSize):
            self._on_mem_size(ev)
        elif isinstance(ev, DeviceState):
            self._on_device_state(ev)
        elif isinstance(ev, Hook):
            raise RemoteProtocolError(
                f"migration stream offset {at}: a HOOK record in a {self.uri.scheme}: stream "
                "(pages travel inline here; only rdma: registers memory)")
        elif isinstance(ev, Eof):
            self.stats.update(pause_time=time.monotonic())
        elif isinstance(ev, VmDescription):
            self.description = ev.description()

    def _on_mem_size(self, ev: MemSize) -> None:
        from shm.region import RamBlockSpec, RamRegion

        if self.region is None:
            self.region = RamRegion.create(
                self.run_id, [RamBlockSpec(b.idstr, b.length) for b in ev.blocks],
                self.config.chunk_size, kind="dstram")
        mine = [(b.idstr, b.length) for b in self.region.blocks]
        theirs = [(b.idstr, b.length) for b in ev.blocks]
        if sorted(mine) != sorted(theirs):
            raise RemoteProtocolError(f"ram blocks mismatch: the stream has {theirs}, this "
                                      f"destination {mine}",
                                      hint="start both sides with the same RAM size")
        from stages.pagehash import PageHasher

        self.blocks = {b.idstr: b for b in self.region.blocks}
        self.where = [np.full(b.nb_pages, -1, np.int64) for b in self.region.blocks]
        self.landed = [np.zeros(b.nb_pages, bool) for b in self.region.blocks]
        if self.hasher is None:
            self.hasher = PageHasher([b.view.view(np.uint64).reshape(-1, 512)
                                      for b in self.region.blocks])
        self.stats.update(total_bytes=ev.total)
        if self.early_guest:
            self._start_guest()

    def _pages(self, block: str, offsets: np.ndarray, data: np.ndarray, at: int,
               stride: int) -> None:
        blk = self.blocks[block]
        idx = (offsets // PAGE_SIZE).astype(np.int64)
        blk.view.reshape(-1, PAGE_SIZE)[idx] = data
        self.where[blk.index][idx] = at + stride * np.arange(len(idx), dtype=np.int64)
        self.landed[blk.index][idx] = True
        self._count_landed(len(idx))
        self.stats.update(normal_pages=self.stats.normal_pages + len(idx))

    def _zeros(self, block: str, offsets: np.ndarray, at: int, stride: int) -> None:
        blk = self.blocks[block]
        idx = (offsets // PAGE_SIZE).astype(np.int64)
        pages = blk.view.view(np.uint64).reshape(-1, 512)
        held = nonzero_pages(pages, idx)      # pages not in memory are zero already
        if held.any():
            pages[idx[held]] = 0
        self.where[blk.index][idx] = at + stride * np.arange(len(idx), dtype=np.int64)
        self.landed[blk.index][idx] = True
        self._count_landed(len(idx))
        self.stats.update(duplicate_pages=self.stats.duplicate_pages + len(idx))

    def _inject_fault(self, kind: str) -> None:
        """Test hook (``fault``: kind and the ram section to act at, 1 = START): the connection
        cut, or a return-path message no destination sends."""
        import socket

        if kind == "disconnect":
            self.source.sock.shutdown(socket.SHUT_RDWR)
        elif kind == "malformed":
            self.source.sock.sendall(bytes.fromhex("0009 0000"))
        self.cancel.wait(30.0)
        raise MigrationError(f"test fault {kind} injected")

    def _count_landed(self, n: int) -> None:
        """A long section is hashed as it lands, HASH_EVERY pages at a time, so that little
        is left to hash after EOF (a page written again later is hashed again later)."""
        self.unhashed += n
        if self.unhashed >= HASH_EVERY:
            self._hash_landed()

    def _hash_landed(self) -> None:
        """Hand the pages this ram section wrote to the hasher (it reads them from RAM)."""
        pages = [np.flatnonzero(mask) for mask in self.landed]    # sorted, as hashing needs
        if any(len(p) for p in pages):
            self.hasher.submit(pages)
        for mask in self.landed:
            mask[:] = False
        self.unhashed = 0

    # -- the end -------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.corrupt is not None:     # test hook: damage one page before the check
            b, page = self.corrupt
            self.region.blocks[b].view[page * PAGE_SIZE] ^= 0xFF
            self.landed[b][page] = True           # as if a write had brought it
            self._hash_landed()
        if self.digests is None:
            raise RemoteProtocolError("the stream carried no RAM digest: cannot verify the RAM",
                                      hint="the destination never resumes on unchecked memory")
        lengths = [b.length for b in self.region.blocks]
        cs = chunk_size_for(lengths, len(self.digests) // 32)
        if cs is None or len(self.digests) % 32:
            raise RemoteProtocolError(f"the RAM digest ({len(self.digests)} bytes) does not fit "
                                      f"RAM blocks of {lengths} bytes")
        bad = self._mismatches(cs)
        self.verified = not bad
        if bad:
            raise MigrationError(f"RAM verification failed: {len(bad)} chunk(s) differ "
                                 f"({self._located(bad, cs)}); the guest was not resumed")
        if self.guest_device is None:
            raise RemoteProtocolError("the stream carried no guest device state")
        self._start_guest()
        self._resume()
        self.resume_time = time.monotonic()
        self.stats.update(resume_time=self.resume_time)
        self.source.done(True)

    def _mismatches(self, cs: int) -> list[tuple[str, int]]:
        """(block, chunk) of every chunk whose page hashes differ from the source's."""
        from stages.pagehash import table_digests

        cp = cs // PAGE_SIZE
        chunks = [(blk.idstr, c) for blk in self.region.blocks
                  for c in range(-(-blk.nb_pages // cp))]
        return differing(table_digests(self.hasher.wait(), cp), self.digests, chunks)

    def _located(self, bad: list[tuple[str, int]], cs: int) -> str:
        """The chunks that differ, the first with the stream bytes its pages came from."""
        name, chunk = bad[0]
        blk = self.blocks[name]
        per = cs // PAGE_SIZE
        offs = self.where[blk.index][chunk * per:(chunk + 1) * per]
        offs = offs[offs >= 0]
        first = f"{name} chunk {chunk}"
        if len(offs):
            first += (f": its pages came from stream bytes {int(offs.min())}.."
                      f"{int(offs.max()) + ROW} of section 'ram'")
        rest = ", ".join(f"{n} chunk {c}" for n, c in bad[1:4])
        return first + (f"; also {rest}" if rest else "")
