"""Each learning stage under real 2-process CPU DDP (gloo): fit runs, predict equals 1-process predict."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.store import read_stage_output
from tests.helpers import ROOT, run_cli

DATA = ["--data.dataset", "synthetic", "--data.loader_args", '{"n_users": 240, "seed": 4}', "--data.window_mode", "week",
        "--data.text_encoder", "hashing", "--data.batch_size", "16", "--data.progress", "false"]
CPU = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
DDP2 = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


def _by_user(folder, column):
    ds, meta = read_stage_output(folder)
    return {u: np.asarray(v) for u, v in zip(ds["user_id"], ds[column], strict=True)}, meta


def _same_output(tmp_path, config, extra, column, atol):
    one, _ = _by_user(tmp_path / "p1", column)
    two, meta = _by_user(tmp_path / "p2", column)
    assert meta["world_size"] == 2 and len(meta["parts"]) == 2
    assert one.keys() == two.keys() and len(one) == 240
    import datasets  # a stage output is a Hugging Face dataset folder: both ranks' parts, one dataset

    hf = datasets.load_from_disk(str(tmp_path / "p2"))
    assert len(hf) == 240 and sorted(hf["user_id"]) == sorted(two)
    for u in one:
        np.testing.assert_allclose(one[u].astype(float), two[u].astype(float), atol=atol)


@pytest.mark.ddp
def test_tokenizer_ddp_fit_and_predict(tmp_path):
    cfg = str(ROOT / "experiments/synthetic/tokenizer.yaml")
    common = ["--config", cfg, *DATA, *CPU, "--data.cache_dir", str(tmp_path / "cache"),
              "--model.quantizer.shared_codes", "16", "--model.quantizer.specific_codes", "8", "--model.rqvae.code_dim", "8",
              "--model.quantizer.kmeans_buffer", "256", "--model.quantizer.respawn_every", "5"]
    run_cli("fit", *common, *DDP2, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.export_dir", str(tmp_path / "export"))
    pred = [*common, "--trainer.logger", "false", "--model.pretrained", str(tmp_path / "export"),
            "--trainer.default_root_dir", str(tmp_path)]
    run_cli("predict", *pred, "--trainer.devices", "1", "--model.predict_dir", str(tmp_path / "p1"))
    run_cli("predict", *pred, *DDP2, "--model.predict_dir", str(tmp_path / "p2"))
    _same_output(tmp_path, cfg, pred, "codes", atol=0)


def _fit_then_predict_twice(tmp_path, cfg: str, common: list[str], fit_args: list[str]) -> None:
    """A 2-process fit, then its last checkpoint's predict under 1 and 2 processes: the same user_emb."""
    run_cli("fit", *common, *DDP2, *fit_args, "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path))
    ckpt = sorted(tmp_path.rglob("last.ckpt"))[-1]
    pred = [*common, "--trainer.logger", "false", "--ckpt_path", str(ckpt), "--trainer.default_root_dir",
            str(tmp_path)]
    run_cli("predict", *pred, "--trainer.devices", "1", "--model.predict_dir", str(tmp_path / "p1"))
    run_cli("predict", *pred, *DDP2, "--model.predict_dir", str(tmp_path / "p2"))
    _same_output(tmp_path, cfg, pred, "user_emb", atol=1e-5)


@pytest.mark.ddp
def test_qformer_ddp_fit_and_predict(tmp_path):
    cfg = str(ROOT / "experiments/synthetic/qformer.yaml")
    common = ["--config", cfg, *DATA, *CPU, "--data.cache_dir", str(tmp_path / "cache"), "--model.qformer.dim", "16",
              "--model.qformer.num_layers", "1"]
    _fit_then_predict_twice(tmp_path, cfg, common, ["--trainer.max_steps", "6", "--trainer.limit_val_batches", "2"])


@pytest.mark.ddp
def test_qanchor_ddp_fit_and_predict(tmp_path):
    """Query-as-Anchor with the tiny LM: a 2-process fit (InfoNCE over the gathered batch), then
    its predict under 2 processes equals 1 process."""
    cfg = str(ROOT / "experiments/synthetic/qanchor.yaml")
    common = ["--config", cfg, *DATA, *CPU, "--data.cache_dir", str(tmp_path / "cache"), "--data.max_events", "24"]
    _fit_then_predict_twice(tmp_path, cfg, common, ["--trainer.max_steps", "4"])
