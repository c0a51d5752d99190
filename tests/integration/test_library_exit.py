"""A program that embeds the coordinator and exits mid-migration leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, time
    from pipeline import MigrationConfig, SyntheticGuest, start_incoming, start_outgoing
    from pipeline.api import free_port
    from shm.naming import new_run_id

    if __name__ == "__main__":      # stage processes are spawned: they import this file
        port = free_port()
        incoming = start_incoming(f"rdma:127.0.0.1:{port}")
        guest = SyntheticGuest(64 << 20, run_id=new_run_id()).start()
        outgoing = start_outgoing(f"rdma:127.0.0.1:{port}", guest, MigrationConfig())
        time.sleep(float(sys.argv[1]))
        if sys.argv[2] == "raise":
            raise RuntimeError("the embedding program failed")
        # "return": the program simply ends with both migrations running
""")


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("how", ["return", "raise"])
def test_program_exiting_mid_migration_cancels_and_cleans_up(tmp_path, delay, how):
    script = tmp_path / "embed.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(delay), how], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == (1 if how == "raise" else 0), proc.stderr
    if how == "raise":
        assert proc.stderr.rstrip().endswith("RuntimeError: the embedding program failed")
    # The suite's leak guard fails this test if a segment or a process outlived the program.
