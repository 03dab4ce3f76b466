"""AlignmentStage (stage 3) end to end at toy size: tokens from a real tokenizer fit, then a fit
with every objective, predict, the semantic term's leak guard, and a bf16-mixed fit on CPU."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.schema import DataError
from data_modules.store import read_stage_output
from foundv2.nn.mrqvae import RQVAEConfig
from foundv2.nn.quantizer import QuantizerConfig
from foundv2.nn.sequence import SequenceConfig
from foundv2.objectives import ObjectivesConfig
from foundv2.stages.alignment import AlignmentStage
from foundv2.stages.base import OptimConfig
from foundv2.stages.tokenizer import TokenizerStage


def _dm(cache, **kw) -> UserDataModule:
    return UserDataModule(dataset="synthetic", loader_args={"n_users": 300, "seed": 1}, window_mode="day",
                          text_encoder="hashing", cache_dir=str(cache), batch_size=32, progress=False,
                          max_windows=64, **kw)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, **kw)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A tokens dataset and its tokenizer folder from a real (short) tokenizer fit."""
    root = tmp_path_factory.mktemp("align")
    L.seed_everything(0)
    tok = TokenizerStage(quantizer=QuantizerConfig(n_shared_levels=2, n_specific_levels=1, shared_codes=16,
                                                   specific_codes=8, kmeans_buffer=256, respawn_every=10),
                         rqvae=RQVAEConfig(code_dim=8, hidden=[32]),
                         predict_dir=str(root / "tokens"), export_dir=str(root / "export"))
    dm = _dm(root / "cache")
    _trainer(max_epochs=2).fit(tok, datamodule=dm)
    _trainer().predict(tok, datamodule=dm, return_predictions=False)
    return root


def _stage(tokens, freeze_codes: bool = False, **kw) -> AlignmentStage:
    return AlignmentStage(tokenizer_dir=str(tokens / "export"),
                          sequence=SequenceConfig(dim=16, num_layers=1, num_heads=2, freeze_codes=freeze_codes), **kw)


def test_every_objective_is_logged_and_falls(tokens):
    L.seed_everything(0)
    dm = _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    first = {}

    class Record(L.Callback):
        def on_train_epoch_end(self, tr, pl):
            if not first:
                first.update({k: float(v) for k, v in tr.callback_metrics.items()})

    stage = _stage(tokens, optim=OptimConfig(lr=3e-3))
    trainer = _trainer(max_epochs=6, callbacks=[Record()])
    trainer.fit(stage, datamodule=dm)
    last = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for term in ("fine", "window", "semantic"):
        key = f"train/loss/{term}_epoch"
        assert key in last and np.isfinite(last[key]), key
        assert last[key] < first[key], (term, first[key], last[key])
    assert last["train/pairs/window_epoch"] > 0  # day windows: same weekday a week apart exist
    assert batch["token_id"].shape[0] == 32


def test_semantic_term_never_reads_a_val_or_test_future(tokens):
    L.seed_everything(0)
    stage = _stage(tokens, objectives=ObjectivesConfig(fine_mode="cosine", enabled={"fine": False, "window": False}))
    dm = _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"))
    _trainer(max_steps=1, limit_val_batches=0).fit(stage, datamodule=dm)
    batch = next(iter(dm.train_dataloader()))
    batch["split"][:8] = 1  # pretend the first 8 users are validation users with a future text
    batch["has_fut_text"][:8] = True
    stage.eval()
    base, _ = stage.model_step(batch)
    batch["fut_text_emb"][:8] = torch.randn_like(batch["fut_text_emb"][:8]) * 10
    after, _ = stage.model_step(batch)
    assert torch.equal(base, after)


def test_predict_writes_user_and_window_states_with_real_keys(tokens, tmp_path):
    L.seed_everything(0)
    stage = _stage(tokens, predict_dir=str(tmp_path / "emb"))
    dm = _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"))
    _trainer(max_epochs=1).fit(stage, datamodule=dm)
    _trainer().predict(stage, datamodule=dm, return_predictions=False)
    emb, meta = read_stage_output(tmp_path / "emb")
    tok, _ = read_stage_output(tokens / "tokens")
    assert meta["kind"] == "embeddings" and meta["user_dim"] == 32 and len(emb) == len(tok)
    keys = {u: np.unique(np.asarray(k))[-64:] for u, k in zip(tok["user_id"], tok["slice_key"], strict=True)}
    for u, wk, ue in zip(emb["user_id"], emb["window_key"], emb["user_emb"], strict=True):
        assert np.array_equal(np.asarray(wk), keys[u][keys[u] >= 0])
        assert len(ue) == 32 and np.isfinite(ue).all()
    # the checkpointless round trip: the stage reloads from its own checkpoint and predicts the same
    ckpt = tmp_path / "a.ckpt"
    trainer = _trainer(max_epochs=1)
    trainer.fit(_stage(tokens), datamodule=dm)
    trainer.save_checkpoint(ckpt)
    again = AlignmentStage.load_from_checkpoint(ckpt).eval()
    batch = next(iter(dm.predict_dataloader()))
    torch.testing.assert_close(again.user_embedding(batch), trainer.lightning_module.eval().user_embedding(batch))


