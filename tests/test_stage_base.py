"""The PredictStage base: a checkpoint alone rebuilds a stage (no DataModule) and predicts what
the trainer predicted; the optimiser's no-decay groups and schedule; the tokenizer refuses to
predict with a quantizer that was never initialised."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from data_modules.store import read_stage_output
from foundv2.stages.base import OptimConfig, adamw, lr_factor, param_groups
from foundv2.stages.qformer import QFormerStage
from foundv2.stages.tokenizer import TokenizerStage
from tests.helpers import ROOT, run_cli
from tests.test_window_keys import TINY_QFORMER, assert_window_keys, make_dm, trainer

TINY_TOKENIZER = {"quantizer": {"n_shared_levels": 1, "n_specific_levels": 1, "shared_codes": 8, "specific_codes": 4,
                                "kmeans_buffer": 64}, "rqvae": {"code_dim": 8, "hidden": [16]}}


def _fit_and_checkpoint(stage, dm, tmp_path, steps: int):
    tr = trainer(max_steps=steps, limit_val_batches=0)
    tr.fit(stage, dm)
    tr.save_checkpoint(tmp_path / "stage.ckpt")
    trainer().predict(stage, dm, return_predictions=False)
    return tmp_path / "stage.ckpt"


def _predict_by_hand(stage, dm) -> dict:
    """predict_step over the DataModule's predict batches, outside any trainer: user → columns."""
    stage.eval()
    out = {}
    for i, batch in enumerate(dm.predict_dataloader()):
        cols = stage.predict_step(batch, i)
        for j, user in enumerate(cols["user_id"].tolist()):
            out[user] = {k: v[j] for k, v in cols.items()}
    return out


def _assert_same(folder, by_hand: dict, columns: tuple[str, ...], atol: float) -> None:
    ds, _ = read_stage_output(folder)
    assert sorted(ds["user_id"]) == sorted(by_hand)
    for row in ds.with_format("numpy"):
        mine = by_hand[int(row["user_id"])]
        for col in columns:
            a = np.stack(row[col]) if row[col].dtype == object else row[col]
            np.testing.assert_allclose(np.asarray(mine[col], np.float64), np.asarray(a, np.float64), atol=atol,
                                       err_msg=col)


@pytest.mark.parametrize("features", [False, True], ids=["pooled_input", "features_input"])
def test_tokenizer_checkpoint_alone_predicts_the_trainers_tokens(tmp_path, features):
    cache = tmp_path / "cache"
    if features:
        trainer().predict(QFormerStage(backbone="pooled", predict_dir=str(tmp_path / "features")), make_dm(cache),
                          return_predictions=False)
    dm = make_dm(cache, features_dir=str(tmp_path / "features") if features else None)
    L.seed_everything(0)
    ckpt = _fit_and_checkpoint(TokenizerStage(**TINY_TOKENIZER, predict_dir=str(tmp_path / "tokens")), dm, tmp_path, 4)
    loaded = TokenizerStage.load_from_checkpoint(ckpt)  # no DataModule, no trainer
    assert loaded.dims["sources"][-1] == "profile" and ("pooled" in loaded.dims) != features
    _assert_same(tmp_path / "tokens", _predict_by_hand(loaded, dm), ("codes", "token_ids", "slice_key"), atol=0)
    dm.setup()
    assert_window_keys(tmp_path / "tokens", dm)


def test_qformer_checkpoint_alone_predicts_the_trainers_features(tmp_path):
    dm = make_dm(tmp_path / "cache")
    L.seed_everything(0)
    stage = QFormerStage(qformer=TINY_QFORMER, predict_dir=str(tmp_path / "features"))
    ckpt = _fit_and_checkpoint(stage, dm, tmp_path, 3)
    loaded = QFormerStage.load_from_checkpoint(ckpt)
    assert loaded.dims == dm.dims() and loaded.qformer is not None
    _assert_same(tmp_path / "features", _predict_by_hand(loaded, dm), ("feat", "user_emb", "slice_key"), atol=1e-5)


