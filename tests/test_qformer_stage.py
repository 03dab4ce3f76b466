"""QFormerStage (stage 1): training, no future leak, the features dataset the tokenizer reads,
bf16 on CPU, the frozen backbones, the CLI predict from a checkpoint and the shipped configs
(a checkpoint loaded with no DataModule: tests/test_stage_base.py)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.store import read_stage_output
from foundv2.nn.mrqvae import RQVAEConfig
from foundv2.nn.qformer import QFormerConfig
from foundv2.nn.quantizer import QuantizerConfig
from foundv2.nn.slices import PooledSliceFeatures, slice_target_dim
from foundv2.objectives import ObjectivesConfig
from foundv2.stages.base import OptimConfig
from foundv2.stages.qformer import QFormerStage, semantic_mask
from foundv2.stages.tokenizer import TokenizerStage

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "experiments" / d / "qformer.yaml" for d in ("synthetic", "movielens-100k", "movielens-1m")]
TINY = {"qformer": QFormerConfig(dim=16, num_layers=1, num_heads=2, num_queries=2)}


def make_dm(cache: Path, **kw) -> UserDataModule:
    args = {"dataset": "synthetic", "loader_args": {"n_users": 300, "seed": 0}, "window_mode": "day",
            "text_encoder": "hashing", "cache_dir": str(cache), "progress": False, "batch_size": 32, **kw}
    return UserDataModule(**args)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qformer") / "cache"
    make_dm(path).prepare_data()
    return path


def trainer(**kw) -> L.Trainer:
    args = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, **kw}
    return L.Trainer(**args)


class StepLosses(L.Callback):
    def __init__(self):
        self.total: list[float] = []
        self.keys: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.total.append(float(outputs["loss"]))
        self.keys |= set(trainer.callback_metrics)


def test_fit_losses_finite_and_total_falls(cache):
    L.seed_everything(0)
    rec = StepLosses()
    stage = QFormerStage(**TINY, optim=OptimConfig(lr=3e-3))
    trainer(max_steps=30, limit_val_batches=1, callbacks=[rec]).fit(stage, make_dm(cache))
    assert len(rec.total) == 30 and all(math.isfinite(v) for v in rec.total)
    assert np.mean(rec.total[-5:]) < 0.7 * np.mean(rec.total[:5])
    for term in ("fine", "window", "semantic", "recon", "total"):
        assert f"train/loss/{term}_step" in rec.keys
    assert {"train/acc/window_step", "train/acc/semantic_step", "train/recon_mse/payment_step",
            "val/loss/total", "val/recon_mse/app"} <= rec.keys
    assert "val/loss/semantic" not in rec.keys  # val users have no future text: nothing to log


def test_semantic_term_never_reads_val_or_test_futures(cache):
    dm = make_dm(cache, batch_size=16)
    dm.setup()
    stage = QFormerStage(**TINY)
    stage.build(dm.dims())
    batch = next(iter(dm.train_dataloader()))
    assert batch["has_fut_text"].all()
    # hand-made leak: rows 0 and 1 are val / test users that still claim a future text
    batch["split"][0], batch["split"][1] = 1, 2
    assert semantic_mask(batch).tolist() == [False, False] + [True] * 14
    batch["fut_text_emb"] = batch["fut_text_emb"].clone().requires_grad_(True)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="has_fut_text"):
        total, logs = stage.model_step(batch)
    total.backward()
    grad = batch["fut_text_emb"].grad
    assert float(logs["n/semantic"]) == 14
    assert grad[:2].abs().sum() == 0  # the val/test futures reach no loss
    assert grad[2:].abs().sum() > 0
    # and the loss does not change when those futures change
    other = dict(batch, fut_text_emb=batch["fut_text_emb"].detach().clone())
    other["fut_text_emb"][:2] = torch.randn_like(other["fut_text_emb"][:2])
    torch.manual_seed(0)
    _, logs2 = stage.model_step(other)
    assert torch.allclose(logs["loss/semantic"], logs2["loss/semantic"])


def test_predict_writes_features_the_tokenizer_trains_on(cache, tmp_path):
    L.seed_everything(0)
    stage = QFormerStage(**TINY, predict_dir=str(tmp_path / "features"))
    dm = make_dm(cache)
    trainer(max_steps=3, limit_val_batches=0).fit(stage, dm)
    trainer().predict(stage, dm, return_predictions=False)
    ds, meta = read_stage_output(tmp_path / "features")
    assert meta["kind"] == "features" and meta["dim"] == 16
    import datasets  # the folder is a Hugging Face dataset folder, as the docs say

    assert datasets.load_from_disk(str(tmp_path / "features"))["user_id"] == ds["user_id"]
    assert meta["sources"] == ["payment", "item", "search", "app", "profile"]
    assert len(ds) == 300 and sorted(ds["user_id"]) == sorted(np.asarray(dm.table["user_id"]).tolist())
    row = ds.with_format("numpy")[0]
    n = len(row["slice_window"])
    # user_emb: mean and last window representation (user_pool=mean_last), then the activity features
    act = dm.dims()["activity_dim"]
    assert np.stack(row["feat"]).shape == (n, 16) and row["user_emb"].shape == (32 + act,)
    assert meta["user_dim"] == 32 + act
    assert (row["slice_source"] == 4).sum() == 1  # one profile slice, at window 0
    assert row["slice_window"][row["slice_source"] == 4][0] == 0
    # one slice per present (window, source): compare with the event batch
    batch = next(iter(dm.predict_dataloader()))
    counts = torch.zeros(int(batch["win_mask"].shape[1]), 4)
    ok = batch["ev_mask"][0]
    counts.index_put_((batch["ev_window"][0][ok], batch["ev_source"][0][ok]), torch.ones(int(ok.sum())),
                      accumulate=True)
    assert n == int((counts > 0).sum()) + 1
    # the activity part is the batch's activity features of that user, from the whole history
    first = ds.with_format("numpy")[[int(i) for i in np.flatnonzero(np.asarray(ds["user_id"]) == int(batch["user_id"][0]))][0]]
    assert np.allclose(first["user_emb"][32:], batch["activity"][0].numpy())
    # the tokenizer reads the folder through the DataModule
    tok = TokenizerStage(quantizer=QuantizerConfig(n_shared_levels=1, n_specific_levels=1, shared_codes=16,
                                                   specific_codes=8, kmeans_buffer=64), rqvae=RQVAEConfig(code_dim=8, hidden=[16]))
    rec = StepLosses()
    trainer(max_steps=5, limit_val_batches=1, callbacks=[rec]).fit(
        tok, make_dm(cache, features_dir=str(tmp_path / "features")))
    assert tok.sources == meta["sources"] and tok.feature_dim == 16
    assert len(rec.total) == 5 and all(math.isfinite(v) for v in rec.total)


def test_view_items_put_each_windows_item_mean_beside_its_view(cache, tmp_path):
    L.seed_everything(0)
    stage = QFormerStage(**TINY, view_items=True, predict_dir=str(tmp_path / "features"))
    dm = make_dm(cache, batch_size=300)  # one predict batch: its event tensors index every user
    trainer(max_steps=2, limit_val_batches=0).fit(stage, dm)
    trainer().predict(stage, dm, return_predictions=False)
    ds, meta = read_stage_output(tmp_path / "features")
    assert meta["dim"] == 16 and meta["feature_dim"] == 32
    batch = next(iter(dm.predict_dataloader()))
    table = stage.encoder.item.weight.detach()
    by_user = {int(u): i for i, u in enumerate(batch["user_id"])}
    checked = 0
    for row in ds.with_format("numpy").select(range(20)):
        b, feat = by_user[int(row["user_id"])], np.stack(row["feat"])
        assert feat.shape[1] == 32
        assert np.all(feat[row["slice_source"] == 4, 16:] == 0)  # the profile slice: padded
        ok = batch["ev_mask"][b].bool() & (batch["ev_item"][b] > 0)
        for j in np.flatnonzero(row["slice_source"] < 4):
            sel = ok & (batch["ev_window"][b] == int(row["slice_window"][j])) & (batch["ev_source"][b] == int(row["slice_source"][j]))
            want = table[batch["ev_item"][b][sel]].mean(0).numpy() if sel.any() else np.zeros(16, np.float32)
            np.testing.assert_allclose(feat[j, 16:], want, rtol=1e-5, atol=1e-6)
            checked += int(sel.any())
    assert checked > 50  # windows with items were compared, not only empty ones
    tok = TokenizerStage(quantizer=QuantizerConfig(n_shared_levels=1, n_specific_levels=1, shared_codes=16,
                                                   specific_codes=8, kmeans_buffer=64), rqvae=RQVAEConfig(code_dim=8, hidden=[16]))
    trainer(max_steps=2, limit_val_batches=0).fit(tok, make_dm(cache, features_dir=str(tmp_path / "features")))
    assert tok.feature_dim == 32
    with pytest.raises(ValueError, match="view_items"):
        QFormerStage(backbone="pooled", view_items=True)


def test_bf16_mixed_fit_on_cpu(cache):
    L.seed_everything(0)
    rec = StepLosses()
    trainer(max_steps=4, limit_val_batches=0, precision="bf16-mixed", callbacks=[rec]).fit(
        QFormerStage(**TINY), make_dm(cache))
    assert len(rec.total) == 4 and all(math.isfinite(v) for v in rec.total)


@pytest.mark.parametrize("backbone", ["text_encoder", "pooled"])
def test_frozen_backbones_predict_and_refuse_fit(cache, tmp_path, backbone):
    stage = QFormerStage(backbone=backbone, predict_dir=str(tmp_path / "features"))
    dm = make_dm(cache)
    trainer().predict(stage, dm, return_predictions=False)
    d = dm.dims()
    dim = (slice_target_dim(d["text_dim"]) + d["calendar_dim"] if backbone == "text_encoder" else
           PooledSliceFeatures(d["num_sources"], d["num_items"], d["num_categories"], d["text_dim"],
                               calendar_dim=d["calendar_dim"]).dim)
    ds, meta = read_stage_output(tmp_path / "features")
    assert meta["dim"] == dim and meta["backbone"] == backbone and meta["sources"][-1] == "profile"
    row = ds.with_format("numpy")[0]
    assert np.stack(row["feat"]).shape == (len(row["slice_window"]), dim)
    assert row["user_emb"].shape == (dim + d["activity_dim"],)  # the activity features beside the state
    with pytest.raises(ValueError, match="predict"):
        trainer(max_steps=1).fit(QFormerStage(backbone=backbone), dm)


def test_text_encoder_features_are_mean_text_and_log_count(cache):
    dm = make_dm(cache, batch_size=4)
    dm.setup()
    stage = QFormerStage(backbone="text_encoder")
    stage.build(dm.dims())
    batch = next(iter(dm.predict_dataloader()))
    out = stage(batch)
    first = (out["slice_user"] == 0) & (out["slice_source"] < 4)
    w, s = int(out["slice_window"][first][0]), int(out["slice_source"][first][0])
    sel = batch["ev_mask"][0] & (batch["ev_window"][0] == w) & (batch["ev_source"][0] == s)
    feat = out["feat"][first][0]
    d = batch["ev_text_emb"].shape[-1]
    assert torch.allclose(feat[:d], batch["ev_text_emb"][0][sel].mean(0), atol=1e-5)
    assert torch.isclose(feat[d], torch.log1p(sel.sum().float()))
    value = batch["ev_value"][0][sel].float()
    assert torch.isclose(feat[d + 1], (value.sign() * value.abs().log1p()).mean(), atol=1e-5)


def test_user_pool_modes(cache):
    """mean_last = [mean over real windows | last real window] of the window representations."""
    dm = make_dm(cache)
    dm.setup()
    batch = next(iter(dm.predict_dataloader()))
    L.seed_everything(0)
    stages = {}
    for pool in ("mean", "last", "mean_last", "items", "mean_last_items"):
        stages[pool] = QFormerStage(**TINY, user_pool=pool, activity=False)
        stages[pool].build(dm.dims())
        stages[pool].load_state_dict(stages["mean"].state_dict())
        stages[pool].eval()
    emb = {p: st.user_embedding(batch) for p, st in stages.items()}
    with_activity = QFormerStage(**TINY, user_pool="mean")  # the default: the activity features beside the pool
    with_activity.build(dm.dims())
    with_activity.load_state_dict(stages["mean"].state_dict())
    assert torch.equal(with_activity.eval().user_embedding(batch), torch.cat([emb["mean"], batch["activity"]], 1))
    assert emb["mean"].shape[1] == 16 and emb["mean_last"].shape[1] == 32
    assert torch.equal(emb["mean_last"], torch.cat([emb["mean"], emb["last"]], 1))
    assert not torch.allclose(emb["mean"], emb["last"])
    # items: the mean item-table row over each user's events that have an item, computed here by hand
    table = stages["items"].encoder.item.weight
    for b in range(batch["ev_item"].shape[0]):
        ids = batch["ev_item"][b][batch["ev_mask"][b].bool() & (batch["ev_item"][b] > 0)]
        assert len(ids) > 0
        assert torch.allclose(emb["items"][b], table[ids].mean(0), atol=1e-6)
    assert torch.equal(emb["mean_last_items"], torch.cat([emb["mean_last"], emb["items"]], 1))
    with pytest.raises(ValueError, match="user_pool"):
        QFormerStage(user_pool="max")


def test_item_factors_init_from_train_histories_once(cache):
    """item_init=factors: the item table starts as the collaborative factors of the *train* users'
    histories (exactly the train rows), and a resumed fit (items_fitted set by
    the checkpoint) does not refit over the trained table."""
    from foundv2.nn.item_factors import ItemFactors
    from foundv2.stages.base import train_item_lists

    dm = make_dm(cache)
    dm.setup()
    L.seed_everything(0)
    stage = QFormerStage(**TINY, item_init="factors", optim=OptimConfig(lr=0.0))
    trainer(max_steps=1, limit_val_batches=0).fit(stage, dm)
    table = stage.encoder.item.weight.detach()
    histories = train_item_lists(dm)
    assert len(histories) == int((np.asarray(dm.table["split"]) == 0).sum()) and sum(map(len, histories)) > 0
    fitted = ItemFactors(table.shape[0] - 1, table.shape[1]).fit(histories)
    cos = torch.nn.functional.cosine_similarity(table[1:], fitted.item_codes()[1:], dim=1)
    used = fitted.item_codes()[1:].norm(dim=1) > 0
    assert int(stage.items_fitted) == 1 and bool(used.any()) and torch.allclose(cos[used], torch.ones(()), atol=1e-5)
    assert torch.count_nonzero(table[0]) == 0  # row 0: no item
    stage.encoder.item.weight.data.zero_()
    stage.on_fit_start()  # as after a resume: the checkpoint's items_fitted is 1
    assert torch.count_nonzero(stage.encoder.item.weight) == 0
    plain = QFormerStage(**TINY)
    plain.build(dm.dims())
    assert "items_fitted" not in plain.state_dict()  # random init: old checkpoints still load
    with pytest.raises(ValueError, match="item_init"):
        QFormerStage(item_init="svd")


@pytest.mark.parametrize("fine_target", ["content", "state"])
def test_fine_target(cache, fine_target):
    """``content``: the fine term predicts the next window's pooled slice targets (every source
    side by side); ``state``: the next window's own representation."""
    dm = make_dm(cache)
    dm.setup()
    d = dm.dims()
    stage = QFormerStage(**TINY, fine_target=fine_target,
                         objectives=ObjectivesConfig(enabled={"window": False, "semantic": False, "recon": False}))
    stage.build(d)
    width = d["num_sources"] * slice_target_dim(d["text_dim"]) + 1 if fine_target == "content" else 16
    assert stage.objectives.fine.predictor[-1].out_features == width
    batch = next(iter(dm.train_dataloader()))
    total, logs = stage.model_step(batch)
    assert torch.isfinite(total) and set(logs) >= {"loss/fine", "acc/fine"}
    with pytest.raises(ValueError, match="fine_target"):
        QFormerStage(fine_target="events")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_configs_parse(path):
    from foundv2.launch import lightning_cli

    cli = lightning_cli(["--config", str(path.parent / "data.yaml"), "--config", str(path)], run=False)
    assert isinstance(cli.model, QFormerStage) and cli.model.hparams.backbone == "qformer"
    assert cli.datamodule.hparams.dataset == path.parent.name
    assert path.read_text().startswith("#") and "foundv2 fit --config" in path.read_text()


def test_cli_predict_from_checkpoint_writes_to_the_given_folder(cache, tmp_path):
    """LightningCLI re-applies a checkpoint's hyperparameters over the command line: the output
    folder must still be the one given at predict time."""
    from foundv2.launch import lightning_cli

    common = ["--config", str(CONFIGS[0].parent / "data.yaml"), "--config", str(CONFIGS[0]), "--data.loader_args", "{n_users: 300, seed: 0}",
              "--data.cache_dir", str(cache), "--data.progress", "false", "--trainer.logger", "false",
              "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path)]  # the CLI saves its config.yaml there
    cli = lightning_cli(["fit", *common, "--model.qformer.dim", "16", "--model.qformer.num_layers", "1", "--trainer.max_steps", "1",
                         "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false"])
    cli.trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = tmp_path / "features"
    lightning_cli(["predict", *common, "--ckpt_path", str(tmp_path / "last.ckpt"), "--model.predict_dir", str(out),
                   "--return_predictions", "false"])
    ds, meta = read_stage_output(out)
    assert len(ds) == 300 and meta["dim"] == 16  # the checkpoint's dim, not the config's 64
