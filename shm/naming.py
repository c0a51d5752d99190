"""Names of shared-memory objects, and the sweep that removes those of dead owners.

Every segment and semaphore of rdma-pipeline is named ``/rdp-<run_id>-<pid>-<kind>``: the run id
(a few lowercase hex or alphanumeric characters) groups one migration's objects, ``pid`` is the
process that created the object and alone unlinks it, ``kind`` says what it is (``ram``,
``dirty``, ``ring.runs``, ``ring.runs.items`` ...). Linux keeps POSIX shared memory as
``/dev/shm/<name>`` and POSIX semaphores as ``/dev/shm/sem.<name>``, so one directory listing
finds both, and an object whose owner pid no longer lives is garbage that ``sweep`` may remove.

A process that exits normally unlinks every object its pid owns and did not unlink itself (an
owner object its program never closed, a migration thread cut short): see
``unlink_own_at_exit``. Only SIGKILL and the like leave objects for ``sweep``.

Invariants: run ids never contain ``-``, so a name parses back unambiguously; a process that is
a zombie (killed but not yet reaped) counts as dead.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
from dataclasses import dataclass

SHM_DIR = "/dev/shm"
PREFIX = "rdp"
_SEM_PREFIX = "sem."

_RUN_ID = re.compile(r"[0-9a-z]{1,16}")
_KIND = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_NAME = re.compile(r"/?rdp-([0-9a-z]{1,16})-([0-9]{1,10})-([A-Za-z0-9_.\-]{1,64})")


@dataclass(frozen=True, slots=True)
class SegmentName:
    """A parsed object name: run id, owner pid and kind."""

    run_id: str
    pid: int
    kind: str

    def __str__(self) -> str:
        return f"/{PREFIX}-{self.run_id}-{self.pid}-{self.kind}"


@dataclass(frozen=True, slots=True)
class ShmEntry:
    """One of our objects found in /dev/shm."""

    path: str
    name: SegmentName
    semaphore: bool
    owner_alive: bool


def new_run_id() -> str:
    """A fresh run id: 8 lowercase hex characters."""
    return secrets.token_hex(4)


def segment_name(run_id: str, kind: str, pid: int | None = None) -> str:
    """The name ``/rdp-<run_id>-<pid>-<kind>``; ``pid`` defaults to the caller (the owner)."""
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-16 characters of [0-9a-z]")
    if not _KIND.fullmatch(kind):
        raise ValueError(f"kind {kind!r} must be 1-64 characters of [A-Za-z0-9_.-]")
    pid = os.getpid() if pid is None else pid
    if not 0 < pid < 10**10:
        raise ValueError(f"pid {pid} out of range")
    return f"/{PREFIX}-{run_id}-{pid}-{kind}"


def parse_segment_name(name: str) -> SegmentName | None:
    """Parse one of our names (with or without the leading ``/``); None for any other name."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    return SegmentName(m.group(1), int(m.group(2)), m.group(3))


def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a live process; zombies count as dead."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        # No /proc (or not readable): fall back to signal 0, which sees zombies as alive.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ")".
    state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
    return state not in (b"Z", b"X", b"x")


def list_entries(run_id: str | None = None) -> list[ShmEntry]:
    """Our segments and semaphores in /dev/shm, optionally of one run, sorted by path."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    entries = []
    for entry in sorted(names):
        semaphore = entry.startswith(_SEM_PREFIX)
        parsed = parse_segment_name(entry[len(_SEM_PREFIX):] if semaphore else entry)
        if parsed is None or (run_id is not None and parsed.run_id != run_id):
            continue
        entries.append(ShmEntry(os.path.join(SHM_DIR, entry), parsed, semaphore,
                                pid_alive(parsed.pid)))
    return entries


def remove_entry(entry: ShmEntry) -> bool:
    """Unlink one entry; False when it was already gone."""
    try:
        os.unlink(entry.path)
    except FileNotFoundError:
        return False  # someone else swept it first
    return True


def sweep(dry_run: bool = False, run_id: str | None = None) -> list[str]:
    """Remove (or with ``dry_run`` only list) our objects whose owner is dead.

    Returns the /dev/shm paths removed (or that would be). Objects of live owners are never
    touched.
    """
    return [entry.path for entry in list_entries(run_id)
            if not entry.owner_alive and (dry_run or remove_entry(entry))]


@atexit.register
def unlink_own_at_exit() -> list[str]:
    """Unlink the objects this process owns and has not unlinked; runs at interpreter exit.

    Registered when this module is first imported, so it runs after the exit handlers of the
    code that uses shared memory (atexit runs handlers last-registered first), which may still
    close their objects properly.
    """
    me = os.getpid()
    return [entry.path for entry in list_entries() if entry.name.pid == me and remove_entry(entry)]
