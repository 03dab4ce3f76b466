"""ProbeStage end to end at toy size: planted labels learned, weight decay and epoch chosen on
validation with early stopping, metrics equal to the bench's functions, next items on stage-1
features, a checkpoint alone, and 2-process gloo DDP equal to 1 process."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from data_modules.datamodule import UserDataModule
from data_modules.representations import write_representation
from data_modules.schema import DataError
from data_modules.store import Split, read_stage_output
from foundv2.bench.run import load_bench_data
from foundv2.metrics.classification import binary_auc, ks_statistic, multiclass_metrics
from foundv2.stages.probe import ProbeStage
from foundv2.stages.qformer import QFormerStage
from tests.helpers import run_cli

N_USERS = 400
DATA = {"dataset": "synthetic", "loader_args": {"n_users": N_USERS, "seed": 1}, "window_mode": "week",
        "text_encoder": "hashing", "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared synthetic data set, a planted representation and the pooled stage-1 features."""
    root = tmp_path_factory.mktemp("probe")
    cache = str(root / "cache")
    dm = UserDataModule(**DATA, cache_dir=cache, batch_size=32)
    dm.prepare_data()
    dm.setup()
    rng = np.random.default_rng(0)
    churn = np.asarray(dm.table["label/churn"])
    segment = np.asarray(dm.table["label/segment"])
    emb = rng.normal(size=(len(churn), 16)).astype(np.float32)
    emb[:, 0] += 2.0 * churn - 1.0  # churn planted in dimension 0
    emb[:, 1:7] += 3.0 * np.eye(6, dtype=np.float32)[segment]  # segment in dimensions 1..6
    write_representation(root / "planted", emb, np.arange(len(churn)), dm.split, np.asarray(dm.table["user_id"]))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(QFormerStage(backbone="pooled", predict_dir=str(root / "pooled")), datamodule=dm,
                    return_predictions=False)
    return {"root": root, "cache": cache, "dm": dm}


def _dm(data, rep: str, batch_size: int = 32) -> UserDataModule:
    return UserDataModule(**DATA, cache_dir=data["cache"], batch_size=batch_size,
                          representation_dir=str(data["root"] / rep))


class RecordVal(Callback):
    """Every epoch's val/ metrics, as the callbacks saw them."""

    def __init__(self):
        self.epochs: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def _test_users(data, folder) -> dict:
    ds, _ = read_stage_output(folder)
    ds = ds.with_format("numpy")
    test = np.asarray(ds["split"]) == Split.TEST
    return {k: np.asarray(ds[k])[test] for k in ds.column_names}


