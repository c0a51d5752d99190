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
    """Per round, in base units: throughput (bytes/s), dirty rate (bytes/s), bytes left."""
    rounds = summary.get("rounds") or []
    return {
        "round": [r["round"] for r in rounds],
        "throughput": [r["bytes"] / r["seconds"] if r.get("seconds") else 0.0 for r in rounds],
        "dirty": [r.get("dirty-pages-rate", 0) * 4096 for r in rounds],
        "remaining": [r.get("remaining", 0) for r in rounds],
    }


PANELS = (("throughput", "throughput", "/s"), ("dirty", "dirty rate", "/s"),
          ("remaining", "left after the round", ""))
UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "bytes"))


def unit_for(values: list[float]) -> tuple[int, str]:
    """The largest binary unit in which the biggest value is at least 1 (bytes for none)."""
    top = max((abs(v) for v in values), default=0)
    return next(((d, name) for d, name in UNITS if top >= d), UNITS[-1])


def panels(series: dict[str, dict]) -> list[tuple[str, str, int]]:
    """(key, axis label, divisor) of each panel worth drawing: a quantity that is the same
    number in every round of every run (an idle guest's dirty rate: 0) says nothing as a
    flat line, so it is left out; units are chosen from the data."""
    out = []
    for key, label, per in PANELS:
        values = [v for s in series.values() for v in s[key]]
        if not values or (max(values) == min(values) and key != "throughput"):
            continue
        div, unit = unit_for(values)
        out.append((key, f"{label}, {unit}{per}", div))
    return out


def plot(name: str, runs: dict[str, dict], title: str) -> str:
    """A PNG of throughput, dirty rate and bytes left per round, one line per run (panels
    that would be flat are left out, units follow the data)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return "no plot: matplotlib is missing (pip install 'rdma-pipeline[plot]')"
    series = {label: round_series(summary) for label, summary in runs.items()}
    series = {label: s for label, s in series.items() if s["round"]}
    chosen = panels(series)
    if not chosen:
        return "no plot: no rounds recorded"
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4), squeeze=False)
    for ax, (key, ylabel, div) in zip(axes[0], chosen, strict=True):
        for label, s in series.items():
            ax.plot(s["round"], [v / div for v in s[key]], marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = results_path(f"{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


def save(name: str, payload: dict) -> str:
    return f"results: {write_json(name + '.json', payload)}"
