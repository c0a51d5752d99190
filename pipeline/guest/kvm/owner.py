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

from pipeline.guest.kvm.vm import kvm_unavailable_reason
from pipeline.guest.owner import GuestProcess
from pipeline.sections import KVM_SECTION
from shm.errors import GuestError

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


class KvmGuestProcess(GuestProcess):
    """A KVM guest in its own process over a shared RAM region (see ``GuestProcess``):
    ``pause`` returns a ``KvmPaused``, ``query`` a ``KvmStatus``."""

    kind = "kvm"
    device_section = KVM_SECTION
    STOP_TIMEOUT = 5.0

    def __init__(self, ram: int, *, run_id: str, dirty_rate: float | None = 0,
                 chunk_size: int = 1 << 20, tracking: str = "kvm",
                 blocks: list[tuple[str, int]] | None = None, region_kind: str = "ram",
                 n_pages: int | None = None, stride: int = 1) -> None:
        if tracking not in TRACKINGS:
            raise ValueError(f"dirty tracking {tracking!r}: the KVM guest has kvm or uffd")
        reason = kvm_unavailable_reason()
        if reason:
            raise GuestError(f"--guest kvm: {reason}", hint="use --guest synthetic here")
        self.tracking = tracking
        self.dirty_rate = dirty_rate
        self.paused_state: KvmPaused | None = None
        super().__init__(ram, run_id=run_id, target=TARGET,
                         config={"tracking": tracking, "dirty_rate": dirty_rate,
                                 "n_pages": n_pages, "stride": stride},
                         dirty_log=tracking == "kvm", chunk_size=chunk_size, blocks=blocks,
                         region_kind=region_kind)

    @property
    def busy(self) -> bool:
        """Whether the guest writes memory while it runs."""
        return self.dirty_rate is None or self.dirty_rate > 0

    def pause(self, timeout: float = 10.0) -> KvmPaused:
        """Stop the vCPU; its invariant is checked and its device state taken."""
        _, info, self.paused_at = self.request("pause", timeout)
        self.paused_state = KvmPaused(info["passes"], info["page"], info["pages_written"],
                                      info["device_state"])
        return self.paused_state

    def query(self, timeout: float = 10.0) -> KvmStatus:
        """Where the guest is (a paused guest's invariant is checked on the way)."""
        info = self.request("state", timeout)[1]
        return KvmStatus(info["running"], info["passes"], info["pages_written"])
