"""The pipeline on real toy runs (synthetic, 200 users, tiny nets, 1 epoch): a change reruns the
changed step and the steps that read it, nothing else; ``on_change`` error / restart."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from data_modules.schema import DataError
from foundv2.pipeline import REPO, PipelineConfig, Step, run_pipeline

TB = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "unused", "name": "tb"}}
TRAINER = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 2, "enable_progress_bar": False,
           "logger": TB, "enable_model_summary": False,
           "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"monitor": "val/loss", "mode": "min", "save_last": True}}]}


def _write(path: Path, obj: dict) -> str:
    path.write_text(yaml.safe_dump(obj))
    return str(path)


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("configs")
    data = _write(d / "data.yaml", {"data": {
        "dataset": "synthetic", "loader_args": {"n_users": 200, "seed": 3}, "window_mode": "week",
        "text_encoder": "hashing", "cache_dir": str(d / "cache"), "batch_size": 32, "max_windows": 16,
        "progress": False}})
    stage1 = _write(d / "qformer.yaml", {"seed_everything": 0, "trainer": {
        **TRAINER, "callbacks": [{**TRAINER["callbacks"][0], "init_args": {"monitor": "val/loss/total", "mode": "min",
                                                                          "save_last": True}}]},
        "model": {"class_path": "foundv2.stages.qformer.QFormerStage",
                  "init_args": {"qformer": {"dim": 16, "num_queries": 1, "num_layers": 1, "num_heads": 2},
                                "optim": {"warmup_steps": 1}}}})
    tokenizer = _write(d / "tokenizer.yaml", {"seed_everything": 0, "trainer": TRAINER, "model": {
        "class_path": "foundv2.stages.tokenizer.TokenizerStage",
        "init_args": {"rqvae": {"code_dim": 4, "hidden": [16]},
                      "quantizer": {"n_shared_levels": 1, "n_specific_levels": 1, "shared_codes": 8,
                                    "specific_codes": 4, "kmeans_buffer": 128, "respawn_every": 5}}}})
    # a quick bench: one task, one built-in representation (plus stage 1's), one baseline
    bench = _write(d / "bench.yaml", {"bench": {
        "output_dir": "unused", "baselines": ["majority"], "representations": ["tokens_sum"], "probe_epochs": 2,
        "skip_tasks": ["segment", "spender", "future_categories", "next_items"]}})
    return {"data": data, "stage1": stage1, "tokenizer": tokenizer, "bench": bench, "dir": d}


def _cfg(configs, run_dir: Path, on_change: str = "error", tokenizer_args=(), bench_args=()) -> PipelineConfig:
    return PipelineConfig(run_dir=str(run_dir), data=configs["data"], on_change=on_change, steps=[
        Step("stage1", configs["stage1"], output="features"),
        Step("tokenizer", configs["tokenizer"], args=list(tokenizer_args), output="tokens",
             writes={"export": "model.export_dir"}, reads={"data.features_dir": "stage1/features"}),
        Step("bench", configs["bench"], kind="bench", args=list(bench_args),
             reads={"bench.embeddings.qformer": "stage1/features", "bench.tokens_dir": "tokenizer/tokens",
                    "bench.tokenizer_dir": "tokenizer/export"}),
    ])


#: one file per step whose modification time says whether the step ran again
MARKERS = {"stage1": "stage1/features/meta.json", "tokenizer": "tokenizer/tokens/meta.json", "bench": "bench/bench.json"}


def _stamps(run: Path) -> dict[str, int]:
    return {step: (run / rel).stat().st_mtime_ns for step, rel in MARKERS.items()}


def _rerun(run: Path, before: dict[str, int]) -> set[str]:
    return {step for step, t in _stamps(run).items() if t != before[step]}


@pytest.fixture(scope="module")
def first_run(configs, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("first") / "run"
    result = run_pipeline(_cfg(configs, run))
    assert result["ran"] == ["stage1", "tokenizer", "bench"]
    return run


@pytest.fixture
def run_copy(first_run, tmp_path) -> Path:
    """A copy of the finished first run, for one test to change."""
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    return run


def test_unchanged_run_skips_every_step_and_prints_the_table_once(configs, run_copy, capsys):
    before = _stamps(run_copy)
    result = run_pipeline(_cfg(configs, run_copy))
    assert result["ran"] == [] and result["skipped"] == ["stage1", "tokenizer", "bench"]
    assert _rerun(run_copy, before) == set()
    from foundv2.bench.report import table

    printed = table(json.loads((run_copy / "bench" / "bench.json").read_text()))
    out = capsys.readouterr().out
    assert out.count(printed) == 1 and "qformer" in printed  # the table, once, with the stage-1 row


def test_changed_bench_flag_reruns_only_the_bench(configs, run_copy):
    before = _stamps(run_copy)
    (run_copy / "notes.txt").write_text("mine")  # not a step folder: never removed
    (run_copy / "bench" / "extra.txt").write_text("stale")
    (run_copy / "stage1" / "extra.txt").write_text("kept")
    changed = _cfg(configs, run_copy, bench_args=["--bench.probe_epochs", "3"])
    with pytest.raises(DataError, match=r"step folders bench do not match .*bench: made with other flags.*"
                                        r"stage1, tokenizer kept"):
        run_pipeline(changed)
    assert _rerun(run_copy, before) == set() and (run_copy / "bench" / "extra.txt").exists()  # error touches nothing
    result = run_pipeline(replace(changed, on_change="restart"))
    assert result["ran"] == ["bench"]
    assert _rerun(run_copy, before) == {"bench"}
    assert not (run_copy / "bench" / "extra.txt").exists()  # restart removed the changed step's folder only
    assert (run_copy / "stage1" / "extra.txt").exists() and (run_copy / "notes.txt").exists()


def test_changed_tokenizer_flag_reruns_the_tokenizer_and_the_bench(configs, run_copy):
    before = _stamps(run_copy)
    fit_done = (run_copy / "stage1" / "fit.done").read_text()
    changed = _cfg(configs, run_copy, tokenizer_args=["--model.quantizer.beta", "0.5"])
    with pytest.raises(DataError, match=r"tokenizer: made with other flags; bench: made with other input tokenizer"):
        run_pipeline(changed)
    result = run_pipeline(replace(changed, on_change="restart"))
    assert result["ran"] == ["tokenizer", "bench"]
    assert _rerun(run_copy, before) == {"tokenizer", "bench"}
    assert (run_copy / "stage1" / "fit.done").read_text() == fit_done


def test_code_changes_rerun_only_the_steps_whose_code_changed(configs, run_copy, tmp_path):
    """Fingerprints are taken from a copy of the repository's packages, which the test edits."""
    src = tmp_path / "src"
    for pkg in ("foundv2", "data_modules"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = _stamps(run_copy)
    assert run_pipeline(_cfg(configs, run_copy), root=src)["ran"] == []  # the copy is the same code
    report = src / "foundv2" / "bench" / "report.py"
    report.write_text(report.read_text() + "\n# a comment\n")
    with pytest.raises(DataError, match=r"step folders bench do not match .*made with other code foundv2/bench/report.py"):
        run_pipeline(_cfg(configs, run_copy), root=src)
    assert run_pipeline(_cfg(configs, run_copy, on_change="restart"), root=src)["ran"] == ["bench"]
    assert _rerun(run_copy, before) == {"bench"}
    quantizer = src / "foundv2" / "nn" / "quantizer.py"
    quantizer.write_text(quantizer.read_text() + "\n# a comment\n")
    with pytest.raises(DataError, match=r"step folders tokenizer, bench do not match .*tokenizer: made with other code "
                                        r"foundv2/nn/quantizer.py; bench: made with other input tokenizer and code"):
        run_pipeline(_cfg(configs, run_copy), root=src)


def test_a_step_folder_without_fingerprint_is_not_trusted(configs, run_copy):
    (run_copy / "tokenizer" / "fingerprint.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer: no fingerprint.json says what made it; bench: an input that is rerun \(tokenizer\)"):
        run_pipeline(_cfg(configs, run_copy))
