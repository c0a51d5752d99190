"""The commit point, end to end (issue 13): the destination confirms a verified migration, the
source commits on that confirmation and tells it so, and only then does the destination run the
guest. So a confirmation lost on the way leaves the guest on the source alone (QEMU's order,
resume then confirm, left it running on both hosts), and a commit lost on the way leaves it on
neither, which the summary says. Never on both."""

import socket

import pytest
from migration_helpers import MIB

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.drivers.rdma_source import RdmaSource
from pipeline.drivers.stream_source import StreamSource
from pipeline.guest.synthetic import GuestState
from pipeline.session import actions as act
from shm.errors import TransportError

pytestmark = pytest.mark.slow


def migrate(scheme: str, **kw) -> tuple[dict, bool, list[str]]:
    with LocalRun(16 * MIB, MigrationConfig(), state=GuestState(dirty_rate=2 * MIB),
                  scheme=scheme, **kw) as lr:
        lr.start()
        summary = lr.finish()
        source_runs = lr.guest_running()
        dest_states = [s for s, _ in lr.dest_states]
    return summary, source_runs, dest_states


@pytest.mark.parametrize("scheme", ["rdma", "tcp"])
def test_a_completed_migration_commits_before_the_destination_runs_the_guest(scheme):
    summary, source_runs, dest_states = migrate(scheme)
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["guest-runs-on"] == "destination" and not source_runs
    assert dest_states[-1] == "completed"


def cut(driver, scheme: str) -> None:
    """Break the connection, as a network that fails does."""
    if scheme == "rdma":
        driver.link.qp.disconnect()
    else:
        driver.sink.sock.shutdown(socket.SHUT_RDWR)


def patch(monkeypatch, scheme: str, action: type, step) -> None:
    driver = RdmaSource if scheme == "rdma" else StreamSource
    monkeypatch.setitem(driver.HANDLERS, action, step(driver.HANDLERS[action]))


@pytest.mark.parametrize("scheme", ["rdma", "tcp"])
def test_a_lost_confirmation_leaves_the_guest_on_the_source_alone(scheme, monkeypatch):
    """The destination verified and confirmed; the connection breaks before the source sees
    it. QEMU's destination would run the guest by now, and so would the source: two guests."""
    def lost(await_confirmation):
        def step(self, action):
            await_confirmation(self, action)      # it was sent and arrived ...
            cut(self, scheme)
            raise TransportError("the connection to the destination broke")   # ... unseen
        return step

    patch(monkeypatch, scheme, act.AwaitConfirmation, lost)
    summary, source_runs, dest_states = migrate(scheme)
    assert summary["status"] == "failed"
    assert summary["guest-runs-on"] == "source" and source_runs
    assert "completed" not in dest_states            # the destination never ran it


@pytest.mark.parametrize("scheme", ["rdma", "tcp"])
def test_a_lost_commit_leaves_the_guest_on_neither_host_and_says_so(scheme, monkeypatch):
    """The source took the confirmation (its guest stays paused for good); the connection
    breaks before its COMMIT: the destination must not run the guest it cannot know was
    given up."""
    def lost(send_commit):
        def step(self, action):
            cut(self, scheme)
            return send_commit(self, action)
        return step

    patch(monkeypatch, scheme, act.SendCommit, lost)
    summary, source_runs, dest_states = migrate(scheme)
    assert not source_runs and "completed" not in dest_states
    assert summary["guest-runs-on"].startswith("neither")
    assert "the commit may not have reached the destination" in summary["warning"]
