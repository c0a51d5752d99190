"""An ``rdma:`` run's migration stream (the QEMU FILE payloads of its control trace, put back
together) reads with the same independent reader as a ``file:`` stream: every ram section
holds a HOOK (pages then travel by RDMA WRITE) and its EOS, and the device sections print
through the VMDESCRIPTION."""

import json

import pytest
from qemu_stream_reader import END, FULL, PART, START, read_stream

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState
from pipeline.protocol.codec import decode
from pipeline.protocol.messages import QemuFileMessage

pytestmark = pytest.mark.slow
MIB = 1 << 20


def test_rdma_stream_reads_up_to_the_hook_of_each_iteration(tmp_path):
    trace = tmp_path / "trace.jsonl"
    cfg = MigrationConfig(trace_control=str(trace))
    with LocalRun(16 * MIB, cfg, state=GuestState(dirty_rate=4 * MIB)) as lr:
        lr.start()
        summary = lr.finish()
    assert summary["status"] == "completed", summary.get("error-desc")
    sent = [decode(bytes.fromhex(json.loads(line)["hex"]))
            for line in trace.read_text().splitlines() if '"send"' in line]
    stream = b"".join(m.data for m in sent if isinstance(m, QemuFileMessage))
    dump = read_stream(stream, rdma=True)
    assert dump.machine == "rdma-pipeline"
    ram = [s for s in dump.sections if s.name == "ram"]
    rounds = summary["round"] - 1                  # "round" counts the END round too
    assert [s.kind for s in ram] == [START] + [PART] * rounds + [END]
    assert ram[0].records[0][0] == "mem_size"
    for s in ram:
        # every iteration: its HOOK, then (the window's pages went by RDMA) its EOS
        assert [r[0] for r in s.records if r[0] != "mem_size"] == ["hook", "eos"]
    assert {b: len(m) for b, m in dump.blocks.items()} == {"pc.ram": 16 * MIB,
                                                           "vga.vram": 256 * 1024}
    devices = [s for s in dump.sections if s.kind == FULL]
    assert [d.name for d in devices[-3:]] == ["rdp-synthetic-guest", "rdp-ram-digest",
                                              "rdp-device-digest"]
    # per-round sections (which pages a round sent): one instance per round, each described
    rounds = devices[:-3]
    assert {d.name for d in rounds} <= {"rdp-round-pages"}
    assert [d.instance_id for d in rounds] == list(range(1, len(rounds) + 1))
    assert all(d.fields["size"] == len(d.fields["pages"]) for d in rounds)
    state = json.loads(devices[-3].fields["state"])
    print("device", devices[-3].name, "through VMDESCRIPTION:", state)
    assert state["dirty_rate"] == 4 * MIB and state["pages_written"] > 0
