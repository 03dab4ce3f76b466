"""Fit on a sample, predict everyone: ``data.fit_users`` / ``data.val_users`` draw one seeded sample
of training (validation) users, the same on every rank and at every stage; whatever is fitted on
"the training users" reads only it; predict still covers every user once."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from data_modules.datamodule import UserDataModule
from data_modules.representations import write_representation
from data_modules.store import Split, read_stage_output
from tests.helpers import ROOT, run_cli

N_USERS = 240


def _dm(cache, **kw) -> UserDataModule:
    return UserDataModule(dataset="synthetic", loader_args={"n_users": N_USERS, "seed": 4}, window_mode="week",
                          text_encoder="hashing", cache_dir=str(cache), batch_size=16, progress=False, **kw)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    dm = _dm(root)
    dm.prepare_data()
    return root


def _ready(cache, **kw) -> UserDataModule:
    dm = _dm(cache, **kw)
    dm.setup("fit")
    return dm


def test_the_fit_sample_is_a_seeded_sample_of_training_users(cache):
    full = _ready(cache)
    train, val = np.flatnonzero(full.split == Split.TRAIN), np.flatnonzero(full.split == Split.VAL)
    assert np.array_equal(full.fit_rows(), train) and np.array_equal(full.val_rows(), val)  # no sample: all
    dm = _ready(cache, fit_users=50, val_users=7)
    fit, v = dm.fit_rows(), dm.val_rows()
    assert len(fit) == 50 == len(np.unique(fit)) and (full.split[fit] == Split.TRAIN).all()
    assert len(v) == 7 and (full.split[v] == Split.VAL).all()
    assert np.array_equal(fit, np.sort(fit))  # read in table order
    assert np.array_equal(_ready(cache, fit_users=50, val_users=7).fit_rows(), fit)  # seeded
    other = _ready(cache, fit_users=50, sample_seed=1).fit_rows()
    assert not np.array_equal(other, fit)
    assert np.array_equal(_ready(cache, fit_users=10_000).fit_rows(), train)  # more than there are: all
    # the loaders read the samples, an epoch covers each sampled user once
    seen = np.concatenate([b["row"].numpy() for b in dm.train_dataloader()])
    assert np.array_equal(np.sort(seen), fit)
    seen = np.concatenate([b["row"].numpy() for b in dm.val_dataloader()])
    assert np.array_equal(seen, v)
    assert len(np.concatenate([b["row"].numpy() for b in dm.predict_dataloader()])) == N_USERS  # everyone


def test_the_same_users_at_every_stage_whatever_the_input_order(cache, tmp_path):
    events = _ready(cache, fit_users=40, val_users=5)
    # a stage output holding the same users in another order (as a DDP predict writes them)
    perm = np.random.default_rng(0).permutation(N_USERS)
    emb = np.random.default_rng(1).normal(size=(N_USERS, 3)).astype(np.float32)
    write_representation(tmp_path / "rep", emb[perm], perm, events.split[perm], np.asarray(events.table["user_id"])[perm])
    rep = _ready(cache, fit_users=40, val_users=5, representation_dir=str(tmp_path / "rep"))
    assert not np.array_equal(rep.fit_rows(), events.fit_rows())  # other input rows ...
    assert np.array_equal(np.sort(rep.prepared_rows(rep.fit_rows())), events.fit_rows())  # ... the same users
    assert np.array_equal(np.sort(rep.prepared_rows(rep.val_rows())), events.val_rows())


def test_item_factors_and_question_pairs_read_only_the_sample(cache):
    from data_modules.questions import build_pairs, questions_from_config
    from foundv2.stages.base import item_lists, train_item_lists

    dm = _ready(cache, fit_users=30)
    lists = train_item_lists(dm)
    assert len(lists) == 30
    want = item_lists(dm.table, dm.fit_rows(), "h_item")
    assert all(np.array_equal(a, b) for a, b in zip(lists, want, strict=True))
    act = {"name": "act", "query": "How active?", "answer": "activity"}  # reads no text
    qs = questions_from_config([act])
    everyone = build_pairs(dm.table.data.table, dm.meta, [], qs)
    assert np.array_equal(everyone.row, np.flatnonzero(dm.split == Split.TRAIN))  # the former behaviour
    sample = build_pairs(dm.table.data.table, dm.meta, [], qs, rows=dm.fit_rows())
    assert np.array_equal(sample.row, dm.fit_rows())
    dm.hparams.questions = [act]
    assert np.array_equal(dm.qa_pairs().row, dm.fit_rows())


@pytest.fixture(scope="module")
def tokens(cache, tmp_path_factory):
    """A tokens dataset from a short real tokenizer fit (pooled features)."""
    from foundv2.nn.mrqvae import RQVAEConfig
    from foundv2.nn.quantizer import QuantizerConfig
    from foundv2.stages.tokenizer import TokenizerStage

    root = tmp_path_factory.mktemp("tokens")
    L.seed_everything(0)
    tok = TokenizerStage(quantizer=QuantizerConfig(n_shared_levels=2, n_specific_levels=1, shared_codes=16,
                                                   specific_codes=8, kmeans_buffer=256, respawn_every=10),
                         rqvae=RQVAEConfig(code_dim=8, hidden=[16]), predict_dir=str(root / "tokens"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_steps=12, limit_val_batches=0)
    trainer.fit(tok, datamodule=_dm(cache))
    trainer.predict(tok, datamodule=_dm(cache), return_predictions=False)
    return root / "tokens", tok


def _old_teacher(dm, folder):
    """The former in-memory teacher: every prepared row's standardised user_emb (zeros where absent)."""
    ds, _ = read_stage_output(folder)
    ds = ds.select_columns(["row", "user_emb"]).with_format("numpy")
    rows = np.asarray(ds["row"], np.int64)
    emb = np.stack(ds["user_emb"]).astype(np.float32)
    table = np.zeros((len(dm.split), emb.shape[1]), np.float32)
    present = np.zeros(len(dm.split), bool)
    table[rows], present[rows] = emb, True
    train = present & (dm.split == Split.TRAIN)
    mean, std = table[train].mean(0), table[train].std(0) + 1e-6
    table[present] = (table[present] - mean) / std
    return table, present