def test_the_sum_readout_is_the_per_source_code_sum_and_sits_beside_the_states(tokens, tmp_path):
    """With the token table frozen at the code vectors, ``user_pool: sum`` is exactly the bench's
    ``tokens_sum`` (per-source sums of the decoded codes) for every user whose windows all fit in a
    batch; ``mean_last_sum`` puts it after the two window-state pools."""
    from foundv2.bench.run import token_representations

    L.seed_everything(0)
    dm = _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"))
    stage = _stage(tokens, freeze_codes=True, user_pool="sum", predict_dir=str(tmp_path / "emb"))
    trainer = _trainer(max_epochs=1)
    trainer.fit(stage, datamodule=dm)
    trainer.predict(stage, datamodule=dm, return_predictions=False)
    emb, meta = read_stage_output(tmp_path / "emb")
    tok, _ = read_stage_output(tokens / "tokens")
    S, C = stage.dims["num_sources"], stage.dims["code_dim"]
    assert meta["user_dim"] == S * C
    summed = token_representations(tokens / "tokens", tokens / "export", len(tok))["tokens_sum"][0]
    whole = 0
    for r, wk, ue in zip(emb["row"], emb["window_key"], emb["user_emb"], strict=True):
        if len(wk) < 64:  # the user's whole history is in the batch
            whole += 1
            np.testing.assert_allclose(np.asarray(ue), summed[r], rtol=1e-4, atol=1e-4)
    assert whole > 100
    both = _stage(tokens, user_pool="mean_last_sum")
    both.dims, both.net = stage.dims, stage.net
    batch = next(iter(dm.predict_dataloader()))
    out = both.user_embedding(batch)
    assert out.shape[1] == 2 * 16 + S * C
    torch.testing.assert_close(out[:, 32:], stage.user_embedding(batch))
    with pytest.raises(ValueError, match="user_pool"):
        _stage(tokens, user_pool="sum_mean")


def test_bf16_mixed_fit_on_cpu(tokens):
    L.seed_everything(0)
    trainer = _trainer(max_epochs=1, precision="bf16-mixed")
    trainer.fit(_stage(tokens), datamodule=_dm(tokens / "cache", tokens_dir=str(tokens / "tokens")))
    assert np.isfinite(float(trainer.callback_metrics["train/loss/total_epoch"]))


@pytest.mark.slow  # stage 3 fit + predict + a bench: make test-full
def test_the_bench_counts_stage_3_at_the_tokens_bytes(tokens, tmp_path):
    """Stage 3's output says it is built from the tokens alone: the bench gives it their size."""
    import json

    from foundv2.bench.run import run_bench

    L.seed_everything(0)
    stage = _stage(tokens, predict_dir=str(tmp_path / "emb"))
    dm = _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"))
    _trainer(max_epochs=1).fit(stage, datamodule=dm)
    _trainer().predict(stage, datamodule=dm, return_predictions=False)
    _, meta = read_stage_output(tmp_path / "emb")
    tok_bytes = json.loads((tokens / "tokens" / "report.json").read_text())["storage"]["bytes_per_user"]
    assert meta["row_kind"] == "tokens" and meta["bytes_per_user"] == tok_bytes
    bench = run_bench(_dm(tokens / "cache"), output_dir=str(tmp_path / "bench"), representations=[],
                      baselines=["majority"], embeddings={"aligned_tokens": str(tmp_path / "emb")},
                      skip_tasks=["next_items"], storage_bytes=[])
    row = bench["results"]["aligned_tokens"]
    assert row["kind"] == "tokens" and row["bytes_per_user"] == tok_bytes


# ------------------------------------------------------------------ the distill term (ours)
def _teacher(tokens, folder):
    """A real per-user vector that the tokens do not hold exactly: a 12-d SVD of the users'
    log-count item histories, its basis fitted on the training users only."""
    from data_modules.representations import write_representation
    from foundv2.bench.run import load_bench_data

    dm = _dm(tokens / "cache")
    dm.prepare_data()
    data = load_bench_data(dm)
    H = np.log1p(data.history.toarray().astype(np.float64))
    _, _, vt = np.linalg.svd(H[data.split == 0] - H[data.split == 0].mean(0), full_matrices=False)
    emb = (H @ vt[:12].T).astype(np.float32)
    rows = np.arange(len(emb))
    write_representation(folder, emb, rows, data.split, np.asarray(dm.table["user_id"]))
    return folder, emb


def _distill_stage(tokens, **kw) -> AlignmentStage:
    kw.setdefault("objectives", ObjectivesConfig(fine_mode="cosine", weights={"distill": 1.0}))
    return _stage(tokens, user_pool="distill", optim=OptimConfig(lr=3e-3), **kw)


