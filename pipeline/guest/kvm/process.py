"""The KVM guest as a stage-harness process, speaking the synthetic guest's pipe protocol.

``kvm_guest_main(config, link)`` (run it with ``stages.harness.StageProcess``) owns the VMM.
Config keys: ``region`` (RamRegion name), ``dirtylog`` (DirtyLog name or None), ``tracking``
(``"kvm"``, the default: KVM's dirty log handed to the shared dirty log; ``"uffd"``: KVM
logging off, this process's mapping armed with userfaultfd WP and harvested by the scanner
through ``/proc/<pid>/pagemap``; ``"none"``), ``device_state`` (bytes: a destination restores
it instead of booting), ``start`` (run at once; default: a booted guest runs, a restored one
waits for ``resume``), ``n_pages``, ``stride``, ``delay`` (the program's knobs, source only),
``dirty_rate`` (bytes/s the guest should write, held by ``RateController``; 0 = idle;
absent = leave ``delay`` alone).

Messages, as the synthetic guest's: ready(pid, tracking, blocks, progress) with ``blocks`` the
(address, length) of each RAM block in *this* process (what a uffd harvester needs) and
``progress`` checked at the vCPU's position only (the full check reads every data page, and in
a fresh process each first read is a page fault: tens of ms per 256 MiB here, all of it
downtime on a destination, whose RAM was verified against the source's checked one);
``pause`` -> ("paused", info, t) where info holds ``device_state`` (bytes) and the invariant's
progress, checked at the pause; ``resume`` -> ("resumed", t); ``state`` -> ("state", info)
(``passes``, ``running``, ``pages_written``: exact and invariant-checked when paused, an
estimate while running); ``delay`` -> ("delay", n); ``stop`` -> ("stopped", info). A broken
invariant or a failed vCPU ends the process with exit code 2 and one error line (the harness's
contract).

KVM's dirty log reaches the scanner on the scanner's request, with no bit lost: the shared
dirty log's service thread (``DirtyLog.start_service(collect=...)``) answers each fetch by
taking KVM's bits first (GET + CLEAR_DIRTY_LOG) and ORing them into the bitmap that this very
fetch hands out. A write KVM logs after that is in KVM's log for the next fetch. No timer.

The dirty rate. The guest program has no clock: its only rate knob is the delay loop it runs
after each page write (``KvmGuest.set_delay``, loop iterations, a word of the control page in
guest RAM: the VMM's write, which KVM does not log, so ``set_delay`` marks that page for the
next fetch).
``RateController`` turns a rate in pages per second into that knob with a multiplicative
feedback loop run by the VMM a few times a second: it reads how far the guest got
(``pages_written_now``, from guest memory, with the vCPU running) and scales the delay by
measured / wanted rate, at most 2x either way per step. It starts from about 0.5 ns per loop
iteration (what a CPL3 ``dec/jnz`` costs natively) and settles within a few steps; a
write-protect fault per first write per round (KVM or uffd tracking) is absorbed.

``pages_written_now`` reads the control page's pass counter P, then bisects the data pages for
the first one that carries less than P: the guest writes pages in order, so the pages read
[P]*k + [P-1]*(n-k). It takes O(log n) reads and never stops the vCPU; a pass that ends while
it reads makes it low by at most one pass, which is good enough for a rate.
"""

from __future__ import annotations

import os
import time

from pipeline.guest.kvm import program
from pipeline.guest.kvm.guest import KvmGuest
from shm.memory import PAGE_SIZE

TICK = 0.1                 # seconds between looks at the pipe when no rate is held
STEP = 0.1                 # seconds between controller adjustments
START_NS_PER_LOOP = 0.5    # first guess of one delay-loop iteration (measured 0.4-0.5)
MAX_DELAY = 1 << 40        # loop iterations: minutes per page, i.e. idle
MIN_DELAY = 16             # multiplicative steps need a non-zero start
MAX_CORRECTION = 16        # the delay stays within this factor of the first guess