def test_the_teacher_is_read_for_the_sampled_users_only_and_equals_the_in_memory_table(cache, tokens, tmp_path):
    folder, _ = tokens
    prepared = _ready(cache)
    rng = np.random.default_rng(2)
    missing = rng.choice(N_USERS, 20, replace=False)  # a teacher without some users
    keep = np.setdiff1d(np.arange(N_USERS), missing)
    emb = rng.normal(size=(N_USERS, 6)).astype(np.float32) * 3 + 1
    write_representation(tmp_path / "teacher", emb[keep][::-1], keep[::-1], prepared.split[keep][::-1], keep[::-1])
    dm = _ready(cache, tokens_dir=str(folder), teacher_dir=str(tmp_path / "teacher"))
    table, present = _old_teacher(dm, tmp_path / "teacher")
    assert dm.dims()["teacher_dim"] == 6
    read = np.union1d(dm.fit_rows(), dm.val_rows())
    got, has = dm.teacher(np.arange(N_USERS))
    assert np.array_equal(has, present & np.isin(np.arange(N_USERS), read))
    assert np.array_equal(got[has], table[has])  # bit for bit the former table, where read
    batch = dm.collate()(dm.input_table[dm.rows("train")[:16].tolist()])
    rows = batch["row"].numpy()
    assert np.array_equal(batch["teacher_emb"].numpy(), np.where(present[rows, None], table[rows], 0))
    # with a sample: only the sampled users' vectors, standardised by the sampled training users
    small = _ready(cache, tokens_dir=str(folder), teacher_dir=str(tmp_path / "teacher"), fit_users=25, val_users=4)
    got, has = small.teacher(np.arange(N_USERS))
    read = np.union1d(small.prepared_rows(small.fit_rows()), small.prepared_rows(small.val_rows()))
    assert np.array_equal(np.flatnonzero(has), np.intersect1d(read, keep))
    train = np.intersect1d(small.prepared_rows(small.fit_rows()), keep)
    mean, std = emb[train].mean(0), emb[train].std(0) + 1e-6
    np.testing.assert_allclose(got[has], (emb[has] - mean) / std, rtol=1e-5, atol=1e-5)


def test_the_streamed_token_report_equals_the_in_memory_one(tokens):
    from foundv2.metrics.collisions import collision_stats, collisions_by_sources, window_tuples
    from foundv2.nn.mrqvae import disambiguate
    from foundv2.stages.tokenizer import token_collisions, unique_rows

    folder, _ = tokens
    ds, meta = read_stage_output(folder)
    # the former report: every user's slices in memory at once
    user = np.repeat(np.arange(len(ds)), [len(w) for w in ds["slice_window"]])
    flat = {c: np.concatenate([np.asarray(v) for v in ds[c]]) for c in ("slice_window", "slice_source", "codes")}
    allt = window_tuples(torch.as_tensor(user), torch.as_tensor(flat["slice_window"]),
                         torch.as_tensor(flat["slice_source"]), torch.as_tensor(flat["codes"]).long(),
                         len(meta["sources"]))
    extra = disambiguate(allt)
    for per_bucket, chunk in ((10_000, 8192), (7, 16)):  # one bucket; many buckets and chunks
        got = token_collisions(folder, meta, users_per_bucket=per_bucket, chunk_users=chunk)
        assert got["users"] == len(ds) and got["windows"] == allt.shape[0] and got["slices"] == len(user)
        assert got["collisions"] == pytest.approx(collision_stats(allt), rel=1e-6)
        by = collisions_by_sources(allt, len(meta["sources"]))
        assert got["collisions_by_sources_in_window"].keys() == by.keys()
        for k, v in by.items():
            assert got["collisions_by_sources_in_window"][k] == pytest.approx(v, rel=1e-6)
        assert got["collisions_disambiguated"] == collision_stats(torch.cat([allt, extra[:, None]], 1))
        assert got["disambiguation_max_index"] == int(extra.max())
    assert got["collisions"]["collision_rate"] > 0  # the toy tokenizer collides: the counts are exercised
    rows = np.random.default_rng(0).integers(-1, 700, (500, 9))  # 10-bit values: several per packed word
    rows[::7] = rows[3]
    uniq, inverse, counts = unique_rows(rows)
    want, want_counts = np.unique(rows, axis=0, return_counts=True)
    assert np.array_equal(np.sort(counts), np.sort(want_counts)) and len(uniq) == len(want)
    assert np.array_equal(uniq[inverse], rows)


