"""The KVM guest process: dirty pages reach the shared dirty log (or a uffd harvester), and a
paused source's device state continues in a destination process."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.guest.kvm import kvm_unavailable_reason, program
from shm.dirtylog import DirtyLog
from shm.memory import PAGE_SIZE
from shm.naming import new_run_id
from shm.region import RamBlockSpec, RamRegion
from shm.uffd import PagemapHarvester, uffd_unavailable_reason
from stages.harness import StageProcess

REASON = kvm_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"KVM guest: {REASON}")
TARGET = "pipeline.guest.kvm.process:kvm_guest_main"
MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def resource_tracker():
    """Start spawn's resource tracker before the per-test leak check lists children."""
    from multiprocessing import resource_tracker as tracker
    tracker.ensure_running()


def data_pages(region: RamRegion) -> np.ndarray:
    mem = program.GuestMemory(region.blocks)
    return (program.read_layout(mem).page_gpas() // PAGE_SIZE).astype(np.int64)


def wait_for_pass(proc: StageProcess, passes: int, timeout: float = 10.0) -> None:
    """Ask for the guest's state until its pass counter exceeds ``passes``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.send("state")
        if proc.recv(10)[1]["passes"] > passes:
            return
        time.sleep(0.01)
    raise AssertionError(f"guest {proc.name} made no progress past pass {passes}")


def as_pages(bitmaps, region) -> np.ndarray:
    return np.concatenate([np.unpackbits(np.asarray(bm).view(np.uint8), bitorder="little")
                           [:b.nb_pages].astype(bool)
                           for bm, b in zip(bitmaps, region.blocks, strict=True)])


def test_source_to_destination_through_processes():
    run = new_run_id()
    specs = [RamBlockSpec("pc.ram", 4 * MiB), RamBlockSpec("extra", 2 * MiB)]
    with RamRegion.create(run, specs) as src, RamRegion.create(run, specs, kind="dst") as dst, \
            DirtyLog.create(run, src) as log:
        source = StageProcess("guest", TARGET, {"region": src.name, "dirtylog": log.name,
                                                "delay": 2000}).start()
        try:
            info = source.wait_ready(30)
            assert info["tracking"] == "kvm" and info["progress"]["passes"] == 0
            wait_for_pass(source, 1)
            seen = as_pages(log.fetch(timeout=5), src)
            source.send("pause")
            op, paused, _ = source.recv(10)
            assert op == "paused" and paused["passes"] >= 1
            seen |= as_pages(log.fetch(timeout=5), src)
            assert seen[data_pages(src)].all(), "a page the guest wrote never reached the log"
            assert not as_pages(log.fetch(timeout=5), src).any()  # paused: quiet
            for a, b in zip(src.blocks, dst.blocks, strict=True):
                b.view[:] = a.view  # what the migration carries
            dest = StageProcess("dest", TARGET, {"region": dst.name,
                                                 "device_state": paused["device_state"]}).start()
            try:
                at_start = dest.wait_ready(30)["progress"]
                assert at_start == {k: paused[k] for k in at_start}
                dest.send("resume")
                assert dest.recv(10)[0] == "resumed"
                wait_for_pass(dest, paused["passes"])
                dest.send("stop")
                op, after = dest.recv(10)
                assert op == "stopped" and after["pages_written"] > paused["pages_written"]
                assert dest.stop(5) == 0
            finally:
                dest.close()
            source.send("state")
            assert source.recv(10)[1]["pages_written"] == paused["pages_written"]  # intact
            source.send("resume")  # a failed migration resumes the source
            assert source.recv(10)[0] == "resumed"
            wait_for_pass(source, paused["passes"])
            source.send("stop")
            assert source.recv(10)[1]["pages_written"] > paused["pages_written"]
            assert source.stop(5) == 0
        finally:
            source.close()


@pytest.mark.skipif(uffd_unavailable_reason() is not None, reason="no uffd WP_ASYNC here")
def test_uffd_tracking_of_a_kvm_guest():
    """KVM logging off; the VMM's mapping is write-protected and the guest's writes (made by
    KVM on the guest's behalf) are harvested from another process."""
    with RamRegion.create(new_run_id(), [RamBlockSpec("pc.ram", 4 * MiB)]) as region:
        guest = StageProcess("guest", TARGET, {"region": region.name, "tracking": "uffd",
                                               "delay": 2000}).start()
        try:
            info = guest.wait_ready(30)
            with PagemapHarvester(info["pid"], info["blocks"]) as harvester:
                seen = as_pages(harvester.harvest(), region)
                wait_for_pass(guest, 1)
                guest.send("pause")
                assert guest.recv(10)[1]["passes"] >= 1
                seen |= as_pages(harvester.harvest(), region)
                assert seen[data_pages(region)].all()
                assert not as_pages(harvester.harvest(), region).any()
            guest.send("stop")
            assert guest.recv(10)[0] == "stopped"
            assert guest.stop(5) == 0
        finally:
            guest.close()
