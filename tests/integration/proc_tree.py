"""The process tree of a run, read through /proc: a killed process's children move to init,
out of the suite's leak fixture's sight, so the tests that kill follow the tree themselves."""

from __future__ import annotations

import os
import time

from shm.naming import list_entries


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None for a dead or zombie one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """Live children of ``pid`` in the order they started (the resource tracker left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] == pid and "resource_tracker" not in _cmdline(int(entry)):
                found.append((st[1], int(entry)))
    return [p for _, p in sorted(found)]


def watching(pid: int) -> bool:
    """The stage process ``pid`` has booted: its parent-watch thread runs (a process killed
    while its child is still being spawned leaves what it owned to `rdma-pipeline cleanup`)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("Threads:") and int(line.split()[1]) > 1 for line in f)
    except OSError:
        return False


def tree(pid: int) -> set[int]:
    """``pid`` and its live descendants."""
    found, frontier = {pid}, [pid]
    while frontier:
        kids = children(frontier.pop())
        found.update(kids)
        frontier.extend(kids)
    return found


def owned_by(pids: set[int]) -> list[str]:
    return [e.path for e in list_entries() if e.name.pid in pids]


def wait_for(cond, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
