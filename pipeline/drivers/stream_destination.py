"""The stream destination driver: ``incoming tcp:HOST:PORT`` and ``incoming file:PATH``
(restore a snapshot), pages inline in the stream.

It reads the stream (a socket it accepted, or a file) in slices of ``READ_SIZE`` bytes into a
bulk ``StreamParser``, which yields runs of PAGE / ZERO records as numpy batches: a batch lands
in the RAM region with one scatter (zero pages are written only where the region holds data,
so untouched memory stays unallocated). Every other record goes to the ``DestinationSession``.
Per page it keeps the stream offset of the record that last wrote it, so a chunk that fails
verification is named with the bytes of the stream it came from; and which pages landed since
they were last handed to the page hasher, which hashes them from RAM while more arrive (at the
end of each ram section, as the session says, and every ``HASH_EVERY`` pages of a long one).
``tcp:`` confirms with SHUT(0) on the return path (SHUT(1) with the reason on any failure), then
runs the guest on the source's commit token.
"""

from __future__ import annotations

import numpy as np

from pipeline.drivers.destination_common import DestinationDriver
from pipeline.protocol.parser import NEED_DATA, StreamParser
from pipeline.protocol.ram_batch import PageBatch, ZeroBatch, page_dtype
from pipeline.protocol.records import DeviceState, Page, SectionHeader, ZeroPage
from pipeline.sections import device_codecs
from pipeline.session import destination_events as de
from pipeline.session.destination import DestinationSession
from pipeline.stream_io import open_source
from shm.errors import RemoteProtocolError
from shm.memory import PAGE_SIZE, WORDS_PER_PAGE, nonzero_pages

READ_SIZE = 4 << 20
ROW = page_dtype(PAGE_SIZE).itemsize
ZERO_ROW = 9
HASH_EVERY = 16384         # pages (64 MiB) landed before the hasher gets them mid-section


