"""UserTokenizerStage at toy size: fit reads train users only and checkpoints the fitted
tokenizer (dims included), predict from the checkpoint and ``load_from_checkpoint`` give the same
codes, the output's meta says it is a token row with its bytes per user, the export reloads."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.store import read_stage_output
from foundv2.launch import best_or_last_checkpoint
from foundv2.nn.user_codes import UserCodesConfig, UserCodeTokenizer
from foundv2.stages.base import DIMS_KEY
from foundv2.stages.user_tokenizer import UserTokenizerStage, item_lists

CODES = UserCodesConfig(factor_dim=8, history_dim=4, future_dim=4, recent_items=5, levels=3, codes=16)


def _trainer(root, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), **kw)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user_tok")
    dm = UserDataModule(dataset="synthetic", loader_args={"n_users": 300, "seed": 1}, window_mode="week",
                        text_encoder="hashing", cache_dir=str(tmp / "cache"), batch_size=64, progress=False)
    stage = UserTokenizerStage(CODES, export_dir=str(tmp / "export"))
    trainer = _trainer(tmp / "fit", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                       callbacks=[L.pytorch.callbacks.ModelCheckpoint(save_last=True)])
    trainer.fit(stage, datamodule=dm)
    return tmp, dm, stage


def test_fit_is_the_tokenizer_fitted_on_train_users(fitted):
    _, dm, stage = fitted
    train = dm.rows("train")
    ref = UserCodeTokenizer(stage.model.num_items, CODES).fit(
        item_lists(dm.table, train, "h_item"), item_lists(dm.table, train, "f_item"))
    assert torch.equal(ref.quantizers[0].codebook, stage.model.quantizers[0].codebook)


def test_predict_from_the_checkpoint_and_load_from_checkpoint_agree(fitted):
    tmp, dm, stage = fitted
    ckpt = best_or_last_checkpoint(tmp / "fit")
    assert torch.load(ckpt, weights_only=False)[DIMS_KEY]["num_items"] == stage.model.num_items
    # predict as foundv2.launch.predict_stage does: a fresh stage, the checkpoint, the DataModule
    fresh = UserTokenizerStage(CODES, predict_dir=str(tmp / "tokens"))
    _trainer(tmp / "pred").predict(fresh, datamodule=dm, ckpt_path=str(ckpt), return_predictions=False)
    ds, meta = read_stage_output(tmp / "tokens")
    assert len(ds) == len(dm.table)
    assert meta["row_kind"] == "tokens" and meta["bytes_per_user"] == 1.5 and meta["kind"] == "user_tokens"
    assert meta["dims"]["num_items"] == stage.model.num_items
    codes = np.asarray(ds.with_format("numpy")["user_codes"])
    rows = np.asarray(ds["row"], np.int64)
    hist = item_lists(dm.table, rows, "h_item")
    assert np.array_equal(stage.model.encode(hist).numpy(), codes)
    loaded = UserTokenizerStage.load_from_checkpoint(ckpt)  # no DataModule: the dims come from the checkpoint
    assert np.array_equal(loaded.model.encode(hist).numpy(), codes)
    assert np.array_equal(UserCodeTokenizer.from_pretrained(tmp / "export").encode(hist).numpy(), codes)
    emb = np.asarray(ds.with_format("numpy")["user_emb"], np.float32)  # what the bench reads: the decoded codes
    assert emb.shape == (len(ds), 8)
    # report.json: the share of users whose whole code tuple another user shares (the bench shows it)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    want = float((np.repeat(counts, counts) > 1).mean())
    report = json.loads((tmp / "tokens" / "report.json").read_text())
    assert report["users"] == len(ds) and report["collisions"]["collision_rate"] == pytest.approx(want)
    assert np.allclose(emb, stage.model.decode(torch.as_tensor(codes)).numpy(), atol=1e-6)


def test_product_codes_one_code_per_block():
    hist = [np.arange(i % 7, i % 7 + 5) for i in range(80)]
    tok = UserCodeTokenizer(20, UserCodesConfig(factor_dim=6, history_dim=4, future_dim=0, recent_items=0, levels=4,
                                                codes=8, groups=4)).fit(hist)
    codes = tok.encode(hist)
    assert codes.shape == (80, 4) and tok.bytes_per_user == 4 * 3 / 8
    # each block of one dimension is decoded by its own codebook
    dec = tok.decode(codes)
    for g, q in enumerate(tok.quantizers):
        assert torch.equal(dec[:, g : g + 1], q.decode_codes(codes[:, g : g + 1], torch.zeros(80, dtype=torch.long)))
    with pytest.raises(ValueError, match="groups"):
        UserCodesConfig(factor_dim=6, history_dim=4, future_dim=0, recent_items=0, levels=4, groups=3)


def test_launch_fit_and_predict_stage(tmp_path):
    """What a pipeline step runs: launch.fit_stage (checkpoints in the stage folder), then
    launch.predict_stage from that folder's checkpoint, on the shipped config's trainer settings."""
    from foundv2.launch import fit_stage, predict_stage
    from tests.helpers import ROOT

    stage_dir = tmp_path / "user_tokens"
    args = ["--config", str(ROOT / "experiments/synthetic/data.yaml"),
            "--config", str(ROOT / "experiments/movielens-1m/user-tokenizer.yaml"),
            "--data.loader_args", '{"n_users": 200, "seed": 0}', "--data.cache_dir", str(tmp_path / "cache"),
            "--data.progress", "false", "--trainer.default_root_dir", str(stage_dir),
            "--trainer.logger.init_args.save_dir", str(stage_dir), "--trainer.enable_progress_bar", "false",
            "--model.user_codes.factor_dim", "8", "--model.user_codes.history_dim", "4",
            "--model.user_codes.future_dim", "4", "--model.user_codes.levels", "4", "--model.user_codes.groups", "4",
            "--model.user_codes.codes", "16", "--model.export_dir", str(stage_dir / "export")]
    fit_stage(args, stage_dir, say=lambda _: None)
    predict_stage([*args, "--model.predict_dir", str(stage_dir / "tokens")], stage_dir)
    ds, meta = read_stage_output(stage_dir / "tokens")
    assert meta["row_kind"] == "tokens" and meta["bytes_per_user"] == 2.0 and meta["groups"] == 4
    codes = np.asarray(ds.with_format("numpy")["user_codes"])
    assert codes.shape == (len(ds), 4) and codes.max() < 16
