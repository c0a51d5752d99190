"""What a stage process does about signals and about its parent, around its stage function.

Signals. A stage ignores SIGINT from its first instruction (``StageProcess.start`` spawns it with
SIGINT blocked, and ``install`` sets SIG_IGN before unblocking it, which drops one that came
while it booted): Ctrl-C reaches the whole process group, and belongs to the coordinator, which
stops its stages itself. SIGTERM makes a stage unwind (its ``with`` blocks release what it
holds) and exit 2 with the line "terminated by SIGTERM"; the handler raises through
``shm.semaphores.raise_from_handler``, so no ring or dirty-log wait swallows it. A second SIGTERM
while it unwinds is ignored (the parent kills a stage that does not end).

Orphans. A thread of each stage waits on a pidfd of its parent. If the parent dies (SIGKILL) the
stage stops itself as SIGTERM does ("its parent (pid N) died"), and as it exits (however it
noticed: the pidfd, its pipe or a ring) it unlinks the objects of its runs whose owner is dead
(the parent's rings and RAM region: nobody else would) besides its own; a stage that has not
ended ORPHAN_GRACE seconds later does that from the thread and exits. So a SIGKILLed
coordinator leaves nothing once its children have noticed, which takes well under 2 s. What it
can leave: its guest is gone with it (the guest process is its child, as a VM dies with its
QEMU), and a SIGKILL of the whole process group at once leaves objects of dead owners, for
``rdma-pipeline cleanup``. Every stage also unlinks what it still owns as it exits, and
``StageProcess.close`` what a killed stage could not.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable

from shm.semaphores import raise_from_handler

ORPHAN_GRACE = 1.0   # seconds an orphaned stage may take to unwind before it is cut short
PARENT_EXIT_S = 0.5  # how long a failed stage waits to see whether its parent is dying
_EXIT_ERROR = 2


class _State:
    orphaned_by = 0                  # the parent's pid once it died
    stopping = ""                    # why, once SIGTERM was turned into an exception
    exiting = threading.Event()      # the stage function has returned: nothing more to unwind


def install(parent: int | None, config: dict) -> None:
    """First thing in a stage process: the signal dispositions, and the parent's watcher."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, _on_sigterm)
    if parent:
        threading.Thread(target=_watch_parent, args=(parent, config), name="parent-watch",
                         daemon=True).start()


def stop_reason() -> str:
    """Why this stage was told to stop ("" if it was not)."""
    return _State.stopping


def exiting() -> None:
    """The stage function has returned or raised: a SIGTERM has nothing left to unwind."""
    _State.exiting.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def release(parent: int | None, config: dict, *, failed: bool = False) -> list[str]:
    """Last thing in a stage process: unlink what it still owns and, once its parent is gone,
    what the dead processes of its runs owned (``release_orphan``). A stage that failed may
    have seen its parent's pipe close before the parent was gone (a dying process closes its
    files first, and only then its children are handed to init): it gives the parent a moment
    to finish dying before it decides."""
    if failed and parent and not _State.orphaned_by and _gone_within(parent, PARENT_EXIT_S):
        _State.orphaned_by = parent
    if _State.orphaned_by or (parent and os.getppid() != parent):
        return release_orphan(config)
    me = os.getpid()
    return unlink_entries(lambda e: e.name.pid == me)


def _gone_within(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has exited, or does within ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


def _on_sigterm(signum, frame) -> None:
    if _State.stopping:
        return                       # unwinding already: let it finish
    _State.stopping = (f"its parent (pid {_State.orphaned_by}) died" if _State.orphaned_by
                       else "terminated by SIGTERM")
    raise_from_handler(SystemExit(_State.stopping))


def _watch_parent(parent: int, config: dict) -> None:
    """Thread: wait for ``parent`` to exit; then stop this stage (see Orphans above)."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        fd = -1                      # gone already
    except OSError:
        return                       # no pidfd (Linux < 5.3): rings and pipes still notice
    try:
        if fd >= 0 and os.getppid() == parent:   # (a parent already gone leaves us to init)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not poller.poll():
                pass
    finally:
        if fd >= 0:
            os.close(fd)
    if _State.exiting.is_set():
        return
    _State.orphaned_by = parent
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    if not _State.exiting.wait(ORPHAN_GRACE):
        release_orphan(config)
        os._exit(_EXIT_ERROR)


def run_ids(config) -> set[str]:
    """The run ids of the objects a stage config names (and of its ``run_id``, if any)."""
    from shm.naming import parse_segment_name

    found: set[str] = set()
    todo = [config]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            rid = item.get("run_id")
            if isinstance(rid, str):
                found.add(rid)
            todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)
        elif isinstance(item, str):
            parsed = parse_segment_name(item)
            if parsed is not None:
                found.add(parsed.run_id)
    return found


def release_orphan(config: dict) -> list[str]:
    """Unlink what this process owns and, of the runs ``config`` names, what dead processes
    owned: an orphan's last duty, since its parent cannot sweep any more."""
    me, runs = os.getpid(), run_ids(config)
    return unlink_entries(lambda e: e.name.pid == me or (e.name.run_id in runs
                                                        and not e.owner_alive))


def unlink_entries(which: Callable) -> list[str]:
    """Unlink our /dev/shm objects ``which(entry)`` selects; the paths removed."""
    from shm.naming import list_entries, remove_entry

    removed = []
    for e in list_entries():
        if which(e):
            try:
                if remove_entry(e):
                    removed.append(e.path)
            except OSError:
                pass                 # someone else's to remove (permissions)
    return removed
