"""A verbs peer in another process, driven by commands over a pipe (for the conformance suite).

The peer opens the provider, registers ``size`` bytes of its own memory (or imports a PD and
an MR exported by a third process), creates a QP and answers commands. Nothing here is clever:
each command is one verbs call or one read of memory, so a test reads as a sequence of steps.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np

from stages.verbs import Access, SendOpcode, open_provider

SPAWN = multiprocessing.get_context("spawn")
MiB = 1 << 20


@contextmanager
def writer_to(target, provider: str, address: str, port: int, *, max_send_wr: int):
    """A QP of this process connected to ``target`` (a Peer), with 1 MiB of registered ones
    to write from and a RECV posted: ``.ctx .mr .send_cq .recv_cq .qp``."""
    payload = np.ones(MiB, np.uint8)
    listen_port = target.call("listen", address, port)
    target.send("accept", b"")
    with open_provider(provider).open_device() as ctx:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(payload.ctypes.data, MiB, Access.LOCAL_WRITE)
        send_cq, recv_cq = ctx.create_cq(256), ctx.create_cq(16)
        qp = pd.create_qp(send_cq, recv_cq, max_send_wr=max_send_wr, max_recv_wr=4)
        qp.post_recv(999, mr.addr, 4096, mr.lkey)
        ctx.connect(qp, address, listen_port, b"", 10)
        target.answer()
        yield SimpleNamespace(ctx=ctx, mr=mr, send_cq=send_cq, recv_cq=recv_cq, qp=qp)


def run_in_child(target, *args, timeout: float = 60.0):
    """Run ``target(conn, *args)`` in a spawned process: (its exit code, what it sent)."""
    conn, child_conn = SPAWN.Pipe()
    child = SPAWN.Process(target=target, args=(child_conn, *args))
    child.start()
    try:
        assert conn.poll(timeout), f"{target.__name__} sent nothing in {timeout} s"
        out = conn.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        conn.close()
    return child.exitcode, out


def _serve(conn, provider: str, size: int, access: int, max_send_wr: int, max_recv_wr: int,
           rnr_retry: int, pd_handle, mr_handle) -> None:
    ctx = open_provider(provider).open_device()
    try:
        if pd_handle is not None:
            pd = ctx.import_pd(pd_handle)
            mr = pd.import_mr(mr_handle)
            memory = None
            lkey, base = mr.lkey, mr.addr  # SGEs use the exporter's address space
        else:
            memory = np.zeros(size, np.uint8)
            pd = ctx.alloc_pd()
            mr = pd.reg_mr(memory.ctypes.data, size, Access(access))
            lkey, base = mr.lkey, mr.addr
        cq = ctx.create_cq(1024)
        qp = pd.create_qp(cq, cq, max_send_wr=max_send_wr, max_recv_wr=max_recv_wr,
                          rnr_retry=rnr_retry)
        conn.send({"pid": os.getpid(), "addr": base, "rkey": mr.rkey, "length": mr.length})
        listener = None
        while True:
            cmd, *args = conn.recv()
            if cmd == "exit":
                break
            if cmd == "listen":
                host, port = args
                listener = ctx.listen(host, port)
                conn.send(listener.port)
            elif cmd == "accept":
                request = listener.get_request(10)
                request.accept(qp, args[0])
                conn.send(request.private_data)
            elif cmd == "connect":
                host, port, data = args
                conn.send(ctx.connect(qp, host, port, data, 10))
            elif cmd == "read":
                offset, n = args
                conn.send(memory[offset:offset + n].tobytes())
            elif cmd == "fill":
                offset, data = args
                memory[offset:offset + len(data)] = np.frombuffer(data, np.uint8)
                conn.send(None)
            elif cmd == "post_recv":
                wr_id, offset, n = args
                qp.post_recv(wr_id, base + offset, n, lkey)
                conn.send(None)
            elif cmd == "write":
                wr_id, offset, n, remote_addr, rkey = args
                qp.post_send(wr_id, SendOpcode.RDMA_WRITE, base + offset, n, lkey,
                             remote_addr=remote_addr, rkey=rkey)
                conn.send(None)
            elif cmd == "poll":
                want, timeout = args
                got, deadline = [], time.monotonic() + timeout
                while len(got) < want and cq.wait(max(0.0, deadline - time.monotonic())):
                    got += cq.poll(want - len(got))
                conn.send([(wc.wr_id, int(wc.status), int(wc.opcode), wc.byte_len)
                           for wc in got])
            elif cmd == "state":
                conn.send(int(qp.state))
            else:
                raise ValueError(cmd)
    finally:
        ctx.close()
    conn.send("bye")


class Peer:
    """The other process; ``call`` sends a command and returns its answer."""

    def __init__(self, provider: str, *, size: int = 1 << 20,
                 access: Access = Access.LOCAL_WRITE | Access.REMOTE_WRITE,
                 max_send_wr: int = 64, max_recv_wr: int = 16, rnr_retry: int = 0,
                 pd_handle=None, mr_handle=None) -> None:
        self.conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(
            target=_serve, name="verbs-peer",
            args=(child, provider, size, int(access), max_send_wr, max_recv_wr, rnr_retry,
                  pd_handle, mr_handle))
        self.process.start()
        child.close()
        self.info = self._answer(30.0)
        self.pid = self.info["pid"]

    def _answer(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError("the peer process did not answer")
        return self.conn.recv()

    def call(self, cmd: str, *args, timeout: float = 15.0):
        self.conn.send((cmd, *args))
        return self._answer(timeout)

    def send(self, cmd: str, *args) -> None:
        """Send a command whose answer is collected later with ``answer``."""
        self.conn.send((cmd, *args))

    def answer(self, timeout: float = 15.0):
        return self._answer(timeout)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("exit",))
                self._answer(10.0)
            except (OSError, EOFError, TimeoutError):
                pass
        self.process.join(10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_ipc_lock() -> None:
    """Drop CAP_IPC_LOCK from this process (root ignores RLIMIT_MEMLOCK while it has it)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    from shm.memory import libc

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    bit = 1 << 14  # CAP_IPC_LOCK
    libc.prctl(24, 14, 0, 0, 0)  # PR_CAPBSET_DROP, so nothing can bring it back
    data[0].effective &= ~bit
    data[0].permitted &= ~bit
    data[0].inheritable &= ~bit
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def register_over_limit(conn, provider: str, limit: int, size: int) -> None:
    """Child: lower RLIMIT_MEMLOCK to ``limit``, drop CAP_IPC_LOCK, register ``size`` bytes."""
    import resource

    from shm.errors import TransportError

    drop_ipc_lock()
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    with open("/proc/self/status") as f:
        cap_eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    memory = np.ones(size, np.uint8)
    result = {"cap_ipc_lock": bool(cap_eff & (1 << 14))}
    with open_provider(provider).open_device() as ctx:
        pd = ctx.alloc_pd()
        try:
            small = pd.reg_mr(memory.ctypes.data, limit // 2, Access.LOCAL_WRITE)
            small.close()
            pd.reg_mr(memory.ctypes.data, size, Access.LOCAL_WRITE)
            result["error"] = None
        except TransportError as exc:
            result["error"], result["errno"] = str(exc), exc.errno
    conn.send(result)


def import_and_die(conn, pd_handle, mr_handle) -> None:
    """Child: import an MR, report, then wait to be killed (its hold must die with it)."""
    ctx = open_provider(pd_handle.provider).open_device()
    pd = ctx.import_pd(pd_handle)
    pd.import_mr(mr_handle)
    conn.send("imported")
    conn.recv()  # never answered: the parent kills us
