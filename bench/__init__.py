"""Benchmarks of rdma-pipeline: per stage (``bench_*``) and whole scenarios (``scenario_*``).

``pipeline`` is imported first: it keeps numpy's OpenBLAS from starting worker threads, which
would spin beside the migration being measured in every bench process that imports numpy.
"""

import pipeline  # noqa: F401
