"""Guest and scanner as real processes over real shared memory (no transport needed)."""

import time

import numpy as np
import pytest

from pipeline.guest.synthetic import GuestState
from shm.dirtylog import DirtyLog
from shm.naming import new_run_id, segment_name
from shm.region import RamBlockSpec, RamRegion
from shm.ring import CONSUMER, PRODUCER, Ring
from stages.harness import StageProcess
from stages.records import (
    COMMAND,
    RUN,
    RUN_RING,
    SCAN_END,
    SYNC_REPLY,
    Command,
    RunOp,
    records,
)

pytestmark = pytest.mark.slow
MIB = 1 << 20


def drain_round(ring):
    out = []
    while True:
        recs = ring.pop(4096, timeout=10)
        out.append(recs)
        if len(recs) and recs[-1]["op"] == RunOp.END:
            return np.concatenate(out)


def test_guest_and_scanner_processes():
    run_id = new_run_id()
    with RamRegion.create(run_id, [RamBlockSpec("pc.ram", 8 * MIB),
                                   RamBlockSpec("vga.vram", MIB // 4)]) as region, \
            DirtyLog.create(run_id, region) as log, \
            Ring.create(segment_name(run_id, "cmd"), COMMAND, 16,
                        role=PRODUCER) as cmds, \
            Ring.create(segment_name(run_id, "runs"), RUN_RING, 4096, role=CONSUMER) as runs, \
            Ring.create(segment_name(run_id, "sync"), SYNC_REPLY, 16, role=CONSUMER) as syncs:
        state = GuestState(seed=3, dirty_rate=20 * MIB, zero_share=0.25)
        guest = StageProcess("guest", "pipeline.guest.synthetic:guest_main",
                             {"region": region.name, "dirtylog": log.name,
                              "state": state.__dict__, "fill": 0.5}).start()
        scanner = StageProcess("scanner", "stages.scanner:scanner_main",
                               {"region": region.name, "dirtylog": log.name,
                                "chunk_pages": region.chunk_pages, "commands": cmds.name,
                                "runs": runs.name, "syncs": syncs.name}).start()
        try:
            guest.wait_ready(30)
            scanner.wait_ready(30)
            cmds.push(records(COMMAND, op=Command.ROUND, round=1))
            first = drain_round(runs)
            end = first[-1].view(SCAN_END)
            dirty, zero = int(end["dirty_pages"]), int(end["zero_pages"])
            assert dirty == region.total_length // 4096                     # all of RAM
            # every data page crosses; zero pages the destination holds already do not
            sent = int(first[:-1].view(RUN)["n_pages"].sum())
            assert 0 < zero < dirty and dirty - zero <= sent < dirty
            time.sleep(0.2)
            cmds.push(records(COMMAND, op=Command.SYNC, round=1))
            assert syncs.pop(1, timeout=10)[0]["dirty_pages"] > 0          # the guest writes
            guest.send("pause")
            paused = guest.recv(10)
            assert paused[0] == "paused"
            cmds.push(records(COMMAND, op=Command.ROUND, round=2))
            drain_round(runs)
            cmds.push(records(COMMAND, op=Command.ROUND, round=3))
            assert drain_round(runs)[-1].view(SCAN_END)["dirty_pages"] == 0  # paused: quiet
            guest.send("resume")
            assert guest.recv(10)[0] == "resumed"
            guest.send("state")
            st = guest.recv(10)[1]
            assert st["pages_written"] >= paused[1]["pages_written"]
            cmds.push(records(COMMAND, op=Command.STOP))
            assert len(runs.pop(10, timeout=10)) == 0                      # end of stream
            guest.send("stop")
            assert guest.recv(10)[0] == "stopped"
            assert scanner.stop(5) == 0 and guest.stop(5) == 0
        finally:
            scanner.close()
            guest.close()
            region.unlink()
            log.unlink()
