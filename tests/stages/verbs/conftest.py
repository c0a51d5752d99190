"""Fixtures of the verbs conformance suite.

Every test that takes ``provider`` runs against ``soft``, ``verbs`` and ``strict`` (the verbs
provider, unmodified, on the strict pyverbs double of ``strict_pyverbs``); ``verbs`` is skipped,
with the reason, through ``requires_rdma()`` when pyverbs sees no usable device.
"""

from __future__ import annotations

from multiprocessing import resource_tracker

import pytest
import strict_pyverbs
from verbs_helpers import Pair, requires_rdma


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker_running():
    """Spawning starts multiprocessing's resource tracker once and it lives on: start it before
    the first test counts child processes, or that test would be blamed for it."""
    resource_tracker.ensure_running()
    yield


@pytest.fixture
def strict():
    """The strict pyverbs double installed as ``pyverbs`` (the package)."""
    with strict_pyverbs.installed() as module:
        yield module


@pytest.fixture(params=["soft", "verbs", "strict"])
def provider(request) -> str:
    """The provider name to open: ``strict`` runs ``verbs`` on the double."""
    if request.param == "verbs":
        requires_rdma()
    if request.param == "strict":
        request.getfixturevalue("strict")
        return "verbs"
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


