"""Handing a verbs command fd to another process with SCM_RIGHTS.

A process that exports a PD serves its command fd on an abstract unix socket (no file to clean
up; the name carries the pid and a random part) to any process of the same user that connects;
the importer receives it with ``receive_fd``. Unlike pidfd_getfd(2) this needs no ptrace
access, which Yama's ``ptrace_scope=1`` (the default on most distributions) refuses between
sibling processes. The server is a daemon thread blocked in select() on the socket and a pipe
that ``close()`` writes to.
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import socket
import struct
import threading

from shm.errors import TransportError

_PEERCRED = struct.Struct("3i")     # pid, uid, gid


class FdServer:
    """Serves ``fd`` (not owned) on ``name`` until ``close()``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.name = f"rdma-pipeline-cmdfd-{os.getpid()}-{secrets.token_hex(4)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.name)
        self._sock.listen(8)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="cmd-fd-server")
        self._thread.start()

    def _serve(self) -> None:
        while True:
            readable, _, _ = select.select([self._sock, self._wake_r], [], [])
            if self._wake_r in readable:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with conn:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                _pid, uid, _gid = _PEERCRED.unpack(creds)
                if uid != os.getuid():
                    continue        # another user's process: it gets nothing
                try:
                    socket.send_fds(conn, [b"F"], [self.fd])
                except OSError:
                    continue

    def close(self) -> None:
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join(5.0)
        self._thread = None
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def receive_fd(name: str, timeout: float = 10.0) -> int:
    """The fd served on ``name`` (a new descriptor of this process)."""
    if not name:
        raise TransportError("the PD handle names no command-fd socket", errno=errno.EINVAL)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect("\0" + name)
            _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
        except OSError as exc:
            raise TransportError(f"cannot receive the exporter's command fd: {exc}",
                                 errno=exc.errno or errno.EPROTO) from None
    if not fds:
        raise TransportError("the exporter sent no command fd", errno=errno.EPROTO)
    return fds[0]