@pytest.mark.parametrize("task", ["churn", "segment"])
def test_planted_label_learned_with_choice_on_validation(data, task, tmp_path, one_thread):
    L.seed_everything(0)
    record = RecordVal()
    stage = ProbeStage(task=task, weight_decays=(1e-3, 1e-2, 1e-1), lr=1e-2, patience=2,
                       predict_dir=str(tmp_path / "scores"))
    trainer = _trainer(max_epochs=60, callbacks=[record])
    dm = _dm(data, "planted")
    trainer.fit(stage, datamodule=dm)
    test = trainer.test(stage, datamodule=dm, verbose=False)[0]

    # early stopping: the best epoch, then `patience` epochs without a better val/select
    select = [e["val/select"] for e in record.epochs]
    best = int(np.argmax(select))
    assert len(select) == best + 1 + 2 < 60
    assert int(stage.best_epoch) == best and float(stage.best_score) == pytest.approx(select[best])
    # the head kept is the best of the grid at that epoch, and its weight decay is recorded
    key = "auc" if task == "churn" else "macro_auc"
    per_head = [record.epochs[best][f"val/wd={wd:g}/{key}"] for wd in stage.weight_decays]
    chosen = stage.weight_decays[int(stage.best_head)]
    assert per_head[int(stage.best_head)] == max(per_head) == pytest.approx(select[best])
    assert test["test/weight_decay"] == pytest.approx(chosen)
    assert record.epochs[-1]["val/weight_decay"] == pytest.approx(chosen)

    # the planted signal is learned, and the logged metrics are the bench's functions of the scores
    _trainer().predict(stage, datamodule=dm, return_predictions=False)
    users = _test_users(data, tmp_path / "scores")
    scores, y = np.stack(users["scores"]), np.asarray(data["dm"].table[f"label/{task}"])[users["row"]]
    if task == "churn":
        assert test["test/auc"] > 0.8
        assert test["test/auc"] == pytest.approx(binary_auc(scores[:, 0], y), abs=1e-6)
        assert test["test/ks"] == pytest.approx(ks_statistic(scores[:, 0], y), abs=1e-3)
    else:
        expected = multiclass_metrics(scores, y)
        assert test["test/accuracy"] > 0.6
        assert test["test/accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert test["test/macro_auc"] == pytest.approx(expected["macro_auc"], abs=1e-5)

    # a checkpoint alone rebuilds the probe with the chosen head
    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    loaded = ProbeStage.load_from_checkpoint(tmp_path / "probe.ckpt")
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(loaded.best_logits(batch), stage.best_logits(batch))
    assert int(loaded.best_head) == int(stage.best_head)


def test_next_items_and_future_categories_on_stage1_features(data, tmp_path, one_thread):
    dm = _dm(data, "pooled", batch_size=64)
    L.seed_everything(0)
    stage = ProbeStage(task="next_items", weight_decays=(0.0, 1e-4), lr=1e-2, predict_dir=str(tmp_path / "top"))
    trainer = _trainer(max_epochs=30)
    trainer.fit(stage, datamodule=dm)
    test = trainer.test(stage, datamodule=dm, verbose=False)[0]
    assert set(test) == {"test/recall@10", "test/ndcg@10", "test/recall@20", "test/ndcg@20", "test/weight_decay"}
    # the history predicts the synthetic future: the probe ranks better than popularity
    from foundv2.bench.baselines import popularity

    bench = load_bench_data(data["dm"])
    pop, _ = popularity(bench.history, bench.future, bench.split)
    assert test["test/ndcg@20"] > pop["ndcg@20"]
    # predict: the top items of a user are real items never in their history
    _trainer().predict(stage, datamodule=dm, return_predictions=False)
    users = _test_users(data, tmp_path / "top")
    top = np.stack(users["top_items"])
    assert top.shape == (len(users["row"]), 20) and top.min() >= 1
    for row, items in zip(users["row"], top, strict=True):
        assert not set(items - 1) & set(bench.history[row].indices)

    L.seed_everything(0)
    stage = ProbeStage(task="future_categories")
    trainer = _trainer(max_epochs=30)
    trainer.fit(stage, datamodule=dm)
    assert trainer.test(stage, datamodule=dm, verbose=False)[0]["test/macro_auc"] > 0.6


def test_bad_inputs_are_data_errors(data):
    with pytest.raises(DataError, match="offers"):
        _trainer(max_epochs=1).fit(ProbeStage(task="favourite_colour"), datamodule=_dm(data, "planted"))
    events = UserDataModule(**DATA, cache_dir=data["cache"])
    with pytest.raises(DataError, match="representation_dir"):
        _trainer(max_epochs=1).fit(ProbeStage(task="churn"), datamodule=events)


def _csv_test_metrics(folder) -> dict:
    rows = [r for f in folder.rglob("metrics.csv") for r in csv.DictReader(open(f))]
    return {k: float(v) for r in rows for k, v in r.items() if k.startswith("test/") and v}


@pytest.mark.ddp
def test_ddp_probe_equals_one_process(data, tmp_path):
    # 128 train, 32 val and 32 test users: one process with 32 a batch sees the same batches as two
    # with 16 each (the same seeded permutation, split by rank), and no sampler pads a split
    split = data["dm"].split
    rows = np.concatenate([np.flatnonzero(split == s)[:n] for s, n in ((0, 128), (1, 32), (2, 32))])
    rep = np.random.default_rng(1).normal(size=(len(rows), 8)).astype(np.float32)
    rep[:, 0] += 1.5 * np.asarray(data["dm"].table["label/churn"])[rows]
    write_representation(tmp_path / "rep", rep, rows, split[rows], np.asarray(data["dm"].table["user_id"])[rows])
    common = ["--data.dataset", "synthetic", "--data.loader_args", f'{{"n_users": {N_USERS}, "seed": 1}}',
              "--data.window_mode", "week", "--data.text_encoder", "hashing", "--data.progress", "false",
              "--data.cache_dir", data["cache"], "--data.representation_dir", str(tmp_path / "rep"),
              "--model", "foundv2.stages.probe.ProbeStage", "--model.task", "churn", "--seed_everything", "0",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--trainer.max_epochs", "8", "--trainer.num_sanity_val_steps", "0"]
    out = {}
    for devices, batch in (("1", "32"), ("2", "16")):
        run = tmp_path / f"d{devices}"
        ddp = ["--trainer.strategy", "ddp"] if devices == "2" else []
        args = [*common, *ddp, "--trainer.devices", devices, "--data.batch_size", batch,
                "--trainer.default_root_dir", str(run), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir", str(run)]
        run_cli("fit", *args)
        run_cli("test", *args, "--ckpt_path", str(next(run.rglob("*.ckpt"))))
        out[devices] = _csv_test_metrics(run)
    assert set(out["1"]) == {"test/auc", "test/ks", "test/weight_decay"}
    for key, value in out["1"].items():
        assert out["2"][key] == pytest.approx(value, abs=1e-4), key


def test_linear_heads_sparse_input():
    """A sparse COO input gives the dense input's logits and weight gradient (the embedding-bag
    path); each head's weight is a view ``[O, D]`` of the ``[D, G, O]`` parameter."""
    from foundv2.stages.probe import LinearHeads

    torch.manual_seed(0)
    heads = LinearHeads(2, 30, 5)
    with torch.no_grad():
        heads.weight.normal_()
        heads.bias.normal_()
    dense = torch.rand(7, 30) * (torch.rand(7, 30) < 0.2)
    dense[3] = 0  # a row with no nonzero
    grads = []
    for x in (dense, dense.to_sparse()):
        heads.zero_grad()
        z = heads(x)
        (z * torch.arange(10.0).view(1, 2, 5)).sum().backward()
        grads.append((z.detach(), heads.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert torch.equal(heads.head_weight(1), heads.weight.detach().permute(1, 2, 0)[1])
