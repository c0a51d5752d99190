"""The destination drivers own what they open: a failure at any step releases it all.

A scripted source (``scripted_sources``, a thread of this process) runs a whole migration
against ``RdmaDestination`` or ``StreamDestination``; each case makes one step raise (a step
of setting up, or the carrying out of one action, after it did its work) and checks that the
driver raised it, the session failed without resuming, and nothing it opened is left: no
region in /dev/shm, no guest process (the suite's ``no_leaks`` fixture checks both again), no
thread of its own alive, no verbs object or socket open.
"""

from __future__ import annotations

import os
import pkgutil
import threading

import pytest
from scripted_sources import BLOCKS, rdma_source, tcp_source

from pipeline.api import free_port
from pipeline.config import MigrationConfig
from pipeline.drivers import destination_common
from pipeline.drivers.rdma_destination import RdmaDestination
from pipeline.drivers.stream_destination import StreamDestination
from pipeline.session import destination_events as de
from pipeline.session.states import DestinationState
from pipeline.uri import URI
from shm.naming import new_run_id
from stages import harness

pytestmark = pytest.mark.slow


class Injected(RuntimeError):
    pass


def boom(*args, **kwargs):
    raise Injected("injected")


def run_entries(run_id: str) -> set[str]:
    return {e for e in os.listdir("/dev/shm") if run_id in e}


def threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name != "scripted-source"}


def migrate(driver_class, scheme, source, *, blocks=None, prealloc=False, **kw):
    """Run ``driver_class`` against the scripted ``source``: (driver, the error it raised,
    the source thread)."""
    port = free_port()
    run_id = new_run_id()
    before = threads()
    driver = driver_class(URI(scheme, "127.0.0.1", port), MigrationConfig(), run_id=run_id,
                          blocks=blocks, prealloc=prealloc, accept_timeout=10.0, **kw)
    src = source(port)
    src.start()
    error = None
    try:
        driver.run()
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        error = exc
    src.stop.set()
    src.join(30.0)
    assert not src.is_alive()
    assert run_entries(run_id) == set(), "the region was left behind"
    assert driver.region is None and driver.guest is None and driver.hasher is None
    assert destination_common.GUEST_ENTRY not in harness._SPARES, "a spare was left"
    left = {t for t in threads() - before if t.is_alive()}
    assert not left, f"threads left running: {left}"
    return driver, error, src


# After the source's COMMIT a failure here leaves the guest on neither host (never on both).
COMMITTED = (de.AwaitCommit, de.LoadGuest)


def expect_failure(driver, error, src, action=None) -> None:
    assert isinstance(error, Injected), repr(error)
    s = driver.session
    assert s.state is DestinationState.FAILED and "injected" in s.reason
    assert src.confirmed == (action in COMMITTED)
    assert "resumed" not in driver.guest_report or s.verified


def fail_at(monkeypatch, driver_class, action_type) -> None:
    """Carrying out ``action_type`` does its work, then raises; Confirm raises before it
    confirms (once the source is told, the migration is completed)."""
    real = driver_class.CARRY[action_type]

    def step(self, action):
        if action_type is not de.Confirm:
            real(self, action)
        raise Injected("injected")

    monkeypatch.setitem(driver_class.CARRY, action_type, step)


# -- rdma: -------------------------------------------------------------------------------
RDMA_ACTIONS = [de.CreateRegion, de.Accept, de.AwaitMessage, de.OpenWindow, de.Reply,
                de.StartGuest, de.RegisterChunks, de.ZeroRange, de.DeregisterChunks,
                de.HashRound, de.SettleHashes, de.HashRam, de.Confirm, de.AwaitCommit,
                de.LoadGuest]
RDMA_SETUP = {
    "prealloc": "pipeline.drivers.destination_common.preallocate",
    "device": "stages.verbs.soft.device.SoftProvider.open_device",
    "pd": "stages.verbs.soft.device.SoftContext.alloc_pd",
    "listen": "stages.verbs.soft.device.SoftContext.listen",
    "control link": "pipeline.drivers.rdma_destination.ControlLink",
    "negotiation": "pipeline.protocol.channel.ControlChannel.accept",
    "data cq": "stages.verbs.soft.device.SoftContext.create_cq",
    "guest process": "pipeline.drivers.destination_common.DestinationGuest.start",
    # threads: their failures reach the main loop at its next wait
    "data-acceptor": "pipeline.drivers.rdma_destination.decode_connect",
    "page-hasher": "stages.pagehash.PageHasher._hash_packed",
}


