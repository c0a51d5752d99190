"""Shared-memory substrate: RAM regions, rings, dirty logs, segment naming and cleanup.

Every object is a named POSIX shared-memory segment (plus semaphores for rings and dirty logs)
with one owner that unlinks it; other processes attach by name and only close.
"""

from shm.dirtylog import DirtyLog
from shm.naming import new_run_id, parse_segment_name, segment_name, sweep
from shm.region import DEFAULT_CHUNK_SIZE, PAGE_SIZE, RamBlock, RamBlockSpec, RamRegion
from shm.ring import Ring, RingTimeout
from shm.runs import RUN_DTYPE, dirty_pages, dirty_runs, expand_runs
from shm.segment import PeerGone, Segment, ShmTimeout

__all__ = [
    "DEFAULT_CHUNK_SIZE", "PAGE_SIZE", "RUN_DTYPE", "DirtyLog", "PeerGone", "RamBlock",
    "RamBlockSpec", "RamRegion", "Ring", "RingTimeout", "Segment", "ShmTimeout", "dirty_pages",
    "dirty_runs", "expand_runs", "new_run_id", "parse_segment_name", "segment_name", "sweep",
]
