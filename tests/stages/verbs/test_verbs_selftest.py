"""``rdma-pipeline selftest``: one table of what held, or one line saying it cannot run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import strict_pyverbs

from pipeline.cli import main
from stages.verbs.rdmacore import probe


def test_without_a_device_it_says_so_in_one_line_and_exits_2():
    if probe() is None:
        pytest.skip("this machine has an RDMA device")
    out = subprocess.run([sys.executable, "-m", "pipeline", "selftest"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    line = out.stderr.strip()
    assert "\n" not in line and "no RDMA device" in line and "README" in line


def test_every_check_holds_on_the_strict_double(capsys):
    with strict_pyverbs.installed():
        code = main(["selftest", "--device", "mlx5_0", "--ram", "16M", "--json"])
    report = json.loads(capsys.readouterr().out)
    failed = [c for c in report["checks"] if c["held"] is False]
    assert code == 0 and not failed, failed
    rows = {c["check"]: c["detail"] for c in report["checks"]}
    assert rows["device"] == "mlx5_0 at 127.0.0.1"
    assert "share" in rows["loopback migration"]


def test_a_device_that_cannot_share_a_pd_runs_proxy(capsys):
    with strict_pyverbs.installed("rxe0=127.0.0.1"):
        code = main(["selftest", "--ram", "16M"])
    table = capsys.readouterr().out
    assert code == 0, table
    assert "proxy" in table and "FAILED" not in table and "pin" in table


def test_a_failed_check_is_a_row_and_exit_1(capsys, monkeypatch):
    from pipeline import selftest_cmd

    def broken(self):
        raise AssertionError("QP states ['INIT', 'RTS']")

    monkeypatch.setattr(selftest_cmd.Checks, "CHECKS",
                        [("both QPs RTS after accept", broken)])
    code = main(["selftest", "--transport", "soft", "--ram", "16M"])
    table = capsys.readouterr().out
    assert code == 1
    assert "both QPs RTS after accept  FAILED  AssertionError: QP states" in table
    assert "loopback migration" in table


@pytest.mark.parametrize("peer,uri", [
    ("dest", "rdma:dest:29200"), ("dest:4000", "rdma:dest:4000"),
    ("fe80::1", "rdma:[fe80::1]:29200"), ("[fe80::1]:4000", "rdma:[fe80::1]:4000"),
    ("[::1]", "rdma:[::1]:29200"),
])
def test_peer_spellings(peer, uri):
    from pipeline.selftest_cmd import peer_uri

    assert peer_uri(peer) == uri


def test_a_migration_to_a_peer_running_incoming(capsys):
    """The two-host form, on one host: ``incoming`` in another process, both on the double."""
    import random

    port = random.randint(20000, 60000)
    with strict_pyverbs.installed():
        incoming = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "incoming", f"rdma:127.0.0.1:{port}",
             "--transport", "verbs", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            line = incoming.stderr.readline()
            assert "listening on" in line, line + incoming.stderr.read()
            code = main(["selftest", "--peer", f"127.0.0.1:{port}", "--ram", "16M"])
            incoming.wait(60)
        finally:
            if incoming.poll() is None:
                incoming.kill()
                incoming.wait()
            incoming.stdout.close()
            incoming.stderr.close()
    table = capsys.readouterr().out
    assert code == 0, table
    assert f"migration to 127.0.0.1:{port}" in table and incoming.returncode == 0
