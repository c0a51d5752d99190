"""Capabilities and parameters as QMP sets them: QEMU's checks and words, all or nothing, and
the MigrationConfig they make."""

import pytest

from pipeline.config import MigrationConfig
from pipeline.qmp.protocol import QmpError
from pipeline.qmp.settings import CAPABILITIES, MigrationSettings


def settings() -> MigrationSettings:
    return MigrationSettings(MigrationConfig())


def test_capabilities_make_the_config_and_are_queried_in_qemus_order():
    s = settings()
    s.set_capabilities([{"capability": "rdma-pin-all", "state": True},
                        {"capability": "events", "state": True},
                        {"capability": "x-odp", "state": False}])
    cfg = s.config()
    assert cfg.pin_all and not cfg.odp and s.events
    assert [c["capability"] for c in s.query_capabilities()] == list(CAPABILITIES)
    assert CAPABILITIES[:3] == ("xbzrle", "rdma-pin-all", "auto-converge")


@pytest.mark.parametrize("caps, desc", [
    ([{"capability": "nosuch", "state": True}],
     "Parameter 'capability' does not accept value 'nosuch'"),
    ([{"capability": "xbzrle", "state": True}],
     "Capability 'xbzrle' is not supported by rdma-pipeline"),
    ([{"capability": "events"}], "Parameter 'state' is missing"),
    ([{"capability": "events", "state": "on"}], "Parameter 'state' expects boolean"),
    ("events", "Parameter 'capabilities' expects array"),
])
def test_bad_capabilities_are_refused_whole(caps, desc):
    s = settings()
    events_on = {"capability": "events", "state": True}
    with pytest.raises(QmpError) as info:
        s.set_capabilities([events_on, *caps] if isinstance(caps, list) else caps)
    assert info.value.desc == desc
    assert not s.events                      # nothing applied


def test_qemus_other_capabilities_may_be_turned_off():
    s = settings()
    s.set_capabilities([{"capability": "multifd", "state": False}])


@pytest.mark.parametrize("args, desc", [
    ({"downtime-limit": "abc"}, "Parameter 'downtime-limit' expects uint64"),
    ({"downtime-limit": -1}, "Parameter 'downtime-limit' expects uint64"),
    ({"downtime-limit": 2_000_001},
     "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ({"max-cpu-throttle": 100},
     "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to 99"),
    ({"nosuch": 1}, "Parameter 'nosuch' is unexpected"),
    ({"multifd-channels": 4}, "Parameter 'multifd-channels' is not supported by rdma-pipeline"),
    ({"x-keep-going": 1}, "Parameter 'x-keep-going' expects boolean"),
])
def test_bad_parameters_get_qemus_words(args, desc):
    s = settings()
    with pytest.raises(QmpError) as info:
        s.set_parameters({"max-bandwidth": 1 << 20, **args})
    assert info.value.desc == desc
    assert s.query_parameters()["max-bandwidth"] == 0      # all or nothing


def test_parameters_make_the_config():
    s = settings()
    s.set_parameters({"downtime-limit": 500, "max-bandwidth": 1 << 30, "x-max-rounds": 7,
                      "cpu-throttle-initial": 30})
    cfg = s.config()
    assert (cfg.downtime_limit_ms, cfg.max_bandwidth, cfg.max_rounds) == (500, 1 << 30, 7)
    assert s.query_parameters()["cpu-throttle-initial"] == 30
    with pytest.raises(QmpError) as info:
        s.set_parameters({"downtime-limit": 0})            # QEMU's range allows it; ours not
    assert "downtime-limit" in info.value.desc
