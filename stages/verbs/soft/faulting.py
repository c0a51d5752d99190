"""What the soft responder does for writes into an on-demand (ODP) MR: fault their target in
before the data lands, and fault ahead of a stream of writes from a helper thread.

An ODP device faults in the pages a write targets when it arrives. The soft responder does
that in bulk (``memory.populate``), but in its reader thread, where the faulting of fresh
memory (0.6 s per GiB here) holds up the socket. So ``FaultMap`` also keeps, per MR, which
1 MiB units are in memory, and past each write asks the ``Faulter`` thread to fault in the
next ``AHEAD`` bytes not yet in memory: a stream of writes (a first round over all of RAM)
then finds its memory ready, while scattered writes into memory already faulted in cost
nothing. Once every unit is in, the MR stops being on demand (as after ``prefetch``).

Invariant: a unit is marked done only after it was populated whole; ``queued`` marks units
handed to the thread, so each unit is faulted ahead at most once.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from stages.verbs.soft import memory

UNIT = 1 << 20
AHEAD = 8 << 20


class FaultMap:
    """The 1 MiB units of one ODP MR that are in memory (``done``) or on their way."""

    def __init__(self, mr) -> None:
        self.mr = mr
        n = -(-mr.length // UNIT)
        self.done = np.zeros(n, bool)
        self.queued = np.zeros(n, bool)

    def fault_in(self, address: int, length: int) -> None:
        """A write will land on ``[address, address+length)`` (local addresses): fault it in
        unless it lies in units already in, and queue the units after it."""
        mr = self.mr
        start, end = address - mr.local_address, address + length - mr.local_address
        lo, hi = start // UNIT, -(-end // UNIT)
        if hi - lo == 1 and self.done[lo] and (hi == len(self.done) or self.queued[hi]):
            return      # the common scattered write: its unit is in, the next one is handled
        if not self.done[lo:hi].all():
            memory.populate(address, length)
            # the units it covered whole (the last one may be short: whole at the region's end)
            whole = slice(-(-start // UNIT), hi if end == mr.length else end // UNIT)
            self.done[whole] = self.queued[whole] = True      # nothing left to fault ahead
        ahead = min(len(self.done), hi + AHEAD // UNIT)
        todo = np.flatnonzero(~self.queued[hi:ahead])
        if len(todo):
            units = todo + hi
            self.queued[units] = True
            FAULTER.submit(self, units)

    def fault_units(self, units: np.ndarray) -> None:
        """Populate ``units`` (the helper thread); the MR is no longer on demand once all are."""
        mr = self.mr
        for u in units.tolist():
            if mr.closed:
                return
            start = u * UNIT
            memory.populate(mr.local_address + start, min(UNIT, mr.length - start))
            self.done[u] = True
        if self.done.all():
            mr.on_demand = False


class Faulter:
    """One daemon thread per process that faults units in, in the order they were asked."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fmap: FaultMap, units: np.ndarray) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="soft-odp-fault-ahead")
                self._thread.start()
        self._queue.put((fmap, units))

    def _loop(self) -> None:
        while True:
            fmap, units = self._queue.get()
            try:
                fmap.fault_units(units)
            except Exception:  # noqa: BLE001 - a region unmapped meanwhile: nothing to do
                pass


FAULTER = Faulter()