def test_rdma_destination_completes_and_releases_everything():
    seen = set()

    class Watched(RdmaDestination):
        def carry(self, action):
            seen.add(type(action))
            return RdmaDestination.CARRY[type(action)](self, action)

        CARRY = dict.fromkeys(RdmaDestination.CARRY, carry)

    driver, error, src = migrate(Watched, "rdma", rdma_source, blocks=list(BLOCKS))
    assert error is None and src.error is None and src.confirmed
    assert driver.session.state is DestinationState.COMPLETED
    assert driver.summary()["verified"] is True
    assert driver.guest_report["resumed"]["pages_written"] == 0
    assert set(RDMA_ACTIONS) <= seen, set(RDMA_ACTIONS) - seen


@pytest.mark.parametrize("action", RDMA_ACTIONS, ids=lambda t: t.__name__)
def test_rdma_destination_releases_everything_when_an_action_fails(action, monkeypatch):
    fail_at(monkeypatch, RdmaDestination, action)
    expect_failure(*migrate(RdmaDestination, "rdma", rdma_source, blocks=list(BLOCKS)), action)


@pytest.mark.parametrize("step", RDMA_SETUP)
def test_rdma_destination_releases_everything_when_a_setup_step_fails(step, monkeypatch):
    target = RDMA_SETUP[step]
    real = pkgutil.resolve_name(target)

    def destination_only(*args, **kwargs):
        # the scripted source runs in this process, on the same classes: spare it; a
        # thread's step fails in that thread only
        name = threading.current_thread().name
        if name == "scripted-source" or (step in ("data-acceptor", "page-hasher")
                                         and name != step):
            return real(*args, **kwargs)
        return boom()

    monkeypatch.setattr(target, destination_only)
    driver, error, src = migrate(RdmaDestination, "rdma", rdma_source, blocks=list(BLOCKS),
                                 prealloc=step == "prealloc")
    expect_failure(driver, error, src)


# -- tcp: --------------------------------------------------------------------------------
STREAM_ACTIONS = [de.CreateRegion, de.Accept, de.ReadStream, de.StartGuest, de.HashLanded,
                  de.HashRam, de.Confirm, de.AwaitCommit, de.LoadGuest]


def test_stream_destination_completes_and_releases_everything():
    driver, error, src = migrate(StreamDestination, "tcp", tcp_source)
    assert error is None and src.error is None and src.confirmed
    assert driver.summary()["verified"] is True
    assert driver.stats.duplicate_pages == 4 and driver.stats.normal_pages == 1


@pytest.mark.parametrize("action", STREAM_ACTIONS, ids=lambda t: t.__name__)
def test_stream_destination_releases_everything_when_an_action_fails(action, monkeypatch):
    fail_at(monkeypatch, StreamDestination, action)
    expect_failure(*migrate(StreamDestination, "tcp", tcp_source, blocks=list(BLOCKS)),
                   action)


@pytest.mark.parametrize("step", ["listen", "region", "guest process"])
def test_stream_destination_releases_everything_when_a_setup_step_fails(step, monkeypatch):
    target = {"listen": "pipeline.stream_io.SocketSource.open",
              "region": "shm.region.RamRegion.create",
              "guest process": "pipeline.drivers.destination_common.DestinationGuest.start",
              }[step]
    monkeypatch.setattr(target, boom)
    expect_failure(*migrate(StreamDestination, "tcp", tcp_source))


def test_the_region_closes_last(monkeypatch):
    """The region outlives everything that could write into it or read it."""
    order = []
    real_close = destination_common.DestinationDriver._close_region

    def close_region(self):
        order.append("region")
        real_close(self)

    monkeypatch.setattr(destination_common.DestinationDriver, "_close_region", close_region)
    real_ctx = RdmaDestination._close_ctx
    monkeypatch.setattr(RdmaDestination, "_close_ctx",
                        lambda self: (order.append("ctx"), real_ctx(self)))
    real_guest = destination_common.DestinationDriver._stop_guest
    monkeypatch.setattr(destination_common.DestinationDriver, "_stop_guest",
                        lambda self: (order.append("guest"), real_guest(self)))
    migrate(RdmaDestination, "rdma", rdma_source)
    assert order == ["guest", "ctx", "region"]


def test_the_guest_process_is_the_interpreter_prestarted_while_listening(monkeypatch):
    taken = []
    real = harness._take_spare

    def take(target):
        spare = real(target)
        taken.append((target, spare is not None))
        return spare

    monkeypatch.setattr(harness, "_take_spare", take)
    _driver, error, src = migrate(StreamDestination, "tcp", tcp_source, blocks=list(BLOCKS))
    assert error is None and src.confirmed
    assert taken == [(destination_common.GUEST_ENTRY, True)]
