"""The ``tcp:`` and ``file:`` source: pages inline in the stream, written by this process.

No stage processes: the driver syncs the dirty log and zero-tests dirty pages with the
scanner's own code (``PageScanner``: ``Scanner.sync`` and ``nonzero_pages``, page by page
rather than in runs, because inline records name pages), and writes the records itself,
vectorised (``protocol.ram_batch``: one header expression and one gather per batch of up to
``PAGE_BATCH`` pages), to a socket or a file (``stream_io``). What RDMA splits over three
processes (find, register, write) is here a gather and a send, both bounded by memory
bandwidth, so a pipeline of processes would add copies without adding parallelism.

Verification is rdma:'s (``stages.pagehash``): the 64-bit hash of every page is taken from the
rows just sent (no second read of RAM), a zero page's is 0, a page sent again is hashed again,
and the RAM digest is SHA-256 of each chunk's slice of that table. ``transferred`` counts every
stream byte written. ``file:`` is a snapshot, as QEMU's savevm writes one: the session pauses
the guest before the first round.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.drivers.source_common import SourceDriver
from pipeline.protocol.ram_batch import page_dtype, page_records, zero_records
from pipeline.session import actions as act
from pipeline.session import events as ev
from pipeline.stream_io import open_sink
from shm.memory import PAGE_SIZE, WORDS_PER_PAGE, nonzero_pages
from stages.pagehash import hash_rows, table_digests
from stages.scanner import Scanner

PAGE_BATCH = 2048          # pages gathered per write: 8 MiB
ZERO_BATCH = 1 << 16       # zero records per write: 576 KiB


class PageScanner(Scanner):
    """The scanner's dirty-log sync and zero test, returning pages rather than runs."""

    def scan_pages(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(block, dirty pages, which are non-zero) per block with dirty pages; clears them."""
        self.sync()
        t0 = time.perf_counter_ns()
        out = []
        for b, pending in enumerate(self.pending):
            pages = np.flatnonzero(pending)
            if len(pages):
                nz = nonzero_pages(self.views[b], pages)
                out.append((b, pages, nz))
                self.pages_scanned += len(pages)
                self.zero_pages += len(pages) - int(np.count_nonzero(nz))
            pending[:] = False
        self.busy_ns += time.perf_counter_ns() - t0
        return out


class StreamSource(SourceDriver):
    """One outgoing migration over ``tcp:`` or into ``file:``."""

    inline = True

    def __init__(self, uri, config, guest, **kw) -> None:
        super().__init__(uri, config, guest, **kw)
        self.sink = None
        self.scanner: PageScanner | None = None
        self._paced_from = 0.0
        self._scratch = np.empty(PAGE_BATCH, page_dtype(PAGE_SIZE))   # reused for every batch
        self.hashes = [np.zeros(b.nb_pages, np.uint64) for b in guest.region.blocks]

    # -- setup ---------------------------------------------------------------------------
    def _connect(self, action: act.Connect) -> ev.Connected:
        from shm.dirtylog import dirty_runs
        from stages.dirty_sources import open_dirty_source

        region = self.guest.region
        self.sink = open_sink(self.uri, self.check)
        self.stack.callback(self.sink.close)
        self.sink.open()
        source = open_dirty_source(self.guest.dirty_source(), region)
        self.stack.callback(source.close)
        views = [blk.view.view(np.uint64).reshape(-1, WORDS_PER_PAGE) for blk in region.blocks]
        self.scanner = PageScanner(views, region.chunk_pages, source.fetch, dirty_runs)
        self._paced_from = time.monotonic()
        return ev.Connected()

    # -- writing -------------------------------------------------------------------------
    def _write(self, buffers) -> None:
        self.sink.write(buffers)
        self.stats.update(control_bytes=self.sink.bytes_written)
        cap = self.config.max_bandwidth
        if cap:
            # Pace to max-bandwidth: sleep (in slices, checking) while ahead of the budget.
            while (ahead := self.sink.bytes_written / cap
                   - (time.monotonic() - self._paced_from)) > 0:
                self.check()
                time.sleep(min(ahead, 0.1))

    def _send_stream(self, action: act.SendStream) -> None:
        if action.payloads:
            self._write(list(action.payloads))

    def _send_pages(self, action: act.SendPages) -> ev.PagesSent:
        """Every dirty page since the last sync: ZERO records, then PAGE records gathered
        from RAM a batch at a time, each batch hashed from the rows just sent."""
        busy0 = self.scanner.busy_ns
        pages = zeros = 0
        for b, dirty, nz in self.scanner.scan_pages():
            blk = self.guest.region.blocks[b]
            view = blk.view.reshape(-1, PAGE_SIZE)
            zero, data = dirty[~nz], dirty[nz]
            named = True     # the first record of a block in a section names the block
            table = self.hashes[b]
            for i in range(0, len(zero), ZERO_BATCH):
                self._write(zero_records(blk.idstr, zero[i:i + ZERO_BATCH], named=named))
                named = False
            table[zero] = 0                              # a zero page hashes to 0
            for i in range(0, len(data), PAGE_BATCH):
                batch = data[i:i + PAGE_BATCH]
                bufs = page_records(blk.idstr, view, batch, named=named, scratch=self._scratch)
                self._write(bufs)
                hash_sent(table, view, batch, bufs)
                named = False
                self.check()
            pages += len(dirty)
            zeros += len(zero)
        return ev.PagesSent(pages, zeros, (self.scanner.busy_ns - busy0) / 1e9)

    def _sync(self, action: act.SyncDirtyLog) -> ev.Synced:
        self.check()
        return ev.Synced(self.scanner.sync())

    def _digest(self, action: act.ComputeDigest) -> ev.DigestReady:
        return ev.DigestReady(table_digests(self.hashes, self.guest.region.chunk_pages))

    def _await_confirmation(self, action: act.AwaitConfirmation) -> ev.Confirmed:
        self.sink.finish(action.timeout)
        return ev.Confirmed()

    def send_commit(self) -> None:
        self.sink.commit()

    def _abort(self, action: act.AbortPeer) -> None:
        """Closing the stream before its end is the failure a stream destination sees."""

    HANDLERS = {
        **SourceDriver.HANDLERS,
        act.Connect: _connect, act.SendStream: _send_stream, act.SendPages: _send_pages,
        act.SyncDirtyLog: _sync, act.ComputeDigest: _digest,
        act.AwaitConfirmation: _await_confirmation,
        act.AbortPeer: _abort,
    }


def hash_sent(table: np.ndarray, view: np.ndarray, batch: np.ndarray, bufs: list) -> None:
    """Hash what was just sent: the rows (a page the guest changes after its gather is dirty,
    so sent and hashed again later); a named first page from RAM."""
    rows = bufs[-1] if isinstance(bufs[-1], np.ndarray) else None
    n = len(rows) if rows is not None else 0
    if n:
        table[batch[len(batch) - n:]] = hash_rows(rows["page"].view(np.uint64))
    if len(batch) > n:
        table[batch[0]] = hash_rows(view[batch[:1]].view(np.uint64))[0]
