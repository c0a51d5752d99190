"""userfaultfd write-protect tracking harvested with PAGEMAP_SCAN: exact, and no page lost."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from shm.memory import PAGE_SIZE
from shm.naming import new_run_id
from shm.region import RamBlockSpec, RamRegion
from shm.segment import PeerGone
from shm.uffd import PagemapHarvester, arm, runs_to_bitmap, uffd_unavailable_reason

REASON = uffd_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"uffd tracking: {REASON}")

MiB = 1 << 20
SPECS = [RamBlockSpec("pc.ram", 8 * MiB), RamBlockSpec("vga", 2 * MiB)]


def unpack(bitmaps, region) -> list[np.ndarray]:
    return [np.unpackbits(bm, bitorder="little")[:b.nb_pages].astype(bool)
            for bm, b in zip(bitmaps, region.blocks, strict=True)]


def span(region: RamRegion) -> tuple[int, int]:
    first, last = region.blocks[0], region.blocks[-1]
    return first.address, last.address + last.length - first.address


@pytest.fixture(scope="module", autouse=True)
def resource_tracker():
    """spawn starts multiprocessing's resource tracker once per session; start it before the
    per-test leak check takes its list of children, so it is not counted as leaked."""
    from multiprocessing import resource_tracker as tracker
    tracker.ensure_running()


@pytest.fixture
def region():
    with RamRegion.create(new_run_id(), SPECS) as r:
        yield r


def test_reports_exactly_the_written_pages_then_nothing(region):
    rng = np.random.default_rng(1)
    blocks = [(b.address, b.length) for b in region.blocks]
    with arm(*span(region)), PagemapHarvester(os.getpid(), blocks) as harvester:
        assert not any(bm.any() for bm in harvester.harvest())
        for _ in range(3):
            written = [rng.random(b.nb_pages) < 0.3 for b in region.blocks]
            for b, w in zip(region.blocks, written, strict=True):
                b.view.reshape(-1, PAGE_SIZE)[w, 17] += 1
            # Reads are not writes.
            _ = [int(b.view[::PAGE_SIZE].sum()) for b in region.blocks]
            got = unpack(harvester.harvest(), region)
            for g, w in zip(got, written, strict=True):
                np.testing.assert_array_equal(g, w)
            assert not any(bm.any() for bm in harvester.harvest())


def test_many_regions_fill_the_vector_and_continue(region, monkeypatch):
    import shm.uffd as uffd
    monkeypatch.setattr(uffd, "VECTOR_REGIONS", 7)
    blocks = [(b.address, b.length) for b in region.blocks]
    with arm(*span(region)), PagemapHarvester(os.getpid(), blocks) as harvester:
        pages = region.blocks[0].view.reshape(-1, PAGE_SIZE)
        pages[::2, 0] = 1  # every second page: one region per page, many vector refills
        got = unpack(harvester.harvest(), region)
        assert harvester.calls > 2 * len(blocks)
        np.testing.assert_array_equal(np.flatnonzero(got[0]), np.arange(0, len(pages), 2))
        assert not got[1].any()


def test_runs_to_bitmap_matches_a_direct_build():
    rng = np.random.default_rng(3)
    for _ in range(20):
        nb = int(rng.integers(1, 300))
        want = rng.random(nb) < 0.4
        edges = np.flatnonzero(np.diff(np.concatenate([[0], want.astype(int), [0]])))
        first, end = edges[::2], edges[1::2]
        got = runs_to_bitmap(first.astype(np.int64), (end - first).astype(np.int64), nb)
        np.testing.assert_array_equal(got, np.packbits(want, bitorder="little"))


def _writer(name: str, seed: int, batches: int, conn) -> None:
    """Writer process: arm its own mapping, tell where it is, write random pages in batches."""
    region = RamRegion.attach(name)
    try:
        rng = np.random.default_rng(seed)
        with arm(*span(region)):
            conn.send([(b.address, b.length) for b in region.blocks])
            conn.recv()  # go
            written = [np.zeros(b.nb_pages, bool) for b in region.blocks]
            for i in range(batches):
                b = int(rng.integers(len(region.blocks)))
                block = region.blocks[b]
                pages = rng.integers(0, block.nb_pages, int(rng.integers(1, 64)))
                block.view.reshape(-1, PAGE_SIZE)[pages, (i * 8) % PAGE_SIZE] = i & 0xFF | 1
                written[b][pages] = True
            conn.send([np.packbits(w, bitorder="little") for w in written])
            conn.recv()  # stay armed until the final harvest is done
    finally:
        region.close()


def test_writer_process_while_harvesting_loses_nothing(region):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_writer, args=(region.name, 11, 3000, child))
    proc.start()
    try:
        assert parent.poll(30), "writer did not start"
        blocks = parent.recv()
        union = [np.zeros(b.nb_pages, bool) for b in region.blocks]
        harvests = nonempty = 0
        with PagemapHarvester(proc.pid, blocks) as harvester:
            parent.send("go")
            while not parent.poll(0):
                for u, got in zip(union, unpack(harvester.harvest(), region), strict=True):
                    nonempty += bool(got.any())
                    u |= got
                harvests += 1
            written = unpack(parent.recv(), region)
            for u, got in zip(union, unpack(harvester.harvest(), region), strict=True):
                u |= got
        for u, w in zip(union, written, strict=True):
            missing = np.flatnonzero(w & ~u)
            assert not len(missing), f"written pages never reported: {missing[:10]}"
            np.testing.assert_array_equal(u, w)  # nothing else wrote, so nothing extra
        assert harvests > 1 and nonempty > 1, "the harvests never overlapped the writes"
        parent.send("exit")
        proc.join(10)
        with pytest.raises(PeerGone):
            PagemapHarvester(proc.pid, blocks)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()
        child.close()
