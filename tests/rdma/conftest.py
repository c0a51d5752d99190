"""Hardware-gated tests: each one skips, with the reason, unless pyverbs sees an RDMA device
with an ACTIVE port. The decision is the conformance suite's one ``requires_rdma()``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages" / "verbs"))
from verbs_helpers import requires_rdma  # noqa: E402


@pytest.fixture(autouse=True)
def _rdma_device():
    requires_rdma()
