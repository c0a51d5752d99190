"""The KVM guest as a stage-harness process, speaking the synthetic guest's pipe protocol.

``kvm_guest_main(config, link)`` (run it with ``stages.harness.StageProcess``) owns the VMM.
Config keys: ``region`` (RamRegion name), ``dirtylog`` (DirtyLog name or None), ``tracking``
(``"kvm"``, the default: KVM's dirty log copied into the shared dirty log; or ``"uffd"``: KVM
logging off, this process's mapping armed with userfaultfd WP and harvested by the scanner
through ``/proc/<pid>/pagemap``), ``device_state`` (bytes: a destination restores it instead of
booting), ``n_pages``, ``stride``, ``delay`` (the program's knobs, source only),
``pull_interval`` (seconds between KVM dirty-log pulls, default 5 ms).

Messages, as the synthetic guest's: ready(pid, tracking, blocks, progress) with ``blocks`` the
(address, length) of each RAM block in *this* process (what a uffd harvester needs);
``pause`` -> ("paused", info, t) where info holds ``device_state`` (bytes) and the invariant's
progress, checked at the pause; ``resume`` -> ("resumed", t); ``state`` -> ("state", info);
``stop`` -> ("stopped", info). A broken invariant or a failed vCPU ends the process with exit
code 2 and one error line (the harness's contract).

No bit is lost on the way to the shared log: each pull marks what KVM reported, and ``pause``
pulls once more after the vCPU stopped and before answering, so the round after a pause sees
every write. (A pull on the scanner's request, instead of on a timer, needs a request hook in
shm.dirtylog; the timer keeps the log at most ``pull_interval`` behind.)
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline.guest.kvm.guest import KvmGuest

PULL_INTERVAL = 0.005


def _progress(guest: KvmGuest) -> dict:
    p = guest.check()
    return {"passes": p.passes, "page": p.page, "pages_written": p.pages_written}


def _pull(guest: KvmGuest, log) -> int:
    """Copy KVM's dirty bits into the shared dirty log; returns pages marked."""
    marked = 0
    for b, bitmap in enumerate(guest.fetch_dirty()):
        if bitmap.any():
            pages = np.flatnonzero(np.unpackbits(bitmap, bitorder="little")
                                   [:guest.blocks[b].nb_pages])
            log.mark(b, pages)
            marked += len(pages)
    return marked


def kvm_guest_main(config: dict, link) -> int:
    from shm.dirtylog import DirtyLog
    from shm.region import RamRegion
    from shm.uffd import arm

    tracking = config.get("tracking", "kvm")
    if tracking not in ("kvm", "uffd"):
        raise ValueError(f"tracking {tracking!r}: use kvm or uffd")
    interval = float(config.get("pull_interval", PULL_INTERVAL))
    with RamRegion.attach(config["region"]) as region:
        log = DirtyLog.attach(config["dirtylog"], region) \
            if config.get("dirtylog") and tracking == "kvm" else None
        wp = None
        blocks = region.blocks
        try:
            if config.get("device_state"):
                guest = KvmGuest.incoming(blocks, config["device_state"],
                                          log_dirty=tracking == "kvm")
                running = False  # a destination waits for "resume"
            else:
                guest = KvmGuest.boot(blocks, n_pages=config.get("n_pages"),
                                      stride=int(config.get("stride", 1)),
                                      delay=int(config.get("delay", 0)),
                                      log_dirty=tracking == "kvm")
                running = True
            with guest:
                if tracking == "uffd":
                    first, last = blocks[0], blocks[-1]
                    wp = arm(first.address, last.address + last.length - first.address)
                if log is not None:
                    guest.fetch_dirty()  # boot writes are part of the first full round
                link.ready(pid=os.getpid(), tracking=tracking,
                           blocks=[(b.address, b.length) for b in blocks],
                           progress=_progress(guest))
                if running:
                    guest.start()
                return _serve(guest, log, link, interval)
        finally:
            if wp is not None:
                wp.close()
            if log is not None:
                log.close()


def _serve(guest: KvmGuest, log, link, interval: float) -> int:
    while True:
        if link.poll(interval if log is not None else 0.1):
            msg = link.recv()
            op = msg[0]
            if op == "pause":
                guest.pause()
                if log is not None:
                    _pull(guest, log)
                    log.service()
                link.send("paused", {"device_state": guest.device_state(), **_progress(guest)},
                          time.monotonic())
            elif op == "resume":
                guest.start()
                link.send("resumed", time.monotonic())
            elif op == "state":
                info = {"passes": guest.passes(), "running": guest.running}
                if not guest.running:
                    info.update(_progress(guest), device_state=guest.device_state())
                link.send("state", info)
            elif op == "delay":  # the dirty-rate knob: ("delay", loops per page)
                guest.set_delay(int(msg[1]))
                link.send("delay", int(msg[1]))
            elif op == "stop":
                guest.pause()
                link.send("stopped", _progress(guest))
                return 0
            continue
        if guest.vcpu.error:
            raise guest.vcpu.error
        if log is not None:
            _pull(guest, log)
            log.service()
