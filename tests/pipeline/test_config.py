import pytest

from pipeline.config import MigrationConfig, parse_size


def test_parse_size():
    assert parse_size("512M") == 512 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("4096") == 4096
    assert parse_size("1.5K") == 1536
    with pytest.raises(ValueError):
        parse_size("lots")


def test_qemu_spellings():
    c = MigrationConfig().with_options(["rdma-pin-all=on"],
                                       ["downtime-limit=50", "max-bandwidth=1G"])
    assert c.pin_all and c.downtime_limit_ms == 50 and c.max_bandwidth == 1 << 30


@pytest.mark.parametrize("caps,params", [
    (["rdma-pin-all=maybe"], []),
    (["x-unknown=on"], []),
    ([], ["downtime-limit=-1"]),
    ([], ["downtime-limit"]),
    ([], ["nope=1"]),
])
def test_bad_options_refused(caps, params):
    with pytest.raises(ValueError):
        MigrationConfig().with_options(caps, params)


def test_bad_chunk_size_and_transport():
    with pytest.raises(ValueError):
        MigrationConfig(chunk_size=3 << 20)
    with pytest.raises(ValueError):
        MigrationConfig(transport="carrier-pigeon")


def test_x_rdma_extensions():
    assert MigrationConfig().extensions
    cfg = MigrationConfig().with_options(["x-rdma-extensions=off"])
    assert not cfg.extensions
    with pytest.raises(ValueError, match="QEMU's 1M"):
        MigrationConfig(chunk_size=4 << 20).with_options(["x-rdma-extensions=off"])
