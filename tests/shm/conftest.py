"""Start multiprocessing's resource tracker before any test of this directory takes its
snapshot of child processes: spawning starts the tracker once per session and it lives on, so
without this the first test that spawns would be blamed for a leaked child."""

from __future__ import annotations

from multiprocessing import resource_tracker

import pytest


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker_running():
    resource_tracker.ensure_running()
    yield
