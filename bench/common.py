"""What the benchmarks share: one case per fresh process, JSON lines, medians, baselines, tables.

A benchmark module runs each case in a fresh interpreter (``python -m bench.X --case NAME``,
msgspec / python-zstandard style) that prints one JSON line; the parent collects the lines with
``run_case_process``, takes the median of repeated runs (``median_row``), divides each case's
throughput by its baseline's from the same invocation (``attach_baselines``), and prints a table
(``format_table``) or the JSON lines. ``usage()`` is the CPU time and peak RSS of a case process
and its children, ``results_path`` where scenario scripts keep their JSON. The per-stage
modules' command lines are ``bench.stages.module_main``, over the stage table there.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def usage() -> dict:
    """CPU seconds (user + system) of this process and its waited-for children, and the peak
    RSS (MiB) of the largest of them."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 4),
            "peak_rss_mib": round(max(me.ru_maxrss, kids.ru_maxrss) / 1024, 1)}


class Clock:
    """Wall and process CPU time of a block: ``with Clock() as c: ...; c.wall, c.cpu``."""

    def __enter__(self) -> Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def rates(nbytes: int, wall: float, *, pages: bool = False, records: int | None = None) -> dict:
    """bytes, gb_per_s and pages_per_s (4 KiB pages) or records_per_s for ``wall`` seconds."""
    wall = max(wall, 1e-9)
    out = {"bytes": int(nbytes), "wall_s": round(wall, 6),
           "gb_per_s": round(nbytes / wall / 1e9, 3)}
    if pages:
        out["pages_per_s"] = round(nbytes / 4096 / wall)
    if records is not None:
        out["records_per_s"] = round(records / wall)
    return out


def run_case_process(argv: list[str], *, timeout: float = 900.0,
                     env: dict | None = None) -> dict:
    """Run ``python argv...`` in a fresh interpreter; its last stdout line parsed as JSON.

    A case that fails or prints no JSON gives ``{"error": "<last stderr line>"}`` instead of
    raising, so one broken case never hides the others."""
    cwd = str(Path(__file__).resolve().parent.parent)    # bench/ importable as a package
    run_env = dict(os.environ, **(env or {}))
    run_env["PYTHONPATH"] = cwd + os.pathsep + run_env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                              timeout=timeout, env=run_env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no JSON"])[-1]
    return {"error": err}


def case_result(module: str, case: str) -> dict:
    """One case of ``module`` run in a fresh interpreter; a failed case stops the benchmark
    with its last error line (for scripts that need every case to compute their table)."""
    row = run_case_process(["-m", module, "--case", case])
    if "error" in row:
        raise SystemExit(f"{module} --case {case}: {row['error']}")
    return row


def median_row(rows: list[dict], key: str, *, higher_is_better: bool = True) -> dict:
    """The run whose ``key`` is the median (lower median for an even count), with ``runs``
    (how many) and ``spread`` (min and max of ``key``) added. Failed runs are left out."""
    good = [r for r in rows if "error" not in r and r.get(key) is not None]
    if not good:
        return dict(rows[-1]) if rows else {"error": "no run"}
    ordered = sorted(good, key=lambda r: r[key], reverse=not higher_is_better)
    row = dict(ordered[(len(ordered) - 1) // 2])
    values = [r[key] for r in good]
    row["runs"] = len(good)
    row["spread"] = [min(values), max(values)]
    if len(values) > 1:
        row["median_" + key] = statistics.median(values)
    return row


def attach_baselines(rows: dict[str, dict], baseline_of: dict[str, str],
                     metric: Callable[[dict], float | None],
                     figures: Iterable[str] = ("wall_s", "gb_per_s")) -> None:
    """For every case with a baseline in ``rows``: ``baseline`` (the baseline's case name and
    figures) and ``vs_baseline`` = metric(case) / metric(baseline), above 1 = faster."""
    for name, row in rows.items():
        base_name = baseline_of.get(name)
        base = rows.get(base_name) if base_name else None
        if base is None or "error" in row or "error" in base:
            row.setdefault("vs_baseline", None)
            continue
        mine, theirs = metric(row), metric(base)
        row["baseline"] = {"case": base_name, **{k: base[k] for k in figures if k in base}}
        row["vs_baseline"] = round(mine / theirs, 3) if mine and theirs else None


def format_table(rows: list[dict], columns: list[tuple[str, str | Callable, str]]) -> str:
    """Rows as an aligned text table. ``columns``: (header with units, key or callable,
    format spec); a missing value prints as blank, an error row prints its error."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        if "error" in r:
            cells.append([str(r.get("case", "?"))] + [""] * (len(columns) - 2)
                         + [f"error: {r['error']}"])
            continue
        line = []
        for _, key, fmt in columns:
            v = key(r) if callable(key) else r.get(key)
            line.append("" if v is None or v == "" else format(v, fmt))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for n, c in enumerate(cells):
        parts = [c[0].ljust(widths[0])] + [c[i].rjust(widths[i]) for i in range(1, len(c) - 1)]
        parts.append(c[-1])   # the last column (vs. baseline) reads better left-aligned
        out.append("  ".join(parts).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths).rstrip())
    return "\n".join(out)


def vs_text(row: dict) -> str:
    """The "vs. baseline" cell: ``1.23x tcp-1m``, ``(baseline)`` or blank."""
    if row.get("vs_baseline") is not None:
        return f"{row['vs_baseline']:.2f}x {row['baseline']['case']}"
    return "(baseline)" if row.get("is_baseline") else ""


def results_path(name: str) -> Path:
    """``bench/results/<name>`` (the folder is created)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / name


def write_json(name: str, payload: dict) -> Path:
    path = results_path(name)
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def mib_of(text: str) -> int:
    """An argparse type: a size (``256M``, ``1G``) in MiB, for every bench's ``--ram``."""
    import argparse

    from pipeline.config import parse_size

    try:
        return max(1, parse_size(text) >> 20)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
