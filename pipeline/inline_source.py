"""The source of a migration with pages inline in the stream: ``tcp:HOST:PORT`` and ``file:PATH``.

One process, no stage processes: the coordinator's thread syncs the dirty log and zero-tests
dirty pages with the scanner's own code (``PageScanner``: ``Scanner.sync`` and
``nonzero_pages``, page by page instead of in runs, because inline records name pages), and
writes the records itself, vectorised (``protocol.ram_batch``: one header expression and one
gather per batch of up to ``PAGE_BATCH`` pages; no Python loop per page), to a socket or a
file (``stream_io``). What RDMA splits over three processes (find, register, write) is here a
gather and a send, both bounded by memory bandwidth, so a pipeline of processes would add
copies without adding parallelism.

    setup      header, CONFIGURATION, ram START: MEM_SIZE, EOS, FOOTER
    rounds     ram PART: ZERO / PAGE records of every dirty page, EOS, FOOTER; a dirty-log sync
               and ``SourceMigration``'s convergence rule decide what next
    finish     pause, ram END: the last dirty pages, EOS, FOOTER; the guest's device section,
               the RAM digest, EOF, VMDESCRIPTION; ``tcp:`` waits for the destination's SHUT(0)

Verification is rdma:'s (``stages.pagehash``): the 64-bit hash of every page is taken from the
rows just sent (no second read of RAM), a zero page's is 0, a page sent again is hashed again,
and the RAM digest is SHA-256 of each chunk's slice of that table; so switchover hashes only
what the final round sends.

``file:`` is a snapshot, as QEMU's savevm writes one: the guest is paused before the copy, so
the first round sends all of RAM, the sync finds nothing dirty and END is empty. The states,
failure rules (the guest resumed if we paused it, one-line reasons) and statistics are
``SourceMigration``'s; ``transferred`` counts every stream byte written.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.coordinator import SourceMigration
from pipeline.migration_state import State
from pipeline.protocol.ram_batch import page_dtype, page_records, zero_records
from pipeline.protocol.records import (
    RAM_IDSTR,
    RAM_VERSION,
    EndOfSection,
    MemSize,
    RamBlockInfo,
    SectionFooter,
    SectionHeader,
    SectionType,
)
from pipeline.sections import RAM_SID, write_header
from pipeline.stream_io import open_sink
from shm.memory import PAGE_SIZE, nonzero_pages
from shm.memory import WORDS_PER_PAGE as WORDS
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


class InlinePipeline:
    """What ``SourceMigration`` asks of its pipeline (``sync``, ``check``, ``dead_stage``,
    ``close``), done in this process over the guest's dirty source."""

    def __init__(self, guest) -> None:
        from shm.dirtylog import dirty_runs
        from stages.dirty_sources import open_dirty_source

        self.source = open_dirty_source(guest.dirty_source(), guest.region)
        views = [blk.view.view(np.uint64).reshape(-1, WORDS) for blk in guest.region.blocks]
        self.scanner = PageScanner(views, guest.region.chunk_pages, self.source.fetch,
                                   dirty_runs)

    def sync(self, r: int, check) -> int:
        check()
        return self.scanner.sync()

    def check(self) -> None:
        pass

    def dead_stage(self):
        return None

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None


