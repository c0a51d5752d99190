"""The per-round plot: units follow the data and flat panels are left out (no matplotlib
needed to check the choice)."""

from bench.scenario_common import panels, round_series, unit_for


def summary(rates, remaining):
    return {"rounds": [{"round": i + 1, "bytes": 2 << 30, "seconds": 1.0,
                        "dirty-pages-rate": r, "remaining": left}
                       for i, (r, left) in enumerate(zip(rates, remaining, strict=True))]}


def test_units_follow_the_biggest_value():
    assert unit_for([3 << 30, 5]) == (1 << 30, "GiB")
    assert unit_for([900 << 10]) == (1 << 10, "KiB")
    assert unit_for([0, 0]) == (1, "bytes")


def test_an_idle_guests_flat_dirty_rate_is_left_out():
    idle = {"idle": round_series(summary([0, 0], [4096, 4096]))}
    assert [p[0] for p in panels(idle)] == ["throughput"]
    busy = {"busy": round_series(summary([1000, 3000], [64 << 20, 8 << 20]))}
    chosen = {key: (label, div) for key, label, div in panels(busy)}
    assert set(chosen) == {"throughput", "dirty", "remaining"}
    assert chosen["remaining"] == ("left after the round, MiB", 1 << 20)
    assert chosen["throughput"][0] == "throughput, GiB/s"