# ------------------------------------------------------------------ 2 processes (gloo)
class RecordRanks(L.Callback):
    """Writes, per rank, the sample it drew, the rows its batches held and the codebook right after
    the k-means init and at the end (a test helper the DDP fit below loads by class path)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.info: dict = {"train_seen": {}, "val_seen": []}
        self.codebooks: dict = {}

    def on_fit_start(self, trainer, pl_module):
        dm = trainer.datamodule
        self.info.update(fit=dm.prepared_rows(dm.fit_rows()).tolist(), val=dm.prepared_rows(dm.val_rows()).tolist())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.info["train_seen"].setdefault(str(trainer.current_epoch), []).extend(batch["row"].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.info["val_seen"] += batch["row"].tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        q = pl_module.model.quantizer
        if bool(q.initialised) and "init" not in self.codebooks:
            self.codebooks["init"] = q.codebook.detach().clone()
            self.info["init_step"] = int(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        self.codebooks["end"] = pl_module.model.quantizer.codebook.detach().clone()
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out / f"rank{rank}.json").write_text(json.dumps(self.info))
        torch.save(self.codebooks, self.out / f"rank{rank}.pt")


@pytest.mark.ddp
def test_two_ranks_fit_on_one_sample_with_one_kmeans_init_and_predict_everyone(cache, tmp_path):
    cfg = str(ROOT / "experiments/synthetic/tokenizer.yaml")
    common = ["--config", cfg, "--data.dataset", "synthetic", "--data.loader_args", '{"n_users": 240, "seed": 4}',
              "--data.window_mode", "week", "--data.text_encoder", "hashing", "--data.batch_size", "16",
              "--data.progress", "false", "--data.cache_dir", str(cache), "--data.fit_users", "64",
              "--data.val_users", "12", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--model.quantizer.shared_codes", "16", "--model.quantizer.specific_codes", "8", "--model.rqvae.code_dim", "8",
              "--model.quantizer.kmeans_buffer", "600", "--model.quantizer.respawn_every", "1000"]
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    run_cli("fit", *common, *ddp, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.export_dir", str(tmp_path / "export"),
            "--trainer.callbacks+=tests.test_fit_sample.RecordRanks",
            "--trainer.callbacks.out", str(tmp_path / "ranks"))
    info = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    books = [torch.load(tmp_path / "ranks" / f"rank{r}.pt") for r in (0, 1)]
    split = _ready(cache).split
    fit, val = np.asarray(info[0]["fit"]), np.asarray(info[0]["val"])
    assert info[1]["fit"] == info[0]["fit"] and info[1]["val"] == info[0]["val"]  # one sample on every rank
    assert len(fit) == 64 and (split[fit] == Split.TRAIN).all() and len(val) == 12 and (split[val] == Split.VAL).all()
    assert np.array_equal(fit, _ready(cache, fit_users=64).fit_rows())  # the seeded sample, as one process draws it
    assert info[0]["train_seen"].keys() == info[1]["train_seen"].keys() == {"0", "1"}
    for epoch in ("0", "1"):
        seen = [set(i["train_seen"][epoch]) for i in info]
        assert seen[0] and seen[1] and not (seen[0] & seen[1])  # each rank its share ...
        assert seen[0] | seen[1] == set(fit.tolist())  # ... of the sample, and nothing else
    assert set(info[0]["val_seen"]) | set(info[1]["val_seen"]) == set(val.tolist())
    # the k-means init drew one buffer from both ranks' sampled users: one codebook everywhere
    assert info[0]["init_step"] == info[1]["init_step"] > 1  # the buffer took more than one batch
    assert torch.equal(books[0]["init"], books[1]["init"]) and torch.equal(books[0]["end"], books[1]["end"])
    # predict ignores the sample: every user once, over both ranks (here in length order, which
    # each rank takes its share of)
    run_cli("predict", *common, *ddp, "--trainer.logger", "false", "--model.pretrained", str(tmp_path / "export"),
            "--trainer.default_root_dir", str(tmp_path), "--model.predict_dir", str(tmp_path / "tokens"),
            "--data.predict_order", "length")
    ds, meta = read_stage_output(tmp_path / "tokens")
    assert meta["world_size"] == 2 and len(meta["parts"]) == 2
    assert sorted(ds["row"]) == list(range(N_USERS))
