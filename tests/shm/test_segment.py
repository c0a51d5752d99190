"""Segments: header checks, close/unlink split, attachers that die or exit never unlink."""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import time

import numpy as np
import posix_ipc
import pytest

from shm import naming
from shm.dirtylog import DirtyLog
from shm.errors import ShmError
from shm.region import RamBlockSpec, RamRegion
from shm.ring import Ring
from shm.runs import RUN_DTYPE
from shm.segment import HEADER_SIZE, MAGIC, Segment

ctx = mp.get_context("spawn")


@pytest.fixture
def name():
    return naming.segment_name(naming.new_run_id(), "test")


def test_create_attach_share_payload(name):
    with Segment.create(name, 10000, kind=b"test", geometry=(1, 2, 3)) as seg:
        assert seg.owner and seg.size == 10000 and seg.path == "/dev/shm" + name
        assert os.path.exists(seg.path)
        assert seg.address % 4096 == 0  # the payload is page-aligned
        other = Segment.attach(name, kind=b"test", geometry=(1, 2, 3))
        assert not other.owner and other.geometry == (1, 2, 3)
        assert other.owner_pid == os.getpid()
        seg.ndarray("<u8", 8, 2)[:] = [7, 9]
        assert other.ndarray("<u8", 8, 2).tolist() == [7, 9]
        assert bytes(other.payload[8:16]) == struct.pack("<Q", 7)
        with pytest.raises(ValueError):
            other.ndarray("<u8", 9996, 1)
        with pytest.raises(ValueError, match="owner"):
            other.unlink()
        other.close()
        other.close()
        assert other.closed
    assert not os.path.exists("/dev/shm" + name)


def test_header_mismatches_are_refused(name):
    with Segment.create(name, 64, kind=b"ring", geometry=(4, 16)) as seg:
        with pytest.raises(ShmError, match="holds 'ring', expected 'ram'"):
            Segment.attach(name, kind=b"ram")
        with pytest.raises(ShmError, match=r"geometry \(4, 16\), expected \(8, 16\)"):
            Segment.attach(name, kind=b"ring", geometry=(8, 16))
        header = np.frombuffer(seg._mmap, np.uint8, HEADER_SIZE)
        header[8] = 99  # layout version
        with pytest.raises(ShmError, match="layout version 99"):
            Segment.attach(name, kind=b"ring")
        header[0] = ord("X")
        with pytest.raises(ShmError, match="not an rdma-pipeline segment"):
            Segment.attach(name, kind=b"ring")
        header[:8] = np.frombuffer(MAGIC, np.uint8)
        header[8] = 1
        header[40:48] = 255  # payload size larger than the file
        with pytest.raises(ShmError, match="corrupt header"):
            Segment.attach(name, kind=b"ring")
        del header


def test_foreign_or_missing_segments_are_refused(name):
    with pytest.raises(ShmError, match="no shared-memory segment"):
        Segment.attach(name, kind=b"ram")
    small = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=100)
    try:
        small.close_fd()
        with pytest.raises(ShmError, match="too small"):
            Segment.attach(name, kind=b"ram")
    finally:
        small.unlink()
    junk = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=HEADER_SIZE)
    try:
        junk.close_fd()
        with pytest.raises(ShmError, match="not an rdma-pipeline segment"):
            Segment.attach(name, kind=b"ram")
    finally:
        junk.unlink()


def test_create_refuses_existing_name_and_impossible_size(name):
    with Segment.create(name, 0, kind=b"test"):
        with pytest.raises(ShmError, match="already exists"):
            Segment.create(name, 0, kind=b"test")
    with pytest.raises(ShmError, match="holds at most"):
        Segment.create(name, 1 << 50, kind=b"test")
    with pytest.raises(ValueError):
        Segment.create(name, 8, kind=b"a-kind-longer-than-16")
    assert not os.path.exists("/dev/shm" + name)


def test_close_with_live_view_keeps_the_view_valid(name):
    seg = Segment.create(name, 4096, kind=b"test")
    try:
        view = seg.ndarray(np.uint8)
        view[:4] = 5
        seg.close()  # cannot unmap under a live view: the mapping outlives close
        assert seg.closed and view[:4].tolist() == [5] * 4
        with pytest.raises(ValueError, match="closed"):
            seg.ndarray(np.uint8)
        del view
    finally:
        seg.unlink()
        seg.unlink()  # idempotent


def test_unlink_keeps_existing_mappings(name):
    seg = Segment.create(name, 4096, kind=b"test")
    other = Segment.attach(name, kind=b"test")
    seg.unlink()
    seg.ndarray(np.uint8)[0] = 42
    assert other.ndarray(np.uint8)[0] == 42
    other.close()
    seg.close()


def attach_everything(names: dict[str, str], conn, stay: bool) -> None:
    """Child: attach every kind of object, touch it, report, then hang or exit without close."""
    seg = Segment.attach(names["segment"], kind=b"test")
    region = RamRegion.attach(names["region"])
    ring = Ring.attach(names["ring"], RUN_DTYPE, role="producer")
    log = DirtyLog.attach(names["log"], region)
    region.blocks[0].view[:4096] = 1
    log.mark(0, np.array([0]))
    ring.push(np.zeros(1, RUN_DTYPE))
    seg.ndarray(np.uint8)[0] = 1
    conn.send("attached")
    if stay:
        time.sleep(60)
    # exit without closing anything: nothing may unlink the owner's objects at exit


@pytest.mark.parametrize("stay", [True, False], ids=["killed", "exits-without-close"])
def test_attacher_death_leaves_owner_in_charge(stay):
    run_id = naming.new_run_id()
    seg = Segment.create(naming.segment_name(run_id, "test"), 4096, kind=b"test")
    region = RamRegion.create(run_id, [RamBlockSpec("pc.ram", 1 << 20)])
    ring = Ring.create(naming.segment_name(run_id, "ring"), RUN_DTYPE, 8, role="consumer")
    log = DirtyLog.create(run_id, region)
    names = {"segment": seg.name, "region": region.name, "ring": ring.name, "log": log.name}
    ours = {e.path for e in naming.list_entries(run_id)}
    assert len(ours) == 8  # 4 segments and 4 semaphores
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=attach_everything, args=(names, child_end, stay))
    proc.start()
    try:
        assert parent_end.poll(30) and parent_end.recv() == "attached"
        if stay:
            proc.kill()
        proc.join(30)
        assert {e.path for e in naming.list_entries(run_id)} == ours  # nothing unlinked
        assert seg.ndarray(np.uint8)[0] == 1 and region.blocks[0].view[0] == 1
        assert len(ring.pop(4, timeout=5)) == 1
        again = Segment.attach(seg.name, kind=b"test")  # still attachable
        again.close()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        for obj in (log, ring, region, seg):
            obj.__exit__(None, None, None)
    assert naming.list_entries(run_id) == []
