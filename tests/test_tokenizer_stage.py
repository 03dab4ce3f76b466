"""TokenizerStage end to end at toy size: fit (fp32 and bf16-mixed), predict, export and reload."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.store import read_stage_output
from foundv2.nn.mrqvae import RQVAEConfig
from foundv2.nn.quantizer import QuantizerConfig
from foundv2.stages.tokenizer import TokenizerStage
from tests.helpers import run_cli


def _dm(tmp_path, **kw) -> UserDataModule:
    return UserDataModule(dataset="synthetic", loader_args={"n_users": 300, "seed": 1}, window_mode="week",
                          text_encoder="hashing", cache_dir=str(tmp_path / "cache"), batch_size=32, progress=False,
                          **kw)


def _stage(tmp_path, **kw) -> TokenizerStage:
    return TokenizerStage(quantizer=QuantizerConfig(n_shared_levels=2, n_specific_levels=1, shared_codes=16,
                                                    specific_codes=8, kmeans_buffer=256, respawn_every=10),
                          rqvae=RQVAEConfig(code_dim=8, hidden=[32]), **kw)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_logs_every_term_and_uses_the_codebooks(tmp_path, precision):
    L.seed_everything(0)
    stage = _stage(tmp_path)
    trainer = _trainer(max_epochs=3, precision=precision)
    trainer.fit(stage, datamodule=_dm(tmp_path))
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("train/recon_mse_epoch", "train/loss_codebook_epoch", "train/loss_commit_epoch",
                "val/collision_rate", "val/unique_frac", "codebook/util/L0/shared", "codebook/perplexity/L2"):
        assert key in m and np.isfinite(m[key]), key
    for src in ("payment", "item", "search", "app", "profile"):
        assert f"train/recon_mse/{src}_epoch" in m
    # k-means init + respawn keep the codebooks in use (collapse would leave most codes dead)
    assert min(v for k, v in m.items() if k.startswith("codebook/util/")) > 0.5


def test_predict_report_and_pretrained_roundtrip(tmp_path):
    L.seed_everything(0)
    stage = _stage(tmp_path, predict_dir=str(tmp_path / "tokens"), export_dir=str(tmp_path / "export"))
    dm = _dm(tmp_path)
    _trainer(max_epochs=2).fit(stage, datamodule=dm)
    _trainer().predict(stage, datamodule=dm, return_predictions=False)
    tokens, meta = read_stage_output(tmp_path / "tokens")
    assert len(tokens) == 300 and meta["kind"] == "tokens" and meta["levels"] == 3
    report = json.loads((tmp_path / "tokens" / "report.json").read_text())
    assert report["storage"]["bits_per_code"] == [4, 4, 3]
    assert report["storage"]["ratio_fp32"] > 10
    assert report["collisions_disambiguated"]["collision_rate"] == 0.0  # the extra token makes tuples unique
    ids = np.concatenate([np.asarray(t).reshape(-1) for t in tokens["token_ids"]])
    assert ids.min() >= 0 and ids.max() < meta["vocab_size"]
    # a fresh stage from the exported folder gives identical tokens
    again = TokenizerStage(pretrained=str(tmp_path / "export"), predict_dir=str(tmp_path / "tokens2"))
    _trainer().predict(again, datamodule=_dm(tmp_path), return_predictions=False)
    tokens2, _ = read_stage_output(tmp_path / "tokens2")
    a = {u: np.asarray(c) for u, c in zip(tokens["user_id"], tokens["codes"], strict=True)}
    b = {u: np.asarray(c) for u, c in zip(tokens2["user_id"], tokens2["codes"], strict=True)}
    assert a.keys() == b.keys() and all(np.array_equal(a[u], b[u]) for u in a)


def test_tokenize_command_and_bad_folder(tmp_path):
    L.seed_everything(0)
    stage = _stage(tmp_path, export_dir=str(tmp_path / "export"))
    _trainer(max_epochs=1).fit(stage, datamodule=_dm(tmp_path))
    data = ["--data.dataset", "synthetic", "--data.loader_args", '{"n_users": 300, "seed": 1}',
            "--data.window_mode", "week", "--data.text_encoder", "hashing", "--data.cache_dir",
            str(tmp_path / "cache"), "--data.progress", "false"]
    res = run_cli("tokenize", "--tokenizer", str(tmp_path / "export"), "--output", str(tmp_path / "tok"), *data,
                  "--accelerator", "cpu", "--devices", "1")
    assert "collisions" in res.stdout
    import subprocess
    import sys

    from tests.helpers import ROOT

    bad = subprocess.run([sys.executable, "-m", "foundv2", "tokenize", "--tokenizer", str(tmp_path), "--output",
                          str(tmp_path / "x"), *data], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not a tokenizer folder" in bad.stderr and "Traceback" not in bad.stderr


def test_features_input_from_a_stage_output(tmp_path):
    """The tokenizer reads any features dataset: here the frozen pooled stage 1's predict output."""
    from foundv2.stages.qformer import QFormerStage

    _trainer().predict(QFormerStage(backbone="pooled", predict_dir=str(tmp_path / "feat")), datamodule=_dm(tmp_path),
                       return_predictions=False)
    stage = _stage(tmp_path)
    _trainer(max_steps=5, limit_val_batches=1).fit(stage, datamodule=_dm(tmp_path, features_dir=str(tmp_path / "feat")))
    assert torch.isfinite(stage.trainer.callback_metrics["train/loss_step"])
    assert stage.sources[-1] == "profile"


def test_corrupt_checkpoint_and_tokenizer_folder_are_clear_errors(tmp_path, monkeypatch):
    import subprocess
    import sys

    from tests.helpers import ROOT

    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"\x00" * 64)
    res = subprocess.run([sys.executable, "-m", "foundv2", "predict", "--config",
                          str(ROOT / "experiments/synthetic/data.yaml"), "--config",
                          str(ROOT / "experiments/synthetic/tokenizer.yaml"), "--ckpt_path", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "not a readable checkpoint" in res.stderr and "Traceback" not in res.stderr
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    stage = TokenizerStage(pretrained=str(folder))
    from data_modules.schema import DataError
    from data_modules.store import ALLOW_NO_CHECKSUM_ENV

    with pytest.raises(DataError, match="no checksums.json"):  # written without checksums: refused unless allowed
        _trainer().predict(stage, datamodule=_dm(tmp_path), return_predictions=False)
    monkeypatch.setenv(ALLOW_NO_CHECKSUM_ENV, "1")
    with pytest.raises(DataError, match="config cannot be read"):
        _trainer().predict(TokenizerStage(pretrained=str(folder)), datamodule=_dm(tmp_path), return_predictions=False)
