"""README.md shows the table ``make demo`` prints: ``make readme`` writes it into a marked block
(:func:`foundv2.bench.report.readme_with_table`), and a slow test runs the demo's pipeline afresh
and checks the README holds exactly its table."""

from __future__ import annotations

import json

import pytest

from foundv2.bench.report import (
    README_BEGIN,
    README_END,
    block,
    readme_table,
    readme_with_table,
    rows_table,
    table,
    write_block,
)
from tests.helpers import ROOT, run_cli

BENCH = {"tasks": {"churn": "binary"},
         "results": {"pooled": {"churn": {"auc": 0.7}, "bytes_per_user": 256},
                     "majority": {"churn": {"auc": 0.5}, "bytes_per_user": 0}}}


def test_the_block_is_rewritten_in_place_and_read_back():
    readme = f"# x\n\nbefore\n\n{README_BEGIN}\nstale\n{README_END}\n\nafter\n"
    out = readme_with_table(readme, BENCH)
    assert out.startswith("# x\n\nbefore\n\n") and out.endswith(f"{README_END}\n\nafter\n") and "stale" not in out
    assert readme_table(out) == rows_table(BENCH) and table(BENCH).startswith(rows_table(BENCH))
    assert readme_with_table(out, BENCH) == out  # rewriting with the same run changes nothing
    with pytest.raises(ValueError, match="no block"):
        readme_with_table("# no block\n", BENCH)


def test_a_benchmark_block_is_added_once_then_replaced(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n\nprose\n")
    write_block(doc, "speed", "make bench-x", "| a |\n|---|\n| 1 |")
    write_block(doc, "speed", "make bench-x", "| a |\n|---|\n| 2 |")  # a rerun replaces its block
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose\n") and text.count("make bench-x") == 1
    assert block(text, "speed", "make bench-x") == "| a |\n|---|\n| 2 |"


@pytest.mark.slow  # the whole MovieLens-100k demo pipeline: make test-full
def test_a_fresh_demo_prints_the_table_the_readme_shows(tmp_path):
    run_cli("pipeline", "--config", "experiments/movielens-100k/pipeline.yaml", "--pipeline.run_dir",
            str(tmp_path / "demo"), timeout=3000)
    bench = json.loads((tmp_path / "demo" / "bench" / "bench.json").read_text())
    assert readme_table((ROOT / "README.md").read_text()) == rows_table(bench), "README is stale: run `make readme`"
