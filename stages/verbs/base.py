"""The verbs interface that every transport provider implements.

Modeled on ibverbs and librdmacm: a provider opens a device (``Context``); a context allocates
protection domains and completion queues and runs the connection manager; a PD registers memory
regions and creates RC queue pairs. Enum values equal libibverbs' own, so the pyverbs provider
passes them through. Every object is a context manager whose ``close()`` is idempotent and closes
its children first (QPs and MRs before their PD, PDs before CQs, everything before the context).

SGE addresses are integers in the MR's address space (``mr.addr + offset``). For an imported MR
that is the *exporter's* address space, as with ``ibv_import_mr``.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

import numpy as np

from shm.errors import TransportError

# librdmacm's limits for RDMA_PS_TCP; the soft provider enforces them too so that code that
# works on one provider works on the other. On real hardware the peer may see padded data.
MAX_CONNECT_PRIVATE_DATA = 56
MAX_ACCEPT_PRIVATE_DATA = 196


class WCStatus(IntEnum):
    """Work-completion status (``enum ibv_wc_status``)."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21


class WCOpcode(IntEnum):
    """Work-completion opcode (``enum ibv_wc_opcode``)."""

    SEND = 0
    RDMA_WRITE = 1
    RDMA_READ = 2
    COMP_SWAP = 3
    FETCH_ADD = 4
    BIND_MW = 5
    RECV = 128
    RECV_RDMA_WITH_IMM = 129


class SendOpcode(IntEnum):
    """Send work-request opcode (``enum ibv_wr_opcode``); WRITE and SEND are supported."""

    RDMA_WRITE = 0
    RDMA_WRITE_WITH_IMM = 1
    SEND = 2
    SEND_WITH_IMM = 3
    RDMA_READ = 4


class Access(IntFlag):
    """MR access flags (``enum ibv_access_flags``)."""

    NONE = 0
    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    ON_DEMAND = 64      # IBV_ACCESS_ON_DEMAND (ODP): nothing pinned, pages faulted in when used


class QPState(IntEnum):
    """Queue-pair state (``enum ibv_qp_state``)."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    SQD = 4
    SQE = 5
    ERR = 6


SEND_WC_OPCODE = {SendOpcode.RDMA_WRITE: WCOpcode.RDMA_WRITE, SendOpcode.SEND: WCOpcode.SEND}

# One RDMA WRITE work request of one SGE, as a record: ``QP.post_writes`` takes an array of them,
# the way ibv_post_send takes a linked list of WRs (addresses as for ``post_send``).
WRITE_WR_DTYPE = np.dtype([
    ("wr_id", "<u8"),
    ("addr", "<u8"),          # local address, in the lkey's MR address space
    ("remote_addr", "<u8"),
    ("length", "<u4"),
    ("lkey", "<u4"),
    ("rkey", "<u4"),
    ("signaled", "<u4"),      # nonzero: IBV_SEND_SIGNALED
])


@dataclass(frozen=True, slots=True)
class WorkCompletion:
    """One completion. ``byte_len`` is the received length for RECV, the posted length for a
    SEND or WRITE (verbs leaves it undefined there)."""

    wr_id: int
    status: WCStatus
    opcode: WCOpcode
    byte_len: int = 0
    qp_num: int = 0

    @property
    def ok(self) -> bool:
        return self.status == WCStatus.SUCCESS


@dataclass(frozen=True, slots=True)
class PDHandle:
    """What a process needs to import a PD exported by another one (plain, picklable)."""

    provider: str
    owner_pid: int
    name: str  # soft: the PD table's shared-memory name; verbs: the device name
    pd_handle: int = 0  # verbs: the kernel PD handle
    cmd_fd: int = -1  # verbs: the exporter's command fd (its number there)
    socket: str = ""  # verbs: the abstract unix socket that hands that fd over (SCM_RIGHTS)


@dataclass(frozen=True, slots=True)
class MRHandle:
    """What a process needs to import an MR exported by another one (plain, picklable)."""

    provider: str
    pd_name: str
    lkey: int
    rkey: int
    addr: int  # in the exporter's address space
    length: int
    access: int
    mr_handle: int = 0  # verbs: the kernel MR handle
    slot: int = -1  # soft: the MR's entry in the PD table
    path: str = ""  # soft: the file backing the memory (POSIX shm or any shared mapping)
    file_offset: int = 0  # soft: where ``addr`` lies in that file


def closed_error(what: str) -> TransportError:
    return TransportError(f"{what} is closed", errno=errno.EBADF)


def check_private_data(data: bytes, limit: int, what: str) -> bytes:
    """Private data as bytes, at most ``limit`` bytes (API misuse otherwise)."""
    data = bytes(data)
    if len(data) > limit:
        raise ValueError(f"{what} private data is {len(data)} bytes; the limit is {limit}")
    return data


class Resource(ABC):
    """A verbs object: a context manager with an idempotent ``close()``."""

    _closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @abstractmethod
    def close(self) -> None:
        """Release the object (children first); calling it again does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MR(Resource):
    """A registered memory region."""

    lkey: int
    rkey: int
    addr: int  # start of the region in its own address space (the exporter's, if imported)
    length: int
    access: Access
    imported: bool

    @abstractmethod
    def export(self) -> MRHandle:
        """A handle another process passes to ``pd.import_mr`` (after importing this PD)."""

    def prefetch(self) -> None:
        """Fault an ON_DEMAND region in for writing now, as ibv_advise_mr(PREFETCH_WRITE)
        does; a no-op where the provider has no use for it."""


