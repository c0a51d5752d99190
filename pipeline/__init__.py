"""rdma-pipeline: live migration of VM RAM with QEMU's RDMA migration protocol.

The public API grows here (start, watch, cancel and await a migration); see ``pipeline.api``.
"""

import os

# numpy's OpenBLAS starts a worker thread per core in every process that imports it, and those
# spin while they wait for work. We never call BLAS; on two cores shared by six processes the
# spinning only steals time. Set before numpy is imported here or in any stage we spawn.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pipeline.errors import *  # noqa: E402, F401, F403 - the exception tree, for users

__version__ = "0.1.0"

# The library API (pipeline.api), imported on first use so that `import pipeline` stays light.
_API = ("Migration", "start_outgoing", "start_incoming", "run_local", "LocalRun",
        "MigrationConfig", "SyntheticGuest", "GuestState", "GuestSpec", "save_to_file",
        "restore_from_file")


def __getattr__(name: str):
    if name in _API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
