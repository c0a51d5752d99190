"""The sessions do no I/O: each module under pipeline/session imports nothing that could.

Direct imports are what a module chooses (numpy itself loads ctypes and threading, which the
sessions never touch). Of our own tree a session may import the protocol, the stream's
sections, the plain data of config, stats and digests, the exception tree and the ring
records' dtypes: nothing that opens, spawns, maps or waits.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[3]
SESSION = ROOT / "pipeline" / "session"
BANNED = {"socket", "select", "selectors", "threading", "multiprocessing", "subprocess",
          "time", "signal", "posix_ipc", "mmap", "ctypes", "queue", "concurrent", "asyncio",
          "os", "pyverbs"}
OURS_ALLOWED = ("pipeline.protocol", "pipeline.session", "pipeline.sections",
                "pipeline.section_writer", "pipeline.config", "pipeline.stats", "pipeline.digest",
                "shm.errors", "stages.records")


def imports(path: pathlib.Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append(node.module or "")
    return out


@pytest.mark.parametrize("module", sorted(p.name for p in SESSION.glob("*.py")))
def test_a_session_module_imports_nothing_that_does_io(module):
    for name in imports(SESSION / module):
        top = name.split(".")[0]
        assert top not in BANNED, f"pipeline/session/{module} imports {name}"
        if top in ("pipeline", "stages", "shm"):
            assert name.startswith(OURS_ALLOWED), f"pipeline/session/{module} imports {name}"


def test_the_check_sees_a_banned_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import threading\nfrom pipeline.drivers import source_driver\n")
    assert imports(bad) == ["threading", "pipeline.drivers"]


def test_importing_both_sessions_loads_no_io_module():
    code = ("import sys, pipeline.session.source, pipeline.session.destination; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('socket', 'select', "
            "'multiprocessing', 'subprocess', 'concurrent', 'posix_ipc', 'mmap', 'pyverbs', "
            "'stages') and m not in ('stages', 'stages.records')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
