"""The worked own-data examples, end to end through the real ``foundv2 pipeline`` command (toy
epochs): experiments/files-example (payments with items and text, searches) and
experiments/files-purchases (item-free: purchases with dates and amounts only).

The bench must run to the end on both: item tasks and item baselines skipped with one line on
the item-free data, the ``activity`` baseline present, every verdict with its paired interval.
The shipped folders run in full in the slow tests; the fast test runs the item-free pipeline on
a tiny generated copy of its data.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, run_cli

TOY = '["--trainer.max_epochs", "1"]'
LABELS = ("cohort", "lifecycle", "spender")


def run_pipeline_cli(pipeline: Path | str, run_dir: Path) -> str:
    res = run_cli("pipeline", "--config", str(pipeline), "--pipeline.run_dir", str(run_dir),
                  "--pipeline.trainer_args", TOY, timeout=1200)
    return res.stdout + res.stderr


def check_bench(run_dir: Path, said: str, tasks: tuple[str, ...], item_free: bool) -> dict:
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    assert tuple(bench["tasks"]) == tasks
    assert bench["has_items"] is (not item_free)
    assert said.count("no item ids") == (1 if item_free else 0)
    res = bench["results"]
    assert res["activity"]["bytes_per_user"] > 0 and all(t in res["activity"] for t in tasks if t != "next_items")
    assert {"qformer", "tokens_bag", "pooled", "majority"} <= set(res)
    if item_free:
        assert not {"tfidf", "ease", "sasrec", "popularity"} & set(res)
    else:
        assert {"tfidf", "ease", "sasrec"} <= set(res) and "ndcg@10" in res["ease"]["next_items"]
    for t in tasks:
        v = bench["verdicts"][t]
        assert v["comparisons"] and v["warnings"]  # a toy test split: it says so
        for c in v["comparisons"]:
            assert c["lo"] <= c["delta"] <= c["hi"] and c["verdict"] in ("beats", "tie", "loses")
    assert (run_dir / "bench" / "report.md").exists()
    return bench


def _generator():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "experiments" / "files-purchases" / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.purchases


def test_item_free_pipeline_on_a_tiny_copy(tmp_path):
    """The shipped item-free pipeline and stage configs on 60 generated customers."""
    events, users = _generator()(60, seed=2)
    events.to_csv(tmp_path / "purchases.csv", index=False)
    users.to_csv(tmp_path / "customers.csv", index=False)
    folder = ROOT / "experiments" / "files-purchases"
    data = yaml.safe_load((folder / "data.yaml").read_text())
    data["data"]["loader_args"].update(events=str(tmp_path / "purchases.csv"), users=str(tmp_path / "customers.csv"))
    data["data"]["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    pipe = yaml.safe_load((folder / "pipeline.yaml").read_text())
    pipe["pipeline"]["data"] = str(tmp_path / "data.yaml")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipe))
    run = tmp_path / "run"
    said = run_pipeline_cli(tmp_path / "pipeline.yaml", run)
    check_bench(run, said, LABELS, item_free=True)


@pytest.mark.slow
@pytest.mark.parametrize("example, tasks, item_free", [
    ("files-purchases", LABELS, True),
    ("files-example", ("is_premium", "future_categories", "next_items"), False),
])
def test_shipped_own_data_pipeline(example, tasks, item_free, tmp_path):
    run = tmp_path / "run"
    said = run_pipeline_cli(ROOT / "experiments" / example / "pipeline.yaml", run)
    check_bench(run, said, tasks, item_free)
