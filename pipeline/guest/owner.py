"""The owner side of a guest that runs in its own process over a shared RAM region.

``GuestProcess`` is what the coordinator, the source pipeline and ``run_local`` drive, whatever
the guest: it creates the RAM region (``pc.ram`` plus a small ``vga.vram``, as a real VM has) and,
when the guest keeps one, the shared dirty log, runs the guest as a stage process
(``stages.harness``), and speaks the guest pipe protocol to it: ``pause`` / ``resume`` /
``state`` / ``stop``. It owns both segments: closing stops the process and unlinks them
(idempotent), and so does a ``start`` that fails. Subclasses say what a pause and a query return.
"""

from __future__ import annotations

from shm.errors import GuestError, StageFailed


class GuestProcess:
    """A guest process over a RAM region this object owns; use ``start()``, then ``close()``."""

    SECOND_BLOCK = ("vga.vram", 256 * 1024)
    kind = "guest"              # the summary's name for it
    device_section = ""         # the idstr of its device-state section in the stream
    STOP_TIMEOUT = 2.0          # seconds a guest may take to answer ``stop``
    tracking = "soft"           # how its dirty pages are found: soft, uffd or kvm

    def __init__(self, ram: int, *, run_id: str, target: str, config: dict, dirty_log: bool,
                 chunk_size: int = 1 << 20, blocks: list[tuple[str, int]] | None = None,
                 region_kind: str = "ram") -> None:
        from shm.dirtylog import DirtyLog
        from shm.region import RamBlockSpec, RamRegion
        from stages.harness import StageProcess

        specs = blocks or [("pc.ram", ram), self.SECOND_BLOCK]
        self.region = RamRegion.create(run_id, [RamBlockSpec(n, s) for n, s in specs],
                                       chunk_size, kind=region_kind)
        self.log = None
        self.process = None
        self.paused_at = 0.0
        self._closed = False
        try:
            if dirty_log:
                self.log = DirtyLog.create(run_id, self.region, kind=region_kind + "dirty")
            self.process = StageProcess("guest", target, {
                "region": self.region.name, "dirtylog": self.log.name if self.log else None,
                **config})
        except BaseException:
            self.close()
            raise

    def start(self, timeout: float = 60.0):
        """Start the guest process; on failure nothing of the guest is left (close, then raise)."""
        try:
            self.process.start()
            self.process.wait_ready(timeout)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def dirty_source(self) -> dict:
        """Where the scanner finds this guest's dirty pages (plain config; after ``start``)."""
        if self.tracking == "uffd":   # the guest's ready message says where its RAM is mapped
            info = self.process.info
            return {"kind": "pagemap", "pid": info["pid"], "blocks": info["blocks"]}
        return {"kind": "log", "name": self.log.name}

    def request(self, op: str, timeout: float) -> tuple:
        """Send ``op`` to the guest and return its answer (a tuple whose first item names it)."""
        self.process.send(op)
        return self.process.recv(timeout, what=op)

    def throttle(self, percentage: int, timeout: float = 10.0) -> None:
        """Auto-converge: let the guest run ``100 - percentage`` % as fast (0: unthrottled)."""
        self.process.send("throttle", int(percentage))
        self.process.recv(timeout, what="throttle")

    def resume(self, timeout: float = 10.0) -> float:
        """Let the guest run again; the guest's clock when it did."""
        return self.request("resume", timeout)[1]

    def check(self) -> None:
        """GuestError if the guest process is gone."""
        try:
            self.process.check()
        except StageFailed as exc:
            raise GuestError(f"the {self.kind} guest died: {exc}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process is not None:
            if self.process.pid is not None and self.process.alive:
                try:
                    self.request("stop", self.STOP_TIMEOUT)
                except Exception:  # noqa: BLE001 - killed below if it did not stop
                    pass
            self.process.stop(2.0)
            self.process.close()
        if self.log is not None:
            self.log.close()
            self.log.unlink()
        self.region.close()
        self.region.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
