"""Shared-memory substrate: RAM regions, rings, dirty logs, segment naming and cleanup, and what
every layer needs (the exception tree in ``shm.errors``, pages and libc in ``shm.memory``).

Every object is a named POSIX shared-memory segment (plus semaphores for rings and dirty logs)
with one owner that unlinks it; other processes attach by name and only close.

The names below load their module on first use, so that importing ``shm.errors`` (as the sans-IO
protocol does, through the exception tree) maps and loads nothing else.
"""

from importlib import import_module

_HOME = {
    "DirtyLog": "shm.dirtylog",
    "new_run_id": "shm.naming", "parse_segment_name": "shm.naming", "segment_name": "shm.naming",
    "sweep": "shm.naming",
    "PAGE_SIZE": "shm.memory",
    "DEFAULT_CHUNK_SIZE": "shm.region", "RamBlock": "shm.region", "RamBlockSpec": "shm.region",
    "RamRegion": "shm.region",
    "Ring": "shm.ring", "RingTimeout": "shm.ring",
    "RUN_DTYPE": "shm.runs", "dirty_pages": "shm.runs", "dirty_runs": "shm.runs",
    "expand_runs": "shm.runs",
    "PeerGone": "shm.segment", "Segment": "shm.segment", "ShmTimeout": "shm.segment",
}

__all__ = [
    "DEFAULT_CHUNK_SIZE", "PAGE_SIZE", "RUN_DTYPE", "DirtyLog", "PeerGone", "RamBlock",
    "RamBlockSpec", "RamRegion", "Ring", "RingTimeout", "Segment", "ShmTimeout", "dirty_pages",
    "dirty_runs", "expand_runs", "new_run_id", "parse_segment_name", "segment_name", "sweep",
]


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'shm' has no attribute {name!r}")
    return getattr(import_module(home), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
