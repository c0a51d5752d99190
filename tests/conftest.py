"""Suite-wide guards: no test may leave a /dev/shm entry or a live child process behind."""

from __future__ import annotations

import os
import time
from multiprocessing import resource_tracker

import pytest

from shm.naming import parse_segment_name, pid_alive

SHM = "/dev/shm"


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM))
    except FileNotFoundError:
        return set()


def _foreign(entry: str, ours: set[int]) -> bool:
    """True for an rdma-pipeline object whose owner is alive outside this session's processes.

    Another test session or a run on the same machine may create objects while a test runs;
    those are not this test's leaks (and not ours to remove). Objects of dead owners are ours to
    judge: a test that kills a process must still see its segments unlinked by the owner.
    """
    parsed = parse_segment_name(entry.removeprefix("sem."))
    return parsed is not None and parsed.pid not in ours and pid_alive(parsed.pid)


def _children() -> set[int]:
    """Live (non-zombie) descendants of this process, found through /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] == b"Z":
            continue
        parents[int(entry)] = int(fields[1])
    me = os.getpid()
    found: set[int] = set()
    frontier = {me}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


@pytest.fixture(scope="session", autouse=True)
def resource_tracker_running():
    """Start multiprocessing's resource tracker before any test counts child processes.

    The first ``spawn`` starts the tracker and it lives as long as the session; started inside a
    test it would be blamed on that test as a leaked child.
    """
    resource_tracker.ensure_running()
    yield


@pytest.fixture(autouse=True)
def no_leaks(request, resource_tracker_running):
    """Fail a test that leaves a new /dev/shm entry or a live child process."""
    shm_before = _shm_entries()
    children_before = _children()
    yield
    deadline = time.monotonic() + 2.0
    ours = children_before | {os.getpid()}
    while True:
        new_children = _children() - children_before
        ours |= new_children
        new_shm = {e for e in _shm_entries() - shm_before if not _foreign(e, ours)}
        if not (new_shm or new_children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in new_children:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    for name in new_shm:
        try:
            os.unlink(os.path.join(SHM, name))
        except OSError:
            pass
    problems = []
    if new_shm:
        problems.append(f"left /dev/shm entries: {sorted(new_shm)}")
    if new_children:
        problems.append(f"left live child processes: {sorted(new_children)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
