import os
import signal
import time

import numpy as np
import pytest

from shm.errors import StageFailed
from shm.naming import list_entries, new_run_id, segment_name
from shm.ring import Ring
from stages.harness import Inbox, StageProcess

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def targets_importable(monkeypatch):
    """Spawned children import ``stage_targets`` through the sys.path they inherit."""
    monkeypatch.syspath_prepend(os.path.dirname(__file__))


def test_ready_messages_and_clean_exit():
    with StageProcess("ok", "stage_targets:ok_main", {"x": 5}) as st:
        st.start()
        assert st.wait_ready(30) == {"echo": 5}
        assert st.recv(10) == ("hello", 1)
        assert st.stop(5) == 0


def test_error_becomes_one_line_and_exit_2():
    with StageProcess("bad", "stage_targets:fail_main", {}) as st:
        st.start()
        st.wait_ready(30)
        with pytest.raises(StageFailed) as info:
            st.recv(10)
        assert info.value.exitcode == 2
        assert str(info.value) == "stage bad exited with code 2: ring /x went away"


def test_killed_stage_is_noticed_and_stop_kills_stragglers():
    with StageProcess("hang", "stage_targets:hang_main", {}) as st:
        st.start()
        st.wait_ready(30)
        assert st.stop(0.2) is not None          # terminated (SIGTERM unwinds it: code 2)
        with pytest.raises(StageFailed):
            st.check()


class FakeRing:
    def __init__(self, batches):
        self.batches = list(batches)

    def pop(self, max_n, timeout=None):
        return self.batches.pop(0)


def test_inbox_merges_and_ends():
    inbox = Inbox()
    inbox.watch("a", FakeRing([np.arange(3), np.arange(0)]))
    got = [inbox.get(5) for _ in range(2)]
    assert [len(x[1]) for x in got] == [3, 0]
    assert inbox.get(0.05) is None
    inbox.close()


def test_inbox_fd_is_not_left_readable_once_drained():
    """A reader that takes an item before its wake-up byte is written (put queues first) must
    not be left with a readable fd and nothing queued: the poster's select() loop spun at
    100% CPU on that, and with max-bandwidth pacing never sent again."""
    import select

    inbox = Inbox()
    inbox._q.put(("a", np.arange(2)))          # the item is queued, its byte not yet written
    assert inbox.get_nowait()[0] == "a"
    os.write(inbox._w, b"x")                    # ... and now the byte comes
    assert select.select([inbox.fileno()], [], [], 0)[0]
    assert inbox.get_nowait() is None           # nothing queued: the stray byte is drained
    assert not select.select([inbox.fileno()], [], [], 0)[0]
    inbox.put(("b", np.arange(1)))              # a real wake-up still wakes
    assert select.select([inbox.fileno()], [], [], 0)[0]
    assert inbox.get_nowait()[0] == "b"
    inbox.close()


def _gone(pid, within):
    from shm.naming import pid_alive

    deadline = time.monotonic() + within
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_stage_ignores_sigint_from_its_start():
    """Ctrl-C reaches the whole process group, stages included, even while they boot: they
    must not die of it (the coordinator stops them)."""
    with StageProcess("sig", "stage_targets:signals_main", {}) as st:
        st.start()
        os.kill(st.pid, signal.SIGINT)       # still booting: the interpreter is not up yet
        info = st.wait_ready(30)
        os.kill(st.pid, signal.SIGINT)
        assert info["sigint_ignored"]
        assert signal.SIGINT not in info["blocked"]
        assert st.alive
        with pytest.raises(StageFailed):
            st.recv(0.3)                     # no message, and still no death
        assert st.alive


def test_sigterm_ends_a_ring_wait_with_a_clear_line():
    with Ring.create(segment_name(new_run_id(), "sigring"), "<u8", 16) as ring:
        with StageProcess("waiter", "stage_targets:ring_wait_main", {"ring": ring.name}) as st:
            st.start()
            st.wait_ready(30)
            time.sleep(0.3)                  # asleep on the ring's semaphore
            t0 = time.monotonic()
            os.kill(st.pid, signal.SIGTERM)
            with pytest.raises(StageFailed) as info:
                st.recv(10)
            assert time.monotonic() - t0 < 5
            assert info.value.exitcode == 2
            assert "terminated by SIGTERM" in str(info.value)


def test_close_unlinks_what_a_killed_stage_owned():
    rid = new_run_id()
    with StageProcess("owner", "stage_targets:owner_main",
                      {"run_id": rid, "child": "stage_targets:hang_main"}, daemon=False) as st:
        st.start()
        info = st.wait_ready(30)
        grandchild = info["child"]
        assert [e for e in list_entries(rid)]
        os.kill(st.pid, signal.SIGKILL)
        # the grandchild sees its parent die: it exits and unlinks the dead parent's ring
        assert _gone(grandchild, 2.0)
        st.close()
    assert list_entries(rid) == []


def test_an_orphan_releases_its_dead_parents_objects_within_2_s():
    rid = new_run_id()
    st = StageProcess("owner", "stage_targets:owner_main",
                      {"run_id": rid, "child": "stage_targets:hang_main"}, daemon=False)
    st.start()
    try:
        info = st.wait_ready(30)
        os.kill(st.pid, signal.SIGKILL)
        st.process.join(5)                   # reaped here: nobody sweeps for the parent
        t0 = time.monotonic()
        assert _gone(info["child"], 2.0)
        while list_entries(rid) and time.monotonic() - t0 < 2.0:
            time.sleep(0.02)
        assert list_entries(rid) == []
    finally:
        st.conn.close()
        st._closed = True


def test_a_prestarted_interpreter_becomes_the_stage_and_unused_ones_end():
    from stages import harness

    harness.prestart(["stage_targets:ok_main", "stage_targets:ok_main",
                      "stage_targets:hang_main"])
    try:
        spares = [p.pid for p, _ in harness._SPARES["stage_targets:ok_main"]]
        with StageProcess("ok", "stage_targets:ok_main", {"x": 7}) as st:
            st.start()
            assert st.pid == spares[0]               # taken, not spawned
            assert st.wait_ready(30) == {"echo": 7}
            assert st.recv(10) == ("hello", 1)
            assert st.stop(5) == 0
        assert [p.pid for p, _ in harness._SPARES["stage_targets:ok_main"]] == spares[1:]
        with StageProcess("g", "stage_targets:ok_main", {"x": 1}, daemon=False) as st:
            st.start()                               # not daemonic: never a spare
            assert st.pid not in spares
            st.wait_ready(30)
            st.stop(5)
    finally:
        harness.discard_spares()
    assert harness._SPARES == {}


def test_discarding_the_spares_of_some_targets_keeps_the_others():
    from stages import harness

    harness.prestart(["stage_targets:ok_main", "stage_targets:hang_main"])
    try:
        (kept, _), = harness._SPARES["stage_targets:ok_main"]
        (gone, _), = harness._SPARES["stage_targets:hang_main"]
        kept_pid, gone_pid = kept.pid, gone.pid
        harness.discard_spares(["stage_targets:hang_main"])
        assert not os.path.exists(f"/proc/{gone_pid}")        # ended and reaped
        assert kept.is_alive()
        assert list(harness._SPARES) == ["stage_targets:ok_main"]
    finally:
        harness.discard_spares()
    assert not os.path.exists(f"/proc/{kept_pid}")
