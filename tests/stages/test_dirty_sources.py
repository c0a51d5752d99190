"""The scanner's dirty sources: the shared dirty log and the kernel's (uffd + PAGEMAP_SCAN),
opened from the plain spec a guest gives, behind one fetch()."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shm import naming
from shm.dirtylog import DirtyLog
from shm.region import RamBlockSpec, RamRegion
from shm.runs import dirty_pages
from shm.uffd import PagemapHarvester, arm, uffd_unavailable_reason
from stages.dirty_sources import LogSource, open_dirty_source, scanner_source

MiB = 1 << 20
SPECS = [RamBlockSpec("pc.ram", 2 * MiB), RamBlockSpec("vga.vram", 256 * 1024)]


@pytest.fixture
def region():
    with RamRegion.create(naming.new_run_id(), SPECS) as region:
        yield region


def test_log_source_fetches_the_writers_marks(region):
    run = naming.parse_segment_name(region.name).run_id
    with DirtyLog.create(run, region) as log:
        log.mark(1, np.array([3, 5]))
        log.start_service()   # the guest answers fetches
        with scanner_source({"dirty": {"kind": "log", "name": log.name}}, region) as src:
            assert isinstance(src, LogSource)
            assert [dirty_pages(b).tolist() for b in src.fetch()] == [[], [3, 5]]
        with scanner_source({"dirtylog": log.name}, region) as src:   # the older config key
            assert [dirty_pages(b).tolist() for b in src.fetch()] == [[], []]


@pytest.mark.skipif(uffd_unavailable_reason() is not None, reason="no uffd WP_ASYNC here")
def test_pagemap_source_reports_the_pages_written_once(region):
    first, last = region.blocks[0], region.blocks[-1]
    blocks = [(b.address, b.length) for b in region.blocks]
    with arm(first.address, last.address + last.length - first.address):
        spec = {"kind": "pagemap", "pid": os.getpid(), "blocks": blocks}
        with open_dirty_source(spec, region) as src:
            assert isinstance(src, PagemapHarvester)
            region.blocks[0].view[[0, 4096 * 9, 4096 * 511 + 7]] = 1
            region.blocks[1].view[4096 * 63] = 2
            assert [dirty_pages(b).tolist() for b in src.fetch()] == [[0, 9, 511], [63]]
            assert [dirty_pages(b).tolist() for b in src.fetch()] == [[], []]


def test_a_spec_that_does_not_fit_is_refused(region):
    with pytest.raises(ValueError, match="use log or pagemap"):
        open_dirty_source({"kind": "softdirty"})
    with pytest.raises(ValueError, match="do not match"):
        open_dirty_source({"kind": "pagemap", "pid": os.getpid(),
                           "blocks": [(region.blocks[0].address, 4096)]}, region)
