"""``rdma-pipeline cleanup`` removes a killed owner's objects and leaves a live owner's alone."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from multiprocessing import resource_tracker

import pytest

from pipeline.cli import main
from shm import naming
from shm.dirtylog import DirtyLog
from shm.region import RamBlockSpec, RamRegion
from shm.ring import Ring
from shm.runs import RUN_DTYPE

ctx = mp.get_context("spawn")


@pytest.fixture(scope="module", autouse=True)
def _resource_tracker_running():
    """Spawning starts multiprocessing's tracker, which lives on: start it before the leak
    guard takes its snapshot of child processes."""
    resource_tracker.ensure_running()


def own_and_hang(run_id: str, conn) -> None:
    """Child: create a region, a dirty log and a ring (3 segments, 4 semaphores), then hang."""
    region = RamRegion.create(run_id, [RamBlockSpec("pc.ram", 1 << 20)])
    DirtyLog.create(run_id, region)
    Ring.create(naming.segment_name(run_id, "ring.runs"), RUN_DTYPE, 16)
    conn.send("ready")
    time.sleep(60)


@pytest.fixture
def killed_owner():
    """A run whose owner was SIGKILLed after creating its objects: (run_id, pid)."""
    run_id = naming.new_run_id()
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=own_and_hang, args=(run_id, child_end))
    proc.start()
    try:
        assert parent_end.poll(30) and parent_end.recv() == "ready"
    finally:
        proc.kill()
        proc.join(30)
    yield run_id, proc.pid
    naming.sweep(run_id=run_id)


def test_cleanup_removes_killed_owner_and_keeps_live_one(killed_owner, capsys):
    run_id, pid = killed_owner
    dead = {e.path for e in naming.list_entries(run_id)}
    assert len(dead) == 7
    with RamRegion.create(run_id, [RamBlockSpec("pc.ram", 1 << 20)], kind="live") as live:
        assert main(["cleanup", "--dry-run", "--run-id", run_id]) == 0
        out = capsys.readouterr().out
        assert out.count("would remove /dev/shm/") == 7 and f"dead pid {pid}" in out
        assert "would remove 7, kept 1 of live owners" in out
        assert {e.path for e in naming.list_entries(run_id)} == dead | {live.segment.path}

        assert main(["cleanup", "--run-id", run_id, "--verbose"]) == 0
        out = capsys.readouterr().out
        for path in dead:
            assert f"removed {path}" in out
        assert f"kept {live.segment.path}" in out
        assert [e.path for e in naming.list_entries(run_id)] == [live.segment.path]
        assert os.path.exists(live.segment.path)

        assert main(["cleanup", "--run-id", run_id]) == 0
        assert "removed 0, kept 1" in capsys.readouterr().out
    assert naming.list_entries(run_id) == []


def test_cleanup_command_line(killed_owner):
    run_id, _ = killed_owner
    cmd = [sys.executable, "-m", "pipeline", "cleanup", "--run-id", run_id]
    out = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, check=True).stdout
    assert "would remove 7" in out
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "removed 7, kept 0" in out
    assert naming.list_entries(run_id) == []
