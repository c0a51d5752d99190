"""``rdma-pipeline selftest``: does the verbs transport hold on this machine's RDMA device?

It runs the verbs conformance checks in one process over the device (two contexts connected
through the device's own address: a loopback through the NIC or Soft-RoCE), then a whole
loopback migration over ``--transport verbs`` (or, with ``--peer HOST:PORT``, a migration to
``rdma-pipeline incoming`` on another host), and prints one table of what held.

Exit codes: 0 when every check held; 1 when a check failed (the table says which); 2 when it
cannot run here at all (no pyverbs, a kernel without RDMA, no device or no ACTIVE port): one
line saying so, as every ``rdma-pipeline`` error. ``--transport soft`` runs the same checks on
the soft provider.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

MIB = 1 << 20
PEER_PORT = 29200        # the README's port for 'rdma-pipeline incoming'


def add_arguments(p) -> None:
    p.add_argument("--transport", choices=("soft", "verbs"), default="verbs",
                   help="provider to check (default verbs: pyverbs on an RDMA device)")
    p.add_argument("--device", metavar="NAME", help="RDMA device (default: the first one with "
                                                    "an ACTIVE port)")
    p.add_argument("--address", metavar="IP", help="the device's IP address (default: the "
                                                   "IPv4 address in its GID table)")
    p.add_argument("--peer", metavar="HOST[:PORT]",
                   help="migrate to 'rdma-pipeline incoming rdma:0.0.0.0:PORT --transport "
                        f"verbs' running on HOST (PORT {PEER_PORT} unless given) instead of "
                        "a loopback migration")
    p.add_argument("--ram", default="64M", help="guest RAM of the test migration (default 64M)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object")


@dataclass
class Row:
    check: str
    held: bool | None        # None: not applicable here (skipped)
    detail: str = ""


class Checks:
    """The conformance checks, each a method that returns a detail string or raises."""

    def __init__(self, transport: str, device: str | None, address: str) -> None:
        from stages.verbs import open_provider

        self.provider = open_provider(transport)
        self.transport, self.device, self.address = transport, device, address
        self.port = 0 if transport == "soft" else 20000 + os.getpid() % 20000

    def pair(self, **options):
        return Pair(self, **options)

    # -- the checks ----------------------------------------------------------------------
    def connect_with_private_data(self) -> str:
        with self.pair() as p:
            if p.request[:5] != b"hello" or p.reply[:5] != b"world":
                raise AssertionError(f"private data {p.request[:5]!r}/{p.reply[:5]!r}")
            return f"request {len(p.request)} B, reply {len(p.reply)} B received"

    def both_qps_rts(self) -> str:
        from stages.verbs import QPState

        with self.pair() as p:
            states = (p.qp_a.state, p.qp_b.state)
            if states != (QPState.RTS, QPState.RTS):
                raise AssertionError(f"QP states {[s.name for s in states]}")
            return "requester and responder RTS (responder RTR before accept)"

    def write_places_data(self) -> str:
        from stages.verbs import SendOpcode, WCStatus

        with self.pair() as p:
            p.mem_a[:MIB] = 0x5A
            p.qp_a.post_send(1, SendOpcode.RDMA_WRITE, p.mr_a.addr, MIB, p.mr_a.lkey,
                             remote_addr=p.mr_b.addr, rkey=p.mr_b.rkey)
            wc = p.wait(p.cq_a, 1)[0]
            if wc.status != WCStatus.SUCCESS or (p.mem_b[:MIB] != 0x5A).any():
                raise AssertionError(f"completion {wc.status.name}, data placed: "
                                     f"{bool((p.mem_b[:MIB] == 0x5A).all())}")
            return "1 MiB RDMA WRITE placed, completion SUCCESS"

    def unsignaled_writes_are_silent(self) -> str:
        with self.pair() as p:
            for i in range(3):
                p.write(i, signaled=i == 2)
            ids = [wc.wr_id for wc in p.wait(p.cq_a, 3, timeout=1.0)]
            if ids != [2]:
                raise AssertionError(f"completions for wr_ids {ids}, expected [2]")
            return "2 unsignaled + 1 signaled WRITE: 1 completion"

    def bad_rkey_is_remote_access_error(self) -> str:
        from stages.verbs import QPState, WCStatus

        with self.pair() as p:
            p.write(7, rkey=p.mr_b.rkey ^ 0x5A5A)
            wc = p.wait(p.cq_a, 1)[0]
            if wc.status != WCStatus.REM_ACCESS_ERR:
                raise AssertionError(f"status {wc.status.name}")
            if not wait_until(lambda: p.qp_a.state == QPState.ERR):
                raise AssertionError(f"QP state {p.qp_a.state.name} after the error")
            return "REM_ACCESS_ERR, then the QP reads ERR"

    def send_and_recv(self) -> str:
        from stages.verbs import SendOpcode, WCStatus

        with self.pair() as p:
            p.qp_b.post_recv(5, p.mr_b.addr, 4096, p.mr_b.lkey)
            p.qp_a.post_send(6, SendOpcode.SEND, p.mr_a.addr, 100, p.mr_a.lkey)
            send, recv = p.wait(p.cq_a, 1)[0], p.wait(p.rcq_b, 1)[0]
            if (send.status, recv.status, recv.byte_len) != (WCStatus.SUCCESS,
                                                             WCStatus.SUCCESS, 100):
                raise AssertionError(f"send {send.status.name}, recv {recv.status.name} "
                                     f"{recv.byte_len} B")
            return "SEND of 100 B consumed a RECV, byte_len 100"

    def reject_refuses(self) -> str:
        from shm.errors import TransportError

        try:
            with self.pair(reject=True):
                pass
        except TransportError as exc:
            if exc.errno == errno.ECONNREFUSED:
                return "the requester sees ECONNREFUSED"
            raise
        raise AssertionError("a rejected connection connected")

    def odp(self) -> str:
        from stages.verbs import Access, WCStatus

        with self.provider.open_device(self.device) as ctx:
            odp = getattr(ctx, "odp_write", True)
        if not odp:
            return "no ODP for RC writes: registrations pin (as with x-odp=off)"
        from stages.poster import RNR_RETRY

        with self.pair(access_b=Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.ON_DEMAND,
                       rnr_retry=RNR_RETRY) as p:
            p.write(1)                  # no prefetch: a page fault (RNR) the retry survives
            p.mr_b.prefetch()           # ibv_advise_mr(PREFETCH_WRITE)
            p.write(2, remote=MIB)
            statuses = [wc.status for wc in p.wait(p.cq_a, 2)]
            if statuses != [WCStatus.SUCCESS] * 2:
                raise AssertionError(f"statuses {[s.name for s in statuses]}")
            return "writes into on-demand memory complete (RNR retried, prefetch advised)"

    def pd_sharing(self) -> str:
        with self.provider.open_device(self.device) as ctx:
            shareable = ctx.alloc_pd().shareable
        return ("share: the poster imports the registrar's PD (ibv_import_pd)" if shareable
                else "proxy: this device cannot share a PD; the poster registers")

    CHECKS = [
        ("connect with private data", connect_with_private_data),
        ("both QPs RTS after accept", both_qps_rts),
        ("RDMA WRITE placement", write_places_data),
        ("unsignaled WRs complete silently", unsignaled_writes_are_silent),
        ("bad rkey: REM_ACCESS_ERR, QP ERR", bad_rkey_is_remote_access_error),
        ("SEND/RECV", send_and_recv),
        ("reject", reject_refuses),
        ("on-demand paging", odp),
        ("registration mode", pd_sharing),
    ]


class Pair:
    """Two connected QPs over the device, A (requester) and B (responder), 2 MiB each."""

    def __init__(self, checks: Checks, *, access_b=None, rnr_retry: int = 0,
                 reject: bool = False) -> None:
        import numpy as np

        from stages.verbs import Access

        access_b = access_b or Access.LOCAL_WRITE | Access.REMOTE_WRITE
        self.ctx_a = checks.provider.open_device(checks.device)
        self.ctx_b = checks.provider.open_device(checks.device)
        try:
            self.mem_a, self.mem_b = np.zeros(2 * MIB, np.uint8), np.zeros(2 * MIB, np.uint8)
            pd_a, pd_b = self.ctx_a.alloc_pd(), self.ctx_b.alloc_pd()
            self.mr_a = pd_a.reg_mr(self.mem_a.ctypes.data, 2 * MIB, Access.LOCAL_WRITE)
            self.mr_b = pd_b.reg_mr(self.mem_b.ctypes.data, 2 * MIB, access_b)
            self.cq_a, self.cq_b = self.ctx_a.create_cq(64), self.ctx_b.create_cq(64)
            self.rcq_b = self.ctx_b.create_cq(64)
            self.qp_a = pd_a.create_qp(self.cq_a, self.cq_a, max_send_wr=16, max_recv_wr=4,
                                       rnr_retry=rnr_retry)
            self.qp_b = pd_b.create_qp(self.cq_b, self.rcq_b, max_send_wr=16, max_recv_wr=4,
                                       rnr_retry=rnr_retry)
            checks.port += 1
            listener = self.ctx_b.listen(checks.address, checks.port)
            seen: dict = {}

            def passive() -> None:
                try:
                    req = listener.get_request(10)
                    seen["request"] = req.private_data
                    if reject:
                        req.reject()
                    else:
                        req.accept(self.qp_b, b"world")
                except BaseException as exc:  # noqa: BLE001 - reported by the active side
                    seen["error"] = exc

            thread = threading.Thread(target=passive, daemon=True)
            thread.start()
            try:
                self.reply = self.ctx_a.connect(self.qp_a, checks.address, listener.port,
                                                b"hello", 10)
            finally:
                thread.join(15)
                listener.close()
            if "error" in seen:
                raise seen["error"]
            self.request = seen["request"]
        except BaseException:
            self.close()
            raise

    def write(self, wr_id: int, *, signaled: bool = True, rkey: int | None = None,
              remote: int = 0) -> None:
        from stages.verbs import SendOpcode

        self.qp_a.post_send(wr_id, SendOpcode.RDMA_WRITE, self.mr_a.addr, 4096, self.mr_a.lkey,
                            remote_addr=self.mr_b.addr + remote,
                            rkey=self.mr_b.rkey if rkey is None else rkey, signaled=signaled)

    @staticmethod
    def wait(cq, n: int, timeout: float = 10.0) -> list:
        got, deadline = [], time.monotonic() + timeout
        while len(got) < n and cq.wait(max(0.0, deadline - time.monotonic())):
            got += cq.poll(n - len(got))
        if not got:
            raise AssertionError(f"no completion within {timeout:g} s")
        return got

    def close(self) -> None:
        for ctx in (self.ctx_a, self.ctx_b):
            try:
                ctx.close()
            except Exception:  # noqa: BLE001 - a check failed: close what can be closed
                pass

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` every 10 ms until true (True) or ``timeout`` (False): for a QP's
    asynchronous move, which pyverbs gives no fd to block on. The tests use it too."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def device_and_address(args) -> tuple[str | None, str, str]:
    """(device, its IP address, a line about it); TransportUnsupported when there is none."""
    if args.transport == "soft":
        return None, args.address or "127.0.0.1", "soft0 (userspace verbs over TCP)"
    from stages.verbs.rdmacore import device_address, probe

    reason = probe()
    if reason:
        from shm.errors import TransportUnsupported

        raise TransportUnsupported(reason, hint="see README, 'Running on an RDMA NIC or "
                                                "Soft-RoCE'")
    from stages.verbs import open_provider

    with open_provider("verbs").open_device(args.device) as ctx:
        name = ctx.name
        address = args.address or device_address(ctx)
    if address is None:
        raise ValueError(f"RDMA device {name} has no IPv4 address in its GID table: give "
                         "--address")
    return name, address, f"{name} at {address}"


def peer_uri(peer: str) -> str:
    """``rdma:HOST:PORT`` for --peer HOST, HOST:PORT, an IPv6 address, [IPv6] or [IPv6]:PORT."""
    if peer.startswith("["):
        host, _, port = peer[1:].partition("]")
        return f"rdma:[{host}]:{port.lstrip(':') or PEER_PORT}"
    if peer.count(":") > 1:
        return f"rdma:[{peer}]:{PEER_PORT}"
    host, _, port = peer.partition(":")
    return f"rdma:{host}:{port or PEER_PORT}"


def _migration(args, address: str) -> Row:
    from pipeline.api import LocalRun
    from pipeline.config import MigrationConfig, parse_size
    from pipeline.guest.synthetic import GuestState

    ram = parse_size(args.ram)
    if args.peer:
        cmd = [sys.executable, "-m", "pipeline", "migrate", peer_uri(args.peer), "--transport",
               args.transport, "--ram", args.ram, "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        try:
            summary = json.loads(out.stdout)
        except ValueError:
            return Row(f"migration to {args.peer}", False,
                       (out.stderr.strip().splitlines() or ["no summary"])[-1])
        where = f"migration to {args.peer}"
    else:
        with LocalRun(ram, MigrationConfig(transport=args.transport), state=GuestState(),
                      host=address) as lr:
            lr.start()
            summary = lr.finish()
        where = "loopback migration"
    if summary.get("status") != "completed":
        return Row(where, False, summary.get("error-desc") or summary.get("status", "?"))
    mode = summary.get("stages", {}).get("registrar", {}).get("registration", "?")
    return Row(where, summary.get("verified") is True,
               f"{args.ram} in {summary.get('total-time', 0):.0f} ms, {mode} registration, "
               f"RAM verified: {summary.get('verified')}")


def run(args) -> list[Row]:
    """Every row of the table (raises TransportUnsupported when nothing can run)."""
    from stages.verbs.rdmacore import DEVICE_ENV

    device, address, about = device_and_address(args)
    saved = os.environ.get(DEVICE_ENV)
    if device is not None:
        os.environ[DEVICE_ENV] = device     # the migration's processes use the same device
    try:
        return _rows(args, device, address, about)
    finally:
        if saved is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = saved


def _rows(args, device: str | None, address: str, about: str) -> list[Row]:
    rows = [Row("device", True, about)]
    checks = Checks(args.transport, device, address)
    for title, check in Checks.CHECKS:
        try:
            rows.append(Row(title, True, check(checks)))
        except Exception as exc:  # noqa: BLE001 - a check that failed is a row, not a crash
            rows.append(Row(title, False, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    try:
        rows.append(_migration(args, address))
    except Exception as exc:  # noqa: BLE001
        rows.append(Row("migration", False, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return rows


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    mark = {True: "held", False: "FAILED", None: "skipped"}
    return "\n".join(f"{r.check:<{width}}  {mark[r.held]:<7} {r.detail}".rstrip()
                     for r in rows)


def main(args) -> int:
    rows = run(args)
    if args.json:
        print(json.dumps({"transport": args.transport, "checks": [
            {"check": r.check, "held": r.held, "detail": r.detail} for r in rows]}))
    else:
        print(table(rows))
    return 0 if all(r.held is not False for r in rows) else 1
