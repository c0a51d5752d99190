"""``rdma-pipeline bench`` runs every stage's benchmark at a tiny size and prints valid JSON.

No figure is checked: a benchmark reports, it does not fail CI. Only the shape is.
"""

from __future__ import annotations

import json

import pytest

from bench.common import attach_baselines, format_table, median_row
from pipeline.cli import main

STAGES = ("ring", "scanner", "registrar", "poster", "codec", "pipeline")


@pytest.mark.slow
def test_every_stage_runs_and_prints_one_json_object_per_case(capsys):
    assert main(["bench", "--quick", "--repeat", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["stage"] for r in rows} == set(STAGES)
    for r in rows:
        assert "error" not in r, r
        for key in ("case", "wall_s", "cpu_s", "peak_rss_mib", "metric", "vs_baseline"):
            assert key in r, (key, r)
        assert r[r["metric"]] is not None or r["stage"] == "ring"
    contenders = [r for r in rows if not r["is_baseline"]]
    assert contenders and all(r["vs_baseline"] > 0 and r["baseline"]["case"]
                              for r in contenders)


def test_one_stage_prints_a_table_with_units_and_a_baseline_column(capsys):
    assert main(["bench", "--quick", "--repeat", "1", "--stage", "codec"]) == 0
    out = capsys.readouterr().out
    assert "messages/s" in out and "vs. baseline" in out and "(baseline)" in out


def test_median_and_baseline_helpers():
    rows = [{"case": "a", "x": 3.0}, {"case": "a", "x": 1.0}, {"case": "a", "x": 2.0}]
    med = median_row(rows, "x")
    assert med["x"] == 2.0 and med["runs"] == 3 and med["spread"] == [1.0, 3.0]
    table = {"base": {"case": "base", "x": 4.0, "wall_s": 1.0}, "fast": {"case": "fast", "x": 8.0}}
    attach_baselines(table, {"fast": "base"}, lambda r: r["x"])
    assert table["fast"]["vs_baseline"] == 2.0
    assert table["fast"]["baseline"] == {"case": "base", "wall_s": 1.0}
    text = format_table([table["fast"], {"case": "bad", "error": "boom"}],
                        [("case", "case", ""), ("x/s", "x", ".1f"), ("vs.", "vs_baseline", "")])
    assert "x/s" in text and "error: boom" in text


def test_the_poster_table_says_whether_target_3_is_met_and_what_held_a_miss_back():
    from bench import bench_poster

    rows = [{"case": "tcp-4k", "gb_per_s": 1.6}, {"case": "tcp-1m", "gb_per_s": 4.0},
            {"case": "write-1m", "gb_per_s": 3.9},
            {"case": "poster-1m", "gb_per_s": 3.0, "busy_s": 1.0, "post_s": 0.8,
             "wall_s": 1.3, "own_ns_per_write": 500},
            {"case": "poster-4k", "gb_per_s": 1.4, "busy_s": 0.4, "post_s": 0.3,
             "wall_s": 0.6, "own_ns_per_write": 450}]
    lines = bench_poster.targets(rows)
    assert lines[0] == "target 3, write-1m: 0.97x tcp-1m (>= 0.95): met"
    assert lines[1] == "target 3, poster-4k: 0.87x tcp-4k (>= 1.0): NOT met"
    assert lines[2].startswith("  held back by the posting thread: 0.30 s of its 0.60 s")
    assert lines[3] == "target 3, poster-1m: 0.77x write-1m (>= 0.95): NOT met"
    assert len(lines) == 5
