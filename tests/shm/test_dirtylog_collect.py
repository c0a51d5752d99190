"""A dirty log answered on request by a writer whose writes are logged elsewhere (``collect``):
what it collects is handed out by the very fetch that asked, nothing is lost or repeated, and
a failing collect is reported instead of answered."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shm import naming
from shm.dirtylog import DirtyLog
from shm.region import RamBlockSpec, RamRegion
from shm.runs import dirty_pages
from shm.segment import ShmTimeout

BLOCK_PAGES = [5000, 70]


@pytest.fixture
def logs():
    specs = [RamBlockSpec(f"b{i}", n * 4096) for i, n in enumerate(BLOCK_PAGES)]
    run = naming.new_run_id()
    with RamRegion.create(run, specs) as region, DirtyLog.create(run, region) as reader:
        writer = DirtyLog.attach(reader.name, region)
        try:
            yield writer, reader
        finally:
            writer.close()


class Elsewhere:
    """A log kept outside the dirty log (as KVM's is): pages set by ``write``, taken by
    ``collect`` as packed bitmaps, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bits = [np.zeros(n, bool) for n in BLOCK_PAGES]
        self.calls = 0

    def write(self, block: int, pages) -> None:
        with self.lock:
            self.bits[block][pages] = True

    def collect(self) -> list[np.ndarray]:
        with self.lock:
            self.calls += 1
            out = [np.packbits(b, bitorder="little") for b in self.bits]
            for b in self.bits:
                b[:] = False
        return out


def pages(bitmaps) -> list[set[int]]:
    return [set(dirty_pages(b).tolist()) for b in bitmaps]


def test_the_fetch_that_asks_gets_what_was_collected(logs):
    writer, reader = logs
    src = Elsewhere()
    writer.start_service(collect=src.collect)
    src.write(0, [0, 63, 64, 4999])
    src.write(1, [69])
    assert pages(reader.fetch(timeout=5)) == [{0, 63, 64, 4999}, {69}]
    assert pages(reader.fetch(timeout=5)) == [set(), set()]
    src.write(0, [7])
    assert pages(reader.fetch(timeout=5)) == [{7}, set()]
    assert src.calls >= 3


def test_no_page_lost_or_invented_while_writes_race_the_fetches(logs):
    writer, reader = logs
    src = Elsewhere()
    writer.start_service(collect=src.collect)
    rng = np.random.default_rng(5)
    written: set[int] = set()
    stop = threading.Event()

    def writes() -> None:
        while not stop.is_set():
            batch = rng.integers(0, BLOCK_PAGES[0], 50)
            src.write(0, batch)
            written.update(batch.tolist())

    t = threading.Thread(target=writes)
    t.start()
    seen: set[int] = set()
    try:
        for _ in range(40):
            seen |= pages(reader.fetch(timeout=5))[0]
    finally:
        stop.set()
        t.join()
    seen |= pages(reader.fetch(timeout=5))[0]
    assert seen == written


def test_a_failing_collect_is_reported_not_answered(logs):
    writer, reader = logs

    def broken():
        raise OSError("KVM_GET_DIRTY_LOG failed")

    writer.start_service(collect=broken)
    with pytest.raises(ShmTimeout):
        reader.fetch(timeout=0.5)
    assert isinstance(writer.service_error, OSError)
