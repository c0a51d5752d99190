"""What the destination drivers share: the run loop that feeds a ``DestinationSession``, the
RAM region, the guest process and the page hasher.

``DestinationDriver`` is a context manager owning everything it opens through one
``ExitStack``; a carrier (``RdmaDestination``, ``StreamDestination``) adds the actions that
move bytes. Closing order (the stack's, last opened first) keeps two rules: the region is
released last, after the guest and after every MR and connection that could still write into
it (its closer is pushed when the driver is entered, before anything else), and every thread
that reads RAM (populator, hasher) stops before it. ``run()`` blocks until the migration is
completed (the summary) or not (it raises: the driver's own error, or the session's).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from pipeline.config import MigrationConfig
from pipeline.drivers.loop import one_line, run_session
from pipeline.session import destination_events as de
from pipeline.session.destination import DestinationSession
from pipeline.session.states import DestinationState
from pipeline.stats import MigrationStats
from shm.errors import MigrationCancelled, MigrationError
from shm.memory import PAGE_SIZE, WORDS_PER_PAGE, Madv, madvise, nonzero_pages

GUEST_ENTRY = "pipeline.guest.factory:incoming_guest_main"
GUEST_TIMEOUT_S = 30.0


def create_region(run_id: str, blocks, chunk_size: int, *, prealloc: bool = False):
    """The destination's RAM region (``prealloc``: every page faulted in now, in bulk, as
    QEMU's -mem-prealloc does: writes then land in memory already there)."""
    from shm.region import RamBlockSpec, RamRegion

    region = RamRegion.create(run_id, [RamBlockSpec(n, s) for n, s in blocks], chunk_size,
                              kind="dstram")
    if prealloc:
        try:
            preallocate(region)
        except BaseException:
            region.close()
            region.unlink()
            raise
    return region


def preallocate(region) -> None:
    for blk in region.blocks:
        if not madvise(blk.address, blk.length, Madv.POPULATE_WRITE):
            blk.view[::PAGE_SIZE] = 0                       # older kernel: touch


def region_blocks(region) -> tuple[de.RegionBlock, ...]:
    return tuple(de.RegionBlock(b.idstr, b.offset, b.length, b.address) for b in region.blocks)


def zero_range(region, name: str, start: int, length: int) -> None:
    """Zero the pages of a range that hold data; pages not in memory are zero already and
    reading them would allocate them."""
    pages = region.block(name).view[start:start + length].view(np.uint64).reshape(
        -1, WORDS_PER_PAGE)
    nonzero = nonzero_pages(pages, np.arange(len(pages)))
    if nonzero.any():
        pages[nonzero] = 0


class DestinationGuest:
    """The destination's guest process: started early and idle until ``resume`` loads its
    device state (``pipeline.guest.factory.incoming_guest_main``)."""

    def __init__(self, region_name: str, report: dict | None = None) -> None:
        from stages.harness import StageProcess

        self.process = StageProcess("dst-guest", GUEST_ENTRY, {"region": region_name})
        self.report = {} if report is None else report   # where it resumed, where it stopped

    def start(self) -> DestinationGuest:
        self.process.start()
        return self

    def resume(self, section: str, body: bytes) -> dict:
        self.process.wait_ready(GUEST_TIMEOUT_S)
        self.process.send("load", section, body)
        msg = self.process.recv(GUEST_TIMEOUT_S, what="resume")
        self.report["resumed"] = msg[2] if len(msg) > 2 else {}
        return self.report["resumed"]

    def stop(self) -> dict | None:
        """Stop it; its last state (once it ran) is kept in ``report["stopped"]``."""
        state = None
        proc = self.process
        if proc.pid is not None and proc.alive:
            try:
                if not proc.info:
                    proc.wait_ready(GUEST_TIMEOUT_S)
                proc.send("stop")
                state = proc.recv(5.0, what="stop")[1]
                if state and self.report:
                    self.report["stopped"] = state
            except MigrationError:
                pass
        proc.stop(2.0)
        proc.close()
        return state


