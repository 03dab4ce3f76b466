"""UserTokenizerStage at toy size: fit reads train users only, predict writes codes, export reloads."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from data_modules.datamodule import UserDataModule
from data_modules.store import read_stage_output
from foundv2.bench.user_tokens import user_token_representations
from foundv2.nn.user_codes import UserCodeTokenizer
from foundv2.stages.user_tokenizer import UserTokenizerStage, item_lists


def test_fit_predict_export(tmp_path):
    dm = UserDataModule(dataset="synthetic", loader_args={"n_users": 300, "seed": 1}, window_mode="week",
                        text_encoder="hashing", cache_dir=str(tmp_path / "cache"), batch_size=64, progress=False)
    stage = UserTokenizerStage(factor_dim=8, history_dim=4, future_dim=4, recent_items=5, levels=3, codes=16,
                               predict_dir=str(tmp_path / "tokens"), export_dir=str(tmp_path / "export"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_epochs=1, limit_train_batches=1,
                        limit_val_batches=0)
    trainer.fit(stage, datamodule=dm)
    # the fit is exactly a UserCodeTokenizer fitted on the train users' histories and futures
    train = dm.rows("train")
    ref = UserCodeTokenizer(stage.model.config["num_items"], 8, 4, 4, 5, levels=3, codes=16).fit(
        item_lists(dm.table, train, "h_item"), item_lists(dm.table, train, "f_item"))
    assert torch.equal(ref.quantizer.codebook, stage.model.quantizer.codebook)
    trainer.predict(stage, datamodule=dm)
    ds, meta = read_stage_output(tmp_path / "tokens")
    assert len(ds) == len(dm.table) and meta["bytes_per_user"] == 1.5
    codes = np.asarray(ds.with_format("numpy")["user_codes"])
    reloaded = UserCodeTokenizer.from_pretrained(tmp_path / "export")
    rows = np.asarray(ds["row"], np.int64)
    assert np.array_equal(reloaded.encode(item_lists(dm.table, rows, "h_item")).numpy(), codes)
    reps = user_token_representations(tmp_path / "tokens", len(dm.table))
    assert reps["user_codes_bag"][0].shape == (len(dm.table), 48) and reps["user_codes_bag"][0].sum() == 3 * len(ds)
    assert reps["user_codes_dec"][0].shape == (len(dm.table), 8)
