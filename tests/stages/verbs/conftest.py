"""Fixtures of the verbs conformance suite.

Every test that takes ``provider`` runs against ``soft`` and ``verbs``; ``verbs`` is skipped,
with the reason, through ``requires_rdma()`` when pyverbs sees no usable device.
"""

from __future__ import annotations

from multiprocessing import resource_tracker

import pytest
from verbs_helpers import Pair, requires_rdma


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker_running():
    """Spawning starts multiprocessing's resource tracker once and it lives on: start it before
    the first test counts child processes, or that test would be blamed for it."""
    resource_tracker.ensure_running()
    yield


@pytest.fixture(params=["soft", "verbs"])
def provider(request) -> str:
    if request.param == "verbs":
        requires_rdma()
    return request.param


@pytest.fixture
def make_pair(provider):
    pairs = []

    def make(**options) -> Pair:
        pair = Pair(provider, **options)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