def pages_written_now(mem: program.GuestMemory, layout: program.Layout) -> int:
    """Page writes since boot of a guest that may be running (an estimate, never ahead)."""
    passes = int(mem.u64s(program.CTRL_GPA, 1)[0])
    if passes == 0:
        return 0
    gpas = layout.page_gpas()
    lo, hi = 0, layout.n_pages          # first page carrying less than ``passes`` in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if int(mem.u64s(int(gpas[mid]), 1)[0]) >= passes:
            lo = mid + 1
        else:
            hi = mid
    return (passes - 1) * layout.n_pages + lo


class RateController:
    """Holds a running guest near ``pages_per_s`` (0 = idle, None = as fast as it can)."""

    def __init__(self, guest, pages_per_s: float | None) -> None:
        self.guest = guest        # a KvmGuest: its set_delay also marks the control page dirty
        self.mem = guest.mem
        self.layout = program.read_layout(self.mem)
        self.target = pages_per_s
        self.max_delay = MAX_DELAY
        if pages_per_s is None:
            self.delay = 0
        elif pages_per_s <= 0:
            self.delay = MAX_DELAY
        else:
            self.delay = int(min(MAX_DELAY, max(MIN_DELAY,
                                                1e9 / pages_per_s / START_NS_PER_LOOP)))
            # The guest reads the delay once per page: never let it sleep in one loop for
            # much longer than the first guess, or a correction would wait for that loop.
            self.max_delay = self.delay * MAX_CORRECTION
        guest.set_delay(self.delay)
        self._mark: tuple[float, int] | None = None

    @property
    def active(self) -> bool:
        """Whether ``step`` has anything to do (a finite, non-zero rate)."""
        return self.target is not None and self.target > 0

    def restart(self, now: float | None = None) -> None:
        """The guest (re)starts running now: measure from here (time paused does not count)."""
        now = time.monotonic() if now is None else now
        self._mark = (now, pages_written_now(self.mem, self.layout))

    def pause(self) -> None:
        self._mark = None

    def step(self, now: float | None = None) -> float | None:
        """Adjust the delay if a STEP has passed since the last adjustment; the rate measured
        (pages/s) when it adjusted, else None."""
        if not self.active or self._mark is None:
            return None
        now = time.monotonic() if now is None else now
        t0, w0 = self._mark
        if now - t0 < STEP:
            return None
        w = pages_written_now(self.mem, self.layout)
        rate = (w - w0) / (now - t0)
        factor = min(2.0, max(0.5, rate / self.target)) if rate > 0 else 0.5
        self.delay = int(min(self.max_delay, max(MIN_DELAY, self.delay * factor)))
        self.guest.set_delay(self.delay)
        self._mark = (now, w)
        return rate


def _progress(guest: KvmGuest, full: bool = True) -> dict:
    p = guest.check(full=full)
    return {"passes": p.passes, "page": p.page, "pages_written": p.pages_written}


def kvm_guest_main(config: dict, link) -> int:
    from shm.dirtylog import DirtyLog
    from shm.region import RamRegion
    from shm.uffd import arm

    tracking = config.get("tracking") or "kvm"
    if tracking not in ("kvm", "uffd", "none"):
        raise ValueError(f"tracking {tracking!r}: use kvm, uffd or none")
    with RamRegion.attach(config["region"]) as region:
        blocks = region.blocks
        if config.get("device_state"):
            guest = KvmGuest.incoming(blocks, config["device_state"],
                                      log_dirty=tracking == "kvm")
            running = bool(config.get("start", False))  # a destination waits for "resume"
        else:
            guest = KvmGuest.boot(blocks, n_pages=config.get("n_pages"),
                                  stride=int(config.get("stride", 1)),
                                  delay=int(config.get("delay", 0)),
                                  log_dirty=tracking == "kvm")
            running = bool(config.get("start", True))
        with guest:
            log = wp = None
            try:
                rate = None
                if config.get("dirty_rate") is not None:
                    rate = RateController(guest, float(config["dirty_rate"]) / PAGE_SIZE)
                if tracking == "uffd":
                    first, last = blocks[0], blocks[-1]
                    wp = arm(first.address, last.address + last.length - first.address)
                if config.get("dirtylog") and tracking == "kvm":
                    log = DirtyLog.attach(config["dirtylog"], region)
                    guest.fetch_dirty()  # boot writes are part of the first full round
                    log.start_service(collect=guest.fetch_dirty)
                link.ready(pid=os.getpid(), tracking=tracking,
                           blocks=[(b.address, b.length) for b in blocks],
                           progress=_progress(guest, full=False))
                if running:
                    guest.start()
                    if rate is not None:
                        rate.restart()
                return _serve(guest, log, link, rate)
            finally:
                if log is not None:
                    log.close()  # stops the service thread before the VM goes away
                if wp is not None:
                    wp.close()


