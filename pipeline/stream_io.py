"""Byte transports for a migration stream with pages inline: ``tcp:`` and ``file:``.

Source side (``StreamSink``): ``open()``, ``write(buffers)`` (bytes, memoryviews or numpy
arrays, written in order), ``finish()`` (``tcp:``: wait for the destination's return-path SHUT,
which says it verified the RAM and resumed the guest; ``file:``: fsync and rename the
finished file into place) and an idempotent ``close()``.
Destination side (``StreamSource``): ``open(on_listening)``, ``readinto(view)`` (0 at the end),
``done(ok)`` (``tcp:``: send SHUT) and ``close()``.

Nothing blocks for more than ``SLICE`` seconds without calling ``check()``, so a cancel, a dead
guest or a dead stage interrupts any wait; a peer that stops moving bytes for ``stall``
seconds is a ``TransportError``. A file is written under a temporary name and renamed only once
complete, so ``file:PATH`` never names half a snapshot.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time

import numpy as np

from pipeline.protocol.return_path import (
    COMMIT_TOKEN,
    SHUT_FAILED,
    SHUT_OK,
    ReturnPathReader,
    RpMessageType,
    error_text,
    shut,
)
from shm.errors import MigrationError, RemoteProtocolError, TransportError
from stages.verbs.soft.link import tune  # no Nagle; a dead peer noticed within 10 s

SLICE = 0.1
STALL = 30.0
# A QEMU destination that refuses a stream (another machine type, a RAM size or block it does
# not have) says why on its own stderr and closes the connection, without a return-path word.
REFUSED = " without a reason (a QEMU destination refuses a stream so: its log says why)"


def _bytes_view(buf) -> memoryview:
    if isinstance(buf, np.ndarray):
        return memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    return memoryview(buf).cast("B")


def _broken(exc: OSError, what: str) -> TransportError:
    return TransportError(f"{what}: {exc.strerror or exc}", errno=exc.errno)


class SocketSink:
    """The source's end of a ``tcp:`` migration: the stream out, the return path in."""

    def __init__(self, uri, check=lambda: None, *, stall: float = STALL,
                 connect_timeout: float = 10.0) -> None:
        self.uri = uri
        self.check = check
        self.stall = stall
        self.connect_timeout = connect_timeout
        self.sock: socket.socket | None = None
        self.rp = ReturnPathReader()
        self.bytes_written = 0
        self.confirmed = False
        self.reason = ""

    def open(self) -> None:
        try:
            infos = socket.getaddrinfo(self.uri.host, self.uri.port, self.uri.family,
                                       socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise TransportError(f"cannot resolve {self.uri.host}: {exc.strerror}") from None
        last: OSError | None = None
        for family, kind, proto, _name, addr in infos:     # every address in turn, as QEMU
            s = socket.socket(family, kind, proto)
            s.settimeout(self.connect_timeout)
            try:
                s.connect(addr)
            except OSError as exc:
                s.close()
                last = exc
                continue
            self.sock = s
            break
        if self.sock is None:
            raise TransportError(f"cannot connect to {self.uri}: "
                                 f"{getattr(last, 'strerror', None) or last}",
                                 hint="start `rdma-pipeline incoming` there first")
        tune(self.sock)
        self.sock.settimeout(SLICE)

    def write(self, buffers) -> int:
        """Send every buffer whole, in order; returns the bytes sent."""
        total = 0
        for buf in buffers:
            view = _bytes_view(buf)
            off, n = 0, len(view)
            last_progress = time.monotonic()
            while off < n:
                try:
                    sent = self.sock.send(view[off:])
                except TimeoutError:
                    self._poll_return_path()
                    self.check()
                    if time.monotonic() - last_progress > self.stall:
                        raise TransportError(f"the destination took no data for {self.stall:g} "
                                             "s: it stopped reading") from None
                    continue
                except OSError as exc:
                    self._poll_return_path()
                    raise _broken(exc, "the connection to the destination broke") from None
                off += sent
                last_progress = time.monotonic()
            total += n
        self.bytes_written += total
        self._poll_return_path()
        return total

    def _poll_return_path(self) -> None:
        """A destination that failed says so (SHUT with an error) before it closes; one that
        closed its end without a word is gone too (its receive side may still take bytes
        until the window fills, so a send alone would only notice after the stall time)."""
        while select.select([self.sock], [], [], 0)[0]:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return                  # the next send reports the broken connection
            if not data:
                if not self.confirmed:
                    raise TransportError("the destination closed the connection" + REFUSED)
                return
            self.rp.feed(data)
            self._take_messages()

    def _take_messages(self) -> None:
        while (msg := self.rp.next_message()) is not None:
            if msg.type == RpMessageType.X_ERROR:
                self.reason = msg.data.decode(errors="replace")
            elif msg.type == RpMessageType.SHUT:
                status = msg.shut_status
                if status != SHUT_OK:
                    raise MigrationError(
                        "the destination failed the migration: "
                        + (self.reason or f"return-path SHUT with error {status}"))
                self.confirmed = True

    def finish(self, timeout: float = 60.0) -> None:
        """Wait for SHUT(0): the destination verified the RAM and resumed the guest."""
        deadline = time.monotonic() + timeout
        while not self.confirmed:
            self.check()
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TransportError(f"the destination did not confirm within {timeout:g} s"
                                         ) from None
                continue
            except OSError as exc:
                raise _broken(exc, "the connection to the destination broke") from None
            if not data:
                raise TransportError("the destination closed the connection before it "
                                     "confirmed the migration" + REFUSED)
            self.rp.feed(data)
            self._take_messages()

    def commit(self, timeout: float = 5.0) -> None:
        """After SHUT(0): tell our destination it may run the guest."""
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(COMMIT_TOKEN)
        except OSError as exc:
            raise _broken(exc, "the commit did not reach the destination") from None

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


class FileSink:
    """The source's end of a ``file:`` migration: a file written whole, then renamed."""

    def __init__(self, path: str, check=lambda: None) -> None:
        self.path = os.path.abspath(path)
        self.tmp = f"{self.path}.{os.getpid()}.part"
        self.check = check
        self.f = None
        self.bytes_written = 0
        self.finished = False

    def open(self) -> None:
        if os.path.isdir(self.path):
            raise MigrationError(f"file:{self.path} is a directory", hint="give a file name")
        try:
            self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise _broken(exc, f"cannot create {self.tmp}") from None

    def write(self, buffers) -> int:
        total = 0
        try:
            for buf in buffers:
                total += self.f.write(_bytes_view(buf))
        except OSError as exc:
            raise _broken(exc, f"writing {self.tmp} failed") from None
        self.bytes_written += total
        return total

    def finish(self, timeout: float = 0.0) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise _broken(exc, f"finishing {self.path} failed") from None
        self.finished = True

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if not self.finished:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


class SocketSource:
    """The destination's end of a ``tcp:`` migration: listen, accept one source, read."""

    def __init__(self, uri, check=lambda: None, *, accept_timeout: float = 60.0,
                 stall: float = STALL) -> None:
        self.uri = uri
        self.check = check
        self.accept_timeout = accept_timeout
        self.stall = stall
        self.listener: socket.socket | None = None
        self.sock: socket.socket | None = None

    def open(self, on_listening=lambda port: None) -> None:
        family = socket.AF_INET6 if ":" in self.uri.host else socket.AF_INET
        host = self.uri.host.partition("%")[0] if family == socket.AF_INET6 else self.uri.host
        try:
            self.listener = socket.create_server((host, self.uri.port), family=family)
        except OSError as exc:
            raise _broken(exc, f"cannot listen on {self.uri}") from None
        self.listener.settimeout(SLICE)
        on_listening(self.listener.getsockname()[1])
        deadline = time.monotonic() + self.accept_timeout
        while self.sock is None:
            self.check()
            try:
                self.sock, _ = self.listener.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TransportError(f"no source connected within {self.accept_timeout:g} s"
                                         ) from None
        tune(self.sock)
        self.sock.settimeout(SLICE)
        self.listener.close()
        self.listener = None

    def readinto(self, view: memoryview) -> int:
        last = time.monotonic()
        while True:
            try:
                return self.sock.recv_into(view)
            except TimeoutError:
                self.check()
                if time.monotonic() - last > self.stall:
                    raise TransportError(f"the source sent nothing for {self.stall:g} s"
                                         ) from None
            except OSError as exc:
                raise _broken(exc, "the connection to the source broke") from None

    def read_commit(self, already: bytes, timeout: float) -> None:
        """Wait for the source's COMMIT_TOKEN (``already``: its first bytes, read with the
        stream); anything else, the connection closing or ``timeout`` raise."""
        got = bytearray(already)
        deadline = time.monotonic() + timeout
        while len(got) < len(COMMIT_TOKEN) and got == COMMIT_TOKEN[:len(got)]:
            try:
                data = self.sock.recv(len(COMMIT_TOKEN) - len(got))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TransportError(f"the source did not commit within {timeout:g} s: "
                                         "the guest is not resumed here") from None
                continue
            except OSError as exc:
                raise _broken(exc, "the connection broke before the source committed") from None
            if not data:
                raise TransportError("the source closed the connection before it committed: "
                                     "the guest is not resumed here")
            got += data
        if got != COMMIT_TOKEN:
            raise RemoteProtocolError(f"expected the commit token after the stream, got "
                                      f"{bytes(got)!r}")

    def done(self, ok: bool, reason: str = "") -> None:
        """SHUT on the return path: 0 once verified (and, from QEMU's source, resumed); on
        failure (best effort) the reason, then SHUT(1)."""
        if self.sock is None:
            return
        try:
            self.sock.sendall(shut(SHUT_OK) if ok else error_text(reason) + shut(SHUT_FAILED))
        except OSError as exc:
            if ok:
                raise _broken(exc, "cannot confirm the migration to the source") from None

    def close(self) -> None:
        for s in (self.sock, self.listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self.sock = self.listener = None


class FileSource:
    """The destination's end of a ``file:`` migration: a saved stream read back."""

    def __init__(self, path: str, check=lambda: None) -> None:
        self.path = path
        self.check = check
        self.f = None

    def open(self, on_listening=lambda port: None) -> None:
        try:
            self.f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise _broken(exc, f"cannot open {self.path}") from None

    def readinto(self, view: memoryview) -> int:
        self.check()
        try:
            return self.f.readinto(view)
        except OSError as exc:
            raise _broken(exc, f"reading {self.path} failed") from None

    def done(self, ok: bool, reason: str = "") -> None:
        pass

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def open_sink(uri, check):
    """The source's transport for a ``tcp:`` or ``file:`` URI."""
    return FileSink(uri.path, check) if uri.scheme == "file" else SocketSink(uri, check)


def open_source(uri, check, accept_timeout: float = 60.0):
    """The destination's transport for a ``tcp:`` or ``file:`` URI."""
    if uri.scheme == "file":
        return FileSource(uri.path, check)
    return SocketSource(uri, check, accept_timeout=accept_timeout)
