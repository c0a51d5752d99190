"""The QMP monitor's socket side: one thread, one selector, any number of clients.

``MonitorServer`` listens on ``unix:PATH`` or ``tcp:HOST:PORT`` (QEMU's ``-qmp`` forms; options
after a comma, ``server=on,wait=off``, are accepted and ignored: the monitor never waits for a
client). Its ``serve()`` blocks in ``select`` on the listener, the clients and a wake-up pipe,
never polling: other threads (a migration's worker) hand work to it with ``call_soon``, which
writes one byte to the pipe; the work then runs on the monitor's thread, so the machine's state
is only ever touched there. ``tick``, while set, is called every ``TICK`` seconds (the
terminal's progress line during a migration). Events go to every client that has
negotiated. ``stop()`` (from ``quit`` or a signal) ends ``serve`` once what was queued for
the clients is written. A unix socket path is unlinked before binding, as QEMU does, and
again on ``close``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import socket
import time
from collections.abc import Callable

from pipeline import __version__
from pipeline.qmp.protocol import QmpConnection, QmpError, Request

FLUSH_DEADLINE = 5.0        # seconds ``serve`` keeps writing to slow clients after ``stop``
TICK = 0.2                  # seconds between two ``tick`` calls (a terminal's progress line)


def parse_monitor_address(spec: str) -> tuple[int, object]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` -> (family, address); ValueError says the forms."""
    text = spec.split(",", 1)[0]
    kind, sep, rest = text.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp" and sep:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and int(port) < 65536:
            return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    raise ValueError(f"--qmp {spec}: use unix:PATH or tcp:HOST:PORT")


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = QmpConnection(f"rdma-pipeline {__version__}")
        self.out = bytearray()


class MonitorServer:
    """Serve QMP for ``dispatch(request) -> value`` (which raises ``QmpError``)."""

    def __init__(self, spec: str, dispatch: Callable[[Request], object]) -> None:
        self.dispatch = dispatch
        family, address = parse_monitor_address(spec)
        self.family = family
        self.path = address if family == socket.AF_UNIX else None
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, _Client] = {}
        self._calls: collections.deque = collections.deque()   # append/popleft: atomic
        self.tick: Callable[[], None] | None = None   # called every TICK s while set
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            if self.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            else:
                self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(address)
            self.listener.listen(8)
        except OSError as exc:
            self.close()
            raise ValueError(f"--qmp {spec}: cannot listen: {exc.strerror or exc}") from None
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    @property
    def address(self) -> str:
        """Where it listens, as a ``--qmp`` value (the port the kernel chose for ``:0``)."""
        if self.path:
            return f"unix:{self.path}"
        host, port = self.listener.getsockname()[:2]
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"

    # -- from any thread ------------------------------------------------------------------
    def call_soon(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the monitor's thread (safe from a signal handler too: no
        lock is taken)."""
        self._calls.append((fn, args))
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    # -- on the monitor's thread ----------------------------------------------------------
    def broadcast(self, name: str, data: dict | None = None) -> None:
        """Send an event to every negotiated client, stamped now."""
        now = time.time()
        for client in list(self.clients.values()):
            if client.conn.negotiated:
                self._send(client, client.conn.event(name, data, now))

    def stop(self) -> None:
        self._stopping = True

    def serve(self) -> None:
        """Answer clients until ``stop()``; then flush (bounded) and return."""
        deadline = None
        while True:
            if self._stopping:
                if deadline is None:
                    deadline = time.monotonic() + FLUSH_DEADLINE
                if not any(c.out for c in self.clients.values()) \
                        or time.monotonic() >= deadline:
                    return
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.tick is not None:
                timeout = TICK if timeout is None else min(timeout, TICK)
                self.tick()
            for key, mask in self.sel.select(timeout):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    self._run_calls()
                else:
                    client = key.data
                    if mask & selectors.EVENT_WRITE:
                        self._flush(client)
                    if mask & selectors.EVENT_READ and client.sock.fileno() in self.clients:
                        self._read(client)

    def _run_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while self._calls:
            fn, args = self._calls.popleft()
            fn(*args)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        client = _Client(sock)
        self.clients[sock.fileno()] = client
        self.sel.register(sock, selectors.EVENT_READ, client)
        self._send(client, client.conn.greeting())

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.conn.receive_data(data)
        while client.sock.fileno() in self.clients:
            req = client.conn.next_request()
            if req is None:
                return
            if isinstance(req, QmpError):
                self._send(client, client.conn.error(req))
                continue
            try:
                if req.execute == "qmp_capabilities":
                    value = {}
                else:
                    value = self.dispatch(req)
            except QmpError as exc:
                exc.id = req.id if req.has_id else None
                self._send(client, client.conn.error(exc))
            else:
                self._send(client, client.conn.reply(value, req))

    def _send(self, client: _Client, data: bytes) -> None:
        client.out += data
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            n = client.sock.send(client.out)
            del client.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        self.sel.modify(client.sock, events, client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self.clients.pop(fd, None) is not None:
            self.sel.unregister(client.sock)
        client.out.clear()
        client.sock.close()

    def close(self) -> None:
        """Close every client and the listener; idempotent."""
        for client in list(self.clients.values()):
            self._drop(client)
        if self.listener.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.listener)
            self.listener.close()
            if self.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        if self._wake_r >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self._wake_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        self.sel.close()

    def __enter__(self) -> MonitorServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