def test_load_from_checkpoint_refuses_a_damaged_file(tmp_path):
    """``Stage.load_from_checkpoint`` makes the same checks as a CLI load: a truncated
    checkpoint, or one whose bytes no longer match its checksum, is a DataError naming it."""
    from data_modules.schema import DataError

    dm = make_dm(tmp_path / "cache")
    L.seed_everything(0)
    ckpt = Path(_fit_and_checkpoint(QFormerStage(qformer=TINY_QFORMER, predict_dir=str(tmp_path / "f")), dm,
                                    tmp_path, 1))
    QFormerStage.load_from_checkpoint(ckpt)  # whole: loads
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=str(ckpt)):
        QFormerStage.load_from_checkpoint(ckpt)
    with pytest.raises(DataError, match="no such checkpoint"):
        QFormerStage.load_from_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_for_other_data_is_a_clear_error(tmp_path):
    from data_modules.schema import DataError

    L.seed_everything(0)
    ckpt = _fit_and_checkpoint(QFormerStage(qformer=TINY_QFORMER), make_dm(tmp_path / "cache"),
                               tmp_path, 1)
    with pytest.raises(DataError, match="max_windows 6 there, 8 here"):
        trainer().predict(QFormerStage(qformer=TINY_QFORMER), make_dm(tmp_path / "cache", max_windows=8),
                          ckpt_path=str(ckpt), return_predictions=False)


# ------------------------------------------------------------------------------ optimiser
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.item = nn.Embedding(5, 4, padding_idx=0)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.queries = nn.Parameter(torch.randn(2, 3, 4))  # a 3-D matrix stack: decayed
        self.scale = nn.Parameter(torch.ones(4))  # 1-D: not decayed
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.tied = self.proj  # shared module: its parameters are listed once


def test_param_groups_decay_matrices_only():
    toy = _Toy()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(toy, 0.1)}
    assert groups["decay"] == {id(toy.proj.weight), id(toy.queries)}
    assert groups["no_decay"] == {id(p) for p in (toy.item.weight, toy.proj.bias, toy.norm.weight, toy.norm.bias,
                                                  toy.scale)}


def test_adamw_decays_exactly_the_decay_group_of_a_real_stage():
    """A step with zero gradients moves AdamW only through its decoupled decay: the decay group
    shrinks by (1 - lr * wd), every other parameter (norms, biases, embedding tables with their
    padding rows) stays bit for bit."""
    dims = {"num_sources": 4, "sources": ["a", "b", "c", "d"], "num_items": 30, "num_categories": 5,
            "text_dim": 8, "tabular_dim": 2, "window_period": 4, "max_windows": 6, "calendar_dim": 0}
    stage = QFormerStage(qformer=TINY_QFORMER, optim=OptimConfig(weight_decay=0.5))
    stage.build(dims)
    opt = adamw(stage, total_steps=10, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in stage.named_parameters()}
    for p in stage.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["name"] == "decay" and decayed
    for name, p in stage.named_parameters():
        expect = before[name] * (1 - 0.1 * 0.5) if id(p) in decayed else before[name]
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-7, msg=name)
        if id(p) not in decayed:
            assert torch.equal(p.detach(), before[name]), name
    assert not torch.any(stage.encoder.item.weight[0])  # the null item row is still zero
    assert any(n.endswith("norm.weight") for n, p in stage.named_parameters() if id(p) not in decayed)


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    assert [lr_factor(s, 100, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(50, 100, warmup_steps=4) == 1.0  # no cosine: flat after warm-up
    cos = [lr_factor(s, 100, warmup_steps=4, cosine=True, min_lr_ratio=0.1) for s in range(4, 101)]
    assert cos[0] == 1.0 and math.isclose(cos[-1], 0.1) and all(a >= b for a, b in zip(cos[:-1], cos[1:], strict=True))
    assert math.isclose(lr_factor(52, 100, warmup_steps=4, cosine=True, min_lr_ratio=0.1), 0.55)
    layer = nn.Linear(2, 2)
    assert isinstance(adamw(layer, 10), torch.optim.AdamW)
    conf = adamw(layer, 10, warmup_steps=2)
    assert conf["lr_scheduler"]["interval"] == "step"


# ------------------------------------------------------------------------------ refusal
def test_predict_refuses_an_uninitialised_tokenizer(tmp_path):
    """The synthetic tokenizer YAML without fit, checkpoint or pretrained folder: exit 2, one
    paragraph, nothing written."""
    out = tmp_path / "tokens"
    res = run_cli("predict", "--config", str(ROOT / "experiments/synthetic/data.yaml"),
                  "--config", str(ROOT / "experiments/synthetic/tokenizer.yaml"),
                  "--data.loader_args", "{n_users: 60, seed: 0}", "--data.cache_dir", str(tmp_path / "cache"),
                  "--data.progress", "false", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                  "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "root"),
                  "--model.export_dir", "null", "--model.predict_dir", str(out), check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "quantizer was never initialised" in res.stderr and "--ckpt_path" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()
