"""Install the strict pyverbs double (``strict/pyverbs``) in place of pyverbs.

``installed()`` takes every ``pyverbs`` module out of ``sys.modules``, puts ``strict/`` first on
``sys.path`` and on ``PYTHONPATH`` (so spawned stage processes and peers import the double too),
and puts everything back afterwards. ``stages/verbs/rdmacore*.py`` then runs unmodified on it.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

STRICT_DIR = str(Path(__file__).resolve().parent / "strict")


def _pyverbs_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "pyverbs" or k.startswith("pyverbs.")}


@contextmanager
def installed(devices: str | None = None):
    """The double as ``pyverbs`` here and in children; ``devices`` is ``name=ip,...``."""
    saved = _pyverbs_modules()
    for name in saved:
        del sys.modules[name]
    env = {k: os.environ.get(k) for k in ("PYTHONPATH", "STRICT_PYVERBS_DEVICES")}
    sys.path.insert(0, STRICT_DIR)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (STRICT_DIR, env["PYTHONPATH"]) if p)
    if devices is not None:
        os.environ["STRICT_PYVERBS_DEVICES"] = devices
    importlib.invalidate_caches()
    try:
        import pyverbs

        assert getattr(pyverbs, "STRICT_DOUBLE", False), pyverbs.__file__
        yield pyverbs
    finally:
        for name in _pyverbs_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path.remove(STRICT_DIR)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
