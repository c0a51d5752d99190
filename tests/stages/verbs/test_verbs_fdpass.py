"""Handing a command fd to another process with SCM_RIGHTS (``rdmacore_fdpass``)."""

from __future__ import annotations

import os

import pytest
from verbs_peer import run_in_child

from shm.errors import TransportError
from stages.verbs.rdmacore_fdpass import FdServer, receive_fd


def _fetch(conn, name: str) -> None:
    fd = receive_fd(name)
    try:
        st = os.fstat(fd)
        conn.send((st.st_dev, st.st_ino, os.pread(fd, 5, 0)))
    finally:
        os.close(fd)


def test_another_process_receives_the_same_open_file():
    fd = os.memfd_create("uverbs-test")
    os.write(fd, b"hello")
    server = FdServer(fd)
    try:
        code, (dev, ino, data) = run_in_child(_fetch, server.name)
        st = os.fstat(fd)
        assert code == 0 and (dev, ino, data) == (st.st_dev, st.st_ino, b"hello")
        code, got = run_in_child(_fetch, server.name)     # served to every importer
        assert code == 0 and got[2] == b"hello"
    finally:
        server.close()
        os.close(fd)
    server.close()                  # idempotent


def test_no_server_is_a_transport_error():
    with pytest.raises(TransportError, match="cannot receive"):
        receive_fd("rdma-pipeline-cmdfd-nobody-here", timeout=1)
    with pytest.raises(TransportError):
        receive_fd("")
