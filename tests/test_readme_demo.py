"""README.md shows the table ``make demo`` prints: ``make readme`` writes it into a marked block
(:func:`foundv2.bench.report.readme_with_table`), and a slow test runs the demo's pipeline afresh
and checks the README holds exactly its table."""

from __future__ import annotations

import json

import pytest

from foundv2.bench.report import (
    DOCS_BLOCK,
    README_BEGIN,
    README_END,
    block,
    block_markers,
    main,
    readme_table,
    readme_with_table,
    rows_table,
    summary_table,
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


def test_make_readme_writes_the_readme_rows_and_the_whole_table_into_docs(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    readme, docs = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    docs.write_text("# B\n\n" + "\n".join(block_markers(*DOCS_BLOCK)) + "\n\nafter\n")
    assert main([str(tmp_path / "bench.json"), "--readme", str(readme), "--docs", str(docs)]) == 0
    assert readme_table(readme.read_text()) == rows_table(BENCH)
    assert block(docs.read_text(), *DOCS_BLOCK) == f"```\n{table(BENCH)}\n```" and docs.read_text().endswith("after\n")
    before = docs.read_text()
    assert main([str(tmp_path / "bench.json"), "--docs"]) == 2  # a flag without its file: usage, nothing written
    assert main([str(tmp_path / "missing.json"), "--docs", str(docs)]) == 2
    assert docs.read_text() == before and "usage" in capsys.readouterr().err


def test_the_summary_pairs_each_budget_best_row_with_its_baselines_and_the_best_of_any_size():
    res = {"user_tokens16": {"kind": "tokens", "bytes_per_user": 16, "churn": {"auc": 0.80}},
           "qformer": {"kind": "representation", "bytes_per_user": 512, "churn": {"auc": 0.78}},
           "pooled": {"kind": "representation", "bytes_per_user": 400, "churn": {"auc": 0.90}},
           "tfidf_svd16_int8": {"kind": "baseline", "bytes_per_user": 16, "churn": {"auc": 0.75}},
           "tfidf": {"kind": "baseline", "bytes_per_user": 900, "churn": {"auc": 0.85}},
           "ease": {"kind": "baseline", "bytes_per_user": None}}
    bench = {"tasks": {"churn": "binary"}, "results": res,
             "budgets": {"16": {"best": "user_tokens16", "baselines": ["tfidf_svd16_int8"], "meets": True}}}
    rows = summary_table(bench).splitlines()[2:]
    assert rows == ["| 16 B | `user_tokens16` (ours, meets the budget) | 0.8000 |", "| 16 B | `tfidf_svd16_int8` | 0.7500 |",
                    "| unbounded | best of ours per task | `user_tokens16` 0.8000 |",  # pooled is not learned
                    "| unbounded | best baseline per task | `tfidf` 0.8500 |"]  # a row without the task is skipped


@pytest.mark.slow  # the whole MovieLens-100k demo pipeline: make test-full
def test_a_fresh_demo_prints_the_table_the_readme_shows(tmp_path):
    run_cli("pipeline", "--config", "experiments/movielens-100k/pipeline.yaml", "--pipeline.run_dir",
            str(tmp_path / "demo"), timeout=3000)
    bench = json.loads((tmp_path / "demo" / "bench" / "bench.json").read_text())
    assert readme_table((ROOT / "README.md").read_text()) == rows_table(bench), "README is stale: run `make readme`"
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert block(docs, *DOCS_BLOCK) == f"```\n{table(bench)}\n```", "docs/benchmarks.md is stale: run `make readme`"
