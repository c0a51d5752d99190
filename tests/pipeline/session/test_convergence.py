import pytest

from pipeline.session.convergence import Convergence, Decision, RoundResult


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


def test_auto_converge_follows_qemus_rule():
    from pipeline.session.convergence import AutoConverge

    t = AutoConverge()                               # 20 %, +10 %, at most 99 %, 50 %
    assert t.after_round(40, 100) is None            # under the threshold: never counts
    assert t.after_round(60, 100) is None            # over it once: not yet
    assert t.after_round(60, 100) == 20              # twice: throttled at the initial 20 %
    assert [t.after_round(99, 100) for _ in range(4)] == [None, 30, None, 40]
    t = AutoConverge(initial=95, increment=10, maximum=99)
    assert [t.after_round(90, 100) for _ in range(6)] == [None, 95, None, 99, None, None]
    # tailslow: only as much more as should bring the dirtied bytes down to the threshold
    t = AutoConverge(tailslow=True)
    t.after_round(60, 100), t.after_round(60, 100)
    assert t.percentage == 20
    assert [t.after_round(55, 100) for _ in range(2)] == [None, 27]   # 80 - 80 * 50 / 55 = 7
    assert [t.after_round(500, 100) for _ in range(2)] == [None, 37]  # at most the increment
