"""The strict pyverbs double (this module: devices, the "kernel" object table, what the
others share): rdma-core v44's class names, signatures and state rules over the
soft provider's transport.

Data moves through ``stages.verbs.soft`` (TCP between processes, one-sided writes placed by
rkey); everything pyverbs adds on top is checked here as a real device and librdmacm would,
and where hardware only misbehaves quietly (a first packet dropped, a later segfault) the double
raises at once, naming the rule:

- devices come from ``STRICT_PYVERBS_DEVICES`` (``name=ip,...``; default ``mlx5_0=127.0.0.1,
  rxe0=127.0.0.2``); an ``mlx5`` device shares PDs (``ibv_import_pd``) and has ODP, others
  have neither. The route to an address picks the device that owns it (else the first).
- a CM id bound to a wildcard address has no device: ``dev_name`` is a NULL dereference (raised
  as ``SystemError``); ``context`` is None unless the id was created from an AddrInfo.
- a QP accepted on (``rdma_accept``) must already be RTR; posting needs RTS; ``qp_state`` is
  the value cached at the last ``modify`` while ``query`` sees an asynchronous move to ERR.
- ``sq_sig_all`` defaults to 1 (every WR completes); with 0 only IBV_SEND_SIGNALED WRs do.
- an error completion's opcode is left unset (a value no ``ibv_wc_opcode`` has).
- a write into a page of an ON_DEMAND MR that no ``advise_mr(PREFETCH_WRITE)`` nor earlier
  fault mapped is answered with RNR NAK (the fault is then serviced): ``rnr_retry`` 0 turns
  that into RNR_RETRY_EXC_ERR.
- ``MR(pd, handle=...)`` needs a handle the exporter's command fd really holds: the command fd
  is a memfd holding the "kernel" object table, passed between processes like the real one.
- an event channel destroyed while CM ids still use it (a listener's channel carries the
  events of the ids it accepted) is a use after free in librdmacm: raised here.
- every ``SendWR``/``SGE``/``RecvWR`` made is counted (pyverbs 44 never frees them).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import tempfile
import weakref

from pyverbs.pyverbs_error import PyverbsRDMAError

PAGE = 4096
UNSET_OPCODE = 0xFF       # what mlx5 leaves in an error completion's opcode
CONNECT_PRIVATE = 56      # IB CM: the peer receives the whole private-data area, zero padded
ACCEPT_PRIVATE = 196


_QPS: dict[int, object] = weakref.WeakValueDictionary()    # qp_num -> QP, this process
_handles = itertools.count(0x100 + (os.getpid() & 0xFFF) * 0x1000)


# -- devices -------------------------------------------------------------------------------
def devices() -> dict[str, str]:
    spec = os.environ.get("STRICT_PYVERBS_DEVICES", "mlx5_0=127.0.0.1,rxe0=127.0.0.2")
    out = {}
    for item in spec.split(","):
        name, _, ip = item.partition("=")
        out[name.strip()] = ip.strip()
    return out


def shares_pd(name: str) -> bool:
    return name.startswith("mlx5")


def has_odp(name: str) -> bool:
    return name.startswith("mlx5")


def device_for(host: str) -> str | None:
    """The device that owns ``host`` (None for a wildcard address)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return None
    try:
        ip = socket.getaddrinfo(host, None)[0][4][0]
    except socket.gaierror:
        ip = host
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    devs = devices()
    for name, dev_ip in devs.items():
        if dev_ip == ip:
            return name
    return next(iter(devs))


def marked_fd(marker: str) -> int:
    """A pollable fd whose /proc/self/fd link names ``marker`` (a FIFO, unlinked)."""
    where = tempfile.mkdtemp(prefix="strict-pyverbs-")
    path = os.path.join(where, marker)
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    os.unlink(path)
    os.rmdir(where)
    return fd


def _rdma(msg: str, code: int):
    return PyverbsRDMAError(msg, code)


# -- the "kernel" object table behind a command fd -----------------------------------------
def table_add(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def table_read(fd: int) -> list[dict]:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0).decode()
    return [json.loads(line) for line in data.splitlines() if line]
