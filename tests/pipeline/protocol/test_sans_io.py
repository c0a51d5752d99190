"""pipeline/protocol does no I/O: it imports nothing that could (STYLE.md habit 1)."""

import ast
import pathlib
import subprocess
import sys

import pipeline.protocol

FORBIDDEN = {"socket", "select", "selectors", "multiprocessing", "time", "pyverbs", "shm",
             "stages", "threading", "asyncio", "subprocess", "os"}
PACKAGE = pathlib.Path(pipeline.protocol.__file__).parent
# The exception tree lives in the bottom layer and does no I/O: the one shm module allowed.
ALLOWED = {"shm", "shm.errors"}


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_no_module_imports_io():
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 8
    for path in modules:
        for name in imported_modules(path):
            assert name in ALLOWED or name.split(".")[0] not in FORBIDDEN, \
                f"{path.name} imports {name}"


def test_importing_the_package_loads_no_io_module():
    code = ("import sys; before = set(sys.modules); import pipeline.protocol.channel, "
            "pipeline.protocol.stream, pipeline.protocol.codec; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
            f"{sorted(FORBIDDEN)!r} and m not in {sorted(ALLOWED)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "[]"
