"""The per-stage benchmarks behind ``rdma-pipeline bench``: which module, cases and baselines.

Every stage names a benchmark module (``bench.bench_<stage>``) with ``CASES`` and
``run_case(name) -> dict``; this module runs each case in a fresh interpreter
(``python -m bench.stages --stage S --case C``), brings its figures to one shape (``wall_s``,
``cpu_s``, ``bytes``, ``gb_per_s``, ``records_per_s`` or ``pages_per_s``, ``peak_rss_mib``),
takes medians over repeats and divides by the baseline measured in the same invocation.
``--quick`` shrinks every case (a smoke run: the figures mean nothing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.common import attach_baselines, format_table, median_row, run_case_process, vs_text


def _ring_quick(m) -> None:
    m.CASES = {k: (kind, batch, max(batch * 50, 2000) if "latency" not in kind else 20)
               for k, (kind, batch, _n) in m.CASES.items()}


def _poster_quick(m) -> None:
    from bench import bench_transport as t

    m.CASES = {k: (kind, size, 64 if size > 4096 else 2000)
               for k, (kind, size, _n) in m.CASES.items()}
    t.CASES = {k: (kind, size, 64 if size > 4096 else 2000)
               for k, (kind, size, _n) in t.CASES.items()}


def _ring_norm(r: dict) -> dict:
    if "records_per_s" in r:
        r["bytes"] = r["records"] * 16                 # RUN_DTYPE records
        r["gb_per_s"] = round(r["bytes"] / r["wall_s"] / 1e9, 4)
    return r


def _codec_norm(r: dict) -> dict:
    r["bytes"] = r["records"] * r["bytes_per_record"]
    r["gb_per_s"] = round(r["bytes"] / r["wall_s"] / 1e9, 4)
    return r


def _ring_metric(r: dict) -> float | None:
    if r.get("records_per_s"):
        return r["records_per_s"]
    return 1 / r["p50_us"] if r.get("p50_us") else None    # latency: lower is better


@dataclass(frozen=True)
class Stage:
    module: str
    metric: str                                   # the throughput key: higher is better
    columns: list
    quick_cases: tuple[str, ...]
    quick: Callable | dict = field(default_factory=dict)   # module attributes for --quick
    normalize: Callable[[dict], dict] = lambda r: r
    metric_fn: Callable[[dict], float | None] | None = None

    def load(self):
        return importlib.import_module(self.module)

    def baselines(self) -> dict[str, str]:
        m = self.load()
        if hasattr(m, "BASELINE"):
            return dict(m.BASELINE)
        return {c: b for c in m.CASES if (b := m.baseline_for(c))}   # bench_codec

    def value(self, row: dict) -> float | None:
        return self.metric_fn(row) if self.metric_fn else row.get(self.metric)


_COMMON_TAIL = [("wall s", "wall_s", ".3f"), ("CPU s", "cpu_s", ".2f"),
                ("peak RSS MiB", "peak_rss_mib", ".0f"), ("vs. baseline", vs_text, "")]

STAGES: dict[str, Stage] = {
    "ring": Stage(
        "bench.bench_ring", "records_per_s",
        [("case", "case", ""), ("records/s", "records_per_s", ",.0f"),
         ("GB/s", "gb_per_s", ".3f"), ("p50 us", "p50_us", ".0f"), ("p99 us", "p99_us", ".0f"),
         *_COMMON_TAIL],
        ("queue-b64", "ring-b64"), quick=_ring_quick, normalize=_ring_norm,
        metric_fn=_ring_metric),
    "scanner": Stage(
        "bench.bench_scanner", "gb_per_s",
        [("case", "case", ""), ("GB/s", "gb_per_s", ".2f"),
         ("Mpages/s", lambda r: r.get("pages_per_s", 0) / 1e6, ".1f"),
         ("dirty pages", "dirty_pages", ""), ("runs", "runs", ""), *_COMMON_TAIL],
        ("memcpy", "round1-data"), quick={"GUEST": 64 << 20, "ROUNDS": 2}),
    "registrar": Stage(
        "bench.bench_registrar", "chunks_per_s",
        [("case", "case", ""), ("chunk MiB", lambda r: r["chunk_bytes"] >> 20, ""),
         ("chunks/s", "chunks_per_s", ",.0f"), ("GB/s", "gb_per_s", ".2f"),
         ("register ms", "register_ms", ".1f"), ("unregister ms", "unregister_ms", ".1f"),
         *_COMMON_TAIL],
        ("mlock-1m", "register-1m"), quick={"SIZE": 32 << 20}),
    "poster": Stage(
        "bench.bench_poster", "gb_per_s",
        [("case", "case", ""), ("write B", "size", ""), ("GB/s", "gb_per_s", ".3f"),
         ("writes/s", "writes_per_s", ",.0f"), *_COMMON_TAIL],
        ("tcp-1m", "poster-1m"), quick=_poster_quick),
    "codec": Stage(
        "bench.bench_codec", "records_per_s",
        [("case", "case", ""), ("messages/s", "records_per_s", ",.0f"),
         ("B/message", "bytes_per_record", ""), ("GB/s", "gb_per_s", ".3f"), *_COMMON_TAIL],
        ("baseline-unpack", "decode-REGISTER_REQUEST"), quick={"DURATION": 0.05},
        normalize=_codec_norm),
    "pipeline": Stage(
        "bench.bench_pipeline", "gb_per_s",
        [("case", "case", ""), ("round-1 GB/s", "gb_per_s", ".3f"),
         ("end-to-end GB/s", "end_to_end_gb_per_s", ".3f"), ("setup ms", "setup_ms", ".0f"),
         ("downtime ms", "downtime_ms", ".0f"), *_COMMON_TAIL],
        ("tcp-fresh", "migrate-pin-off"), quick={"RAM": 32 << 20}),
}


def case_main(stage: str, case: str, quick: bool) -> dict:
    """Run one case here (the fresh interpreter's side) and bring its figures to one shape."""
    st = STAGES[stage]
    module = st.load()
    if quick:
        if callable(st.quick):
            st.quick(module)
        else:
            for k, v in st.quick.items():
                setattr(module, k, v)
    row = st.normalize(dict(module.run_case(case)))
    row["stage"] = stage
    return row


def run_stage(stage: str, *, repeat: int = 3, quick: bool = False, cases=None,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Median rows of every case of ``stage`` (each run in a fresh process), baselines
    attached; ``on_row`` sees each raw run as it finishes."""
    st = STAGES[stage]
    module = st.load()
    names = list(cases or (st.quick_cases if quick else module.CASES))
    baselines = st.baselines()
    for name in list(names):         # a contender always runs with its baseline
        b = baselines.get(name)
        if b and b not in names:
            names.insert(names.index(name), b)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(repeat):
        for name in names:           # interleaved: drift hits baseline and contender alike
            argv = ["-m", "bench.stages", "--stage", stage, "--case", name]
            row = run_case_process(argv + (["--quick"] if quick else []))
            row.setdefault("case", name)
            row.setdefault("stage", stage)
            runs[name].append(row)
            if on_row is not None:
                on_row(row)
    rows: dict[str, dict] = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        key = "_metric"
        for r in ok:
            r[key] = st.value(r)
        med = median_row(ok or rs, key)
        med.pop(key, None)
        med.pop("median__metric", None)
        if "spread" in med and ok:
            med["spread"] = [round(v, 6) if v is not None else None for v in med["spread"]]
        med["metric"] = st.metric
        med["is_baseline"] = name not in baselines
        rows[name] = med
    attach_baselines(rows, baselines, st.value,
                     figures=("wall_s", "cpu_s", "bytes", "gb_per_s", st.metric, "p50_us"))
    return list(rows.values())


def table(stage: str, rows: list[dict]) -> str:
    """The stage's table, then the lines of its module's ``targets(rows)`` if it has one."""
    out = format_table(rows, STAGES[stage].columns)
    targets = getattr(STAGES[stage].load(), "targets", None)
    return "\n".join([out, *targets(rows)]) if targets else out


def module_main(stage: str, argv: list[str] | None = None, description: str = "") -> int:
    """The command line of ``python -m bench.bench_<stage>``: the runs and table of
    ``rdma-pipeline bench --stage <stage>``; ``--case NAME`` runs one case in this process and
    prints its JSON line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    parser.add_argument("--case", choices=list(STAGES[stage].load().CASES),
                        help="run one case in this process")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median shown)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(case_main(stage, args.case, args.quick)), flush=True)
        return 0
    rows = run_stage(stage, repeat=args.repeat, quick=args.quick)
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(table(stage, rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run one benchmark case (internal)")
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--case", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(case_main(args.stage, args.case, args.quick)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
