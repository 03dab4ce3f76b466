"""Every stage output keeps, per slice, the window key the prepared data assigned (``slice_key``),
and the next stage carries it on: features (stage 1) → slice batches → tokens (stage 2)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest

from data_modules.datamodule import UserDataModule
from data_modules.schema import DataError
from data_modules.store import read_stage_output
from foundv2.nn.mrqvae import RQVAEConfig
from foundv2.nn.qformer import QFormerConfig
from foundv2.nn.quantizer import QuantizerConfig
from foundv2.stages.qformer import QFormerStage
from foundv2.stages.tokenizer import TokenizerStage

TINY_QFORMER = QFormerConfig(dim=16, num_layers=1, num_heads=2)
CAPS = {"max_windows": 6, "max_events": 40}  # small caps: the kept windows start past the oldest ones


def make_dm(cache: Path, window_mode: str = "week", **kw) -> UserDataModule:
    return UserDataModule(dataset="synthetic", loader_args={"n_users": 120, "seed": 7}, window_mode=window_mode,
                          window_size=4, text_encoder="hashing", cache_dir=str(cache), batch_size=32, progress=False,
                          **{**CAPS, **kw})


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, **kw)


def expected_slices(table, row: int, max_windows: int, max_events: int, profile_source: int | None) -> list:
    """Sorted (window key, source) of a prepared user's slices under the batch caps, read from the
    prepared table alone: events of the latest ``max_windows`` windows, then the latest
    ``max_events`` of those; each event's key is ``w_key[h_window]``."""
    r = table[row]
    window = np.asarray(r["h_window"], np.int64)
    source = np.asarray(r["h_source"], np.int64)
    w_key = np.asarray(r["w_key"], np.int64)
    kept = np.flatnonzero(window >= int(r["n_windows"]) - max_windows)[-max_events:]
    pairs = {(int(w_key[window[e]]), int(source[e])) for e in kept}
    if profile_source is not None:
        pairs.add((-1, profile_source))
    return sorted(pairs)


def assert_window_keys(folder: Path, dm: UserDataModule) -> None:
    """Each user's (slice_key, slice_source) pairs in a stage output equal the prepared data's."""
    ds, meta = read_stage_output(folder)
    table = dm.table.with_format("numpy", columns=["h_window", "h_source", "w_key", "n_windows"])
    n_sources = len(dm.spec.sources)
    profile = n_sources if dm.spec.tabular_inputs else None
    assert len(ds) == len(dm.table)
    checked = 0
    for out in ds.with_format("numpy"):
        got = sorted(zip(out["slice_key"].tolist(), out["slice_source"].tolist(), strict=True))
        assert got == expected_slices(table, int(out["row"]), dm.hparams.max_windows, dm.hparams.max_events,
                                      profile), f"user {out['user_id']} ({meta['kind']})"
        checked += len(got) > 1
    assert checked > len(ds) // 2  # most users have event slices, not only a profile slice


@pytest.mark.parametrize("window_mode", ["day", "week", "events"])
def test_features_carry_the_prepared_window_keys(tmp_path, window_mode):
    dm = make_dm(tmp_path / "cache", window_mode)
    trainer().predict(QFormerStage(backbone="pooled", predict_dir=str(tmp_path / "features")), dm,
                      return_predictions=False)
    assert_window_keys(tmp_path / "features", dm)
    # the keys are not the window numbers: the caps drop the oldest windows
    ds, _ = read_stage_output(tmp_path / "features")
    assert any(np.any(np.asarray(k)[np.asarray(s) < 4] != np.asarray(w)[np.asarray(s) < 4])
               for k, w, s in zip(ds["slice_key"], ds["slice_window"], ds["slice_source"], strict=True))


def test_tokens_carry_the_keys_of_the_features_they_read(tmp_path):
    cache = tmp_path / "cache"
    L.seed_everything(0)
    stage1 = QFormerStage(qformer=TINY_QFORMER, predict_dir=str(tmp_path / "features"))
    trainer(max_steps=2, limit_val_batches=0).fit(stage1, make_dm(cache))
    trainer().predict(stage1, make_dm(cache), return_predictions=False)
    dm = make_dm(cache)
    dm.prepare_data()
    dm.setup()
    assert_window_keys(tmp_path / "features", dm)
    tok = TokenizerStage(quantizer=QuantizerConfig(n_shared_levels=1, n_specific_levels=1, shared_codes=8,
                                                   specific_codes=4, kmeans_buffer=64),
                         rqvae=RQVAEConfig(code_dim=8, hidden=[16]), predict_dir=str(tmp_path / "tokens"))
    features = make_dm(cache, features_dir=str(tmp_path / "features"))
    trainer(max_steps=3, limit_val_batches=0).fit(tok, features)
    trainer().predict(tok, features, return_predictions=False)
    assert_window_keys(tmp_path / "tokens", dm)
    # a tokens folder is not a features dataset: the DataModule says so
    with pytest.raises(DataError, match="'tokens' dataset, not a 'features' one"):
        make_dm(cache, features_dir=str(tmp_path / "tokens")).setup()
