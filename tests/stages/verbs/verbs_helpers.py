"""Helpers of the verbs conformance suite: the RDMA gate, connected QP pairs, waits.

``requires_rdma()`` is the one place that decides whether the ``verbs`` provider can run here
(it asks ``stages.verbs.rdmacore.probe``: pyverbs importable, device list readable and not
empty, an ACTIVE port).
"""

from __future__ import annotations

import functools
import mmap
import os
import random
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from pipeline.selftest_cmd import wait_until
from stages.verbs import Access, open_provider
from stages.verbs.rdmacore import probe


@functools.cache
def _rdma_reason() -> str | None:
    return probe()


def requires_rdma() -> None:
    """Skip the calling test unless pyverbs sees an RDMA device with an ACTIVE port."""
    reason = _rdma_reason()
    if reason is not None:
        pytest.skip(f"verbs provider: {reason}")


def address(provider: str) -> str:
    """Where test listeners bind: loopback for soft, RDP_TEST_RDMA_ADDR for real devices."""
    if provider == "soft":
        return "127.0.0.1"
    return os.environ.get("RDP_TEST_RDMA_ADDR", "127.0.0.1")


def port(provider: str) -> int:
    """0 (any free port) for soft; rdma_cm listeners need an explicit one."""
    return 0 if provider == "soft" else random.randint(20000, 60000)


def wait_wcs(cq, n: int, timeout: float = 10.0) -> list:
    """At least ``n`` completions from ``cq`` (fewer only if ``timeout`` passes)."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and cq.wait(max(0.0, deadline - time.monotonic())):
        got += cq.poll(n - len(got))
    return got


class Pair:
    """Two connected QPs in this process, A (requester) and B (target), each on its own
    context, with 1 MiB of registered memory per side."""

    def __init__(self, provider: str, *, size: int = 1 << 20,
                 access_b: Access = Access.LOCAL_WRITE | Access.REMOTE_WRITE,
                 max_send_wr: int = 64, max_recv_wr: int = 16, rnr_retry: int = 0,
                 prepost_b: int = 0, listen_host: str | None = None,
                 connect_host: str | None = None) -> None:
        dev = open_provider(provider)
        self.ctx_a, self.ctx_b = dev.open_device(), dev.open_device()
        try:
            self.mem_a = np.zeros(size, np.uint8)
            self.mem_b = np.zeros(size, np.uint8)
            self.pd_a, self.pd_b = self.ctx_a.alloc_pd(), self.ctx_b.alloc_pd()
            self.mr_a = self.pd_a.reg_mr(self.mem_a.ctypes.data, size, Access.LOCAL_WRITE)
            self.mr_b = self.pd_b.reg_mr(self.mem_b.ctypes.data, size, access_b)
            self.cq_a, self.cq_b = self.ctx_a.create_cq(512), self.ctx_b.create_cq(512)
            self.rcq_b = self.ctx_b.create_cq(512)
            self.qp_a = self.pd_a.create_qp(self.cq_a, self.cq_a, max_send_wr=max_send_wr,
                                            max_recv_wr=max_recv_wr, rnr_retry=rnr_retry)
            self.qp_b = self.pd_b.create_qp(self.cq_b, self.rcq_b, max_send_wr=max_send_wr,
                                            max_recv_wr=max_recv_wr, rnr_retry=rnr_retry)
            for i in range(prepost_b):  # before connecting, as QEMU posts its slot-0 RECV
                self.recv_b(1000 + i, 4096 * i, 4096)
            listener = self.ctx_b.listen(listen_host or address(provider), port(provider))
            seen = {}

            def passive():
                request = listener.get_request(10)
                seen["request"] = request.private_data
                request.accept(self.qp_b, b"reply from B")

            thread = threading.Thread(target=passive)
            thread.start()
            try:
                seen["reply"] = self.ctx_a.connect(self.qp_a, connect_host or address(provider),
                                                   listener.port, b"hello from A", 10)
            finally:
                thread.join(10)
                listener.close()
            self.private_data = seen
        except BaseException:
            self.close()
            raise

    def recv_b(self, wr_id: int, offset: int, length: int) -> None:
        self.qp_b.post_recv(wr_id, self.mr_b.addr + offset, length, self.mr_b.lkey)

    def write(self, wr_id: int, offset: int, length: int, remote_offset: int, *,
              signaled: bool = True, rkey: int | None = None) -> None:
        self.qp_a.post_send(wr_id, 0, self.mr_a.addr + offset, length, self.mr_a.lkey,
                            remote_addr=self.mr_b.addr + remote_offset,
                            rkey=self.mr_b.rkey if rkey is None else rkey, signaled=signaled)

    def write_wrs(self, n: int, *, first_id: int = 0, length: int = 4096) -> np.ndarray:
        """``n`` signaled WRITEs (``WRITE_WR_DTYPE``) of ``length`` bytes, A to B in order."""
        from stages.verbs.base import WRITE_WR_DTYPE

        wrs = np.zeros(n, WRITE_WR_DTYPE)
        wrs["wr_id"] = np.arange(first_id, first_id + n)
        wrs["addr"] = self.mr_a.addr + np.arange(n) * length
        wrs["remote_addr"] = self.mr_b.addr + np.arange(n) * length
        wrs["length"], wrs["lkey"], wrs["rkey"] = length, self.mr_a.lkey, self.mr_b.rkey
        wrs["signaled"] = 1
        return wrs

    def send(self, wr_id: int, offset: int, length: int, *, signaled: bool = True) -> None:
        self.qp_a.post_send(wr_id, 2, self.mr_a.addr + offset, length, self.mr_a.lkey,
                            signaled=signaled)

    def close(self) -> None:
        self.ctx_a.close()
        self.ctx_b.close()


wait_for = wait_until       # poll a cheap predicate every 10 ms until true or the timeout


@contextmanager
def shm_ram(size: int):
    """``size`` bytes of never-touched POSIX shared memory, as guest RAM is (exportable to
    another process): ``(name, uint8 array)``; unlinked afterwards."""
    import posix_ipc

    from shm.naming import new_run_id, segment_name

    name = segment_name(new_run_id(), "test.ram")
    segment = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    mapping = mmap.mmap(segment.fd, size)
    segment.close_fd()
    ram = np.frombuffer(mapping, np.uint8)
    try:
        yield name, ram
    finally:
        del ram
        posix_ipc.unlink_shared_memory(name)
