"""``tcp:``: pre-copy live migration with pages inline, source and destination processes on this
machine; the same verification and failure rules as ``rdma:``."""

import functools
import subprocess
import sys

import migration_helpers
import pytest
from faulty_destination import FAULTY
from migration_helpers import MIB, assert_completed

from pipeline.api import free_port
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState

pytestmark = pytest.mark.slow
migrate = functools.partial(migration_helpers.migrate, scheme="tcp")
run_until = functools.partial(migration_helpers.run_until, scheme="tcp", status="failed",
                              when=lambda st: st["ram"]["transferred"] > 4 * MIB)


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
    summary, running = migrate(state=GuestState(dirty_rate=2 * MIB), dest_entry=FAULTY,
                                dest_options={"corrupt": (0, 300)})
    assert summary["status"] == "failed" and summary["verified"] is False
    desc = summary["destination"]["error-desc"]
    assert "verification failed" in desc and "pc.ram chunk 1" in desc and "stream bytes" in desc
    assert running                                          # the source guest runs on




def test_destination_killed():
    s = run_until(lambda lr: lr.dest.kill())
    assert "connection" in s["error-desc"] or "destination" in s["error-desc"]


def test_cancel():
    s = run_until(lambda lr: lr.migration.cancel(), status="cancelled")
    assert s["destination"]["status"] in ("failed", "cancelled")


@pytest.mark.parametrize("kind", ["disconnect", "malformed"])
def test_connection_cut_or_malformed_return_path(kind):
    s = run_until(lambda lr: None, dest_entry=FAULTY,
                  dest_options={"fault": {"kind": kind, "window": 2}})
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
