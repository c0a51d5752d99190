"""Whole migrations on the soft provider: guest, source stages, destination process."""

import json

import pytest
from faulty_destination import FAULTY
from migration_helpers import MIB, assert_completed, migrate

from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState
from pipeline.protocol.codec import decode
from pipeline.protocol.messages import MessageType, QemuFileMessage
from pipeline.protocol.records import HOOK_RECORD

pytestmark = pytest.mark.slow


def test_idle_guest():
    summary, _ = migrate(state=GuestState(dirty_rate=0))
    assert_completed(summary)
    ram = summary["ram"]
    assert ram["total"] == 32 * MIB + 256 * 1024          # two RAM blocks
    assert ram["normal"] + ram["duplicate"] >= ram["total"] // 4096
    assert summary["stages"]["scanner"]["pages-scanned"] >= ram["total"] // 4096


def test_busy_guest_converges_within_downtime_limit():
    cfg = MigrationConfig().with_options([], ["downtime-limit=300"])
    summary, running = migrate(64 * MIB, cfg, GuestState(dirty_rate=30 * MIB, seed=7))
    assert_completed(summary)
    assert summary["ram"]["dirty-sync-count"] >= 1
    assert summary["expected-downtime"] <= 300
    pages = summary["ram"]["total"] // 4096
    assert summary["stages"]["scanner"]["pages-scanned"] > pages   # re-sent dirtied pages
    # what crossed: every data page, but not the zero pages the destination held already
    ram = summary["ram"]
    assert ram["normal-bytes"] <= ram["transferred"] < (ram["normal"] + ram["duplicate"]) * 4096
    assert not running                                      # source guest stays paused


@pytest.mark.parametrize("chunk", [1 * MIB, 4 * MIB])
@pytest.mark.parametrize("pin_all", [False, True])
def test_chunk_sizes_and_pin_all(chunk, pin_all, tmp_path):
    trace = tmp_path / "trace.jsonl"
    cfg = MigrationConfig(chunk_size=chunk, trace_control=str(trace)).with_options(
        [f"rdma-pin-all={'on' if pin_all else 'off'}"], [])
    summary, _ = migrate(32 * MIB, cfg, GuestState(dirty_rate=5 * MIB, zero_share=0.3))
    assert_completed(summary)
    types = [decode(bytes.fromhex(json.loads(line)["hex"])).TYPE
             for line in trace.read_text().splitlines()[2:]]
    regs = types.count(MessageType.REGISTER_REQUEST)
    if pin_all:
        assert regs == 0          # zero runs still go as COMPRESS: never written, pin-all or not
        assert summary["stages"]["registrar"]["chunks-registered"] == 2   # one MR per block
    else:
        assert regs >= 1


def test_control_trace_decodes_and_windows_are_closed(tmp_path):
    trace = tmp_path / "trace.jsonl"
    cfg = MigrationConfig(trace_control=str(trace))
    summary, _ = migrate(32 * MIB, cfg, GuestState(dirty_rate=10 * MIB))
    assert_completed(summary)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [x["dir"] for x in lines[:2]] == ["connect", "accepted"]   # the private data
    lines = lines[2:]
    assert {x["dir"] for x in lines} == {"send", "recv"}
    assert all(a["t"] <= b["t"] for a, b in zip(lines, lines[1:], strict=False))
    sent = [decode(bytes.fromhex(x["hex"])) for x in lines if x["dir"] == "send"]
    assert sent[-1].TYPE is MessageType.COMMIT        # the last word: the source committed
    in_window, windows = False, 0
    for msg in sent[:-1]:
        if in_window:
            assert msg.TYPE is not MessageType.QEMU_FILE, "QEMU FILE inside a window"
            if msg.TYPE is MessageType.REGISTER_FINISHED:
                in_window = False
        elif isinstance(msg, QemuFileMessage) and msg.data.endswith(HOOK_RECORD):
            in_window, windows = True, windows + 1
        else:
            assert msg.TYPE is MessageType.QEMU_FILE
    assert not in_window and windows == summary["round"] + 1   # SETUP + every round
    # Before the pause, the last round's page bitmap goes in a message of its own (no HOOK),
    # and the source waits for its READY, which the destination grants once every round is
    # hashed: only then does the final round's message (its SECTION_END and HOOK) follow.
    msgs = [(x["dir"], decode(bytes.fromhex(x["hex"]))) for x in lines]
    hooks = [k for k, (d, m) in enumerate(msgs) if d == "send"
             and isinstance(m, QemuFileMessage) and m.data.endswith(HOOK_RECORD)]
    final = hooks[-1]                                   # the final round's SECTION_END + HOOK
    before = [m for d, m in msgs[:final] if d == "send"][-1]
    assert isinstance(before, QemuFileMessage) and b"rdp-round-pages" in before.data
    assert not before.data.endswith(HOOK_RECORD)
    assert msgs[final - 1][0] == "recv" and msgs[final - 1][1].TYPE is MessageType.READY


def test_corrupted_destination_page_fails_verification():
    summary, running = migrate(state=GuestState(dirty_rate=2 * MIB), dest_entry=FAULTY,
                                dest_options={"corrupt": (1, 3)})
    assert summary["status"] == "failed"
    assert summary["verified"] is False
    assert "verification failed" in summary["destination"]["error-desc"]
    assert "vga.vram chunk 0" in summary["destination"]["error-desc"]
    assert running                                          # the source guest runs on


def test_auto_converge_throttles_a_guest_dirtying_near_the_link_rate():
    # 90 % of a 2 MB/s link: the guest is throttled (its write rate) until it converges
    cfg = MigrationConfig().with_options(["auto-converge=on"], ["max-bandwidth=2M"])
    summary, running = migrate(8 * MIB, cfg, GuestState(dirty_rate=1_800_000, seed=3))
    assert_completed(summary)
    assert summary["cpu-throttle-percentage"] >= 20
    assert summary["ram"]["dirty-sync-count"] >= 2
    assert not running
