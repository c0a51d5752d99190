"""Where the scanner gets dirty pages: one ``fetch()`` surface over the dirty sources.

A guest names its source in plain config (``guest.dirty_source()``), the scanner opens it:

    {"kind": "log", "name": ...}          shm.dirtylog.DirtyLog, fetched with the guest's help:
                                          the synthetic guest's own marks (soft), or KVM's dirty
                                          log, which the KVM guest's VMM collects on request
    {"kind": "pagemap", "pid": ...,       shm.uffd.PagemapHarvester: pages the guest process
     "blocks": [(address, length), ...]}  wrote, found by the kernel (userfaultfd WP_ASYNC),
                                          harvested and re-protected with PAGEMAP_SCAN

Every source's ``fetch()`` returns one packed little-endian bitmap per RAM block of the pages
written since its previous fetch, with no bit lost between fetches, and ``close()``s
idempotently. ``name`` says which tracking ran, for the summary.
"""

from __future__ import annotations

import numpy as np

FETCH_TIMEOUT = 5.0   # seconds a guest may take to answer a dirty-log fetch


class LogSource:
    """The shared dirty log of a guest that marks it (or hands KVM's bits to it)."""

    name = "log"

    def __init__(self, name: str, region=None, timeout: float = FETCH_TIMEOUT) -> None:
        from shm.dirtylog import DirtyLog

        self.log = DirtyLog.attach(name, region)
        self.timeout = timeout

    def fetch(self) -> list[np.ndarray]:
        return self.log.fetch(timeout=self.timeout)

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> LogSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_dirty_source(spec: dict, region=None):
    """The dirty source ``spec`` names (see the module docstring); a context manager."""
    kind = spec.get("kind")
    if kind == "log":
        return LogSource(spec["name"], region)
    if kind == "pagemap":
        from shm.uffd import PagemapHarvester

        blocks = [tuple(b) for b in spec["blocks"]]
        if region is not None and [n for _, n in blocks] != [b.length for b in region.blocks]:
            raise ValueError("the harvested blocks do not match the region's blocks")
        return PagemapHarvester(int(spec["pid"]), blocks)
    raise ValueError(f"dirty source {kind!r}: use log or pagemap")


def scanner_source(config: dict, region=None):
    """The scanner's source from its config: ``dirty`` (a spec) or, as before, ``dirtylog``."""
    if config.get("dirty"):
        return open_dirty_source(config["dirty"], region)
    return LogSource(config["dirtylog"], region)
