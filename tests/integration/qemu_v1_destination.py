"""A destination that speaks QEMU's rdma: protocol version 1 alone, for the tests of our
source against it: the production driver with ``x-rdma-extensions=off`` (it grants pin-all
at most, as QEMU's destination masks every other flag), which reports the SHA-256 of each RAM
block as it ends, so a test can compare its RAM with the source's byte for byte (nothing else
verifies it: version 1 carries no digest). ``LocalRun(dest_entry=QEMU_V1)``."""

from __future__ import annotations

import hashlib

from pipeline.drivers.incoming_main import incoming_main
from pipeline.drivers.rdma_destination import RdmaDestination

QEMU_V1 = "qemu_v1_destination:qemu_v1_main"


class HashingRdma(RdmaDestination):
    ram_sha256: dict | None = None

    def _close_region(self) -> None:
        if self.region is not None and self.ram_sha256 is None:
            self.ram_sha256 = {b.idstr: hashlib.sha256(b.view).hexdigest()
                               for b in self.region.blocks}
        super()._close_region()

    def summary(self) -> dict:
        out = super().summary()
        if self.ram_sha256 is not None:
            out["ram-sha256"] = self.ram_sha256
        out["data-qps"] = len(self.data_qps)
        return out


def qemu_v1_main(config: dict, link) -> int:
    config["config"] = {**config["config"], "extensions": False}
    return incoming_main(config, link, driver=HashingRdma)
