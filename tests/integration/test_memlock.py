"""A non-root user with the default 8 MiB RLIMIT_MEMLOCK migrates 256 MiB: on demand (ODP)
registrations pin nothing, and with x-odp=off each side keeps what it pins inside that limit
(the source unregisters least recently used chunks from round 1 on)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
LIMIT = 8 << 20
USER = "nobody"


def _limit_memlock() -> None:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (LIMIT, LIMIT))


def _as_nobody(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", USER, "--", *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=_limit_memlock)


def _skip_unless_nobody_can_run() -> None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to run as nobody")
    probe = _as_nobody("sh", "-c", f"ulimit -l && test -r {ROOT}/pipeline/config.py && "
                                   f"test -x {PYTHON} && touch /dev/shm/memlock-probe && "
                                   "rm /dev/shm/memlock-probe", timeout=30)
    if probe.returncode != 0:
        reason = (f"{USER} cannot read {ROOT} or write /dev/shm: "
                  f"{(probe.stderr or probe.stdout).strip()}")
        print(reason)
        pytest.skip(reason)
    assert probe.stdout.split()[0] == str(LIMIT >> 10)     # KiB: the limit holds for nobody


# The default guest (50 MB/s, uniform: all 256 chunks dirty every round). With x-odp=off each
# round cycles them all through a 6 MiB budget, 6 chunks per REGISTER and UNREGISTER.
@pytest.mark.parametrize("capabilities", [(), ("--capability", "x-odp=off")],
                         ids=["odp", "x-odp=off"])
def test_nobody_with_an_8_mib_memlock_limit_migrates_256_mib(capabilities):
    _skip_unless_nobody_can_run()
    run = _as_nobody(str(PYTHON), "-m", "pipeline", "run", "--ram", "256M", "--json",
                     *capabilities)
    assert run.stdout, run.stderr
    summary = json.loads(run.stdout)
    assert summary["status"] == "completed", summary.get("error-desc")
    assert summary["verified"] is True
    assert run.returncode == 0
    if capabilities:       # chunks went in and out of an 8 MiB budget
        registrar = summary["stages"]["registrar"]
        assert registrar["chunks-unregistered"] > 0


def test_nobody_with_a_limit_below_one_chunk_fails_before_the_transfer():
    _skip_unless_nobody_can_run()
    run = _as_nobody(str(PYTHON), "-m", "pipeline", "run", "--ram", "64M", "--chunk-size", "8M",
                     "--capability", "x-odp=off", "--json")
    summary = json.loads(run.stdout)
    assert summary["status"] == "failed" and run.returncode != 0
    error = summary["error-desc"]
    assert "source: cannot pin one 8.0 MiB chunk" in error and "RLIMIT_MEMLOCK" in error
    assert "8.0 MiB" in error and "ulimit -l" in error and "\n" not in error
    assert summary["ram"]["transferred"] == 0
