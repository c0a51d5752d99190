"""Monitor processes for the QMP tests: ours (``rdma-pipeline vm`` / ``incoming --qmp``) and
QEMU 7.2's (``-M none``), each handed over as a connected socket.

Ours says on stderr where its monitor listens once it does (the tests read that line: no
polling). QEMU is started as the monitor's *client* (``-qmp tcp:HOST:PORT`` without
``server=on``) of a socket the test listens on, so the test accepts its connection instead of
retrying a connect while QEMU starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile

QEMU = shutil.which("qemu-system-x86_64")
START_TIMEOUT = 60.0


class Monitored:
    """A process with a QMP monitor; ``sock()`` connects to it (once for QEMU)."""

    def __init__(self, argv: list[str], *, qemu: bool = False) -> None:
        self.qemu = qemu
        self.dir = tempfile.mkdtemp(prefix="qmp")
        self.listener = None
        if qemu:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.listener.settimeout(START_TIMEOUT)
            port = self.listener.getsockname()[1]
            argv = [QEMU, "-M", "none", "-m", "64M", "-nodefaults", "-display", "none",
                    "-qmp", f"tcp:127.0.0.1:{port}", *argv]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
            self.address = None
        else:
            self.path = os.path.join(self.dir, "m.sock")
            argv = [sys.executable, "-m", "pipeline", *argv, "--qmp", f"unix:{self.path}"]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
            line = self.proc.stderr.readline()
            if "QMP monitor on" not in line:
                self.close()
                raise AssertionError(f"no monitor: {line}{self.proc.stderr.read()}")
            self.address = self.path

    def stderr_line(self) -> str:
        return self.proc.stderr.readline()

    def sock(self) -> socket.socket:
        if self.qemu:
            conn, _ = self.listener.accept()
            return conn
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.path)
        return s

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.listener is not None:
            self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Monitored:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(mon: Monitored, name: str):
    from qemu.qmp import QMPClient

    c = QMPClient(name)
    await c.connect(mon.sock())
    return c


async def next_event(c, name: str, timeout: float = 120.0, status: str | None = None) -> dict:
    """The next event called ``name`` (and with that MIGRATION status), skipping others."""
    async def find():
        while True:
            ev = await c.events.get()
            if ev["event"] == name and (status is None or ev["data"]["status"] == status):
                return ev
    return await asyncio.wait_for(find(), timeout)


async def events_until(c, statuses=("completed", "failed", "cancelled"),
                       timeout: float = 120.0) -> list[dict]:
    """Every event up to a MIGRATION with a final status."""
    seen = []

    async def collect():
        while True:
            ev = await c.events.get()
            seen.append(ev)
            if ev["event"] == "MIGRATION" and ev["data"]["status"] in statuses:
                return seen
    return await asyncio.wait_for(collect(), timeout)


async def quit_monitor(c) -> None:
    from qemu.qmp import ExecuteError

    with contextlib.suppress(ExecuteError, EOFError, ConnectionError):
        await c.execute("quit")
    with contextlib.suppress(EOFError, ConnectionError):
        await c.disconnect()      # QEMU may have closed the socket first
