"""Which guest a migration moves, and how its dirty pages are found.

``GuestSpec`` names a guest by kind (``--guest``): ``synthetic`` (a process writing a RAM region,
``synthetic.SyntheticGuest``) or ``kvm`` (a VM running a CPL3 page-writing program,
``kvm.owner.KvmGuestProcess``), and a dirty source (``--dirty-tracking``):

    soft   the guest's own code marks a shared dirty log (synthetic only; the default for it)
    uffd   the kernel: userfaultfd write-protect (async) on the guest process's mapping,
           harvested by the scanner with PAGEMAP_SCAN on /proc/<pid>/pagemap (either guest)
    kvm    KVM's dirty log, handed over on the scanner's request (kvm only; the default for it)

A guest's writes made by a vCPU never pass through our code, so ``soft`` cannot track a KVM
guest, and only a VM has a KVM dirty log. ``GuestSpec`` checks the pair on construction
(``ValueError``); ``create`` says in one line (``GuestError``) when this machine lacks what the
pair needs (/dev/kvm, userfaultfd WP_ASYNC with PAGEMAP_SCAN), before any segment exists.

Both guests carry their state across as one device section; ``pipeline.sections.GUEST_SECTIONS``
maps section names to kinds, for the destination, which learns the kind from the stream.

The destination's guest process (``incoming_guest_main``) starts early, at MEM_SIZE, so that
starting a Python process is not part of the downtime, before the stream has said which guest
it carries (the device section comes last). It loads what either guest needs (numpy, the VMM's
modules), reports ready, and waits for ("load", section, body), the guest's device section, or
("stop",). On ``load`` it becomes the guest ``section`` names, through that guest's own process
entry (``synthetic.guest_main`` given the state; ``kvm.process.kvm_guest_main`` given the
device state, which restores the vCPU and checks the invariant before it runs), and answers
("loaded", t, info) once the guest runs: ``info`` holds ``kind`` and where the guest resumed
(``pages_written``; for KVM also ``passes`` and ``page``). After that the pipe speaks the
guest's protocol (``state``, ``pause``, ``resume``, ``stop``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from pipeline.guest.synthetic import GuestState
from pipeline.sections import GUEST_SECTIONS
from shm.errors import GuestError

GUESTS = ("synthetic", "kvm")
TRACKINGS = ("soft", "uffd", "kvm")
ALLOWED = {"synthetic": ("soft", "uffd"), "kvm": ("kvm", "uffd")}
DEFAULT_TRACKING = {"synthetic": "soft", "kvm": "kvm"}


def resolve_tracking(kind: str, tracking: str | None) -> str:
    """The dirty source for guest ``kind``: ``tracking``, or the kind's default if None."""
    if kind not in GUESTS:
        raise ValueError(f"guest {kind!r}: use one of {', '.join(GUESTS)}")
    if tracking is None:
        return DEFAULT_TRACKING[kind]
    if tracking not in TRACKINGS:
        raise ValueError(f"dirty tracking {tracking!r}: use one of {', '.join(TRACKINGS)}")
    if tracking not in ALLOWED[kind]:
        why = ("a KVM guest's writes come from its vCPU, not from our code"
               if kind == "kvm" else "only a KVM guest has a KVM dirty log")
        raise ValueError(f"--dirty-tracking {tracking} does not fit --guest {kind} ({why}): "
                         f"use {' or '.join(ALLOWED[kind])}")
    return tracking


def unavailable_reason(kind: str, tracking: str) -> str | None:
    """None when this machine can run guest ``kind`` with ``tracking``; else one line why not."""
    if kind == "kvm":
        from pipeline.guest.kvm.vm import kvm_unavailable_reason

        reason = kvm_unavailable_reason()
        if reason:
            return f"--guest kvm: {reason}"
    if tracking == "uffd":
        from shm.uffd import uffd_unavailable_reason

        reason = uffd_unavailable_reason()
        if reason:
            return f"--dirty-tracking uffd: {reason}"
    return None


