"""What the scenario scripts share: one migration per fresh process, medians, the per-round
plot (``--plot``; matplotlib is the optional ``plot`` extra), and their JSON in bench/results/.
"""

from __future__ import annotations

import statistics

from bench.common import results_path, run_case_process, write_json

GiB = 1 << 30


def migration(ram: int, *, tcp: str | None = None, pin_all: bool = False, dirty_rate: float = 0,
              fill: float = 1.0, zero_share: float = 0.0, parameters: list[str] = (),
              memory: bool = False, prealloc: bool = False, timeout: float = 900) -> dict:
    """One migration (or raw TCP baseline) in a fresh interpreter: its summary."""
    argv = ["-m", "bench.migration", "--ram", str(ram), "--fill", str(fill),
            "--zero-share", str(zero_share), "--dirty-rate", str(dirty_rate)]
    if tcp:
        argv += ["--tcp", tcp]
    if pin_all:
        argv.append("--pin-all")
    if memory:
        argv.append("--memory")
    if prealloc:
        argv.append("--prealloc")
    for item in parameters:
        argv += ["--parameter", item]
    return run_case_process(argv, timeout=timeout)


def med(rows: list[dict], key, default=None):
    """Median of ``key`` (a name or a callable) over the rows that have it."""
    vals = []
    for r in rows:
        v = key(r) if callable(key) else r.get(key)
        if v is not None and "error" not in r:
            vals.append(v)
    return statistics.median(vals) if vals else default


def round_series(summary: dict) -> dict:
    """Per round: throughput (GB/s), dirty rate (MB/s) and bytes left after it."""
    rounds = summary.get("rounds") or []
    return {
        "round": [r["round"] for r in rounds],
        "gb_per_s": [r["bytes"] / r["seconds"] / 1e9 if r.get("seconds") else 0.0
                     for r in rounds],
        "dirty_mb_per_s": [r.get("dirty-pages-rate", 0) * 4096 / 1e6 for r in rounds],
        "remaining_mib": [r.get("remaining", 0) / (1 << 20) for r in rounds],
    }


def plot(name: str, runs: dict[str, dict], title: str) -> str:
    """A PNG of throughput, dirty rate and remaining bytes per round, one line per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is missing (pip install 'rdma-pipeline[plot]')"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, summary in runs.items():
        s = round_series(summary)
        if not s["round"]:
            continue
        for ax, key in zip(axes, ("gb_per_s", "dirty_mb_per_s", "remaining_mib"), strict=True):
            ax.plot(s["round"], s[key], marker="o", label=label)
    for ax, ylabel in zip(axes, ("throughput, GB/s", "dirty rate, MB/s",
                                 "remaining after the round, MiB"), strict=True):
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = results_path(f"{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


def save(name: str, payload: dict) -> str:
    return f"results: {write_json(name + '.json', payload)}"
