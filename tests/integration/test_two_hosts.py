"""`incoming` and `migrate` as two commands, as on two hosts (here over loopback)."""

import json
import subprocess
import sys
import time

import pytest

from pipeline.api import free_port

pytestmark = pytest.mark.slow


def test_incoming_and_migrate_commands():
    uri = f"rdma:127.0.0.1:{free_port()}"
    dest = subprocess.Popen([sys.executable, "-m", "pipeline", "incoming", uri, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        src = subprocess.run([sys.executable, "-m", "pipeline", "migrate", uri, "--ram", "32M",
                              "--dirty-rate", "5", "--capability", "rdma-pin-all=on",
                              "--json"], capture_output=True, text=True, timeout=60)
        out, err = dest.communicate(timeout=30)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    assert src.returncode == 0, src.stderr
    s, d = json.loads(src.stdout), json.loads(out)
    assert s["status"] == "completed" and s["verified"] is True
    assert d["status"] == "completed" and d["verified"] is True
    assert d["ram"]["total"] == s["ram"]["total"]
    # the destination counts what crossed too (the stream, and the WRITEs that landed): the
    # source's figure less its control messages
    assert 0.99 * s["ram"]["transferred"] <= d["ram"]["transferred"] <= s["ram"]["transferred"]


def test_the_source_says_why_the_destination_failed():
    """rdma:'s ERROR carries no reason in QEMU; between two of ours it says why, so the
    source's one line names the destination's cause, as tcp:'s return path does."""
    uri = f"rdma:127.0.0.1:{free_port()}"
    dest = subprocess.Popen([sys.executable, "-m", "pipeline", "incoming", uri, "--json",
                             "--capability", "x-odp=off", "--parameter", "x-memlock-limit=2M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        src = subprocess.run([sys.executable, "-m", "pipeline", "migrate", uri, "--ram", "32M"],
                             capture_output=True, text=True, timeout=60)
        out, _ = dest.communicate(timeout=30)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    assert src.returncode == 1 and src.stdout == ""
    assert src.stderr.count("\n") == 1
    assert "migration failed: the destination failed the migration: cannot pin" in src.stderr
    assert "RLIMIT_MEMLOCK" in src.stderr and json.loads(out)["status"] == "failed"
