"""Stage 3 under real 2-process CPU DDP (gloo): the fit gathers its negatives across ranks and
predict on 2 ranks equals predict on 1."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.store import read_stage_output
from tests.helpers import ROOT, run_cli

DATA_CONFIG = ["--config", str(ROOT / "experiments/synthetic/data.yaml")]
DATA = ["--data.loader_args", '{"n_users": 240, "seed": 4}', "--data.text_encoder", "hashing",
        "--data.batch_size", "16", "--data.progress", "false"]
CPU = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
DDP2 = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.mark.slow  # a tokenizer fit and three 2-process runs: make test-full
@pytest.mark.ddp
def test_alignment_ddp_fit_and_predict(tmp_path):
    data = [*DATA, "--data.cache_dir", str(tmp_path / "cache")]  # after every --config: they win
    tok = [*DATA_CONFIG, "--config", str(ROOT / "experiments/synthetic/tokenizer.yaml"), *data, *CPU,
           "--model.quantizer.shared_codes", "16", "--model.quantizer.specific_codes", "8", "--model.rqvae.code_dim", "8",
           "--model.quantizer.kmeans_buffer", "256", "--model.quantizer.respawn_every", "5"]
    run_cli("fit", *tok, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "tok"),
            "--trainer.logger", "false", "--model.export_dir", str(tmp_path / "export"))
    run_cli("predict", *tok, "--trainer.logger", "false", "--model.pretrained", str(tmp_path / "export"),
            "--trainer.default_root_dir", str(tmp_path / "tok"), "--model.predict_dir", str(tmp_path / "tokens"))
    align = [*DATA_CONFIG, "--config", str(ROOT / "experiments/synthetic/alignment.yaml"), *data, *CPU,
             "--data.tokens_dir", str(tmp_path / "tokens"), "--model.tokenizer_dir", str(tmp_path / "export"),
             "--model.sequence.dim", "16", "--model.sequence.num_layers", "1"]
    run_cli("fit", *align, *DDP2, "--trainer.max_steps", "6", "--trainer.limit_val_batches", "2",
            "--trainer.default_root_dir", str(tmp_path / "al"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "al"))
    ckpt = sorted((tmp_path / "al").rglob("last.ckpt"))[-1]
    pred = [*align, "--trainer.logger", "false", "--ckpt_path", str(ckpt), "--trainer.default_root_dir",
            str(tmp_path / "al")]
    run_cli("predict", *pred, "--trainer.devices", "1", "--model.predict_dir", str(tmp_path / "p1"))
    run_cli("predict", *pred, *DDP2, "--model.predict_dir", str(tmp_path / "p2"))
    one, _ = read_stage_output(tmp_path / "p1")
    two, meta = read_stage_output(tmp_path / "p2")
    assert meta["world_size"] == 2 and len(meta["parts"]) == 2 and len(one) == len(two) == 240
    a = {u: np.asarray(v) for u, v in zip(one["user_id"], one["user_emb"], strict=True)}
    b = {u: np.asarray(v) for u, v in zip(two["user_id"], two["user_emb"], strict=True)}
    assert a.keys() == b.keys()
    for u in a:
        np.testing.assert_allclose(a[u], b[u], atol=1e-5)
