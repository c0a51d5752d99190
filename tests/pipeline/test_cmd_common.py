"""What SIGINT, SIGTERM and SIGHUP do to run, migrate and incoming (``StopSignals``)."""

import signal
import threading
import time

import pytest

from pipeline import api
from pipeline.cmd_common import Interrupted, StopSignals, signal_exit_code


def send(sig):
    signal.pthread_kill(threading.main_thread().ident, sig)


def test_exit_codes_are_the_shells():
    assert [signal_exit_code(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == \
        [130, 143, 129]


@pytest.mark.parametrize("sig", StopSignals.SIGNALS)
def test_a_signal_while_starting_unwinds_at_once(sig):
    with StopSignals("run") as signals:
        t0 = time.monotonic()
        with pytest.raises(Interrupted) as info, signals.starting():
            send(sig)
            time.sleep(10)                    # the handler raises here
        assert info.value.signum == sig
        assert time.monotonic() - t0 < 5
        send(sig)                             # a second one only counts: nothing raises
        time.sleep(0.05)
    assert signals.signum == sig


def test_a_signal_cancels_a_running_migration_and_raises_nothing(capsys):
    mig = api.Migration("test")
    api._running.add(mig)
    try:
        with StopSignals("migrate") as signals, signals.starting():
            send(signal.SIGTERM)
            assert mig.cancel_event.wait(5)
        assert signals.report({"status": "cancelled"}) == 143
    finally:
        api._running.discard(mig)
    assert capsys.readouterr().err == "rdma-pipeline migrate: cancelled: SIGTERM\n"


def test_after_the_commit_point_a_signal_changes_nothing(capsys):
    with StopSignals("run") as signals:
        send(signal.SIGHUP)                   # not starting, nothing running: noted only
        time.sleep(0.05)
    assert signals.report({"status": "completed"}) == 0
    assert "came after the commit point" in capsys.readouterr().err


def test_no_signal_no_report():
    old = signal.getsignal(signal.SIGTERM)
    with StopSignals("run") as signals:
        assert signal.getsignal(signal.SIGTERM) != old
    assert signal.getsignal(signal.SIGTERM) == old
    assert signals.report({"status": "failed"}) is None