class InlineSource(SourceMigration):
    """One outgoing migration over ``tcp:`` or into ``file:``; ``run()`` blocks."""

    def __init__(self, uri, config, guest, **kw) -> None:
        super().__init__(uri, config, guest, **kw)
        self.sink = open_sink(uri, self.check)
        self.snapshot = uri.scheme == "file"
        self.state = None
        self._paced_from = 0.0
        self._scratch = np.empty(PAGE_BATCH, page_dtype(PAGE_SIZE))   # reused for every batch
        self.hashes = [np.zeros(b.nb_pages, np.uint64) for b in guest.region.blocks]

    # -- the whole migration -------------------------------------------------------------
    def run(self) -> dict:
        region = self.guest.region
        self.stats.update(start_time=time.monotonic(), total_bytes=region.total_length,
                          remaining_bytes=region.total_length)
        if hasattr(self.guest, "kind"):
            self.stats.update(guest=self.guest.kind, dirty_tracking=self.guest.tracking)
        self._to(State.SETUP)
        try:
            self.sink.open()
            self.pipeline = InlinePipeline(self.guest)
            if self.snapshot:
                self._pause()
            self._setup()
            self._to(State.ACTIVE)
            self._iterate()
            self._to(State.DEVICE)
            self._switchover()
            self._to(State.COMPLETED)
        except BaseException as exc:
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._teardown()
        return self.stats.snapshot(time.monotonic())

    def _teardown(self) -> None:
        super()._teardown()
        self.sink.close()

    def _pause(self) -> None:
        self.state = self.guest.pause()
        self.paused = True
        self.stats.update(pause_time=self.guest.paused_at)

    # -- writing -------------------------------------------------------------------------
    def _send(self, buffers) -> int:
        n = self.sink.write(buffers)
        self.stats.update(control_bytes=self.sink.bytes_written)
        cap = self.config.max_bandwidth
        if cap:
            # Pace to max-bandwidth: sleep (in slices, checking) while ahead of the budget.
            while (ahead := self.sink.bytes_written / cap
                   - (time.monotonic() - self._paced_from)) > 0:
                self.check()
                time.sleep(min(ahead, 0.1))
        return n

    def _flush(self) -> None:
        payloads = self.writer.flush()
        if payloads:
            self._send(payloads)

    def _setup(self) -> None:
        w = self.writer
        self._paced_from = time.monotonic()
        write_header(w)
        w.write_event(SectionHeader(SectionType.SECTION_START, RAM_SID, RAM_IDSTR, 0,
                                    RAM_VERSION))
        w.write_event(MemSize(tuple(RamBlockInfo(b.idstr, b.length)
                                    for b in self.guest.region.blocks)))
        w.write_event(EndOfSection())
        w.write_event(SectionFooter(RAM_SID))
        self._flush()
        self.stats.update(setup_end=time.monotonic())

    def _round(self, r: int, section: SectionType, cmd: int) -> tuple[int, float]:
        t0 = time.monotonic()
        sent0 = self.sink.bytes_written
        w = self.writer
        w.write_event(SectionHeader(section, RAM_SID, RAM_IDSTR))
        self._flush()
        scanner = self.pipeline.scanner
        st = self.stats
        for b, pages, nz in scanner.scan_pages():
            blk = self.guest.region.blocks[b]
            view = blk.view.reshape(-1, PAGE_SIZE)
            zero, data = pages[~nz], pages[nz]
            named = True     # the first record of a block in a section names the block
            table = self.hashes[b]
            for i in range(0, len(zero), ZERO_BATCH):
                self._send(zero_records(blk.idstr, zero[i:i + ZERO_BATCH], named=named))
                named = False
            table[zero] = 0                              # a zero page hashes to 0
            for i in range(0, len(data), PAGE_BATCH):
                batch = data[i:i + PAGE_BATCH]
                bufs = page_records(blk.idstr, view, batch, named=named, scratch=self._scratch)
                self._send(bufs)
                self._hash_sent(table, view, batch, bufs)
                named = False
                self.check()
            st.update(duplicate_pages=st.duplicate_pages + len(zero),
                      normal_pages=st.normal_pages + len(data))
            st.stages.bytes_written += len(data) * PAGE_SIZE
        w.write_event(EndOfSection())
        w.write_event(SectionFooter(RAM_SID))
        self._flush()
        secs = time.monotonic() - t0
        sent = self.sink.bytes_written - sent0
        fig = st.stages
        st.rounds.append({"round": r, "start": round(t0 - st.start_time, 4),
                          "seconds": round(secs, 4), "bytes": sent,
                          "pages": scanner.pages_scanned - fig.pages_scanned,
                          "zero-pages": scanner.zero_pages - fig.zero_pages, "remaining": 0})
        fig.pages_scanned, fig.zero_pages = scanner.pages_scanned, scanner.zero_pages
        fig.scanner_busy_s = scanner.busy_ns / 1e9
        st.update(round=r, mbps=sent * 8 / 1e6 / secs if secs > 0 else 0.0)
        return sent, secs

    @staticmethod
    def _hash_sent(table: np.ndarray, view: np.ndarray, batch: np.ndarray, bufs: list) -> None:
        """Hash what was just sent: the rows (a page the guest changes after its gather is
        dirty, so sent and hashed again later); a named first page from RAM."""
        rows = bufs[-1] if isinstance(bufs[-1], np.ndarray) else None
        n = len(rows) if rows is not None else 0
        if n:
            table[batch[len(batch) - n:]] = hash_rows(rows["page"].view(np.uint64))
        if len(batch) > n:
            table[batch[0]] = hash_rows(view[batch[:1]].view(np.uint64))[0]

    # -- switchover ----------------------------------------------------------------------
    def _switchover(self) -> None:
        if not self.paused:
            self._pause()
        self._round(self.rounds + 1, SectionType.SECTION_END, 0)
        w = self.writer
        sections = self.sections
        sections.guest(w, self.guest.device_section, self.state.to_bytes())
        sections.digest(w, table_digests(self.hashes, self.guest.region.chunk_pages))
        sections.end(w)
        self._flush()
        self.stats.update(remaining_bytes=0)
        self.sink.finish()
        if not self.snapshot:
            # SHUT(0) came: the destination verified the RAM and resumed the guest.
            self.stats.update(resume_time=time.monotonic(), verified=True)
