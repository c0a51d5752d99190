"""Names carry run id, owner pid and kind; sweep removes only the objects of dead owners."""

from __future__ import annotations

import os
import subprocess
import sys

import posix_ipc
import pytest

from shm import naming
from shm.segment import Segment


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_names_round_trip():
    run_id = naming.new_run_id()
    assert len(run_id) == 8 and int(run_id, 16) >= 0
    assert naming.new_run_id() != run_id
    name = naming.segment_name(run_id, "ring.runs.items")
    assert name == f"/rdp-{run_id}-{os.getpid()}-ring.runs.items"
    parsed = naming.parse_segment_name(name)
    assert parsed == naming.SegmentName(run_id, os.getpid(), "ring.runs.items")
    assert str(parsed) == name
    assert naming.parse_segment_name(name[1:]) == parsed
    assert naming.segment_name("ab12", "ram", pid=42) == "/rdp-ab12-42-ram"


@pytest.mark.parametrize("name", ["/psm_1234", "/rdp-AB-1-ram", "/rdp-ab-x-ram", "/rdp-ab-1-",
                                  "/rdp-ab-1-a/b", "sem.mp-abc", "/rdp-ab-cd-1-ram"])
def test_foreign_names_do_not_parse(name):
    assert naming.parse_segment_name(name) is None


@pytest.mark.parametrize("run_id, kind", [("", "ram"), ("a-b", "ram"), ("ABC", "ram"),
                                          ("ab", ""), ("ab", "a/b"), ("ab", "x" * 65)])
def test_bad_name_parts_refused(run_id, kind):
    with pytest.raises(ValueError):
        naming.segment_name(run_id, kind)


def test_pid_alive_counts_zombies_as_dead():
    assert naming.pid_alive(os.getpid())
    assert not naming.pid_alive(dead_pid())
    assert not naming.pid_alive(0)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert not naming.pid_alive(zombie.pid)
    finally:
        zombie.wait()


def test_sweep_removes_dead_owners_only():
    run_id = naming.new_run_id()
    gone = dead_pid()
    dead_seg = naming.segment_name(run_id, "ram", pid=gone)
    dead_sem = naming.segment_name(run_id, "ring.items", pid=gone)
    posix_ipc.SharedMemory(dead_seg, posix_ipc.O_CREX, size=4096).close_fd()
    posix_ipc.Semaphore(dead_sem, posix_ipc.O_CREX).close()
    live = Segment.create(naming.segment_name(run_id, "ram"), 0, kind=b"ram")
    try:
        entries = naming.list_entries(run_id)
        assert {(e.name.kind, e.semaphore, e.owner_alive) for e in entries} == {
            ("ram", False, False), ("ring.items", True, False), ("ram", False, True)}
        assert [e.path for e in entries] == sorted(e.path for e in entries)
        want = sorted([f"/dev/shm{dead_seg}", f"/dev/shm/sem.{dead_sem[1:]}"])
        assert sorted(naming.sweep(dry_run=True, run_id=run_id)) == want
        assert len(naming.list_entries(run_id)) == 3  # a dry run removes nothing
        assert sorted(naming.sweep(run_id=run_id)) == want
        assert [e.path for e in naming.list_entries(run_id)] == [live.path]
        assert naming.sweep(run_id=run_id) == []
    finally:
        live.close()
        live.unlink()
