"""Our rdma: destination against a replay of QEMU's own source (``qemu_rdma_source``): no
extension granted, a HOOK split over two QEMU FILE messages, the return path's second
connection, REGISTER and COMPRESS as QEMU sends them, an UNREGISTER, no digest and no READY
after EOF, and QEMU's ``-M none`` device sections, which only the VMDESCRIPTION after EOF
describes. The migration completes unverified, says why, tells QEMU SHUT(0) on its return
path, and the RAM equals the source's byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qemu_rdma_source import BLOCKS, QemuRdmaSource, ram

from pipeline.api import free_port
from pipeline.config import MigrationConfig
from pipeline.control import ControlTrace
from pipeline.drivers.rdma_destination import RdmaDestination
from pipeline.protocol.codec import decode
from pipeline.protocol.messages import MessageType
from pipeline.session.states import DestinationState
from pipeline.uri import URI
from shm.naming import new_run_id

pytestmark = pytest.mark.slow
T = MessageType
QEMU_TYPES = set(range(1, 12))      # ERROR .. UNREGISTER FINISHED: version 1's twelve, less NONE


@pytest.mark.parametrize("extensions, return_path", [
    (True, True), (False, True), (True, False)],
    ids=["ours", "x-rdma-extensions=off", "no-return-path"])
def test_qemu_source_migrates_into_our_destination(tmp_path, extensions, return_path):
    port = free_port()
    trace = tmp_path / "dst.jsonl"
    config = MigrationConfig(extensions=extensions)
    driver = RdmaDestination(URI("rdma", "127.0.0.1", port), config, run_id=new_run_id(),
                             accept_timeout=10.0, keep_guest=True,
                             trace=ControlTrace(str(trace)))
    src = QemuRdmaSource(port, return_path=return_path)
    src.start()
    try:
        summary = driver.run()
        assert driver.session.state is DestinationState.COMPLETED, driver.session.reason
        expected = ram()
        for name, _ in BLOCKS:
            got = driver.region.block(name).view
            assert np.array_equal(np.asarray(got), expected[name]), name
        # UNREGISTER found the MR its REGISTER made: vga.vram chunk 0 was registered anew
        # (another rkey), and the destination holds one MR per chunk registered.
        pc, vga, vga_again = (r.results[0].rkey for r in src.replies)
        assert vga_again != vga and len({pc, vga, vga_again}) == 3
        assert sorted(driver.chunk_mrs) == [(0, 0), (1, 0)]
        assert driver.chunk_mrs[(1, 0)].rkey == vga_again
    finally:
        src.stop.set()
        src.join(15.0)
        driver.stop_guest()
    assert src.error is None, repr(src.error)
    assert src.shut == (0 if return_path else None)
    # QEMU's -M none: its RAM recorded, its device sections read by the VMDESCRIPTION, no
    # guest of ours to run
    assert summary["verified"] is None and driver.session.machine == "none"
    assert "machine type 'none'" in summary["verification"] and "no guest resumed" in \
        summary["verification"]
    assert "resumed" not in driver.guest_report
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    msgs = [(x["dir"], decode(bytes.fromhex(x["hex"]))) for x in lines]
    assert {m.TYPE for _, m in msgs} <= QEMU_TYPES
    for _, m in msgs:
        if m.TYPE is T.REGISTER_RESULT:
            assert m.repeat == 1 and len(m.results) == 1
    # Nothing after the stream's end: the last message is QEMU's last QEMU FILE.
    assert msgs[-1][0] == "recv" and msgs[-1][1].TYPE is T.QEMU_FILE
