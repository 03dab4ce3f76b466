"""A pipeline ``qanchor`` step (the tiny LM on synthetic users) and the bench's Q-Anchor rows that
read its model folder: base (each task its own query), prompt-tuned (a scenario prompt per
class task, saved alone) and no-query, each with its bytes per user; a rerun skips everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data_modules.schema import DataError
from foundv2.bench.qanchor import CHECKPOINT_NAME, task_query
from foundv2.nn.anchor import ScenarioPrompt
from foundv2.pipeline import PipelineConfig, Step, run_pipeline, validate

TASKS = ["churn", "segment"]  # the two class tasks of the synthetic data; the others are skipped here


def _write(path: Path, obj: dict) -> str:
    path.write_text(yaml.safe_dump(obj))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("qa")
    data = _write(d / "data.yaml", {"data": {
        "dataset": "synthetic", "loader_args": {"n_users": 200, "seed": 3}, "window_mode": "week",
        "text_encoder": "hashing", "cache_dir": str(d / "cache"), "batch_size": 32, "max_windows": 16,
        "max_events": 24, "progress": False}})
    qanchor = _write(d / "qanchor.yaml", {"seed_everything": 0, "data": {"questions": True}, "trainer": {
        "accelerator": "cpu", "devices": 1, "max_steps": 6, "limit_val_batches": 0, "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "unused", "name": "tb"}},
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]},
        "model": {"class_path": "foundv2.stages.qanchor.QAnchorStage",
                  "init_args": {"lm": "tiny", "head": {"emb_dim": 16, "hidden": 32}, "optim": {"lr": 3e-3}}}})
    skip = ["spender", "future_categories", "next_items"]
    bench = _write(d / "bench.yaml", {"bench": {
        "output_dir": "unused", "baselines": ["majority"], "representations": ["pooled"], "probe_epochs": 2,
        "skip_tasks": skip, "qanchor_tune_steps": 20, "compare": [["qa_tuned", "qa"], ["qa", "qa_noquery"]]}})
    cfg = PipelineConfig(run_dir=str(d / "run"), data=data, steps=[
        Step("qanchor", qanchor, kind="qanchor", output="emb"),
        Step("bench", bench, kind="bench", reads={"bench.qanchor.qa": "qanchor/model"})])
    result = run_pipeline(cfg)
    return d / "run", {"cfg": cfg, "result": result}


def test_the_qanchor_step_puts_its_checkpoint_in_its_model_folder(run):
    folder, info = run
    assert info["result"]["ran"] == ["qanchor", "bench"]
    ckpt = folder / "qanchor" / "model" / CHECKPOINT_NAME
    assert ckpt.is_file() and (folder / "qanchor" / "emb" / "meta.json").is_file()
    again = run_pipeline(info["cfg"])
    assert again["ran"] == [] and again["skipped"] == ["qanchor", "bench"]


def test_bench_has_the_three_qanchor_rows_with_their_size(run):
    folder, _ = run
    bench = json.loads((folder / "bench" / "bench.json").read_text())
    for name in ("qa", "qa_tuned", "qa_noquery"):
        row = bench["results"][name]
        assert row["bytes_per_user"] == 16 * 4, (name, row)  # float32 × emb_dim
        assert 0.0 <= row["churn"]["auc"] <= 1.0 and 0.0 <= row["segment"]["macro_auc"] <= 1.0, row
    # each class task's prompt, saved alone, with that task's query
    for t in TASKS:
        scen = ScenarioPrompt.load(folder / "bench" / "prompts" / "qa" / t)
        assert scen.query == task_query(t) and scen.n_tokens == 6
    assert {p["a"] for p in bench["pairs"]["churn"]} == {"qa_tuned", "qa"}


def test_a_qanchor_step_cannot_name_a_folder_model(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path), data="d.yaml", steps=[
        Step("qa", "q.yaml", kind="qanchor", output="model")])
    with pytest.raises(DataError, match="qanchor step writes its checkpoint"):
        validate(cfg)
