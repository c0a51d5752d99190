"""``tcp:``: pre-copy live migration with pages inline, source and destination processes on this
machine; the same verification and failure rules as ``rdma:``."""

import subprocess
import sys
import time

import pytest

from pipeline.api import LocalRun, free_port
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState

pytestmark = pytest.mark.slow
MIB = 1 << 20


def migrate(ram=32 * MIB, config=None, state=None, **kw):
    with LocalRun(ram, config or MigrationConfig(), state=state or GuestState(), scheme="tcp",
                  **kw) as lr:
        lr.start()
        summary = lr.finish()
        running = lr.guest_running()
    return summary, running


def assert_completed(summary):
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["verified"] is True
    assert summary["destination"]["status"] == "completed"
    assert summary["ram"]["remaining"] == 0
    assert summary["downtime"] > 0


def test_idle_guest():
    summary, _ = migrate(state=GuestState(dirty_rate=0, zero_share=0.3))
    assert_completed(summary)
    ram = summary["ram"]
    pages = ram["total"] // 4096
    assert ram["total"] == 32 * MIB + 256 * 1024
    assert ram["normal"] + ram["duplicate"] == pages          # each page once: idle guest
    assert ram["duplicate"] > pages // 2                       # unfilled half, zero pages
    # pages inline: 8 + 4096 per normal page, 9 per zero page, a few KiB of the rest
    inline = ram["normal"] * 4104 + ram["duplicate"] * 9
    assert inline < ram["transferred"] < inline + 64 * 1024
    assert summary["stages"]["scanner"]["pages-scanned"] == pages


def test_busy_guest_converges_within_downtime_limit():
    cfg = MigrationConfig().with_options([], ["downtime-limit=300"])
    summary, running = migrate(64 * MIB, cfg, GuestState(dirty_rate=30 * MIB, seed=7))
    assert_completed(summary)
    assert summary["ram"]["dirty-sync-count"] >= 1
    assert summary["expected-downtime"] <= 300
    assert summary["ram"]["normal"] + summary["ram"]["duplicate"] > 64 * MIB // 4096
    assert not running                                      # source guest stays paused


def test_corrupted_destination_page_fails_verification():
    summary, running = migrate(state=GuestState(dirty_rate=2 * MIB), corrupt=(0, 300))
    assert summary["status"] == "failed" and summary["verified"] is False
    desc = summary["destination"]["error-desc"]
    assert "verification failed" in desc and "pc.ram chunk 1" in desc and "stream bytes" in desc
    assert running                                          # the source guest runs on


SLOW = MigrationConfig().with_options([], ["max-bandwidth=16M"])    # ~2 s for 32 MiB


def run_until(action, *, when=lambda st: st["ram"]["transferred"] > 4 * MIB, status="failed",
              **kw):
    with LocalRun(32 * MIB, SLOW, state=GuestState(dirty_rate=4 * MIB), scheme="tcp",
                  **kw) as lr:
        mig = lr.start()
        deadline = time.monotonic() + 30
        acted = False
        while not mig.done and time.monotonic() < deadline:
            if not acted and when(mig.stats()):
                action(lr)
                acted = True
            time.sleep(0.02)
        summary = lr.finish()
        running = lr.guest_running()
        dest_states = [s for s, _ in lr.dest_states]
    assert "completed" not in dest_states, "the destination resumed"
    assert summary["status"] == status
    assert summary.get("error-desc") and "\n" not in summary["error-desc"]
    assert running, "the source guest stopped dirtying memory"
    return summary


def test_destination_killed():
    s = run_until(lambda lr: lr.dest.kill())
    assert "connection" in s["error-desc"] or "destination" in s["error-desc"]


def test_cancel():
    s = run_until(lambda lr: lr.migration.cancel(), status="cancelled")
    assert s["destination"]["status"] in ("failed", "cancelled")


@pytest.mark.parametrize("kind", ["disconnect", "malformed"])
def test_connection_cut_or_malformed_return_path(kind):
    s = run_until(lambda lr: None, fault={"kind": kind, "window": 2})
    assert ("connection" in s["error-desc"] if kind == "disconnect"
            else "return path" in s["error-desc"]), s["error-desc"]


def test_nobody_listening_and_bad_uris():
    cli = [sys.executable, "-m", "pipeline", "migrate", "--ram", "4M", "--dirty-rate", "0"]
    port = free_port()
    res = subprocess.run([*cli, f"tcp:127.0.0.1:{port}"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and "cannot connect" in res.stderr
    for bad in ("tcp:127.0.0.1", "tcp:[::1:4444", "tcp:host:99999", "file:"):
        res = subprocess.run([*cli, bad], capture_output=True, text=True, timeout=60)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "URI" in lines[0], res.stderr


def test_the_destinations_reason_reaches_the_source():
    summary, running = migrate(dest_blocks=[("pc.ram", 16 * MIB), ("vga.vram", 256 * 1024)])
    assert summary["status"] == "failed"
    assert summary["error-desc"].startswith("the destination failed the migration: ram blocks "
                                            "mismatch"), summary["error-desc"]
    assert running