def _state(guest: KvmGuest, rate: RateController | None) -> dict:
    if not guest.running:
        return {"running": False, **_progress(guest), "device_state": guest.device_state()}
    layout = rate.layout if rate is not None else program.read_layout(guest.mem)
    return {"running": True, "passes": guest.passes(),
            "pages_written": pages_written_now(guest.mem, layout)}


class DutyCycle:
    """Auto-converge's throttle of the vCPU, as QEMU's cpu_throttle: in each cycle the vCPU
    runs ``SLICE`` seconds, then sleeps ``SLICE * pct / (100 - pct)`` (0 %: runs on)."""

    SLICE = 0.01

    def __init__(self) -> None:
        self.percentage = 0
        self.asleep = False            # paused by the throttle (not by the migration)
        self.switch_at = 0.0

    def set(self, percentage: int, now: float) -> None:
        self.percentage = percentage
        self.switch_at = now

    def timeout(self, now: float, tick: float) -> float:
        return min(tick, max(0.0, self.switch_at - now)) if self.percentage else tick

    def step(self, guest, rate, now: float) -> None:
        """Sleep or wake the running vCPU when its time comes (a guest the migration
        paused is left alone)."""
        if self.asleep and (not self.percentage or now >= self.switch_at):
            guest.start()
            self.asleep = False
            if rate is not None:
                rate.restart(now)
            self.switch_at = now + self.SLICE
        elif self.percentage and not self.asleep and guest.running and now >= self.switch_at:
            guest.pause()
            self.asleep = True
            if rate is not None:      # the rate is the guest's pace while it runs
                rate.pause()
            self.switch_at = now + self.SLICE * self.percentage / (100 - self.percentage)


def _serve(guest: KvmGuest, log, link, rate: RateController | None) -> int:
    tick = STEP / 2 if rate is not None and rate.active else TICK
    duty = DutyCycle()
    while True:
        if link.poll(duty.timeout(time.monotonic(), tick)):
            msg = link.recv()
            op = msg[0]
            if op in ("pause", "stop") and duty.asleep:
                duty.asleep = False           # the migration's pause now: stays paused
            elif op == "pause":
                guest.pause()
            if op == "pause":
                if rate is not None:
                    rate.pause()
                link.send("paused", {"device_state": guest.device_state(), **_progress(guest)},
                          time.monotonic())
            elif op == "resume":
                guest.start()
                if rate is not None:
                    rate.restart()
                link.send("resumed", time.monotonic())
            elif op == "state":
                link.send("state", _state(guest, rate))
            elif op == "delay":  # the raw knob: ("delay", loops per page)
                guest.set_delay(int(msg[1]))
                rate = None
                link.send("delay", int(msg[1]))
            elif op == "throttle":   # auto-converge: ("throttle", percentage)
                duty.set(int(msg[1]), time.monotonic())
                if not duty.percentage:
                    duty.step(guest, rate, time.monotonic())
                link.send("throttle", duty.percentage)
            elif op == "stop":
                if guest.running:
                    guest.pause()
                link.send("stopped", _progress(guest))
                return 0
            continue
        if guest.vcpu.error:
            raise guest.vcpu.error
        if log is not None and log.service_error is not None:
            raise log.service_error
        duty.step(guest, rate, time.monotonic())
        if rate is not None and guest.running:
            rate.step()