class DestinationDriver:
    """The part of a destination driver every carrier shares; subclasses set ``CARRY``
    (action type -> method) for their own actions and open their connections in ``accept``."""

    def __init__(self, uri, config: MigrationConfig, *, run_id: str,
                 blocks: list[tuple[str, int]] | None = None,
                 on_state: Callable[[str, str], None] | None = None,
                 on_listening: Callable[[int], None] | None = None,
                 cancel: threading.Event | None = None, keep_guest: bool = False,
                 accept_timeout: float = math.inf, guest_watch: float = 0.0,
                 prealloc: bool = False, dump_dir: str | None = None) -> None:
        self.uri = uri
        self.config = config
        self.run_id = run_id
        self.on_state = on_state or (lambda s, r: None)
        self.on_listening = on_listening or (lambda port: None)
        self.cancel = cancel or threading.Event()
        self.keep_guest = keep_guest
        self.accept_timeout = accept_timeout
        self.guest_watch = guest_watch      # seconds the resumed guest runs before a report
        self.dump_dir = dump_dir            # --dump: RAM and device sections, once completed
        self.device_sections: list[tuple] = []   # (idstr, instance, version, id, data)
        self.stats = MigrationStats()
        self.session = self.create_session(blocks, prealloc)
        self.region = None
        self.guest: DestinationGuest | None = None
        self.guest_report: dict = {}        # where the guest resumed, and where it stopped
        self.hasher = None                  # stages.pagehash.PageHasher, at the first pages
        self._hash_names: tuple[str, ...] = ()
        self._stack: contextlib.ExitStack | None = None
        self._error: BaseException | None = None   # the driver's own failure, re-raised

    def create_session(self, blocks, prealloc: bool) -> DestinationSession:
        raise NotImplementedError

    # -- ownership -----------------------------------------------------------------------
    def __enter__(self):
        from stages.harness import discard_spares, prestart

        self._stack = contextlib.ExitStack()
        self._stack.callback(self._close_region)       # last: after all that writes into it
        if self.session.carrier != "file":
            # The guest process starts with the stream (its MEM_SIZE); its interpreter starts
            # now, while this side waits for a source: its imports (about 0.1 core-s) then
            # stay out of the first round, where both cores are busy moving pages.
            prestart([GUEST_ENTRY])
            self._stack.callback(discard_spares, [GUEST_ENTRY])
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release everything opened, last opened first; idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _close_region(self) -> None:
        if self.region is None or self._kept():
            return
        region, self.region = self.region, None
        region.close()
        region.unlink()

    def _kept(self) -> bool:
        return self.keep_guest and self.session.state is DestinationState.COMPLETED

    def stop_guest(self) -> dict | None:
        """Stop a guest kept running (``keep_guest``) and release its region."""
        state = None
        if self.guest is not None:
            state = self.guest.stop()
            self.guest = None
        self.keep_guest = False
        self._close_region()
        return state

    # -- the loop ------------------------------------------------------------------------
    def check(self) -> None:
        """Raise if the migration was cancelled or the idle guest died (called inside every
        wait and before confirming), unless it is too late: the destination confirmed and the
        source may have committed."""
        if self.session.committing:
            return
        if self.cancel.is_set():
            raise MigrationCancelled("incoming migration cancelled")
        if self.guest is not None and not self.session.resumed:
            self.guest.process.check()   # a guest that died cannot be resumed: say so first

    def run(self) -> dict:
        with self:
            self._loop()
            if self.session.state is DestinationState.COMPLETED and self.dump_dir:
                self.dump()
            if self.session.state is DestinationState.COMPLETED and self.guest_watch > 0:
                self.cancel.wait(self.guest_watch)   # let the resumed guest run a little
        if self.session.state is not DestinationState.COMPLETED:
            raise self._error or self.session.error or MigrationError("migration not completed")
        return self.summary()

    def dump(self) -> None:
        """``--dump``: after the commit point, so a failure is the summary's warning."""
        from pipeline.dump import write_dump

        try:
            write_dump(self.dump_dir, [(b.idstr, b.view) for b in self.region.blocks]
                       if self.region is not None else [],
                       self.device_sections, self.session.description)
        except (OSError, ValueError) as exc:
            self.stats.update(warning=f"--dump {self.dump_dir}: {exc}")

    def _loop(self) -> None:
        run_session(self.session, lambda action: self.CARRY[type(action)](self, action),
                    self._failure)

    def _failure(self, exc: BaseException):
        if isinstance(exc, MigrationCancelled | KeyboardInterrupt):
            if isinstance(exc, KeyboardInterrupt):
                self._error = exc
            return de.Cancel()
        self._error = exc
        if isinstance(exc, MigrationError):
            self.name_error(exc)
        return de.Failed(one_line(exc))

    def name_error(self, exc: MigrationError) -> None:
        """Let the error say which stream it is about (a file's path)."""
        if self.session.label:
            exc.message = f"{self.session.label}: {exc.message}"
            exc.args = (exc.message,)

    def summary(self) -> dict:
        snap = self.stats.snapshot(time.monotonic())
        snap["verified"] = self.session.verified
        if self.guest_report:
            snap["guest"] = dict(self.guest_report)
        return snap

    # -- shared actions ------------------------------------------------------------------
    def _state_changed(self, a: de.StateChanged):
        self.on_state(a.state, a.reason)

    def _create_region(self, a: de.CreateRegion):
        self.region = create_region(self.run_id, a.blocks, a.chunk_size, prealloc=a.prealloc)
        return de.RegionCreated(region_blocks(self.region))

    def _start_guest(self, a: de.StartGuest | None = None):
        if self.guest is None:
            self.guest = DestinationGuest(self.region.name, self.guest_report)
            self._stack.callback(self._stop_guest)
            self.guest.start()

    def _stop_guest(self, a: de.StopGuest | None = None) -> None:
        if self.guest is None or self._kept():
            return
        guest, self.guest = self.guest, None
        try:
            guest.stop()
        except Exception:  # noqa: BLE001 - the region and the rest are released regardless
            pass

    def _load_guest(self, a: de.LoadGuest):
        self._start_guest()
        return de.GuestResumed(self.guest.resume(a.section, a.state))

    def _zero_range(self, a: de.ZeroRange):
        zero_range(self.region, a.block, a.start, a.length)

    def hasher_for(self, names: tuple[str, ...]):
        """The page hasher, its tables in the block order ``names`` (the first asked)."""
        if self.hasher is None:
            from stages.pagehash import PageHasher

            self._hash_names = tuple(names)
            self.hasher = PageHasher([self.region.block(n).view.view(np.uint64)
                                      .reshape(-1, WORDS_PER_PAGE) for n in names])
            self._stack.callback(self._close_hasher)
        return self.hasher

    def _close_hasher(self) -> None:
        hasher, self.hasher = self.hasher, None
        if hasher is not None:
            hasher.close()

    def _hash_round(self, a: de.HashRound):
        self.hasher_for(a.blocks).submit(a.body)

    def _settle_hashes(self, a: de.SettleHashes):
        if self.hasher is not None:
            self.hasher.wait()

    def _hash_ram(self, a: de.HashRam):
        from pipeline.protocol.capabilities import Digest

        if a.digest == Digest.PAGE_HASH:
            from stages.pagehash import table_digests

            tables = self.hasher_for(a.blocks).wait()
            by_name = dict(zip(self._hash_names, tables, strict=True))
            return de.RamHashed(table_digests([by_name[n] for n in a.blocks],
                                              a.chunk_size // PAGE_SIZE))
        from pipeline.digest import chunk_digests

        ordered = SimpleNamespace(blocks=[self.region.block(n) for n in a.blocks])
        return de.RamHashed(chunk_digests(ordered, chunk_size=a.chunk_size))

    CARRY: dict = {
        de.StateChanged: _state_changed, de.CreateRegion: _create_region,
        de.StartGuest: _start_guest, de.StopGuest: _stop_guest, de.LoadGuest: _load_guest,
        de.ZeroRange: _zero_range,
        de.HashRound: _hash_round, de.SettleHashes: _settle_hashes, de.HashRam: _hash_ram,
    }
