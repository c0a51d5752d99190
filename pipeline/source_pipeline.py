"""The source's stage processes and the rings between them, owned by the coordinator.

``SourcePipeline`` creates every ring (the coordinator is their owner and unlinks them), starts
scanner, registrar and poster with plain configs (names, not objects), and gives the coordinator
three things: ``commands`` (to the scanner), ``answers`` (to the registrar) and
``next_requests()`` (from the registrar: REGISTER / COMPRESS / UNREGISTER / DRAINED), plus
``sync()``. Waits are sliced and call the coordinator's ``check`` between slices, and a stage
that exits is a ``StageFailed`` at once. ``close()`` always leaves no process and no segment.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from pipeline.config import MigrationConfig
from pipeline.control import CONTROL_PINNED
from pipeline.protocol.capabilities import DataConnect
from shm.errors import ShmError, StageFailed
from shm.naming import segment_name
from shm.ring import CONSUMER, PRODUCER, Ring
from stages.harness import Inbox, StageProcess, sweep_pids
from stages.records import (
    ANSWER,
    COMMAND,
    COMPLETION_RING,
    REQUEST_RING,
    RUN_RING,
    SYNC_REPLY,
    WRITE_RING,
    Command,
    records,
)
from stages.scanner import GAP_PAGES

SLICE = 0.1
# What an rdma-pipeline destination pins beside its chunks (its control link's buffers): the
# source's default pin budget leaves it out, so that a destination with the same
# RLIMIT_MEMLOCK can hold every chunk the source registers at once.
PEER_CONTROL_PINNED = CONTROL_PINNED
RINGS = {  # name: (dtype, capacity, coordinator's role)
    "commands": (COMMAND, 64, PRODUCER),
    "syncs": (SYNC_REPLY, 64, CONSUMER),
    "runs": (RUN_RING, 1 << 15, None),
    "writes": (WRITE_RING, 1 << 15, None),
    "completions": (COMPLETION_RING, 1 << 14, None),
    "requests": (REQUEST_RING, 1 << 14, CONSUMER),
    "answers": (ANSWER, 1 << 14, PRODUCER),
}

TARGETS = {"scanner": "stages.scanner:scanner_main",
           "registrar": "stages.registrar:registrar_main",
           "poster": "stages.poster:poster_main"}


def prestart() -> None:
    """Start the source's stage interpreters ahead of a migration (``stages.harness.prestart``:
    its setup-time then holds no interpreter start-up); ``stages.harness.discard_spares`` ends
    those a migration did not take."""
    from stages.harness import prestart as start_spares

    start_spares(list(TARGETS.values()))


class SourcePipeline:
    def __init__(self, run_id: str, config: MigrationConfig, guest, *,
                 peer: str | None = None) -> None:
        self.rings: dict[str, Ring] = {}
        self.stages: list[StageProcess] = []
        self.finishing = False
        self._syncs: deque = deque()
        self._requests_done = False
        self.inbox: Inbox | None = None
        self.local_poster: threading.Thread | None = None   # QEMU's version 1: writes here
        self._local: dict = {}                # its figures, or its error
        self.pages = None      # the scanner's page hashes (stages.pagehash.PageTable)
        try:
            for name, (dtype, cap, role) in RINGS.items():
                self.rings[name] = Ring.create(segment_name(run_id, f"r{name[:5]}"), dtype, cap,
                                               role=role)
            from stages.pagehash import PageTable

            self.pages = PageTable.create(segment_name(run_id, "phash"),
                                          [b.nb_pages for b in guest.region.blocks])
        except BaseException:
            self.close()
            raise
        n = {k: r.name for k, r in self.rings.items()}
        region = guest.region.name
        self.scanner = StageProcess("scanner", TARGETS["scanner"], {
            "region": region, "dirty": guest.dirty_source(),
            "chunk_pages": guest.region.chunk_pages,
            "commands": n["commands"], "runs": n["runs"], "syncs": n["syncs"],
            "pagehash": self.pages.name,
            # Under max-bandwidth bytes are what costs: no write carries clean pages (a guest
            # dirtying a third of its pages at random sent 1.4x their bytes with gaps of 2).
            "gap": 0 if config.max_bandwidth else GAP_PAGES})
        self.registrar = StageProcess("registrar", TARGETS["registrar"], {
            "region": region, "transport": config.transport, "pin_all": config.pin_all,
            "peer": peer,       # its PD goes on the device of the route to the destination
            "pin_budget": config.pin_budget, "memlock_limit": config.memlock_limit,
            "odp": config.odp, "pin_reserve": PEER_CONTROL_PINNED,
            "runs": n["runs"], "answers": n["answers"],
            "completions": n["completions"], "writes": n["writes"],
            "requests": n["requests"]})
        self.poster = StageProcess("poster", TARGETS["poster"], {
            "transport": config.transport, "writes": n["writes"],
            "completions": n["completions"], "max_bandwidth": config.max_bandwidth})
        self.stages = [self.scanner, self.registrar, self.poster]
        self.max_bandwidth = config.max_bandwidth

    @property
    def commands(self) -> Ring:
        return self.rings["commands"]

    @property
    def answers(self) -> Ring:
        return self.rings["answers"]

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        for st in self.stages:
            st.start()

    def wait_ready(self, timeout: float) -> None:
        for st in self.stages:
            st.wait_ready(timeout)
        self.inbox = Inbox()
        self.inbox.watch("requests", self.rings["requests"])
        self.inbox.watch("syncs", self.rings["syncs"])

    def connect_poster(self, host: str, port: int, token: int, timeout: float = 15.0) -> None:
        info = self.registrar.info
        self.poster.send("connect", info["pd"], info["path"], host, port,
                         DataConnect(token, 0).encode())
        msg = self.poster.recv(timeout, what="data connection")
        if msg[0] != "connected":
            raise StageFailed("poster", None, f"unexpected message {msg[0]}")

    def post_on_control_qp(self, pd, link) -> None:
        """QEMU's protocol version 1 (no data QP granted): the writes go on the control QP,
        in the registrar's PD (``pd``, its import), posted by a thread of this process; the
        poster process ends unused."""
        self.poster.send("idle")
        code = self.poster.stop(5.0)
        if code != 0:
            raise self.poster.failure()
        self.stages = [self.scanner, self.registrar]
        names = {k: r.name for k, r in self.rings.items()}
        writes_in = Ring.attach(names["writes"], WRITE_RING, role=CONSUMER)
        comps_out = Ring.attach(names["completions"], COMPLETION_RING, role=PRODUCER)
        foreign = link.share_send_cq()
        info = self.registrar.info

        def serve() -> None:
            from stages.poster import serve_writes
            from stages.verbs.proxy import Registrations

            proxy = None if info["pd"] is not None else Registrations(pd, info["path"])
            try:
                # The control QP's send queue (QEMU's 512) less the one control SEND in flight.
                poster = serve_writes(link.qp, link.send_cq, pd, info["pd"], info["path"],
                                      writes_in, comps_out, foreign=foreign,
                                      depth=link.qp_depth - 1,
                                      max_bandwidth=self.max_bandwidth, proxy=proxy)
                self._local["figures"] = {"writes_posted": poster.writes_posted,
                                          "bytes_posted": poster.bytes_posted,
                                          "busy_ns": poster.busy_ns}
            except BaseException as exc:  # noqa: BLE001 - check() raises it
                self._local["error"] = exc
            finally:
                if proxy is not None:
                    proxy.close()
                comps_out.close()
                writes_in.close()

        self.local_poster = threading.Thread(target=serve, name="control-qp-writes",
                                             daemon=True)
        self.local_poster.start()

    def check(self) -> None:
        if self.finishing:
            return
        for st in self.stages:
            st.check()
        if "error" in self._local:
            raise StageFailed("poster", None, f"writes on the control QP: {self._local['error']}")

    def dead_stage(self) -> StageFailed | None:
        """The first stage that failed (an error line or a non-zero exit), if any."""
        for st in self.stages:
            if st.failed:
                return st.failure()
        return None

    # -- traffic -------------------------------------------------------------------------
    def _next(self, check) -> tuple[str, np.ndarray]:
        while True:
            item = self.inbox.get(SLICE)
            if item is None:
                check()
                continue
            name, recs = item
            if isinstance(recs, BaseException):
                check()
                time.sleep(0.3)          # give a dying stage time to report why
                dead = self.dead_stage()
                raise dead if dead is not None else recs
            if len(recs) == 0:
                check()
                raise StageFailed("registrar" if name == "requests" else "scanner", None,
                                  "closed its ring early")
            return name, recs

    def next_requests(self, check) -> np.ndarray:
        while True:
            name, recs = self._next(check)
            if name == "syncs":
                self._syncs.extend(recs)
                continue
            return recs

    def sync(self, r: int, check) -> int:
        """Dirty pages not yet sent, after a dirty-log sync."""
        self.commands.push(records(COMMAND, op=Command.SYNC, round=r))
        while not self._syncs:
            name, recs = self._next(check)
            if name == "syncs":
                self._syncs.extend(recs)
            else:
                raise StageFailed("registrar", None, "sent a request outside a round")
        return int(self._syncs.popleft()["dirty_pages"])

    # -- the end -------------------------------------------------------------------------
    def finish(self, timeout: float) -> None:
        """Stop the stages in order (scanner, registrar, poster all drain) within ``timeout``."""
        self.finishing = True
        self.commands.push(records(COMMAND, op=Command.STOP))
        self.commands.close_write()
        self.answers.close_write()
        deadline = time.monotonic() + timeout
        for st in self.stages:
            code = st.stop(max(0.1, deadline - time.monotonic()))
            if code != 0:
                raise st.failure()
        if self.local_poster is not None:
            self.local_poster.join(max(0.1, deadline - time.monotonic()))
            if "error" in self._local:
                raise StageFailed("poster", None,
                                  f"writes on the control QP: {self._local['error']}")

    def bytes_done(self) -> int:
        """Bytes whose RDMA WRITEs have completed so far, every round (the registrar's note on
        its requests ring, live within a round); 0 once the rings are closed."""
        ring = self.rings.get("requests")
        try:
            return ring.peek_note() if ring is not None else 0
        except (ValueError, ShmError):       # closed meanwhile (another thread's snapshot)
            return 0

    def figures(self) -> dict:
        """The registrar's and the poster's totals, from the figures each sent as it ended."""
        out = {}
        info = getattr(self.registrar, "info", None) or {}
        if info.get("registration"):      # share (PD imported) or proxy (poster registers)
            out.update(registration=info["registration"])
        for (_, fig) in self.registrar.take("figures")[-1:]:
            out.update(registrar_busy_s=fig["busy_ns"] / 1e9,
                       chunks_registered=fig["chunks_registered"],
                       chunks_unregistered=fig["chunks_unregistered"],
                       compress_sent=fig["compress_sent"])
        for (_, fig) in self.poster.take("figures")[-1:] or [(None, self._local.get("figures"))]:
            if fig is None:
                continue
            out.update(poster_busy_s=fig["busy_ns"] / 1e9, writes_posted=fig["writes_posted"],
                       bytes_written=fig["bytes_posted"])
        return out

    def __enter__(self) -> SourcePipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop what still runs, close and unlink every ring (idempotent). The poster goes
        first: it holds imports of the registrar's MRs, which the registrar must deregister."""
        pids = [st.pid for st in self.stages]
        for st in (self.poster, self.registrar, self.scanner):
            st.stop(0.5 if not self.finishing else 2.0)
            st.close()
        sweep_pids(pids)
        stopped = True
        if self.local_poster is not None:
            self.local_poster.join(2.0)      # its rings' producer is gone: it ends
            stopped = not self.local_poster.is_alive()
        if self.inbox is not None:
            stopped = self.inbox.stop()
            self.inbox.close()
            self.inbox = None
        for ring in self.rings.values():
            try:
                if stopped:          # never unmap a ring a thread may still be waiting on
                    ring.close()
            finally:
                ring.unlink()
        self.rings = {}
        if self.pages is not None:
            self.pages.close()
            self.pages.unlink()
            self.pages = None