class CQ(Resource):
    """A completion queue with a pollable file descriptor."""

    depth: int

    @abstractmethod
    def poll(self, n: int = 16) -> list[WorkCompletion]:
        """Up to ``n`` completions, oldest first, without blocking."""

    @abstractmethod
    def fileno(self) -> int:
        """A descriptor that select() reports readable when completions may be waiting."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> bool:
        """Block until a completion is waiting (True) or ``timeout`` seconds pass (False)."""

    @abstractmethod
    def __len__(self) -> int:
        """Completions known to be waiting (a lower bound: 0 does not promise an empty CQ)."""


class QP(Resource):
    """A reliable-connected queue pair."""

    qp_num: int
    send_cq: CQ
    recv_cq: CQ

    @property
    @abstractmethod
    def state(self) -> QPState: ...

    @abstractmethod
    def post_send(self, wr_id: int, opcode: SendOpcode, addr: int, length: int, lkey: int, *,
                  remote_addr: int = 0, rkey: int = 0, signaled: bool = True) -> None:
        """Post one SEND or RDMA WRITE of one SGE; ENOMEM when the send queue is full."""

    def post_writes(self, wrs: np.ndarray) -> None:
        """Post the RDMA WRITEs of ``wrs`` (``WRITE_WR_DTYPE``) in order, as one ibv_post_send
        of a WR list. As there, a failure (ENOMEM: the send queue is full) leaves the WRs
        before the failing one posted. Providers that can batch override this loop."""
        for wr_id, addr, remote_addr, length, lkey, rkey, signaled in wrs.tolist():
            self.post_send(wr_id, SendOpcode.RDMA_WRITE, addr, length, lkey,
                           remote_addr=remote_addr, rkey=rkey, signaled=bool(signaled))

    @abstractmethod
    def post_recv(self, wr_id: int, addr: int, length: int, lkey: int) -> None:
        """Post one receive buffer; allowed before the QP is connected."""

    @abstractmethod
    def disconnect(self) -> None:
        """Tear the connection down; outstanding work completes with WR_FLUSH_ERR."""


class PD(Resource):
    """A protection domain."""

    imported: bool
    shareable: bool = True   # another process can import it (verbs: mlx5 can, rxe cannot)

    @abstractmethod
    def reg_mr(self, address: int, length: int, access: Access) -> MR:
        """Register (and pin) ``length`` bytes at ``address``, memory the caller owns."""

    def reg_mrs(self, ranges: list[tuple[int, int]], access: Access) -> list[MR]:
        """One MR per ``(address, length)`` of ``ranges``, all or none. Providers that can pin
        adjacent ranges together override this loop."""
        mrs: list[MR] = []
        try:
            for address, length in ranges:
                mrs.append(self.reg_mr(address, length, access))
        except BaseException:
            for mr in mrs:
                mr.close()
            raise
        return mrs

    def export_mrs(self, mrs: list[MR]) -> list[MRHandle]:
        """``mr.export()`` of each of ``mrs``; providers may export them in one step."""
        return [mr.export() for mr in mrs]

    @abstractmethod
    def create_qp(self, send_cq: CQ, recv_cq: CQ, *, max_send_wr: int, max_recv_wr: int,
                  rnr_retry: int = 0) -> QP:
        """An unconnected RC QP (receives may be posted before connecting)."""

    @abstractmethod
    def export(self) -> PDHandle:
        """A handle another process passes to ``ctx.import_pd``."""

    @abstractmethod
    def import_mr(self, handle: MRHandle) -> MR:
        """Import an MR of this (imported) PD; closing it only un-imports it."""


class ConnectRequest(ABC):
    """An incoming connection request, answered once by ``accept`` or ``reject``."""

    private_data: bytes

    @abstractmethod
    def accept(self, qp: QP, private_data: bytes = b"") -> None:
        """Connect ``qp`` to the requester, replying with ``private_data``."""

    @abstractmethod
    def reject(self, private_data: bytes = b"") -> None:
        """Refuse the request; the requester's ``connect`` raises TransportError."""


class Listener(Resource):
    """A listening endpoint of the connection manager."""

    host: str
    port: int  # the bound port (useful after listening on port 0)

    @abstractmethod
    def get_request(self, timeout: float | None = None) -> ConnectRequest:
        """The next connection request; TransportError (ETIMEDOUT) after ``timeout``."""


class Context(Resource):
    """An open device."""

    name: str

    @abstractmethod
    def alloc_pd(self) -> PD: ...

    @abstractmethod
    def create_cq(self, depth: int) -> CQ: ...

    @abstractmethod
    def import_pd(self, handle: PDHandle) -> PD: ...

    @abstractmethod
    def listen(self, host: str, port: int, backlog: int = 5) -> Listener: ...

    @abstractmethod
    def connect(self, qp: QP, host: str, port: int, private_data: bytes = b"",
                timeout: float = 10.0) -> bytes:
        """Connect ``qp`` to a listener; returns the accepter's private data."""


class Provider(ABC):
    """A transport provider: ``soft`` (TCP) or ``verbs`` (pyverbs)."""

    name: str

    @abstractmethod
    def list_devices(self) -> list[str]: ...

    @abstractmethod
    def open_device(self, name: str | None = None, *, peer: str | None = None) -> Context:
        """Open ``name`` (when None: the device the route to ``peer`` goes through, or the
        first device); TransportUnsupported if there is none."""
