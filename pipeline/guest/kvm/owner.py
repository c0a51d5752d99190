"""The owner side of a KVM guest: what the migration drives, in the coordinator's process.

``KvmGuestProcess`` has the surface of ``synthetic.SyntheticGuest`` (``region``, ``log``,
``start``, ``pause``, ``resume``, ``query``, ``check``, ``close``, ``paused_at``, ``kind``,
``device_section``, ``tracking``, ``dirty_source()``), so the coordinator, the source pipeline and
``run_local`` take either. It creates the RAM region (``pc.ram`` plus the synthetic guest's small
``vga.vram``, so either destination layout fits) and, for KVM tracking, the shared dirty log,
then runs the VMM (``process.kvm_guest_main``) as a stage process: a vCPU thread that writes
guest pages at ``dirty_rate`` bytes/s. ``pause()`` returns a ``KvmPaused`` whose ``to_bytes()``
is the device-state section (vCPU state and RAM geometry), taken after the invariant was
checked on the paused guest.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import GuestError, StageFailed
from pipeline.guest.kvm.guest import DEVICE_SECTION
from pipeline.guest.kvm.vm import kvm_unavailable_reason

TARGET = "pipeline.guest.kvm.process:kvm_guest_main"
TRACKINGS = ("kvm", "uffd")


@dataclass(frozen=True)
class KvmPaused:
    """A paused KVM guest: where it stopped (invariant checked) and its device state."""

    passes: int
    page: int
    pages_written: int
    device_state: bytes

    def to_bytes(self) -> bytes:
        return self.device_state


@dataclass(frozen=True)
class KvmStatus:
    """A KVM guest as ``query()`` sees it; exact (and invariant-checked) when paused."""

    running: bool
    passes: int
    pages_written: int


class KvmGuestProcess:
    """A KVM guest in its own process over a shared RAM region; closing stops it and unlinks
    every segment (idempotent)."""

    kind = "kvm"
    device_section = DEVICE_SECTION
    SECOND_BLOCK = ("vga.vram", 256 * 1024)

    def __init__(self, ram: int, *, run_id: str, dirty_rate: float | None = 0,
                 chunk_size: int = 1 << 20, tracking: str = "kvm",
                 blocks: list[tuple[str, int]] | None = None, region_kind: str = "ram",
                 n_pages: int | None = None, stride: int = 1) -> None:
        from shm.dirtylog import DirtyLog
        from shm.region import RamBlockSpec, RamRegion
        from stages.harness import StageProcess

        if tracking not in TRACKINGS:
            raise ValueError(f"dirty tracking {tracking!r}: the KVM guest has kvm or uffd")
        reason = kvm_unavailable_reason()
        if reason:
            raise GuestError(f"--guest kvm: {reason}", hint="use --guest synthetic here")
        self.tracking = tracking
        self.dirty_rate = dirty_rate
        specs = blocks or [("pc.ram", ram), self.SECOND_BLOCK]
        self.region = RamRegion.create(run_id, [RamBlockSpec(n, s) for n, s in specs],
                                       chunk_size, kind=region_kind)
        self.log = None
        self.process = None
        self.paused_at = 0.0
        self.paused_state: KvmPaused | None = None
        self.ready_info: dict = {}
        self._closed = False
        try:
            if tracking == "kvm":
                self.log = DirtyLog.create(run_id, self.region, kind=region_kind + "dirty")
            self.process = StageProcess("guest", TARGET, {
                "region": self.region.name, "dirtylog": self.log.name if self.log else None,
                "tracking": tracking, "dirty_rate": dirty_rate, "n_pages": n_pages,
                "stride": stride})
        except BaseException:
            self.close()
            raise

    def start(self, timeout: float = 60.0) -> KvmGuestProcess:
        self.process.start()
        self.ready_info = self.process.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def busy(self) -> bool:
        """Whether the guest writes memory while it runs."""
        return self.dirty_rate is None or self.dirty_rate > 0

    def dirty_source(self) -> dict:
        """Where the scanner finds this guest's dirty pages (plain config; after ``start``)."""
        if self.tracking == "uffd":
            info = self.process.info
            return {"kind": "pagemap", "pid": info["pid"], "blocks": info["blocks"]}
        return {"kind": "log", "name": self.log.name}

    def pause(self, timeout: float = 10.0) -> KvmPaused:
        """Stop the vCPU; its invariant is checked and its device state taken."""
        self.process.send("pause")
        _, info, self.paused_at = self.process.recv(timeout, what="pause")
        self.paused_state = KvmPaused(info["passes"], info["page"], info["pages_written"],
                                      info["device_state"])
        return self.paused_state

    def resume(self, timeout: float = 10.0) -> float:
        self.process.send("resume")
        return self.process.recv(timeout, what="resume")[1]

    def query(self, timeout: float = 10.0) -> KvmStatus:
        """Where the guest is (a paused guest's invariant is checked on the way)."""
        self.process.send("state")
        info = self.process.recv(timeout, what="state")[1]
        return KvmStatus(info["running"], info["passes"], info["pages_written"])

    def check(self) -> None:
        """GuestError if the guest process is gone (or its vCPU failed)."""
        try:
            self.process.check()
        except StageFailed as exc:
            raise GuestError(f"the KVM guest died: {exc}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process is not None:
            if self.process.pid is not None and self.process.alive:
                try:
                    self.process.send("stop")
                    self.process.recv(5.0, what="stop")
                except Exception:  # noqa: BLE001 - killed below if it did not stop
                    pass
            self.process.stop(2.0)
            self.process.close()
        if self.log is not None:
            self.log.close()
            self.log.unlink()
        self.region.close()
        self.region.unlink()

    def __enter__(self) -> KvmGuestProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
