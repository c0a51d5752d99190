"""Start, watch and stop stage processes under one contract.

A stage is a function ``main(config: dict, link: StageLink) -> int`` named by a
``"module:function"`` string, run in a process started with the ``spawn`` method (nothing is
inherited but the plain ``config`` dict and one pipe). The child tells the parent through the pipe:

    ("ready", info)    once its resources exist (info: a plain dict, e.g. exported handles)
    ("error", line)    just before it exits with code 2; ``line`` is one line saying why
    anything else     stage-specific messages (the guest answers pause/resume this way)

Exit codes: 0 ok, 2 error. ``StageProcess.stop(deadline)`` joins, then terminates, then kills;
``close()`` is idempotent and unlinks what the stage owned and left (it was killed, say). Every
blocking wait watches the process sentinel, so a stage that dies is noticed at once
(``StageFailed``).

Signals and orphans (``stages.child``): a stage ignores SIGINT from its first instruction,
SIGTERM makes it unwind and exit 2 saying so, and a stage whose parent dies stops and unlinks
what its dead parent owned.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing import resource_tracker
from typing import Any

from shm.errors import MigrationError, StageFailed
from shm.memory import libc
from stages import child

EXIT_OK, EXIT_ERROR = 0, 2
POLL = 0.2     # seconds an Inbox thread blocks on a ring before it looks at its stop flag
_CTX = multiprocessing.get_context("spawn")


class StageLink:
    """The child's end of the pipe to its parent."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def ready(self, **info: Any) -> None:
        self.conn.send(("ready", info))

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.conn.poll(timeout)

    def recv(self) -> tuple:
        return self.conn.recv()

    def fileno(self) -> int:
        return self.conn.fileno()


def _entry(target: str, name: str, config: dict, conn, parent: int | None = None) -> None:
    child.install(parent, config)
    link = StageLink(conn)
    code = EXIT_ERROR
    try:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        code = int(func(config, link) or EXIT_OK)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and exit 2
        code = EXIT_ERROR
        if child.stop_reason():      # (whatever releasing raised after it: the cause is this)
            line = child.stop_reason()
        elif isinstance(exc, SystemExit):
            line = exc.code if isinstance(exc.code, str) else "terminated"
        else:
            line = str(exc) if isinstance(exc, MigrationError) else \
                f"{type(exc).__name__}: {exc}"
        if os.environ.get("RDP_DEBUG"):
            traceback.print_exc()
        try:
            conn.send(("error", line.splitlines()[0] if line else type(exc).__name__))
        except (OSError, ValueError):
            pass
    finally:
        # Always reached, and never left but by _exit: an orphaned stage's parent-watch SIGTERM
        # may land while the except clause above reports an earlier failure (the parent's pipe
        # closing first); raised from there it used to skip the release, leaving the dead
        # parent's RAM region behind.
        child.exiting()
        try:
            conn.close()
        except OSError:
            pass
        try:
            child.release(parent, config, failed=code != EXIT_OK)
            sys.stdout.flush()
        finally:
            os._exit(code)