class StreamDestination(DestinationDriver):
    """One incoming ``tcp:`` migration or ``file:`` restore; ``run()`` blocks until completed
    (the summary) or not (it raises)."""

    def __init__(self, uri, config, **kw) -> None:
        self.source = None                       # pipeline.stream_io SocketSource/FileSource
        # describe: a QEMU machine's device sections are read by the stream's VMDESCRIPTION
        self.parser = StreamParser(device_codecs(), bulk=True, describe=True)
        self._header: SectionHeader | None = None   # of the device section being read
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self.where: dict[str, np.ndarray] = {}   # per block: stream offset of each page's record
        self.landed: dict[str, np.ndarray] = {}  # per block: pages written, not yet hashed
        self.unhashed = 0
        super().__init__(uri, config, **kw)

    def create_session(self, blocks, prealloc: bool) -> DestinationSession:
        label = str(self.uri) if self.uri.scheme == "file" else ""
        return DestinationSession(self.config, carrier=self.uri.scheme, blocks=blocks,
                                  prealloc=prealloc, label=label, stats=self.stats)

    # -- the carrier ---------------------------------------------------------------------
    def _accept(self, a: de.Accept):
        self.source = open_source(self.uri, self.check, self.accept_timeout)
        self._stack.callback(self.source.close)
        self.source.open(self.on_listening)
        return de.Accepted(None)

    def _confirm(self, a: de.Confirm):
        self.check()
        # QEMU's destination answers only on a return path the source opened; an
        # rdma-pipeline source waits for the SHUT whether it opened one or not.
        if self.session.return_path or self.session.ours:
            self.source.done(True)
        return de.ConfirmSent()

    def _await_commit(self, a: de.AwaitCommit):
        self.source.read_commit(self.parser.trailing(), a.timeout)
        return de.Committed()

    def _abort_peer(self, a: de.AbortPeer):
        if self.source is not None:
            self.source.done(False, self.session.reason)

    def _create_region(self, a: de.CreateRegion):
        event = super()._create_region(a)
        for blk in self.region.blocks:
            self.where[blk.idstr] = np.full(blk.nb_pages, -1, np.int64)
            self.landed[blk.idstr] = np.zeros(blk.nb_pages, bool)
        return event

    # -- the stream ----------------------------------------------------------------------
    def _read_stream(self, a: de.ReadStream):
        """Land pages until a record for the session, or the end of the bytes."""
        parser = self.parser
        while True:
            while True:
                at = parser.offset
                ev = parser.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, PageBatch):
                    self._pages(ev.block, ev.offsets, ev.data, at, ROW)
                elif isinstance(ev, ZeroBatch):
                    self._zeros(ev.block, ev.offsets, at, ZERO_ROW)
                elif isinstance(ev, Page):
                    data = np.frombuffer(ev.data, np.uint8).reshape(1, PAGE_SIZE)
                    self._pages(ev.block, np.array([ev.offset], np.uint64), data, at, 0)
                elif isinstance(ev, ZeroPage):
                    self._zeros(ev.block, np.array([ev.offset], np.uint64), at, 0)
                else:
                    self._keep_device(ev)
                    return de.StreamRecord(ev, at)
            n = self.source.readinto(self._view)
            if n == 0:
                try:
                    parser.end_of_stream()    # a stream cut short raises here, saying where
                except RemoteProtocolError as exc:
                    if self.uri.scheme == "tcp":
                        exc.message = f"the source closed the connection: {exc.message}"
                        exc.args = (exc.message,)
                    raise
                return de.StreamEnded(parser.offset)
            self.stats.add(control_bytes=n)
            parser.feed(self._view[:n])

    def _keep_device(self, ev) -> None:
        """Device sections, kept whole for ``--dump`` (a few KiB; none is RAM)."""
        if isinstance(ev, SectionHeader):
            self._header = ev
        elif isinstance(ev, DeviceState) and self.dump_dir and self._header is not None:
            h = self._header
            self.device_sections.append((h.idstr, h.instance_id, h.version_id, h.section_id,
                                         bytes(ev.data)))

    def _block(self, name: str):
        if self.region is None:
            raise RemoteProtocolError(f"pages of block {name} before MEM_SIZE")
        return self.region.block(name)

    def _pages(self, block: str, offsets: np.ndarray, data: np.ndarray, at: int,
               stride: int) -> None:
        blk = self._block(block)
        idx = (offsets // PAGE_SIZE).astype(np.int64)
        blk.view.reshape(-1, PAGE_SIZE)[idx] = data
        self._landed(block, idx, at, stride)
        self.stats.add(normal_pages=len(idx))

    def _zeros(self, block: str, offsets: np.ndarray, at: int, stride: int) -> None:
        blk = self._block(block)
        idx = (offsets // PAGE_SIZE).astype(np.int64)
        pages = blk.view.view(np.uint64).reshape(-1, WORDS_PER_PAGE)
        held = nonzero_pages(pages, idx)      # pages not in memory are zero already
        if held.any():
            pages[idx[held]] = 0
        self._landed(block, idx, at, stride)
        self.stats.add(duplicate_pages=len(idx))

    def _landed(self, block: str, idx: np.ndarray, at: int, stride: int) -> None:
        """A long section is hashed as it lands, HASH_EVERY pages at a time, so that little
        is left to hash after EOF (a page written again later is hashed again later)."""
        self.where[block][idx] = at + stride * np.arange(len(idx), dtype=np.int64)
        self.landed[block][idx] = True
        self.unhashed += len(idx)
        if self.unhashed >= HASH_EVERY:       # from the first round on, in MEM_SIZE order
            self._submit_landed(self._hash_names or
                                tuple(b.idstr for b in self.session.order))

    def _hash_landed(self, a: de.HashLanded):
        self._submit_landed(a.blocks)

    def _submit_landed(self, names) -> None:
        """Hand the pages landed since the last time to the hasher (it reads them from RAM)."""
        hasher = self.hasher_for(names)
        pages = [np.flatnonzero(self.landed[n]) for n in self._hash_names]   # sorted
        if any(len(p) for p in pages):
            hasher.submit(pages)
        for mask in self.landed.values():
            mask[:] = False
        self.unhashed = 0

    def _locate_chunk(self, a: de.LocateChunk):
        """The stream bytes the pages of a chunk came from."""
        per = a.chunk_size // PAGE_SIZE
        offs = self.where[a.block][a.chunk * per:(a.chunk + 1) * per]
        offs = offs[offs >= 0]
        if not len(offs):
            return de.Located("")
        return de.Located(f": its pages came from stream bytes {int(offs.min())}.."
                          f"{int(offs.max()) + ROW} of section 'ram'")

    CARRY = {
        **DestinationDriver.CARRY,
        de.Accept: _accept, de.Confirm: _confirm, de.AwaitCommit: _await_commit,
        de.AbortPeer: _abort_peer,
        de.CreateRegion: _create_region, de.ReadStream: _read_stream,
        de.HashLanded: _hash_landed, de.LocateChunk: _locate_chunk,
    }
