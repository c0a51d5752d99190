"""``--transport verbs`` on a machine that cannot run it is refused before anything starts."""

import pytest

from pipeline.cli import main
from stages.verbs.rdmacore import probe

REASON = probe()


@pytest.mark.skipif(REASON is None, reason="an RDMA device is present: verbs can run here")
@pytest.mark.parametrize("command", [["run"], ["migrate", "rdma:127.0.0.1:29200"],
                                     ["incoming", "rdma:127.0.0.1:29200"]])
def test_verbs_without_a_device_is_one_line_before_anything_starts(command, capsys):
    assert main([*command, "--transport", "verbs", "--ram", "64M"]) == 2
    err = capsys.readouterr().err.strip()
    # The command itself refuses (no stage started and failed: the leak guard checks the rest).
    assert err == f"rdma-pipeline {command[0]}: {REASON} (use --transport soft (userspace verbs " \
                  "over TCP) on machines without RDMA)"
