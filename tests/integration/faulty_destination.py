"""Destinations that misbehave on purpose, for the failure tests: the production drivers with
one step overridden. ``LocalRun(dest_entry=FAULTY, dest_options={...})`` runs one as the
destination process (spawned children import this module through the sys.path they inherit).

    {"corrupt": [block, page]}                 damage one page of RAM just before verification
    {"fault": {"kind": k, "window": n}}        at registration window n (rdma:) or ram section
                                               n (tcp:, 1 = START): "disconnect" cuts the
                                               connection, "malformed" sends bytes no
                                               destination sends; then it waits to be stopped
    {"slow_confirm": s}                        rdma: wait s seconds between verifying the RAM
                                               and its READY after EOF (the commit point)
"""

from __future__ import annotations

import functools
import socket

import numpy as np

from pipeline.drivers.incoming_main import incoming_main
from pipeline.drivers.rdma_destination import RdmaDestination
from pipeline.drivers.stream_destination import StreamDestination
from pipeline.protocol.records import RAM_IDSTR, SectionHeader
from pipeline.session import destination_events as de
from shm.errors import MigrationError

FAULTY = "faulty_destination:faulty_main"
FAULT_WAIT_S = 30.0


class _Faulty:
    """What both faulty drivers share: the options, and the page damage."""

    def __init__(self, uri, config, *, options: dict, **kw) -> None:
        self.corrupt = tuple(options["corrupt"]) if options.get("corrupt") else None
        self.fault = options.get("fault") or {}
        self.slow_confirm = float(options.get("slow_confirm", 0))
        super().__init__(uri, config, **kw)

    def _damage(self) -> tuple[str, int] | None:
        """Flip a byte of the page ``corrupt`` names; (its block, page)."""
        if self.corrupt is None:
            return None
        b, page = self.corrupt
        blk = self.region.blocks[b]
        blk.view[page * 4096] ^= 0xFF
        return blk.idstr, page

    def _misbehave(self, kind: str) -> None:
        self.cancel.wait(FAULT_WAIT_S)
        raise MigrationError(f"test fault {kind} injected")


class FaultyRdma(_Faulty, RdmaDestination):
    def _hash_ram(self, a: de.HashRam):
        damaged = self._damage()
        if damaged is not None:       # as if the final round's write had brought it
            name, page = damaged
            self.hasher_for(a.blocks).submit([np.array([page] if n == name else [], np.int64)
                                              for n in self._hash_names])
        return super()._hash_ram(a)

    def _open_window(self, a: de.OpenWindow):
        super()._open_window(a)
        if self.fault.get("window") == self.link.channel.windows:
            if self.fault["kind"] == "disconnect":
                self.link.qp.disconnect()          # the connection is cut
            elif self.fault["kind"] == "malformed":
                self.link.post_recvs()
                self.link.transmit(b"\x00\x00\x00\x05\x00\x00\x00\x02bad")   # READY, len 5
            self._misbehave(self.fault["kind"])

    def _confirm(self, a: de.Confirm):
        self.cancel.wait(self.slow_confirm)
        return super()._confirm(a)

    CARRY = {**RdmaDestination.CARRY, de.HashRam: _hash_ram, de.OpenWindow: _open_window,
             de.Confirm: _confirm}


class FaultyStream(_Faulty, StreamDestination):
    ram_sections = 0

    def _hash_ram(self, a: de.HashRam):
        damaged = self._damage()
        if damaged is not None:       # as if a write had brought it
            name, page = damaged
            self.landed[name][page] = True
            self._submit_landed(a.blocks)
        return super()._hash_ram(a)

    def _read_stream(self, a: de.ReadStream):
        event = super()._read_stream(a)
        rec = getattr(event, "record", None)
        if isinstance(rec, SectionHeader) and rec.idstr == RAM_IDSTR:
            self.ram_sections += 1
            if self.fault.get("window") == self.ram_sections:
                if self.fault["kind"] == "disconnect":
                    self.source.sock.shutdown(socket.SHUT_RDWR)
                elif self.fault["kind"] == "malformed":
                    self.source.sock.sendall(bytes.fromhex("0009 0000"))   # no such message
                self._misbehave(self.fault["kind"])
        return event

    CARRY = {**StreamDestination.CARRY, de.HashRam: _hash_ram, de.ReadStream: _read_stream}


def faulty_main(config: dict, link) -> int:
    """Stage-process entry: ``incoming_main`` with a faulty driver (``config["options"]``)."""
    cls = FaultyRdma if config.get("scheme", "rdma") == "rdma" else FaultyStream
    return incoming_main(config, link,
                         driver=functools.partial(cls, options=config.get("options") or {}))
