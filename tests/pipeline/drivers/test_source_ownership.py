"""The source drivers own what they open: a failure at any step of setting up releases it all.

Each case makes one step of ``RdmaSource``'s or ``StreamSource``'s setup raise and checks the
migration failed in one line, the guest runs on, and nothing of the run is left: no ring, no
page table in /dev/shm, no stage process (the suite's ``no_leaks`` fixture checks the last two
again after the test).
"""

from __future__ import annotations

import os

import pytest

from pipeline.api import free_port
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState, SyntheticGuest
from pipeline.uri import URI
from shm.errors import TransportError
from shm.naming import new_run_id

MIB = 1 << 20


RUN_ID = new_run_id()


@pytest.fixture
def guest():
    with SyntheticGuest(4 * MIB, run_id=RUN_ID, state=GuestState()) as g:
        g.process.start()
        g.process.wait_ready(60.0)
        yield g


def run_entries(run_id: str) -> set[str]:
    return {e for e in os.listdir("/dev/shm") if run_id in e}


def boom(*args, **kwargs):
    raise TransportError("injected")


RDMA_STEPS = {
    "control link": ("pipeline.drivers.rdma_source.ControlLink", boom),
    "rings": ("pipeline.drivers.rdma_source.SourcePipeline.__init__", boom),
    "stage start": ("pipeline.source_pipeline.SourcePipeline.start", boom),
    "stages ready": ("pipeline.source_pipeline.SourcePipeline.wait_ready", boom),
    "connect": (None, None),            # nothing listens at the port
}


@pytest.mark.slow
@pytest.mark.parametrize("step", RDMA_STEPS)
def test_rdma_source_releases_everything_when_a_setup_step_fails(step, guest, monkeypatch):
    from pipeline.drivers.rdma_source import RdmaSource

    target, fake = RDMA_STEPS[step]
    if target is not None:
        monkeypatch.setattr(target, fake)
    before = run_entries(RUN_ID)
    uri = URI("rdma", "127.0.0.1", free_port())
    driver = RdmaSource(uri, MigrationConfig(), guest, run_id=RUN_ID)
    summary = driver.run()
    assert summary["status"] == "failed"
    assert "\n" not in summary["error-desc"]
    assert run_entries(RUN_ID) == before          # only the guest's own
    assert driver.pipeline is None or not driver.pipeline.rings      # closed and unlinked
    guest.check()                                               # still running


@pytest.mark.parametrize("step", ["sink", "dirty source"])
def test_stream_source_releases_everything_when_a_setup_step_fails(step, guest, monkeypatch,
                                                                   tmp_path):
    from pipeline.drivers import stream_source

    closed = []
    if step == "dirty source":
        monkeypatch.setattr("stages.dirty_sources.open_dirty_source", boom)
        uri = URI("file", path=str(tmp_path / "snap"))
        real = stream_source.open_sink

        def tracking_sink(uri, check):
            sink = real(uri, check)
            close = sink.close
            sink.close = lambda: (closed.append(True), close())
            return sink

        monkeypatch.setattr(stream_source, "open_sink", tracking_sink)
    else:
        uri = URI("tcp", "127.0.0.1", free_port())       # nothing listens
    before = run_entries(RUN_ID)
    summary = stream_source.StreamSource(uri, MigrationConfig(), guest,
                                         run_id=RUN_ID).run()
    assert summary["status"] == "failed"
    assert run_entries(RUN_ID) == before
    if step == "dirty source":
        assert closed == [True]
    guest.check()
