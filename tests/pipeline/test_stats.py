"""The figures a snapshot shows while a migration runs and once it has completed."""

from pipeline.stats import MigrationStats

MIB = 1 << 20


def test_rdma_bytes_count_within_a_round_and_remaining_drops():
    st = MigrationStats(status="active", start_time=1.0, total_bytes=64 * MIB,
                        remaining_bytes=64 * MIB, control_bytes=1000, rdma_bytes=0)
    st.update(live_rdma_bytes=lambda: 16 * MIB)
    snap = st.snapshot(2.0)
    assert snap["ram"]["transferred"] == 16 * MIB + 1000
    assert snap["ram"]["remaining"] == 48 * MIB
    assert snap["ram"]["average-mbps"] > 0


def test_a_live_counter_that_fails_or_lags_changes_nothing():
    st = MigrationStats(status="active", start_time=1.0, rdma_bytes=8 * MIB,
                        remaining_bytes=MIB)
    st.update(live_rdma_bytes=lambda: 1 / 0)
    assert st.snapshot(2.0)["ram"]["transferred"] == 8 * MIB
    st.update(live_rdma_bytes=lambda: 4 * MIB)        # behind the rounds already counted
    assert st.snapshot(2.0)["ram"]["remaining"] == MIB


def test_completed_mbps_is_qemus_bytes_over_the_time_after_setup():
    st = MigrationStats(status="completed", start_time=10.0, setup_end=10.5, end_time=12.5,
                        rdma_bytes=250_000_000, mbps=0.3)
    st.update(live_rdma_bytes=lambda: 10**12)         # ignored once completed
    snap = st.snapshot(20.0)
    assert snap["ram"]["transferred"] == 250_000_000
    assert snap["ram"]["mbps"] == 1000.0              # 2 Gbit over 2 s after setup


def test_each_sync_is_announced_with_its_count():
    seen = []
    st = MigrationStats(on_sync=seen.append)
    st.add(dirty_sync_count=1)
    st.add(normal_pages=5)
    st.add(dirty_sync_count=1)
    assert seen == [1, 2]
