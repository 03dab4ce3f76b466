"""QAnchorStage on real synthetic data with the tiny random LM: pairs of training users only,
the loss falls, predict's cached embeddings equal a full pass, and a checkpoint predicts alone."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.store import Split, read_stage_output
from foundv2.stages.base import OptimConfig
from foundv2.stages.qanchor import QAnchorStage

QUESTIONS = [{"name": "future", "query": "What will this user do next?", "answer": "future_summary"},
             {"name": "fav", "query": "Which categories does this user like most?", "answer": "top_categories"},
             {"name": "tod", "query": "When in the day is this user active?", "answer": "time_of_day"}]


def _dm(cache, **kw) -> UserDataModule:
    return UserDataModule(dataset="synthetic", loader_args={"n_users": 160, "seed": 3}, window_mode="day",
                          text_encoder="hashing", cache_dir=str(cache), batch_size=32, progress=False,
                          max_events=48, questions=QUESTIONS, **kw)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, **kw)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qanchor")
    L.seed_everything(0)
    dm = _dm(root / "cache")
    seen, losses = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, tr, pl, batch, i):
            seen.append(batch["split"].clone())

        def on_train_epoch_end(self, tr, pl):
            losses.append({k: float(v) for k, v in tr.callback_metrics.items() if k.endswith("_epoch")})

    stage = QAnchorStage(lm="tiny", emb_dim=16, head_hidden=32, optim=OptimConfig(lr=3e-3, weight_decay=0.0))
    trainer = _trainer(max_epochs=4, callbacks=[Record()], default_root_dir=str(root))
    trainer.fit(stage, datamodule=dm)
    return root, dm, stage, trainer, torch.cat(seen), losses


def test_trains_on_training_users_pairs_only_and_the_answer_loss_falls(fitted):
    """Only training users' pairs are read, each once per epoch, and the next-token loss on the
    answers falls. (The InfoNCE term does not fall with this tiny random LM: user and answer
    embeddings collapse to one point, a known open problem of the stage, see issue 13's note.)"""
    _, dm, _, _, seen, losses = fitted
    assert set(seen.tolist()) == {int(Split.TRAIN)}
    assert len(seen) == 4 * len(dm.qa_pairs())  # every pair once per epoch
    first, last = losses[0], losses[-1]
    for term in ("train/loss_epoch", "train/loss/ntp_epoch"):
        assert np.isfinite(last[term]) and last[term] < first[term], (term, first[term], last[term])
    assert np.isfinite(last["train/loss/nce_epoch"])


def test_predict_embeds_every_user_per_query_as_a_full_pass_would(fitted):
    root, dm, stage, trainer, _, _ = fitted
    stage.predict_dir = str(root / "emb")
    trainer.predict(stage, datamodule=dm)
    table, meta = read_stage_output(root / "emb")
    emb = np.asarray(table["user_emb"], dtype=np.float32)
    assert meta["queries"] == [q["query"] for q in QUESTIONS]
    assert emb.shape == (len(dm.table), 16 * len(QUESTIONS)) and np.isfinite(emb).all()
    batch = next(iter(dm.predict_dataloader()))
    stage.eval()
    with torch.no_grad():
        cached = stage.embed_users(batch)
        for q, text in enumerate(stage.queries):
            ids, mask = stage.net.tokenize_queries([text] * len(batch["row"]), max_length=stage.hparams.max_query_tokens)
            full = stage.net(stage.net.prefix.inputs_from(batch), ids, mask).embedding
            assert torch.allclose(cached[:, q], full, atol=1e-4), float((cached[:, q] - full).abs().max())
    # queries differ, so the embeddings of one user differ between queries
    assert not torch.allclose(cached[:, 0], cached[:, 1])


def test_checkpoint_alone_predicts_the_same(fitted, tmp_path):
    _, dm, stage, trainer, _, _ = fitted
    path = tmp_path / "s.ckpt"
    trainer.save_checkpoint(path)
    again = QAnchorStage.load_from_checkpoint(path)
    batch = next(iter(dm.predict_dataloader()))
    stage.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(stage.embed_users(batch), again.embed_users(batch))