@dataclass(frozen=True)
class GuestSpec:
    """A guest to create: kind, dirty tracking, and the workload. ``state.dirty_rate`` (bytes/s)
    is the rate for either kind; ``state``'s other fields and ``fill`` shape the synthetic
    guest only (the KVM guest writes its pages in order, one word per page per pass)."""

    kind: str = "synthetic"
    tracking: str | None = None
    state: GuestState = field(default_factory=GuestState)
    fill: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "tracking", resolve_tracking(self.kind, self.tracking))

    def check(self) -> None:
        """GuestError (one line) if this machine cannot run this guest with this tracking."""
        reason = unavailable_reason(self.kind, self.tracking)
        if reason:
            alt = ("use --guest synthetic" if reason.startswith("--guest")
                   else f"use --dirty-tracking {DEFAULT_TRACKING[self.kind]}")
            raise GuestError(reason, hint=alt)

    def create(self, ram: int, *, run_id: str, chunk_size: int = 1 << 20,
               blocks: list[tuple[str, int]] | None = None):
        """The guest's owner object (not started): its RAM region exists, its process not."""
        self.check()
        if self.kind == "kvm":
            from pipeline.guest.kvm.owner import KvmGuestProcess

            return KvmGuestProcess(ram, run_id=run_id, dirty_rate=self.state.dirty_rate,
                                   chunk_size=chunk_size, tracking=self.tracking, blocks=blocks)
        from pipeline.guest.synthetic import SyntheticGuest

        return SyntheticGuest(ram, run_id=run_id, state=self.state, fill=self.fill,
                              chunk_size=chunk_size, tracking=self.tracking, blocks=blocks)


def make_guest(kind: str = "synthetic", ram: int = 512 << 20, *, run_id: str,
               tracking: str | None = None, state: GuestState | None = None,
               fill: float = 0.5, chunk_size: int = 1 << 20):
    """Create (not start) a guest of ``kind``; see ``GuestSpec``."""
    spec = GuestSpec(kind, tracking, state or GuestState(), fill)
    return spec.create(ram, run_id=run_id, chunk_size=chunk_size)


# -- the destination's guest process ------------------------------------------------------

class _Loaded:
    """The guest entry's link: it already had its "ready" sent and "load" taken by us. The
    entry's own ready (KVM: after the restore) or "loaded" (synthetic) becomes our "loaded"."""

    def __init__(self, link, kind: str, first: tuple | None = None,
                 extra: dict | None = None) -> None:
        self.link = link
        self.kind = kind
        self.extra = extra or {}
        self.first = first

    def ready(self, **info) -> None:
        if self.kind == "kvm":
            self.link.send("loaded", time.monotonic(), {"kind": "kvm", **info["progress"]})

    def send(self, *msg) -> None:
        if msg and msg[0] == "loaded":
            msg = ("loaded", msg[1], {"kind": self.kind, **self.extra})
        self.link.send(*msg)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.first is not None or self.link.poll(timeout)

    def recv(self) -> tuple:
        if self.first is not None:
            msg, self.first = self.first, None
            return msg
        return self.link.recv()

    def fileno(self) -> int:
        return self.link.fileno()


def _prewarm() -> None:
    """Import the VMM now (when /dev/kvm is usable), not during the downtime."""
    from pipeline.guest.kvm.vm import kvm_unavailable_reason

    if kvm_unavailable_reason() is None:
        import pipeline.guest.kvm.process  # noqa: F401


def incoming_guest_main(config: dict, link) -> int:
    """Process entry; ``config``: ``region`` (the destination RAM region's name)."""
    _prewarm()
    link.ready(pid=os.getpid())
    msg = link.recv()
    if msg[0] != "load":
        link.send("stopped", None)
        return 0
    _, section, body = msg
    kind = GUEST_SECTIONS.get(section)
    if kind == "synthetic":
        from pipeline.guest.synthetic import guest_main

        state = GuestState.from_bytes(body)
        loaded = _Loaded(link, kind, ("load", asdict(state)),
                         {"pages_written": state.pages_written})
        return guest_main({"region": config["region"], "dirtylog": None, "state": None},
                          loaded)
    if kind == "kvm":
        from pipeline.guest.kvm.process import kvm_guest_main

        return kvm_guest_main({"region": config["region"], "device_state": bytes(body),
                               "tracking": "none", "start": True}, _Loaded(link, kind))
    raise GuestError(f"the stream's guest section {section!r} is not a guest this destination "
                     f"runs (known: {', '.join(GUEST_SECTIONS)})")
