import pytest

from pipeline.migration_state import (
    Convergence,
    Decision,
    MigrationStateMachine,
    RoundResult,
    State,
)
from shm.errors import LocalProtocolError


def test_transitions():
    sm = MigrationStateMachine()
    sm.to(State.SETUP, 0.0)
    sm.to(State.ACTIVE, 1.0)
    with pytest.raises(LocalProtocolError):
        sm.to(State.COMPLETED, 2.0)
    assert sm.state is State.ACTIVE
    sm.to(State.FAILED, 2.0, "boom")
    assert sm.final and sm.reason == "boom"
    with pytest.raises(LocalProtocolError):
        sm.to(State.ACTIVE, 3.0)


def test_converges_when_dirty_fits_downtime_limit():
    c = Convergence(300, max_rounds=5)
    # 1 GB/s measured; 500 MB left -> 500 ms > 300 ms
    assert c.after_round(RoundResult(1, 10**9, 1.0, 500 * 10**6)) is Decision.ITERATE
    assert c.after_round(RoundResult(2, 10**9, 1.0, 200 * 10**6)) is Decision.SWITCHOVER
    assert c.expected_downtime_s == pytest.approx(0.2)


def test_gives_up_after_max_rounds_unless_keep_going():
    c = Convergence(300, max_rounds=2)
    r = RoundResult(1, 10**8, 1.0, 10**9)
    assert c.after_round(r) is Decision.ITERATE
    assert c.after_round(r) is Decision.GIVE_UP
    assert "did not converge" in c.explain(2e9)
    k = Convergence(300, max_rounds=2, keep_going=True)
    assert [k.after_round(r) for _ in range(4)] == [Decision.ITERATE] * 4


def test_nothing_dirty_switches_over_even_without_bandwidth():
    assert Convergence(300, 3).after_round(RoundResult(1, 0, 0.0, 0)) is Decision.SWITCHOVER
