"""Our rdma: source against a destination that speaks QEMU's protocol version 1 alone
(``x-rdma-extensions=off``, as QEMU's destination: every flag but pin-all masked): the source
falls back to version 1 (one QP, one registration per message, 1 MiB chunks, no digest, no
round sections, no READY after EOF), completes, says the RAM was not verified and why, and
the destination's RAM equals the paused source's byte for byte. The control trace holds
QEMU's version 1 only."""

import hashlib
import json
import os
import signal
import struct

import pytest
from qemu_v1_destination import QEMU_V1

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState
from pipeline.protocol.codec import decode
from pipeline.protocol.messages import MessageType
from pipeline.protocol.records import HOOK_RECORD
from pipeline.sections import DEVICES_SECTION, DIGEST_SECTION, ROUND_SECTION

pytestmark = pytest.mark.slow
MIB = 1 << 20
T = MessageType


@pytest.mark.parametrize("options", [[], ["x-rdma-extensions=off"], ["rdma-pin-all=on"]],
                         ids=["asks-extensions", "extensions-off", "pin-all"])
def test_our_source_meets_a_qemu_v1_destination(tmp_path, options):
    trace = tmp_path / "trace.jsonl"
    cfg = MigrationConfig(trace_control=str(trace)).with_options(options, [])
    # A busy guest: rounds of scattered one-page writes, more than the one QP's 512 in flight.
    with LocalRun(64 * MIB, cfg, state=GuestState(dirty_rate=30 * MIB, zero_share=0.3, seed=7),
                  dest_entry=QEMU_V1) as lr:
        lr.start()
        summary = lr.finish()
        assert not lr.guest_running()
        source_ram = {b.idstr: hashlib.sha256(b.view).hexdigest()
                      for b in lr.guest.region.blocks}
        dest = lr.dest_result
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["destination"]["status"] == "completed"
    assert summary["verified"] is None and dest["verified"] is None
    assert "not verified" in summary["verification"] and "version 1" in dest["verification"]
    assert dest["ram-sha256"] == source_ram
    assert dest["data-qps"] == 0                             # the writes came on the one QP
    assert summary["ram"]["dirty-sync-count"] >= 1           # several rounds, one QP
    assert summary["stages"]["poster"]["writes-posted"] > 512

    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    connect, accepted = (bytes.fromhex(x["hex"]) for x in lines[:2])
    assert struct.unpack(">II", connect[:8])[0] == 1
    pin = 1 if "rdma-pin-all=on" in options else 0
    assert accepted == struct.pack(">II", 1, pin)            # QEMU's 8 bytes, masked
    if "x-rdma-extensions=off" in options:
        assert connect == struct.pack(">II", 1, 0)
    msgs = [(x["dir"], decode(bytes.fromhex(x["hex"]))) for x in lines[2:]]
    assert {m.TYPE for _, m in msgs} <= set(T) - {T.NONE}
    stream = b"".join(m.data for d, m in msgs if d == "send" and m.TYPE is T.QEMU_FILE)
    for name in (DIGEST_SECTION, ROUND_SECTION, DEVICES_SECTION):
        assert name.encode() not in stream, name
    for _, m in msgs:
        if m.TYPE in (T.REGISTER_REQUEST, T.UNREGISTER_REQUEST):
            assert m.repeat == 1
        if m.TYPE is T.QEMU_FILE:
            assert len(m.data) <= 32768
    if pin:
        assert not [m for _, m in msgs if m.TYPE is T.REGISTER_REQUEST]
    else:
        assert [m for _, m in msgs if m.TYPE is T.REGISTER_REQUEST]
    # The end: the last QEMU FILE (EOF, VMDESCRIPTION) and nothing after it, no READY awaited.
    last_file = max(k for k, (d, m) in enumerate(msgs) if m.TYPE is T.QEMU_FILE)
    assert msgs[last_file][0] == "send" and not msgs[last_file][1].data.endswith(HOOK_RECORD)
    assert last_file == len(msgs) - 1


V1_SLOW = MigrationConfig().with_options(["x-rdma-extensions=off"], ["max-bandwidth=16M"])


@pytest.mark.parametrize("how", ["destination killed", "connection cut", "registrar killed"])
def test_a_version_1_migration_that_fails_leaves_nothing(how):
    # The writes on the control QP come from a thread of the source: a failure ends it too.
    from faulty_destination import FAULTY
    from migration_helpers import run_until

    def act(lr):
        if how == "destination killed":
            lr.dest.kill()
        elif how == "registrar killed":
            os.kill(lr.migration.source.pipeline.registrar.pid, signal.SIGKILL)

    kw = {"dest_entry": FAULTY,
          "dest_options": {"fault": {"kind": "disconnect", "window": 2}}} \
        if how == "connection cut" else {}
    s = run_until(act, config=V1_SLOW, when=lambda st: st["ram"]["transferred"] > 4 * MIB,
                  **kw)
    assert s["status"] == "failed"
