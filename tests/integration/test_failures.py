"""Every way a migration can fail: it ends failed or cancelled with one line saying why, the
source guest still running and dirtying, the destination not resumed, nothing left behind (the
suite's leak fixture checks processes and /dev/shm after each test)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from faulty_destination import FAULTY
from migration_helpers import MIB, run_until

from pipeline.api import LocalRun
from pipeline.config import MigrationConfig
from pipeline.guest.synthetic import GuestState

pytestmark = pytest.mark.slow


def test_destination_killed():
    s = run_until(lambda lr: lr.dest.kill(),
                  when=lambda st: st["ram"]["transferred"] > 4 * MIB)
    assert s["status"] == "failed"


@pytest.mark.parametrize("stage", ["scanner", "registrar", "poster"])
def test_stage_killed(stage):
    def kill(lr):
        proc = getattr(lr.migration.source.pipeline, stage)
        os.kill(proc.pid, signal.SIGKILL)

    t0 = time.monotonic()
    s = run_until(kill, when=lambda st: st["ram"]["transferred"] > 4 * MIB)
    assert s["status"] == "failed"
    assert stage in s["error-desc"] or "ring" in s["error-desc"]
    assert time.monotonic() - t0 < 20


def test_connection_cut():
    s = run_until(lambda lr: None, dest_entry=FAULTY,
                  dest_options={"fault": {"kind": "disconnect", "window": 2}})
    assert s["status"] == "failed"


def test_malformed_control_message():
    s = run_until(lambda lr: None, dest_entry=FAULTY,
                  dest_options={"fault": {"kind": "malformed", "window": 2}})
    assert s["status"] == "failed"


def test_ram_blocks_mismatch():
    s = run_until(lambda lr: None, dest_blocks=[("pc.ram", 16 * MIB), ("vga.vram", 256 * 1024)])
    assert "ram blocks mismatch" in s["error-desc"]


def test_mlock_limit_too_low_for_pin_all():
    # on demand (ODP) pin-all pins nothing: only x-odp=off meets the limit
    cfg = MigrationConfig().with_options(["rdma-pin-all=on", "x-odp=off"],
                                         ["x-memlock-limit=4M"])
    s = run_until(lambda lr: None, config=cfg)
    assert "RLIMIT_MEMLOCK" in s["error-desc"]


def test_cancel():
    s = run_until(lambda lr: lr.migration.cancel(),
                  when=lambda st: st["ram"]["transferred"] > 2 * MIB)
    assert s["status"] == "cancelled"


def test_ctrl_c_on_run_command():
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--ram", "64M",
                             "--parameter", "max-bandwidth=8M", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert '"status": "cancelled"' in out


@pytest.mark.parametrize("argv", [
    ["migrate", "rdma:nohost"],
    ["migrate", "tcp:1.2.3.4"],
    ["run", "--uri", "file:/tmp/x"],
    ["run", "--capability", "rdma-pin-all=perhaps"],
    ["run", "--parameter", "downtime-limit=-5"],
    ["run", "--chunk-size", "3M"],
    ["run", "--ram", "1000"],
    ["incoming", "rdma::4444", "--parameter", "bogus=1"],
])
def test_wrong_uri_or_option_refused_before_start(argv):
    proc = subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() and len(proc.stderr.strip().splitlines()) == 1


def test_guest_faster_than_the_link_never_converges():
    cfg = MigrationConfig().with_options([], ["max-bandwidth=8M", "x-max-rounds=3",
                                              "downtime-limit=50"])
    with LocalRun(16 * MIB, cfg, state=GuestState(dirty_rate=40 * MIB)) as lr:
        lr.start()
        s = lr.finish()
        assert lr.guest_running()
    assert s["status"] == "failed"
    assert "did not converge after 3 rounds" in s["error-desc"]
    assert s["round"] == 3


@pytest.mark.parametrize("stage", ["scanner", "registrar", "poster"])
def test_a_stage_killed_while_the_confirmation_is_on_its_way_changes_nothing(stage):
    """Everything is sent and the destination resumed the guest: a stage dying then must not
    make the source resume its own (two guests: 11 of 11 trials before the commit point)."""
    with LocalRun(16 * MIB, MigrationConfig(), state=GuestState(dirty_rate=2 * MIB),
                  dest_entry=FAULTY, dest_options={"slow_confirm": 2.0}) as lr:
        mig = lr.start()
        deadline = time.monotonic() + 30
        while not mig.source.confirming and not mig.done and time.monotonic() < deadline:
            mig.finished(0.01)
        assert mig.source.confirming, mig.stats().get("error-desc")
        os.kill(getattr(mig.source.pipeline, stage).pid, signal.SIGKILL)
        summary = lr.finish()
        source_runs = lr.guest_running()
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["destination"]["status"] == "completed"
    assert not source_runs                       # the destination runs the guest, alone
    assert "warning" in summary                  # the stopped stage, after completion


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_failed_run_says_why_once(as_json):
    """One line on stderr and nothing on stdout; with --json the whole summary (the reason
    in it) and nothing on stderr."""
    argv = [sys.executable, "-m", "pipeline", "run", "--ram", "32M", "--dirty-rate", "2000",
            "--parameter", "x-max-rounds=1", "--parameter", "downtime-limit=1"]
    done = subprocess.run(argv + (["--json"] if as_json else []), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    if as_json:
        summary = json.loads(done.stdout)
        assert summary["status"] == "failed" and "did not converge" in summary["error-desc"]
        assert done.stderr == ""
    else:
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1
        assert done.stderr.startswith("rdma-pipeline run: migration failed: did not converge")
