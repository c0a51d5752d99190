"""A real QEMU (``qemu-system-x86_64 -M none``) for the interoperability tests, driven over QMP
with QEMU's own client library (``qemu.qmp``).

``QemuVm`` starts QEMU with its QMP monitor connecting to a socket the test listens on (no
waiting for a socket file to appear), turns the ``events`` migration capability on, and waits
for the MIGRATION event that ends a migration, so no test polls. ``-incoming defer`` lets a
destination get its capabilities before ``migrate-incoming``. Closing quits QEMU and reaps it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

import pytest

QEMU = shutil.which("qemu-system-x86_64")
requires_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install brings Debian's "
                         "qemu-system-x86)")
ENDED = ("completed", "failed", "cancelled")


class QemuVm:
    """``qemu-system-x86_64 -M MACHINE -m RAM``; ``pattern``: a file loaded at guest address
    ``at``; ``incoming``: start with ``-incoming defer`` (then call ``incoming(uri)``);
    ``paused``: -S, no vCPU runs (a ``pc``'s firmware would write its RAM)."""

    def __init__(self, tmp_path, ram: int, *, pattern: str | None = None, at: int = 0,
                 incoming: bool = False, name: str = "qemu", machine: str = "none",
                 paused: bool = False) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.log_path = os.path.join(tmp_path, f"{name}.log")
        sock = os.path.join(tmp_path, f"{name}.qmp")
        self.qmp = QEMUMonitorProtocol(sock, server=True)
        cmd = [QEMU, "-M", machine, "-m", f"{ram >> 20}M", "-nodefaults", "-display", "none",
               "-qmp", f"unix:{sock}"]
        if pattern:
            cmd += ["-device", f"loader,file={pattern},addr={at:#x},force-raw=on"]
        if paused:
            cmd.append("-S")
        if incoming:
            cmd += ["-incoming", "defer"]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        try:
            self.qmp.accept(timeout=30.0)
            self.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": "events", "state": True}])
        except BaseException:
            self.close()
            raise

    def cmd(self, name: str, **args):
        return self.qmp.cmd(name, **args)

    def set_capability(self, name: str, state: bool) -> None:
        self.cmd("migrate-set-capabilities", capabilities=[{"capability": name, "state": state}])

    def incoming(self, uri: str) -> None:
        self.cmd("migrate-incoming", uri=uri)

    def migrate(self, uri: str) -> None:
        self.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        self.cmd("migrate", uri=uri)

    def wait_migration(self, timeout: float = 60.0) -> str:
        """The status that ended the migration (a MIGRATION event; the status if it ended
        before we listened)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.cmd("query-migrate").get("status")
            if status in ENDED:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"QEMU migration still {status} after {timeout:g} s")
            try:
                event = self.qmp.pull_event(wait=left)   # blocks until QEMU says something
            except TimeoutError:
                continue
            if event and event.get("event") == "MIGRATION" \
                    and event["data"]["status"] in ENDED:
                return event["data"]["status"]

    def pmemsave(self, path: str, size: int, at: int = 0) -> bytes:
        self.cmd("pmemsave", val=at, size=size, filename=path)
        with open(path, "rb") as f:
            return f.read()

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def exit_code(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.cmd("quit")
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self.qmp.close()
        self._log.close()

    def __enter__(self) -> QemuVm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
