"""Live migration figures, named as QEMU's ``query-migrate`` names them.

``MigrationStats`` is written by the coordinator only; readers take ``snapshot()``, a plain
dict (JSON-ready) with QEMU's keys: ``status``, ``total-time``, ``setup-time``, ``downtime``,
``expected-downtime`` (milliseconds) and a ``ram`` object (``transferred``, ``remaining``,
``total``, ``duplicate``, ``normal``, ``normal-bytes``, ``mbps``, ``dirty-pages-rate``,
``dirty-sync-count``; ``mbps`` is the last round's rate while the migration runs and, once it
has completed, all bytes over the time from the end of setup to completion, as QEMU's
``migration_calculate_complete``), ``cpu-throttle-percentage`` (auto-converge, once it
throttles), plus ours: ``verified``, ``round``, ``rounds`` (per round:
``round``, ``start`` (s after the migration started), ``seconds``, ``bytes`` sent, ``pages``,
``zero-pages``, then ``remaining`` and ``dirty-pages-rate`` from the sync that followed),
``cleanup-time`` (ms spent stopping the stages after completion, outside total-time),
``error``, ``stages``, ``guest`` and
``dirty-tracking`` (which guest ran and which dirty source tracked it).

Counting: ``duplicate`` is zero pages found by the scanner (sent as COMPRESS, written as
part of a run in a registered chunk, or not sent at all where the destination holds zeros
already); ``normal`` the non-zero pages written; ``transferred`` the bytes that crossed: every
byte RDMA-written plus every control-message byte sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from shm.memory import PAGE_SIZE


@dataclass
class StageFigures:
    pages_scanned: int = 0
    zero_pages: int = 0
    scanner_busy_s: float = 0.0
    chunks_registered: int = 0
    chunks_unregistered: int = 0
    compress_sent: int = 0
    registrar_busy_s: float = 0.0
    registration: str = ""          # share (the poster imports the PD) or proxy
    writes_posted: int = 0
    bytes_written: int = 0
    poster_busy_s: float = 0.0

    def as_dict(self) -> dict:
        return {
            "scanner": {"pages-scanned": self.pages_scanned, "zero-pages": self.zero_pages,
                        "busy-time": round(self.scanner_busy_s * 1000, 1)},
            "registrar": {"chunks-registered": self.chunks_registered,
                          "chunks-unregistered": self.chunks_unregistered,
                          "compress-sent": self.compress_sent,
                          "busy-time": round(self.registrar_busy_s * 1000, 1),
                          **({"registration": self.registration} if self.registration
                             else {})},
            "poster": {"writes-posted": self.writes_posted,
                       "bytes-written": self.bytes_written,
                       "busy-time": round(self.poster_busy_s * 1000, 1)},
        }


@dataclass
class MigrationStats:
    """Counters of one migration; ``snapshot()`` is safe to call from any thread."""

    status: str = "none"
    start_time: float = 0.0          # monotonic seconds
    setup_end: float = 0.0
    pause_time: float = 0.0
    resume_time: float = 0.0
    end_time: float = 0.0
    total_bytes: int = 0             # ram.total
    control_bytes: int = 0
    rdma_bytes: int = 0
    remaining_bytes: int = 0
    duplicate_pages: int = 0
    normal_pages: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: float = 0.0    # pages/s seen by the last sync
    mbps: float = 0.0                # megabits/s over the last round
    expected_downtime_ms: float = 0.0
    round: int = 0
    verified: bool | None = None
    guest: str = ""                  # which guest: synthetic or kvm
    dirty_tracking: str = ""         # which dirty source ran: soft, uffd or kvm
    error: str = ""
    stages: StageFigures = field(default_factory=StageFigures)
    rounds: list[dict] = field(default_factory=list)   # one entry per round (see snapshot)
    cleanup_ms: float = 0.0          # stopping the stages after completion (not in total-time)
    warning: str = ""                # what failed after the commit point (the migration stands)
    runs_on: str = ""                # where the guest runs at the end: source, destination, ...
    verification: str = ""           # why the RAM was not verified (a stream with no digest)
    on_sync: Callable[[int], None] | None = None   # called with dirty-sync-count at each sync
    live_rdma_bytes: Callable[[], int] | None = None   # bytes written so far, within a round
    cpu_throttle_percentage: int = 0  # auto-converge's throttle of the guest (0: none)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **changes) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def add(self, **deltas) -> None:
        """Add to counters, e.g. ``add(normal_pages=n)``."""
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)
            sync = self.dirty_sync_count
        if "dirty_sync_count" in deltas and self.on_sync is not None:
            self.on_sync(sync)     # outside the lock: the callback may take a snapshot

    def add_stage(self, **deltas) -> None:
        """Add to per-stage counters (``StageFigures``)."""
        with self._lock:
            for name, value in deltas.items():
                setattr(self.stages, name, getattr(self.stages, name) + value)

    def set_stage(self, **values) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self.stages, name, value)

    def add_round(self, entry: dict) -> None:
        with self._lock:
            self.rounds.append(entry)

    def amend_round(self, **changes) -> None:
        """Change the last round's entry (replaced, never mutated: snapshots hold copies)."""
        with self._lock:
            self.rounds[-1] = {**self.rounds[-1], **changes}

    def _mbps(self, end: float) -> float:
        """While it runs, the last round's rate; once completed, QEMU's figure: every byte
        over the time from the end of setup to completion (megabits per second)."""
        if self.status == "completed" and self.end_time and self.start_time:
            secs = end - (self.setup_end or self.start_time)
            if secs > 0:
                return self.transferred * 8 / 1e6 / secs
        return self.mbps

    @property
    def transferred(self) -> int:
        return self.rdma_bytes + self.control_bytes

    def _live(self) -> tuple[int, int]:
        """(transferred, remaining) with the RDMA bytes of the round under way counted as they
        land (``live_rdma_bytes``), so that progress moves within a round, not only at its end:
        remaining drops by the bytes written since the last sync (zero pages, sent without a
        write, are taken off at the next sync)."""
        rdma = self.rdma_bytes
        if self.live_rdma_bytes is not None and self.status not in ("completed", "failed",
                                                                     "cancelled"):
            try:
                rdma = max(rdma, self.live_rdma_bytes())
            except Exception:  # noqa: BLE001 - a figure for display: never fail a snapshot
                pass
        remaining = max(0, self.remaining_bytes - (rdma - self.rdma_bytes))
        return rdma + self.control_bytes, remaining

    def snapshot(self, now: float) -> dict:
        """query-migrate-style dict at monotonic time ``now``."""
        with self._lock:
            end = self.end_time or now
            total_ms = (end - self.start_time) * 1000 if self.start_time else 0.0
            setup_ms = (self.setup_end - self.start_time) * 1000 if self.setup_end else 0.0
            downtime = None
            if self.pause_time and self.resume_time:
                downtime = round((self.resume_time - self.pause_time) * 1000, 1)
            elapsed = max(end - self.start_time, 1e-9) if self.start_time else 0.0
            transferred, remaining = self._live()
            out = {
                "status": self.status,
                "total-time": round(total_ms, 1),
                "setup-time": round(setup_ms, 1),
                "expected-downtime": round(self.expected_downtime_ms, 1),
                "ram": {
                    "transferred": transferred,
                    "remaining": remaining,
                    "total": self.total_bytes,
                    "duplicate": self.duplicate_pages,
                    "normal": self.normal_pages,
                    "normal-bytes": self.normal_pages * PAGE_SIZE,
                    "mbps": round(self._mbps(end), 1),
                    "average-mbps": round(transferred * 8 / 1e6 / elapsed, 1)
                    if elapsed else 0.0,
                    "dirty-pages-rate": round(self.dirty_pages_rate),
                    "dirty-sync-count": self.dirty_sync_count,
                    "page-size": PAGE_SIZE,
                },
                "round": self.round,
                "verified": self.verified,
                "stages": self.stages.as_dict(),
                "rounds": [dict(r) for r in self.rounds],
            }
            if downtime is not None:
                out["downtime"] = downtime
            if self.cpu_throttle_percentage:
                out["cpu-throttle-percentage"] = self.cpu_throttle_percentage
            if self.guest:
                out["guest"] = self.guest
                out["dirty-tracking"] = self.dirty_tracking
            if self.cleanup_ms:
                out["cleanup-time"] = self.cleanup_ms
            if self.error:
                out["error-desc"] = self.error
            if self.warning:
                out["warning"] = self.warning
            if self.runs_on:
                out["guest-runs-on"] = self.runs_on
            if self.verification:
                out["verification"] = self.verification
            return out