def test_the_distill_term_learns_the_teacher_and_its_head_is_the_embedding(tokens, tmp_path):
    teacher, _ = _teacher(tokens, tmp_path / "teacher")
    L.seed_everything(0)
    dm = _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"), teacher_dir=str(teacher))
    first = {}

    class Record(L.Callback):
        def on_train_epoch_end(self, tr, pl):
            if not first:
                first.update({k: float(v) for k, v in tr.callback_metrics.items()})

    stage = _distill_stage(tokens, predict_dir=str(tmp_path / "emb"))
    trainer = _trainer(max_epochs=6, callbacks=[Record()])
    trainer.fit(stage, datamodule=dm)
    last = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert last["train/loss/distill_epoch"] < 0.8 * first["train/loss/distill_epoch"]
    assert last["train/explained/distill_epoch"] > first["train/explained/distill_epoch"]
    assert last["val/n/distill"] > 0 and np.isfinite(last["val/loss/distill"])  # validation users score it
    # predict from the checkpoint without the teacher: the head's width comes from the checkpoint
    ckpt = tmp_path / "d.ckpt"
    trainer.save_checkpoint(ckpt)
    _trainer().predict(_distill_stage(tokens, predict_dir=str(tmp_path / "emb")),
                       datamodule=_dm(tokens / "cache", tokens_dir=str(tokens / "tokens")),
                       ckpt_path=str(ckpt), return_predictions=False)
    emb, meta = read_stage_output(tmp_path / "emb")
    assert meta["user_dim"] == 12 and len(emb[0]["user_emb"]) == 12
    batch = next(iter(dm.predict_dataloader()))
    stage.eval()
    rows = {r: i for i, r in enumerate(emb["row"])}
    want = stage.user_embedding(batch)
    got = torch.as_tensor(np.stack([emb[rows[int(r)]]["user_emb"] for r in batch["row"]]).astype(np.float32))
    torch.testing.assert_close(got, want)
    with pytest.raises(DataError, match="ckpt_path"):  # no checkpoint, no teacher: nothing to build from
        _trainer().predict(_distill_stage(tokens), datamodule=_dm(tokens / "cache", tokens_dir=str(tokens / "tokens")))


def test_the_distill_term_never_learns_from_a_test_or_validation_users_teacher(tokens, tmp_path):
    teacher, _ = _teacher(tokens, tmp_path / "teacher")
    L.seed_everything(0)
    stage = _distill_stage(tokens, objectives=ObjectivesConfig(
        fine_mode="cosine", weights={"distill": 1.0}, enabled={"fine": False, "window": False, "semantic": False}))
    dm = _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"), teacher_dir=str(teacher))
    _trainer(max_steps=1, limit_val_batches=0).fit(stage, datamodule=dm)
    batch = next(iter(dm.train_dataloader()))
    assert batch["has_teacher"].all()  # training users, all with a vector
    stage.train()
    base, _ = stage.model_step(batch)
    other = {k: v.clone() for k, v in batch.items()}
    other["split"][:8] = torch.tensor([1, 2] * 4)  # pretend these are validation and test users
    held, _ = stage.model_step(other)
    other["teacher_emb"][:8] += torch.randn_like(other["teacher_emb"][:8]) * 10
    assert torch.equal(stage.model_step(other)[0], held)
    batch["teacher_emb"][:8] += 10.0  # a training user's vector does move the loss: the test can fail
    assert not torch.equal(stage.model_step(batch)[0], base)


def test_bad_teachers_and_a_distill_without_one_are_refused_clearly(tokens, tmp_path):
    from data_modules.representations import write_representation

    teacher, emb = _teacher(tokens, tmp_path / "teacher")
    with pytest.raises(DataError, match="token batches only"):
        _dm(tokens / "cache", teacher_dir=str(teacher)).setup("fit")
    split = read_stage_output(teacher)[0]["split"]
    bad = emb.copy()
    bad[5, 3] = np.nan
    write_representation(tmp_path / "nan", bad, np.arange(len(bad)), np.asarray(split), np.arange(len(bad)))
    with pytest.raises(DataError, match="NaN"):
        _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"), teacher_dir=str(tmp_path / "nan")).setup("fit")
    with pytest.raises(DataError, match="meta.json missing"):
        _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"), teacher_dir=str(tmp_path / "none")).setup("fit")
    with pytest.raises(DataError, match="lacks the column"):  # a tokens dataset has no user_emb
        _dm(tokens / "cache", tokens_dir=str(tokens / "tokens"), teacher_dir=str(tokens / "tokens")).setup("fit")
    with pytest.raises(ValueError, match="data.teacher_dir"):  # a weighted distill term, no teacher
        _trainer(max_steps=1).fit(_distill_stage(tokens), datamodule=_dm(tokens / "cache",
                                                                         tokens_dir=str(tokens / "tokens")))
    with pytest.raises(ValueError, match="distill"):  # the distill readout without its term
        _stage(tokens, user_pool="distill")
