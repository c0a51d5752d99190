"""A whole migration over ``--transport verbs`` on the strict pyverbs double: the destination,
the coordinator and the stage processes all import the double as pyverbs."""

from __future__ import annotations

import pytest
import strict_pyverbs

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState

MIB = 1 << 20


@pytest.mark.parametrize("devices,mode", [
    ("mlx5_0=127.0.0.1", "share"),
    ("rxe0=127.0.0.1", "proxy"),
    ("mlx5_0=127.0.0.2,mlx5_1=127.0.0.1", "share"),  # the route's device, not the first one
], ids=["mlx5", "rxe", "second-device"])
def test_a_whole_migration_over_verbs_on_the_strict_double(devices, mode):
    with strict_pyverbs.installed(devices):
        with LocalRun(16 * MIB, MigrationConfig(transport="verbs"), state=GuestState()) as lr:
            lr.start()
            summary = lr.finish()
            running = lr.guest_running()
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["verified"] is True and summary["destination"]["status"] == "completed"
    assert running
    assert summary["stages"]["registrar"]["registration"] == mode
