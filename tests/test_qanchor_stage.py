"""QAnchorStage on real synthetic data with the tiny random LM, for both prefix kinds (soft
tokens from event embeddings; U2QT tokens from a real tokenizer fit): pairs of training users
only, both loss terms fall (the InfoNCE term too, with its accuracy above chance), predict's
cached embeddings equal a full pass, a checkpoint predicts alone with the added LM tokens at the
same ids, scenario tuning lifts a planted scenario's probe score, and a bf16-mixed CPU fit."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.schema import DataError
from data_modules.store import ALLOW_NO_CHECKSUM_ENV, Split, read_stage_output
from foundv2.nn.anchor import U2QT_TOKEN, AnchorHeadConfig, ScenarioPrompt
from foundv2.nn.mrqvae import RQVAEConfig
from foundv2.nn.quantizer import QuantizerConfig
from foundv2.stages.base import OptimConfig
from foundv2.stages.qanchor import LM_TOKENS_KEY, QAnchorStage
from foundv2.stages.tokenizer import TokenizerStage

QUESTIONS = [{"name": "future", "query": "What will this user do next?", "answer": "future_summary"},
             {"name": "fav", "query": "Which categories does this user like most?", "answer": "top_categories"},
             {"name": "tod", "query": "When in the day is this user active?", "answer": "time_of_day"}]
EPOCHS = 12
LR = 3e-4  # at 2e-3 and above the tiny LM's InfoNCE collapses to uniform for 100+ steps (research/qanchor_train.py)


def _dm(cache, **kw) -> UserDataModule:
    kw = {"questions": QUESTIONS, **kw}
    return UserDataModule(dataset="synthetic", loader_args={"n_users": 160, "seed": 3}, window_mode="day",
                          text_encoder="hashing", cache_dir=str(cache), batch_size=32, progress=False,
                          max_events=48, **kw)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, **kw)


def _stage(kind: str, root, **kw) -> QAnchorStage:
    tok = {"prefix": "tokens", "tokenizer_dir": str(root / "export")} if kind == "tokens" else {}
    return QAnchorStage(lm="tiny", head=AnchorHeadConfig(emb_dim=16, hidden=32),
                        optim=OptimConfig(lr=LR, weight_decay=0.0), **tok, **kw)


def _kind_dm(kind: str, root) -> UserDataModule:
    return _dm(root / "cache", **({"tokens_dir": str(root / "tokens")} if kind == "tokens" else {}))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The data cache, and a tokens dataset with its tokenizer folder from a real (short) tokenizer fit."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qanchor")
    L.seed_everything(0)
    tok = TokenizerStage(quantizer=QuantizerConfig(n_shared_levels=2, n_specific_levels=1, shared_codes=16,
                                                   specific_codes=8, kmeans_buffer=256, respawn_every=10),
                         rqvae=RQVAEConfig(code_dim=8, hidden=[32]), predict_dir=str(root / "tokens"), export_dir=str(root / "export"))
    dm = _dm(root / "cache", questions=None)
    _trainer(max_epochs=2).fit(tok, datamodule=dm)
    _trainer().predict(tok, datamodule=dm, return_predictions=False)
    return root


@pytest.fixture(scope="module", params=["soft", "tokens"])
def fitted(request, root):
    kind = request.param
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = _kind_dm(kind, root)
    seen, losses = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, tr, pl, batch, i):
            seen.append(batch["split"].clone())

        def on_train_epoch_end(self, tr, pl):
            losses.append({k: float(v) for k, v in tr.callback_metrics.items() if k.endswith("_epoch")})

    stage = _stage(kind, root)
    trainer = _trainer(max_epochs=EPOCHS, callbacks=[Record()], default_root_dir=str(root / kind))
    trainer.fit(stage, datamodule=dm)
    return kind, dm, stage, trainer, torch.cat(seen), losses


def test_trains_on_training_users_pairs_only_and_both_losses_fall(fitted):
    """Only training users' pairs are read, each once per epoch; the next-token loss and the
    InfoNCE term fall, and the InfoNCE accuracy ends well above chance (about 1/63 for 32 pairs).
    (With the InfoNCE weight at 0 the term drifts from 3.87 to 3.22 at accuracy 0.02: this fails.)"""
    _, dm, _, _, seen, losses = fitted
    assert set(seen.tolist()) == {int(Split.TRAIN)}
    assert len(seen) == EPOCHS * len(dm.qa_pairs())  # every pair once per epoch
    first, last = losses[0], losses[-1]
    for term in ("train/loss_epoch", "train/loss/ntp_epoch", "train/loss/nce_epoch"):
        assert np.isfinite(last[term]) and last[term] < first[term], (term, first[term], last[term])
    assert last["train/loss/nce_epoch"] < 0.75 * first["train/loss/nce_epoch"], (first, last)
    assert last["train/acc/nce_epoch"] > 0.05, last  # chance about 0.016; untrained (weight 0) about 0.02


def test_predict_embeds_every_user_per_query_as_a_full_pass_would(fitted, tmp_path):
    kind, dm, stage, trainer, _, _ = fitted
    stage.predict_dir = str(tmp_path / "emb")
    trainer.predict(stage, datamodule=dm)
    table, meta = read_stage_output(stage.predict_dir)
    emb = np.asarray(table["user_emb"], dtype=np.float32)
    assert meta["queries"] == [q["query"] for q in QUESTIONS]
    assert emb.shape == (len(dm.table), 16 * len(QUESTIONS)) and np.isfinite(emb).all()
    batch = next(iter(dm.predict_dataloader()))
    stage.eval()
    with torch.no_grad():
        cached = stage.embed_users(batch)
        for q, text in enumerate(stage.queries):
            ids, mask = stage.net.tokenize_queries([text] * len(batch["row"]), max_length=stage.hparams.max_query_tokens)
            full = stage.net(stage._prefix(batch), ids, mask).embedding
            assert torch.allclose(cached[:, q], full, atol=1e-4), float((cached[:, q] - full).abs().max())
    # queries differ, so the embeddings of one user differ between queries
    assert not torch.allclose(cached[:, 0], cached[:, 1])


def test_checkpoint_alone_predicts_the_same_with_the_added_tokens_at_their_ids(fitted, tmp_path, monkeypatch):
    kind, dm, stage, trainer, _, _ = fitted
    path = tmp_path / "s.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)[LM_TOKENS_KEY]
    assert saved == stage.added_tokens()
    if kind == "tokens":
        k = stage.net.prefix.codebook.shape[0]
        assert len(saved) == 1 + k and saved[U2QT_TOKEN.format(k - 1)] == int(stage.net.prefix.lm_token_ids[-1])
    again = QAnchorStage.load_from_checkpoint(path)
    assert again.added_tokens() == saved
    batch = next(iter(dm.predict_dataloader()))
    stage.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(stage.embed_users(batch), again.embed_users(batch))
    # a checkpoint whose tokens sit at other ids than this LM gives them is refused
    ckpt = torch.load(path, weights_only=False)
    ckpt[LM_TOKENS_KEY] = {name: i + 1 for name, i in saved.items()}
    torch.save(ckpt, tmp_path / "other.ckpt")  # written without a checksum record: the user vouches for it
    monkeypatch.setenv(ALLOW_NO_CHECKSUM_ENV, "1")
    with pytest.raises(DataError, match="other ids"):
        QAnchorStage.load_from_checkpoint(tmp_path / "other.ckpt")


def test_scenario_tuning_fits_a_planted_scenario_frozen_and_loads_alone(fitted, root, tmp_path):
    """The planted scenario: the synthetic users' archetype (``segment``, 6 classes; it drives
    their categories, hence their event texts), on a larger synthetic world than the stage was
    fitted on (same sources and text width, other users). The tuned prompt (everything else
    frozen) and its prototypes must lift the macro AUC of the training and of the test users over
    the plain query's embedding with prototypes at the class means, the stage's weights must not
    move, and the prompt saved alone must serve the same."""
    from foundv2.anchor_losses import TAU, prototype_logits
    from foundv2.bench.probes import fit_label_probe, score_predictions

    kind, _, stage, _, _, _ = fitted
    if kind != "soft":
        pytest.skip("one prefix kind is enough for the prompt (the nn layer tests both)")
    dm = UserDataModule(dataset="synthetic", loader_args={"n_users": 600, "seed": 7}, window_mode="day",
                        text_encoder="hashing", cache_dir=str(root / "cache"), batch_size=64, progress=False,
                        max_events=48)
    dm.prepare_data()
    dm.setup("predict")
    y = np.asarray(dm.table["label/segment"], np.int64)
    query = "What kind of user is this?"
    before = {k: v.clone() for k, v in stage.state_dict().items()}

    def features(prompt):
        out = np.zeros((len(y), 16), np.float32)
        for batch in dm.predict_dataloader():
            out[batch["row"].numpy()] = stage.embed_users(batch, [query], [prompt])[:, 0].numpy()
        return out

    def prototype_score(X, prototypes, rows):
        """Macro AUC of some users under the prototype softmax (the scenario's own classifier)."""
        logits = prototype_logits(torch.as_tensor(X[rows]), prototypes, TAU)
        return score_predictions("multiclass", logits.softmax(1).numpy(), y[rows])["macro_auc"]

    stage.eval()
    classes = [str(c) for c in range(int(y.max()) + 1)]
    base_X = features(None)
    # before tuning: the plain query, prototypes at the training users' class means
    untuned = ScenarioPrompt(stage.net.lm.hidden_size, 16, classes, query)
    train = dm.split == Split.TRAIN
    untuned.init_prototypes(torch.as_tensor(base_X[train]), torch.as_tensor(y[train]))
    scen = stage.tune_scenario(dm.predict_dataloader(), y, query, classes, name="segment", steps=300, lr=2e-2)
    assert all(torch.equal(before[k], v) for k, v in stage.state_dict().items())  # everything else frozen
    tuned_X = features(scen)
    scores = {(name, where): prototype_score(X, protos, rows) for name, X, protos in
              (("base", base_X, untuned.prototypes.detach()), ("tuned", tuned_X, scen.prototypes.detach()))
              for where, rows in (("train", train), ("test", dm.split == Split.TEST))}
    probe = {name: fit_label_probe(X, y, dm.split, "multiclass", seed=0)["macro_auc"]
             for name, X in (("base", base_X), ("tuned", tuned_X))}
    print("scenario macro AUC:", scores, "logistic probe:", probe)
    # the prompt and prototypes fit the scenario better than the plain query does, on held-out users too
    assert scores["tuned", "train"] > scores["base", "train"] + 0.01, scores
    assert scores["tuned", "test"] > scores["base", "test"] + 0.02, scores
    scen.save(tmp_path / "segment")
    back = ScenarioPrompt.load(tmp_path / "segment")
    assert back.query == query and back.classes == classes
    np.testing.assert_array_equal(features(back), tuned_X)


def test_bf16_mixed_fit_on_cpu(root):
    L.seed_everything(0)
    trainer = _trainer(max_steps=3, precision="bf16-mixed")
    trainer.fit(_stage("soft", root), datamodule=_kind_dm("soft", root))
    for term in ("train/loss/nce_step", "train/loss/ntp_step"):
        assert np.isfinite(float(trainer.callback_metrics[term])), term


def test_a_soft_prefix_refuses_token_batches(root):
    with pytest.raises(DataError, match="prefix: soft reads event batches"):
        _trainer(max_steps=1).fit(_stage("soft", root), datamodule=_kind_dm("tokens", root))


def test_a_shallower_lm_and_a_frozen_answer_tower_train_and_reload(root, tmp_path):
    """``lm_layers`` keeps the LM's first layers (the checkpoint holds those only and reloads);
    ``answer_tower: frozen`` reads each training answer's state from the pretrained LM, computed
    once before training: after training, those states still equal a fresh pretrained pass, and
    the loss terms are finite."""
    from foundv2.nn.anchor import answer_hidden
    from foundv2.nn.llm import load_causal_lm

    L.seed_everything(0)
    stage = _stage("soft", root, lm_layers=1, answer_tower="frozen")
    dm = _kind_dm("soft", root)
    trainer = _trainer(max_steps=4, default_root_dir=str(tmp_path))
    trainer.fit(stage, datamodule=dm)
    assert len(stage.net.lm.hf.base_model.layers) == 1 and stage.net.lm.config.num_hidden_layers == 1
    for term in ("train/loss/nce_step", "train/loss/ntp_step"):
        assert np.isfinite(float(trainer.callback_metrics[term])), term
    answers = list(dict.fromkeys(dm.qa_pairs().answer))
    assert set(stage._answers) == set(answers)  # every training answer, once
    pretrained = load_causal_lm("tiny", seed=0)
    pretrained.keep_layers(1)
    ids, mask = stage.net.tokenize_answers(answers[:5], max_length=stage.hparams.max_answer_tokens)
    with torch.no_grad():
        want = answer_hidden(pretrained, ids, mask)
    torch.testing.assert_close(torch.stack([stage._answers[a] for a in answers[:5]]), want)
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    back = QAnchorStage.load_from_checkpoint(tmp_path / "s.ckpt", map_location="cpu")
    assert len(back.net.lm.hf.base_model.layers) == 1
    for a, b in zip(back.net.parameters(), stage.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_more_layers_than_the_lm_has_is_refused(root):
    with pytest.raises(DataError, match="lm_layers 9"):
        _trainer(max_steps=1).fit(_stage("soft", root, lm_layers=9), datamodule=_kind_dm("soft", root))


def test_validation_pairs_are_held_out_users_scored_by_retrieval(fitted):
    """Validation batches hold the validation users' pairs (answered with the training users'
    bins); ``validate`` logs the training terms and the user -> answer retrieval accuracy beside
    its chance on the same batches."""
    _, dm, stage, _, _, _ = fitted
    val = dm.qa_pairs("val")
    split = dm.split[val.row]
    assert len(val) > 0 and set(split.tolist()) == {int(Split.VAL)}
    assert not set(val.row.tolist()) & set(dm.qa_pairs().row.tolist())
    out = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False).validate(stage, datamodule=dm, verbose=False)[0]
    assert np.isfinite(out["val/loss"]) and np.isfinite(out["val/loss/nce"])
    assert 0 < out["val/retrieval_chance"] < 1 and 0 <= out["val/retrieval_acc"] <= 1


def test_answer_retrieval_counts_a_shared_answer_text_as_a_hit():
    from foundv2.anchor_losses import answer_retrieval

    answer = torch.eye(4)
    texts = ["a", "b", "a", "c"]
    # users 0, 1 find their own answer; user 2 finds answer 0 (text "a", its own text: a hit);
    # user 3 finds answer 1 ("b", not its "c": a miss)
    user = torch.stack([answer[0], answer[1], answer[0], answer[1]])
    acc, chance = answer_retrieval(user, answer, texts)
    assert acc.item() == pytest.approx(0.75)
    assert chance.item() == pytest.approx((2 / 4 + 1 / 4 + 2 / 4 + 1 / 4) / 4)
