"""RAM regions: layout, sparse creation, page and chunk arithmetic, refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shm import naming
from shm.errors import ShmError
from shm.memory import PAGE_SIZE
from shm.region import RamBlockSpec, RamRegion
from shm.segment import Segment

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
def run_id():
    return naming.new_run_id()


def test_eight_gib_guest_is_sparse_and_laid_out(run_id):
    specs = [RamBlockSpec("pc.ram", 8 * GiB), RamBlockSpec("vga.vram", 16 * MiB + 8192),
             RamBlockSpec("pc.bios", 256 * 1024)]
    with RamRegion.create(run_id, specs) as region:
        assert os.stat(region.segment.path).st_blocks * 512 <= 64 * 1024  # nothing touched
        ram, vram, bios = region.blocks
        assert [b.offset for b in region.blocks] == [0, 8 * GiB, 8 * GiB + 16 * MiB + 8192]
        assert region.total_length == sum(s.length for s in specs)
        assert [b.index for b in region.blocks] == [0, 1, 2]
        for b in region.blocks:  # chunk-aligned from the first block, page-aligned in memory
            assert (b.seg_offset - ram.seg_offset) % region.chunk_size == 0
            assert b.address % PAGE_SIZE == 0 and b.address == region.segment.address + \
                b.seg_offset
            assert b.view.dtype == np.uint8 and b.view.size == b.length
        assert vram.seg_offset - ram.seg_offset == 8 * GiB
        assert bios.seg_offset - vram.seg_offset == 17 * MiB  # vram rounded up to a chunk
        assert ram.nb_pages == 2 * MiB and ram.nb_chunks == 8192
        assert vram.nb_chunks == 17 and bios.nb_chunks == 1
        assert vram.chunk_range(16) == (16 * MiB, 16 * MiB + 8192)  # clamped at the block end
        assert bios.chunk_range(0) == (0, 256 * 1024)
        with pytest.raises(IndexError):
            vram.chunk_range(17)
        assert ram.page_to_chunk(255) == 0 and ram.page_to_chunk(256) == 1
        assert ram.page_to_chunk(np.array([0, 511, 512, 2 * MiB - 1])).tolist() == \
            [0, 1, 2, 8191]
        assert region.block("vga.vram") is vram
        with pytest.raises(KeyError):
            region.block("nope")
        assert region.specs() == specs


def test_attach_sees_the_same_blocks_and_bytes(run_id):
    specs = [RamBlockSpec("pc.ram", 4 * MiB), RamBlockSpec("small", PAGE_SIZE)]
    with RamRegion.create(run_id, specs, chunk_size=2 * MiB) as region:
        other = RamRegion.attach(region.name)
        try:
            assert [(b.idstr, b.offset, b.length, b.seg_offset) for b in other.blocks] == \
                [(b.idstr, b.offset, b.length, b.seg_offset) for b in region.blocks]
            assert other.chunk_size == 2 * MiB and other.chunk_pages == 512
            region.blocks[1].view[:] = 0xAB
            region.blocks[0].pages(1023, 1)[:] = 7
            assert (other.blocks[1].view == 0xAB).all()
            assert other.blocks[0].view[1023 * PAGE_SIZE:].tolist() == [7] * PAGE_SIZE
            assert not other.blocks[0].view[:1023 * PAGE_SIZE].any()
            with pytest.raises(IndexError):
                other.blocks[0].pages(1023, 2)
        finally:
            other.close()
            other.close()


@pytest.mark.parametrize("chunk_size", [MiB, 2 * MiB, 64 * MiB, GiB])
def test_chunk_sizes_accepted(run_id, chunk_size):
    with RamRegion.create(run_id, [RamBlockSpec("a", 3 * MiB), RamBlockSpec("b", MiB)],
                          chunk_size) as region:
        a, b = region.blocks
        assert a.nb_chunks == -(-3 * MiB // chunk_size)
        assert b.seg_offset - a.seg_offset == a.nb_chunks * chunk_size
        assert a.chunk_range(a.nb_chunks - 1)[1] == 3 * MiB


@pytest.mark.parametrize("chunk_size", [0, MiB // 2, 3 * MiB, 2 * GiB, MiB + 4096])
def test_bad_chunk_sizes_refused(run_id, chunk_size):
    with pytest.raises(ValueError, match="power of two"):
        RamRegion.create(run_id, [RamBlockSpec("a", MiB)], chunk_size)


@pytest.mark.parametrize("length", [0, -4096, 4095, 4097, MiB + 1])
def test_lengths_not_whole_pages_refused(length):
    with pytest.raises(ValueError, match="multiple"):
        RamBlockSpec("pc.ram", length)


def test_bad_specs_refused(run_id):
    with pytest.raises(ValueError):
        RamBlockSpec("", 4096)
    with pytest.raises(ValueError):
        RamBlockSpec("x" * 256, 4096)
    with pytest.raises(ValueError, match="unique"):
        RamRegion.create(run_id, [RamBlockSpec("a", 4096), RamBlockSpec("a", 4096)])
    with pytest.raises(ValueError):
        RamRegion.create(run_id, [])
    assert naming.list_entries(run_id) == []


def test_attach_refuses_other_kinds(run_id):
    with Segment.create(naming.segment_name(run_id, "ram"), 4096, kind=b"ring") as seg:
        with pytest.raises(ShmError, match="expected 'ram'"):
            RamRegion.attach(seg.name)


def test_attach_refuses_corrupt_block_table(run_id):
    with RamRegion.create(run_id, [RamBlockSpec("a", 4096)]) as region:
        table = region.segment.ndarray("<u8", 256, 3)  # offset, length, seg_offset of block 0
        table[1] = 1 << 40
        del table
        with pytest.raises(ShmError, match="corrupt block table"):
            RamRegion.attach(region.name)