def _spare_entry(modules: list[str], conn, parent: int) -> None:
    """A spare stage interpreter (``prestart``): imports ``modules`` ahead of time, then
    becomes the stage whose (target, name, config) arrive on its pipe; exits 0 unused when the
    pipe closes (its parent discarded it, or died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the stage's own import reports it, with its name
            pass
    try:
        target, name, config = conn.recv()
    except (EOFError, OSError):
        os._exit(EXIT_OK)
    _entry(target, name, config, conn, parent)


# Spare interpreters by target, started ahead of the stages that take them (``prestart``).
_SPARES: dict[str, list[tuple[Any, Any]]] = {}
_SPARES_LOCK = threading.Lock()
PRELOAD = ("numpy", "shm.ring", "shm.region", "stages.harness", "stages.verbs.soft")


def prestart(targets: list[str]) -> None:
    """Start one spare interpreter per ``"module:function"`` in ``targets``, importing its
    module: a ``StageProcess`` of that target started later (daemonic, in this process) takes
    it instead of spawning, so the imports (a fresh interpreter with numpy: 100-300 ms here,
    more on a loaded machine) are paid before the migration rather than in its setup-time.
    ``discard_spares`` ends those left unused."""
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for target in targets:
            mine, theirs = _CTX.Pipe(duplex=True)
            proc = _CTX.Process(target=_spare_entry,
                                args=([*PRELOAD, target.split(":")[0]], theirs, os.getpid()),
                                name="rdp-spare", daemon=True)
            proc.start()
            theirs.close()
            with _SPARES_LOCK:
                _SPARES.setdefault(target, []).append((proc, mine))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _take_spare(target: str) -> tuple[Any, Any] | None:
    with _SPARES_LOCK:
        spares = _SPARES.get(target, [])
        while spares:
            proc, conn = spares.pop(0)
            if proc.exitcode is None:
                return proc, conn
            conn.close()
            proc.join(0)
    return None


def discard_spares(targets: list[str] | None = None) -> None:
    """End the spare interpreters no stage took (of ``targets`` only, when given; they exit
    when their pipe closes)."""
    with _SPARES_LOCK:
        names = list(_SPARES) if targets is None else [t for t in targets if t in _SPARES]
        spares = [s for name in names for s in _SPARES.pop(name)]
    for _proc, conn in spares:
        conn.close()
    for proc, _conn in spares:
        proc.join(2.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(2.0)
        proc.close()


EXIT_WAIT_S = 1.0     # a stage that reported its error is on its way out


class StageProcess:
    """One named stage process; a context manager that always leaves nothing running."""

    def __init__(self, name: str, target: str, config: dict, *, daemon: bool = True) -> None:
        self.name = name
        self.target = target
        self.config = config
        self.conn, child_end = _CTX.Pipe(duplex=True)
        self._child_conn = child_end
        self.process = _CTX.Process(target=_entry, args=(target, name, config, child_end,
                                                         os.getpid()),
                                    name=f"rdp-{name}", daemon=daemon)
        self.error_line = ""
        self.info: dict = {}
        self._closed = False
        self._pending: list[tuple] = []

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> StageProcess:
        spare = _take_spare(self.target) if self.process.daemon else None
        if spare is not None:                # a prestarted interpreter becomes this stage
            self._child_conn.close()
            self.conn.close()
            self.process, self.conn = spare
            self.process.name = f"rdp-{self.name}"
            self.send(self.target, self.name, self.config)
            return self
        # The child inherits this thread's signal mask through fork and exec: with SIGINT
        # blocked, a Ctrl-C while it boots waits until it ignores SIGINT (``_entry``). The
        # resource tracker starts first: starting it unblocks SIGINT in the calling thread.
        resource_tracker.ensure_running()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._child_conn.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def failure(self) -> StageFailed:
        """The StageFailed describing how this stage ended (reads its last words; a stage
        that said why it fails is given a moment to be gone, so its exit code is known)."""
        self._drain_messages()
        if self.error_line and self.process.pid is not None and self.process.exitcode is None:
            self.process.join(EXIT_WAIT_S)
        return StageFailed(self.name, self.process.exitcode, self.error_line)

    def check(self) -> None:
        """Raise StageFailed if the stage has exited (successfully or not) or reported an error."""
        self._drain_messages()
        if self.error_line or self.process.exitcode is not None:
            self.process.join(0.5)
            raise self.failure()

    def wait_ready(self, timeout: float) -> dict:
        """The stage's ready info; other messages sent before it are kept for ``recv``."""
        deadline = time.monotonic() + timeout
        early = []
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()) or 1e-3, what="start")
            if msg[0] == "ready":
                break
            early.append(msg)
        self._pending[:0] = early
        self.info = msg[1]
        return self.info

    # -- messages ------------------------------------------------------------------------
    def send(self, *msg: Any) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError):
            self.process.join(0.5)
            raise self.failure() from None

    def recv(self, timeout: float, what: str = "answer") -> tuple:
        """Next message from the stage; StageFailed if it dies first, or on timeout."""
        if self._pending:
            return self._pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageFailed(self.name, None, f"no {what} within {timeout:g} s")
            ready = multiprocessing.connection.wait([self.conn, self.process.sentinel], left)
            if self.conn in ready:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    self.process.join(1.0)
                    raise self.failure() from None
                if msg[0] == "error":
                    self.error_line = msg[1]
                    self.process.join(1.0)
                    raise self.failure()
                return msg
            if self.process.sentinel in ready:
                self.process.join(0.5)
                raise self.failure()

    @property
    def failed(self) -> bool:
        """The stage reported an error or exited non-zero (reads what it sent so far)."""
        self._drain_messages()
        code = self.process.exitcode
        return bool(self.error_line) or (code is not None and code != 0)

    def take(self, kind: str) -> list[tuple]:
        """The messages of ``kind`` the stage sent so far, removed from those kept."""
        self._drain_messages()
        out = [m for m in self._pending if m and m[0] == kind]
        self._pending = [m for m in self._pending if not (m and m[0] == kind)]
        return out

    def _drain_messages(self) -> None:
        try:
            while not self.conn.closed and self.conn.poll(0):
                msg = self.conn.recv()
                if msg and msg[0] == "error":
                    self.error_line = msg[1]
                else:
                    self._pending.append(msg)
        except (EOFError, OSError):
            pass

    # -- teardown ------------------------------------------------------------------------
    def stop(self, timeout: float = 2.0) -> int | None:
        """Join within ``timeout``, then SIGTERM, then SIGKILL; returns the exit code."""
        if self.process.pid is None:
            return None
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.terminate()
            self.process.join(1.0)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(2.0)
        self._drain_messages()
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.pid is not None and self.process.exitcode is None:
            self.process.kill()
            self.process.join(2.0)

    def close(self) -> None:
        """Kill the stage if it still runs, and unlink what it owned and left (idempotent)."""
        if self._closed:
            return
        self._closed = True
        pid = self.process.pid
        if pid is not None and self.process.exitcode is None:
            self.kill()
        try:
            self.conn.close()
        except OSError:
            pass
        if pid is not None:
            dead = self.process.exitcode is not None
            self.process.close()
            if dead:
                sweep_pids([pid])

    def __enter__(self) -> StageProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Inbox:
    """Several blocking inputs (rings) merged into one queue with a selectable wake-up fd.

    Shm rings block on semaphores and cannot be select()ed; each watched ring gets a thread that
    pops batches and queues ``(name, records)``, ending with an empty batch at end of stream or
    ``(name, exception)`` if the ring failed. ``fileno()`` is readable while items wait, so a
    stage can select() on it together with a completion-queue fd.
    """

    def __init__(self) -> None:
        import queue

        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._threads: list = []
        self._stopping = False

    def watch(self, name: str, ring, max_n: int = 4096) -> None:
        import threading

        from shm.ring import RingTimeout

        def pump() -> None:
            while not self._stopping:
                try:
                    recs = ring.pop(max_n, timeout=POLL)
                except RingTimeout:
                    continue
                except BaseException as exc:  # noqa: BLE001 - handed to the owner's loop
                    self.put((name, exc))
                    return
                self.put((name, recs))
                if len(recs) == 0:
                    return

        t = threading.Thread(target=pump, name=f"inbox-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the watcher threads (before the rings close); True if all of them ended."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def put(self, item: tuple) -> None:
        self._q.put(item)
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass

    def get(self, timeout: float | None = None) -> tuple | None:
        """The next ``(name, records | exception)``, or None after ``timeout`` seconds."""
        import queue

        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        try:
            os.read(self._r, 1)
        except BlockingIOError:
            pass
        return item

    def get_nowait(self) -> tuple | None:
        """The next item if one waits, else None. ``put`` queues an item before it writes its
        wake-up byte, so a reader can take the item first and find the byte later: with the
        queue empty, every byte left in the pipe is a stray, drained here before the queue is
        looked at again (a fd left readable with nothing queued made a select() loop spin)."""
        if self._q.empty():
            self._drain()
            if self._q.empty():
                return None
        return self.get(timeout=0)

    def _drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def fileno(self) -> int:
        return self._r

    def close(self) -> None:
        self.stop()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


def limit_memlock(limit: int) -> None:
    """Make this process meet RLIMIT_MEMLOCK = ``limit`` bytes, as an unprivileged one would:
    set the limit and drop CAP_IPC_LOCK (which lets root pin past it). For ``x-memlock-limit``,
    which stands in for a host whose ``ulimit -l`` is too low."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    hdr = Header(0x20080522, 0)          # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        return
    cap_ipc_lock = 1 << 14
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & ~cap_ipc_lock)
    libc.capset(ctypes.byref(hdr), data)


def sweep_pids(pids) -> list[str]:
    """Unlink the shared-memory objects owned by ``pids`` once those processes are dead (a
    stage killed before it could remove its own, e.g. the registrar's exported PD table)."""
    pids = {p for p in pids if p}
    return child.unlink_entries(lambda e: e.name.pid in pids and not e.owner_alive)
