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
