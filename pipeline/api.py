"""The library API: start an incoming or outgoing migration, watch it, cancel it, wait for it.

    from pipeline import MigrationConfig, SyntheticGuest, start_incoming, start_outgoing

    incoming = start_incoming("rdma:0.0.0.0:29200")                  # destination side
    with SyntheticGuest(512 << 20, run_id=new_run_id()).start() as guest:
        mig = start_outgoing("rdma:dest:29200", guest, MigrationConfig())
        mig.subscribe(lambda state, reason: print(state, reason))
        print(mig.stats()["ram"]["remaining"])
        summary = mig.wait()                                          # query-migrate-style

``run_local`` is the whole thing on one machine (what ``rdma-pipeline run`` does): a guest
(synthetic by default; ``guest=GuestSpec("kvm")`` for a KVM guest, ``GuestSpec(tracking="uffd")``
for kernel dirty tracking), a destination process, and the source, on the soft provider over
loopback. Every URI and option is checked before anything starts (``ValueError`` /
``InvalidURI``; ``GuestError`` when this machine cannot run the guest asked for).

``tcp:HOST:PORT`` works wherever ``rdma:`` does (pages inline in the stream over a socket;
``run_local(..., scheme="tcp")`` on one machine). ``save_to_file(path, guest)`` writes a
snapshot in QEMU's stream format (``file:``) and ``restore_from_file(path)`` restores it,
verified, or raises the ``MigrationError`` that says where the file is cut or damaged.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import multiprocessing.util  # noqa: F401 - see _cancel_running_at_exit
import socket
import threading
import time
import weakref
from collections.abc import Callable

from pipeline.config import MigrationConfig
from pipeline.guest.factory import GuestSpec
from pipeline.guest.synthetic import GuestState, SyntheticGuest
from pipeline.stats import MigrationStats
from pipeline.uri import URI, parse_uri
from shm import naming  # noqa: F401 - see _cancel_running_at_exit
from shm.errors import MigrationError, StageFailed

__all__ = ["Migration", "start_outgoing", "start_incoming", "run_local", "LocalRun",
           "MigrationConfig", "SyntheticGuest", "GuestState", "GuestSpec", "save_to_file",
           "restore_from_file"]


# Migrations still running in this process. A program that returns (or dies of an exception)
# with one still running must not leave its segments and stage processes behind: at exit each
# is cancelled and given EXIT_DEADLINE seconds to clean up, as Ctrl-C would. atexit runs the
# last-registered handler first, and both multiprocessing (which terminates daemon children and
# joins the rest) and shm.naming (which unlinks what this process still owns) must act after
# this one: both are imported above, before it is registered.
_running: weakref.WeakSet[Migration] = weakref.WeakSet()
EXIT_DEADLINE = 15.0


def cancel_all() -> int:
    """Cancel every migration this process runs (a signal's handler does); how many."""
    running = list(_running)
    for mig in running:
        mig.cancel()
    return len(running)


@atexit.register
def _cancel_running_at_exit() -> None:
    running = list(_running)
    for mig in running:
        mig.cancel()
    for mig in running:
        mig.finished(EXIT_DEADLINE)


class Migration:
    """A migration running in a background thread of this process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cancel_event = threading.Event()
        self._subscribers: list[Callable[[str, str], None]] = []
        self._done = threading.Event()
        self._summary: dict | None = None
        self._error: BaseException | None = None
        self._stats: MigrationStats | None = None
        self._thread: threading.Thread | None = None

    def _start(self, body: Callable[[], dict], stats: MigrationStats) -> Migration:
        self._stats = stats

        def main() -> None:
            try:
                self._summary = body()
            except BaseException as exc:  # noqa: BLE001 - kept for wait()
                self._error = exc
                self._summary = stats.snapshot(time.monotonic())
            finally:
                _running.discard(self)
                self._done.set()

        self._thread = threading.Thread(target=main, name=f"migration-{self.name}", daemon=True)
        _running.add(self)
        self._thread.start()
        return self

    def _emit(self, state: str, reason: str) -> None:
        for cb in list(self._subscribers):
            try:
                cb(state, reason)
            except Exception:  # noqa: BLE001 - a subscriber's bug must not stop a migration
                pass

    def subscribe(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(state, reason)`` on every state change (from the worker thread)."""
        self._subscribers.append(callback)

    def stats(self) -> dict:
        """Live query-migrate-style figures."""
        return self._stats.snapshot(time.monotonic())

    @property
    def status(self) -> str:
        return self._stats.status

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def finished(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the migration to end; whether it has."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Ask the migration to stop; it ends ``cancelled`` (``wait`` to see it done)."""
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the migration ends; its final summary (``status`` says how it ended)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"migration {self.name} still running after {timeout} s")
        self._thread.join()
        return self._summary

    @property
    def error(self) -> BaseException | None:
        return self._error


def _uri(uri: str | URI) -> URI:
    return uri if isinstance(uri, URI) else parse_uri(uri)


def start_outgoing(uri: str | URI, guest: SyntheticGuest, config: MigrationConfig | None = None,
                   *, run_id: str | None = None,
                   on_pass: Callable[[int], None] | None = None) -> Migration:
    """Migrate ``guest`` (started: a ``SyntheticGuest``, or a KVM guest from
    ``GuestSpec("kvm").create(...)``) to the destination listening at ``uri``. ``on_pass``
    is called (from the worker thread) with the pass number at each dirty-bitmap sync, as
    QEMU's MIGRATION_PASS event counts them."""
    from pipeline.drivers import source_driver
    from shm.naming import new_run_id

    target = _uri(uri)
    config = config or MigrationConfig()
    if config.chunk_size != guest.region.chunk_size:
        raise ValueError(f"chunk size {config.chunk_size} differs from the guest region's "
                         f"{guest.region.chunk_size}")
    mig = Migration("outgoing")
    stats = MigrationStats(on_sync=on_pass)
    src = source_driver(target)(target, config, guest, run_id=run_id or new_run_id(),
                                stats=stats, on_state=mig._emit, cancel=mig.cancel_event)
    mig.source = src
    return mig._start(src.run, stats)


def start_incoming(uri: str | URI, config: MigrationConfig | None = None, *,
                   blocks: list[tuple[str, int]] | None = None, keep_guest: bool = False,
                   on_listening: Callable[[int], None] | None = None,
                   guest_watch: float = 0.0, accept_timeout: float = math.inf,
                   dump_dir: str | None = None) -> Migration:
    """Listen at ``uri`` and receive one migration (the destination side); the guest, synthetic
    or KVM, is the one the stream carries. ``guest_watch``: seconds the resumed guest runs
    before it is stopped and reported in the summary's ``guest``; ``accept_timeout``: how long
    to wait for a source (as QEMU's -incoming, forever by default); ``dump_dir``: write the
    RAM and the device sections there once completed (``pipeline.dump``)."""
    from pipeline.drivers import destination_driver
    from shm.naming import new_run_id

    target = uri if isinstance(uri, URI) else _uri(uri)
    mig = Migration("incoming")
    inc = destination_driver(target)(target, config or MigrationConfig(), run_id=new_run_id(),
                                     blocks=blocks, on_state=mig._emit,
                                     cancel=mig.cancel_event, keep_guest=keep_guest,
                                     on_listening=on_listening, guest_watch=guest_watch,
                                     accept_timeout=accept_timeout, dump_dir=dump_dir)
    mig.incoming = inc
    return mig._start(inc.run, inc.stats)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


DEST_ENTRY = "pipeline.drivers.incoming_main:incoming_main"


class LocalRun:
    """Source, guest and a destination process on this machine; see ``run_local``.
    ``dest_entry`` ("module:function") runs the destination process, given ``dest_options``
    in its config (a test's misbehaving destination, say)."""

    def __init__(self, ram: int, config: MigrationConfig, *, state: GuestState,
                 fill: float = 0.5, host: str = "127.0.0.1",
                 dest_blocks: list[tuple[str, int]] | None = None,
                 guest: GuestSpec | None = None, guest_watch: float = 0.0,
                 scheme: str = "rdma", dest_prealloc: bool = False,
                 dest_entry: str = DEST_ENTRY, dest_options: dict | None = None) -> None:
        from shm.naming import new_run_id

        if scheme not in ("rdma", "tcp"):
            raise ValueError(f"scheme {scheme!r}: a local run migrates over rdma or tcp")
        self.scheme = scheme
        if ram <= 0 or ram % 4096:
            raise ValueError(f"RAM size {ram}: must be a positive multiple of 4 KiB")
        self.config = config
        self.run_id = new_run_id()
        self.host = host
        self.state = state
        self.fill = fill
        self.dest_blocks = dest_blocks
        self.dest_prealloc = dest_prealloc   # the destination faults its RAM in before listening
        self.dest_entry = dest_entry         # "module:function" of the destination process
        self.dest_options = dest_options or {}   # plain data for that entry (``options``)
        self.ram = ram
        self.spec = guest or GuestSpec("synthetic", None, state, fill)
        self.guest_watch = guest_watch   # seconds the destination's guest runs before its report
        self.guest = None
        self.dest = None
        self.migration: Migration | None = None
        self.dest_result: dict | None = None
        self.dest_states: list[tuple[str, str]] = []

    def start(self) -> Migration:
        from stages.harness import StageProcess

        if self.scheme == "rdma":        # its stage interpreters start while the guest boots
            from pipeline.source_pipeline import prestart

            prestart()
        # --machine none: QEMU's -M none, one block "ram"
        blocks = [("ram", self.ram)] if self.config.machine == "none" else None
        self.guest = self.spec.create(self.ram, run_id=self.run_id,
                                      chunk_size=self.config.chunk_size, blocks=blocks)
        self.guest.process.start()
        cfg = dataclasses.asdict(self.config)
        cfg["trace_control"] = None
        if self.dest_prealloc and self.dest_blocks is None:
            self.dest_blocks = [(b.idstr, b.length) for b in self.guest.region.blocks]
        self.dest = StageProcess("destination", self.dest_entry, {
            "config": cfg, "scheme": self.scheme, "host": self.host,
            "port": free_port(self.host),
            "run_id": self.run_id, "blocks": self.dest_blocks, "guest_watch": self.guest_watch,
            "prealloc": self.dest_prealloc, "options": self.dest_options},
            daemon=False)    # it starts the resumed guest as its own child
        self.dest.start()
        self.guest.process.wait_ready(60.0)
        port = self.dest.wait_ready(30.0)["port"]
        self.migration = start_outgoing(URI(self.scheme, self.host, port), self.guest, self.config,
                                        run_id=self.run_id)
        return self.migration

    def finish(self, timeout: float = 30.0) -> dict:
        """Wait for both sides; the source's summary with the destination's verdict merged."""
        summary = self.migration.wait()
        deadline = time.monotonic() + timeout
        if summary["status"] != "completed":
            try:
                self.dest.send("cancel")
            except StageFailed:
                pass
        while self.dest_result is None and time.monotonic() < deadline:
            try:
                msg = self.dest.recv(max(0.1, deadline - time.monotonic()), what="result")
            except StageFailed:
                break
            if msg[0] == "state":
                self.dest_states.append((msg[1], msg[2]))
            elif msg[0] == "result":
                self.dest_result = msg[1]
        dest = self.dest_result or {}
        summary["verified"] = dest.get("verified")
        summary["destination"] = {"status": dest.get("status", "unknown"),
                                  "error-desc": dest.get("error-desc", "")}
        if dest.get("guest"):
            summary["destination"]["guest"] = dest["guest"]
        if (summary["status"] == "failed" and "sent ERROR" in summary.get("error-desc", "")
                and dest.get("status") == "failed" and dest.get("error-desc")):
            # rdma:'s ERROR carries no reason; the destination's is known here: say it, as
            # tcp:'s return path does
            summary["error-desc"] = "the destination failed the migration: " + dest["error-desc"]
        if summary["status"] == "completed" and dest.get("status") != "completed":
            summary["guest-runs-on"] = "neither: the destination failed after the source "\
                                       "committed"
            summary["status"] = "failed"
            summary["error-desc"] = ("destination did not complete: "
                                     + dest.get("error-desc", "no answer"))
        if summary["status"] != "completed" and not summary.get("error-desc"):
            summary["error-desc"] = summary["destination"]["error-desc"] or summary["status"]
        return summary

    def guest_running(self) -> bool:
        """The source guest is alive and still writing (two state queries apart)."""
        try:
            a = self.guest.query().pages_written
            time.sleep(0.1)
            b = self.guest.query().pages_written
        except MigrationError:
            return False
        return b > a or not self.guest.busy

    def close(self) -> None:
        from stages.harness import discard_spares, sweep_pids

        discard_spares()
        if self.dest is not None:
            pid = self.dest.pid
            self.dest.stop(5.0)
            self.dest.close()
            sweep_pids([pid])      # what a killed destination could not remove itself
        if self.guest is not None:
            self.guest.close()

    def __enter__(self) -> LocalRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_local(ram: int, config: MigrationConfig | None = None, *,
              state: GuestState | None = None, fill: float = 0.5,
              on_progress: Callable[[dict], None] | None = None, interval: float = 0.2,
              **kw) -> dict:
    """A whole migration on this machine; returns the summary (``status`` says how it ended)."""
    config = config or MigrationConfig()
    with LocalRun(ram, config, state=state or GuestState(), fill=fill, **kw) as lr:
        mig = lr.start()
        try:
            while not mig.done:
                if on_progress is not None:
                    on_progress(mig.stats())
                mig.finished(interval)
        except KeyboardInterrupt:
            mig.cancel()
        return lr.finish()


def save_to_file(path: str, guest, config: MigrationConfig | None = None) -> dict:
    """Write a snapshot of ``guest`` (started) to ``path`` in QEMU's migration-stream format
    (``file:`` migration: the guest is paused first and stays paused); the summary, or the
    ``MigrationError`` that stopped it."""
    summary = start_outgoing(URI("file", path=path), guest, config).wait()
    if summary["status"] != "completed":
        raise MigrationError(summary.get("error-desc") or summary["status"])
    return summary


def restore_from_file(path: str, config: MigrationConfig | None = None, *,
                      keep_guest: bool = False) -> dict:
    """Restore a snapshot written by ``save_to_file`` (or ``migrate file:``): RAM verified, guest
    resumed from its device state; the summary, or the ``MigrationError`` that refused it (a
    file cut short or damaged: the offset, the section and what is wrong)."""
    mig = start_incoming(URI("file", path=path), config, keep_guest=keep_guest)
    summary = mig.wait()
    if mig.error is not None:
        raise mig.error
    return summary
