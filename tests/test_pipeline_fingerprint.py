"""A pipeline run folder is never silently reused by another config, stage YAML or code."""

from __future__ import annotations

import json

import pytest

from data_modules.schema import DataError
from foundv2.pipeline import FINGERPRINT, PipelineConfig, _check_fingerprint, fingerprint
from tests.helpers import run_cli


def _cfg(tmp_path, on_change: str = "error") -> PipelineConfig:
    stage = tmp_path / "tok.yaml"
    if not stage.exists():
        stage.write_text("model: {}\n")
    return PipelineConfig(run_dir=str(tmp_path / "run"), tokenizer=str(stage), on_change=on_change)


def test_same_fingerprint_reuses_the_folder(tmp_path):
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _check_fingerprint(cfg, run)  # a fresh folder: records the fingerprint
    assert json.loads((run / FINGERPRINT).read_text()) == fingerprint(cfg)
    (run / "tokens").mkdir()
    (run / "tokens" / "part-0.arrow").write_text("x")
    _check_fingerprint(cfg, run)  # unchanged: nothing touched
    assert (run / "tokens" / "part-0.arrow").exists()


def test_changed_yaml_is_refused_then_restarted(tmp_path):
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _check_fingerprint(cfg, run)
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "fit.done").write_text("{}")
    (run / "notes.txt").write_text("mine")  # not a step output: never removed
    (tmp_path / "tok.yaml").write_text("model: {init_args: {lr: 0.1}}\n")
    with pytest.raises(DataError, match=r"yaml_sha256.*on_change restart"):
        _check_fingerprint(cfg, run)
    assert (run / "tokenizer" / "fit.done").exists()  # error mode touches nothing
    _check_fingerprint(_cfg(tmp_path, "restart"), run)
    assert not (run / "tokenizer").exists() and (run / "notes.txt").exists()
    assert json.loads((run / FINGERPRINT).read_text())["yaml_sha256"] == fingerprint(cfg)["yaml_sha256"]


def test_folder_without_fingerprint_but_with_steps_is_refused(tmp_path):
    """A folder written before fingerprints existed (or by hand) is not trusted."""
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    (run / "bench").mkdir(parents=True)
    with pytest.raises(DataError, match="no fingerprint.json says what made them"):
        _check_fingerprint(cfg, run)


def test_cli_reports_a_stale_folder_without_traceback(tmp_path):
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    conf = tmp_path / "pipe.yaml"
    conf.write_text(json.dumps({"pipeline": {"run_dir": str(run), "tokenizer": cfg.tokenizer}}))
    res = run_cli("pipeline", "--config", str(conf), check=False)
    assert res.returncode == 2 and "on_change restart" in res.stderr and "Traceback" not in res.stderr
    assert (run / "stage1").exists()
