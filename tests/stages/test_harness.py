import os

import numpy as np
import pytest

from shm.errors import StageFailed
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
