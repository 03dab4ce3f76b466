"""``foundv2 bench``: protocol ``foundv2-bench-v1`` over every representation that exists.

Reads the prepared data (labels, history, future), builds each representation per user,
fits the same probes on each, trains the baselines on the same split in the same run, and
writes ``bench.json``, ``report.md``, PNG plots and TensorBoard scalars into one folder.
Nothing is tuned on the test users: C, λ, k and early stopping use the validation users.

It scales with the data (:mod:`foundv2.bench.users`): every probe and fitted baseline learns from
a seeded sample of the train users (``probe_users``) and chooses on a seeded sample of the
validation users (``val_users``), and every metric is computed on every test user, read,
featurised and scored ``batch_users`` at a time. Memory depends on the samples and the batch,
never on the number of users; below the sample sizes the bench reads every user. A baseline that
cannot run at a size (a catalogue too large for a dense item-item model, more users than an LLM
can embed) is listed in ``bench.json``, ``report.md`` and on the console as not run, with why.

Nothing finished is lost: every (row, task) result is written to ``progress.json`` (and its test
scores under ``scores/``) as soon as it exists, and a rerun with the same inputs picks up where a
killed or failed run stopped. ``bench.json`` is the completeness marker and is written last, after
``report.md``, the plots and TensorBoard; the progress files are removed after it. The probes'
per-step lines and repeated warnings go to ``bench.log`` in the output folder, not the console.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from data_modules.datamodule import UserDataModule
from data_modules.schema import DataError, DatasetSpec
from data_modules.store import (
    Split,
    atomic_write_bytes,
    atomic_write_json,
    check_writable,
    read_output_meta,
    remove_dead_tmp,
)
from foundv2.bench import baselines as B
from foundv2.bench import representations as R
from foundv2.bench.probes import (
    fit_label,
    fit_next_item,
    label_scores,
    next_item_scores,
    probe_info,
    score_predictions,
)
from foundv2.bench.users import BenchUsers, Task, UserBatch, read_users, sample_rows
from foundv2.console import log_to_file
from foundv2.metrics.ranking import TopKRanking

log = logging.getLogger(__name__)
PROTOCOL = "foundv2-bench-v1"
TASK_KINDS = ("binary", "multiclass", "multilabel")
#: baselines that read item ids (skipped, with next_items, on a data set without items)
ITEM_BASELINES = ("tfidf", "tfidf_svd", "top_items", "popularity", "ease", "itemknn", "sasrec")
PROGRESS_FILE = "progress.json"
SCORES_DIR = "scores"
LOG_FILE = "bench.log"
#: users ranked at a time (bounds the [users, items] score matrix)
RANK_CHUNK = 1024
#: the largest catalogue ``top_items`` can store (its ids are uint16)
TOP_ITEMS_MAX = 2**16

__all__ = ["BenchData", "Task", "load_bench_data", "load_scores", "run_bench", "pooled_representation",
           "token_representations", "embedding_representation", "token_bytes"]


# ---------------------------------------------------------------------------------- every user in memory
@dataclass
class BenchData:
    """Per-user arrays of every user, indexed by the prepared table's row (:func:`load_bench_data`)."""

    spec: DatasetSpec
    split: np.ndarray
    history: sp.csr_matrix
    future: sp.csr_matrix
    sequences: list[np.ndarray]
    tasks: list[Task] = field(default_factory=list)
    sources: list[np.ndarray] = field(default_factory=list)  # per user: history event sources
    times: list[np.ndarray] = field(default_factory=list)  # ... timestamps (s)
    values: list[np.ndarray] = field(default_factory=list)  # ... values (NaN: none)

    @property
    def has_items(self) -> bool:
        """Whether any history or future event carries an item id."""
        return self.history.shape[1] > 0 and (self.history.nnz > 0 or self.future.nnz > 0)


def _check_label(name: str, kind: str, y: np.ndarray, split: np.ndarray, dataset: str,
                 train: np.ndarray | None = None) -> None:
    """A DataError for a label no probe can learn: an unknown kind, or a single class (among all
    users, or among the train users: those of ``split``, else the ``train`` rows)."""
    if kind not in TASK_KINDS:
        raise DataError(
            f"{dataset}: label '{name}' has kind '{kind}', which the bench does not know; use one of "
            f"{', '.join(TASK_KINDS)} in the data config's labels."
        )
    train = split == Split.TRAIN if train is None else train
    for where, rows in (("all users", slice(None)), ("the train users", train)):
        classes = np.unique(y[rows], axis=0) if y.ndim == 2 else np.unique(y[rows])
        if (y.ndim == 1 and classes.size < 2) or (y.ndim == 2 and len(classes) < 2):
            raise DataError(
                f"{dataset}: label '{name}' ({kind}) has a single value among {where} "
                f"({classes[:1].tolist()}), so no probe can be fitted or scored on it; drop it from the data "
                f"config's labels or give it at least two classes."
            )


def bench_tasks(dm: UserDataModule) -> list[Task]:
    """The data set's tasks in report order: each binary / multiclass label, the future categories
    (multi-label) when the data has categories, next items."""
    spec = dm.spec
    tasks = []
    for lab in spec.labels:
        if lab.kind == "multilabel":
            continue
        if lab.kind not in TASK_KINDS:
            _check_label(lab.name, lab.kind, np.zeros(2, np.int64), np.zeros(2, np.int64), spec.name)
        tasks.append(Task(lab.name, lab.kind, column=f"label/{lab.name}"))
    if spec.categories:
        tasks.append(Task("future_genres" if spec.name.startswith("movielens") else "future_categories", "multilabel"))
    tasks.append(Task("next_items", "ranking"))
    return tasks


def load_bench_data(dm: UserDataModule) -> BenchData:
    """Every user's history/future item matrices, item sequences, history events and task labels,
    in memory: for small data sets and exploration scripts (the bench itself reads a batch at a
    time, :mod:`foundv2.bench.users`)."""
    dm.setup()
    tasks = bench_tasks(dm)
    users = BenchUsers(dm, tasks)
    data = read_users(users.reader, np.arange(len(users.split)), users.split, users.n_items, users.n_categories, tasks)
    for t in tasks:
        if t.kind in TASK_KINDS and t.column:
            _check_label(t.name, t.kind, data.labels[t.name], data.split, dm.spec.name)
    kept = [Task(t.name, t.kind, t.column, data.labels.get(t.name)) for t in tasks
            if t.kind != "multilabel" or data.labels[t.name].any()]
    if not (data.split == Split.TEST).any():
        raise DataError(f"{dm.spec.name}: the split has no test users, so there is nothing to score; "
                        f"use more users or check the split fractions.")
    return BenchData(dm.spec, data.split, data.history, data.future, data.sequences, kept, data.sources, data.times,
                     data.values)


def _all_rows(n: int) -> UserBatch:
    return UserBatch(np.arange(n), np.zeros(n, np.int64), sp.csr_matrix((n, 0)), sp.csr_matrix((n, 0)), [])


def pooled_representation(dm: UserDataModule) -> tuple[np.ndarray, float]:
    """Every user's :class:`~foundv2.bench.representations.Pooled` features, and their bytes per user."""
    dm.setup()
    out = R.Pooled(dm)(_all_rows(len(dm.split)))
    return out, float(out.shape[1] * 4)


def token_bytes(tokens_dir: Path) -> float:
    """Bytes per user of a tokens output, from its ``report.json`` (``storage.bytes_per_user``)."""
    return R.token_bytes(Path(tokens_dir))


def token_representations(tokens_dir: Path, tokenizer_dir: Path | None, n_rows: int) -> dict:
    """Every user's ``tokens_bag`` (counts of global token ids) and ``tokens_sum`` (summed code
    vectors per source), with their bytes per user; ``_usage``, ``_levels`` for the usage plot."""
    tokens = R.TokenFeatures(Path(tokens_dir), Path(tokenizer_dir) if tokenizer_dir else None, n_rows)
    users = _all_rows(n_rows)
    reps = {name: (f(users), tokens.bytes_per_user) for name, f in R.token_rows(tokens).items()}
    reps["_usage"] = tokens.usage
    reps["_levels"] = tokens.levels
    return reps


def embedding_representation(folder: Path, n_rows: int, column: str = "user_emb") -> tuple[np.ndarray, float]:
    """Every user's embedding column of a stage output (stage 1, stage 3, Q-Anchor), its bytes per user."""
    out = R.Embedding(Path(folder), n_rows, column)(_all_rows(n_rows))
    return out, float(out.shape[1] * 4)


# ---------------------------------------------------------------------------------- rows
#: ``(users, X, positions) → scores`` of those positions of a batch of users
Scorer = Callable[[UserBatch, object, np.ndarray], object]


@dataclass
class Fitted:
    """One (row, task)'s fitted model: how it scores any users, and what its fit chose."""

    score: Scorer
    info: dict = field(default_factory=dict)


@dataclass
class Row:
    """One line of the bench: how to build its features (or fit its model), its size and its tasks."""

    name: str
    kind: str  # tokens | representation | baseline
    bytes_per_user: float | None  # None: not bounded (a model over the full history), or float32 × the
    # built features' width for kind "representation" (set once built)
    storage: str
    tasks: list[str]
    features: R.Features | None = None  # probed on every task
    task_features: Callable[[UserBatch, Task], object] | None = None  # features of one task (Q-Anchor: its query)
    fit: Callable[[Task], Fitted] | None = None  # a model baseline fitted on the samples
    sparse_bytes: bool = False  # bytes_per_user: the mean nonzeros of the features read × 8 (set once built)
    collision_rate: float | None = None  # token rows: share of windows (users) whose whole code tuple is shared


@dataclass
class Settings:
    """The bench's size settings (run_bench's arguments of the same names)."""

    probe_users: int | None
    val_users: int | None
    sample_seed: int
    batch_users: int
    sasrec_users: int | None
    ease_max_items: int
    itemknn_max_items: int
    qanchor_max_users: int


class _History:
    """The item-item gram of the bench's users' histories (train and validation samples and every
    test user), summed over batches once and shared by EASE and item-kNN."""

    def __init__(self, users: BenchUsers):
        self.users, self.gram = users, None

    def __call__(self) -> np.ndarray:
        if self.gram is None:
            self.gram = B.item_gram(self.users.fit.history)
            for batch in self.users.test_batches(items_only=True):
                self.gram += B.item_gram(batch.history)
        return self.gram


def _ranking_baseline(name: str, users: BenchUsers, settings: Settings, sasrec_epochs: int, seed: int,
                      history: _History) -> Callable[[Task], Fitted]:
    """Fit one of popularity, EASE, item-kNN, SASRec on the samples; score any users."""

    def binary_scores(W):
        def score(batch: UserBatch, X, pos: np.ndarray):
            out = B._binary(batch.history[pos]) @ W
            return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float32)
        return score

    def fit(task: Task) -> Fitted:
        data = users.fit
        if name == "popularity":
            counts = np.asarray(data.history[data.part(Split.TRAIN)].sum(axis=0), dtype=np.float32).ravel()
            return Fitted(lambda batch, X, pos: np.tile(counts, (len(pos), 1)))
        if name in ("ease", "itemknn"):
            make = B.fit_ease if name == "ease" else B.fit_itemknn
            return Fitted(binary_scores(make(history(), data.history, data.future, data.part(Split.VAL))))
        cfg = B.SASRecConfig(epochs=sasrec_epochs, seed=seed)
        split = data.split.copy()
        train = data.part(Split.TRAIN)
        keep = sample_rows(np.where(split == Split.TRAIN, 0, -1), 0, settings.sasrec_users, settings.sample_seed, 2)
        split[np.setdiff1d(train, keep)] = -1  # outside SASRec's own sample of the train users
        model = B.fit_sasrec(data.sequences, data.future, split, cfg, history=data.history)

        def score(batch: UserBatch, X, pos: np.ndarray):
            return B.sasrec_scorer(model, [batch.sequences[i] for i in pos], cfg.max_len)(np.arange(len(pos)))
        return Fitted(score)

    return fit


def _majority(users: BenchUsers) -> Callable[[Task], Fitted]:
    def fit(task: Task) -> Fitted:
        data = users.fit
        y = data.labels[task.name]
        from foundv2.bench.probes import SELECTION_METRIC, n_classes_of

        train, val = data.part(Split.TRAIN), data.part(Split.VAL)
        prior = (np.bincount(y[train], minlength=n_classes_of(y, task.kind)) / train.size if task.kind == "multiclass"
                 else np.asarray(y[train].mean(axis=0), dtype=np.float64))

        def constant(n: int) -> np.ndarray:
            return np.broadcast_to(prior, (n,) + prior.shape).copy()

        key = SELECTION_METRIC[task.kind]
        info = {f"val_{key}": score_predictions(task.kind, constant(len(val)), y[val])[key]}
        return Fitted(lambda batch, X, pos: constant(len(pos)), info)

    return fit


def _rows(users: BenchUsers, dm: UserDataModule, tokens_dir: str | None, tokenizer_dir: str | None,
          embeddings: dict[str, str], baselines: list[str], representations: list[str],
          storage_bytes: list[int], sasrec_epochs: int, seed: int, tasks: list[Task], has_items: bool,
          settings: Settings, qanchor: list | None = None) -> tuple[list[Row], dict, dict[str, str]]:
    """Every row of this run, in report order, with lazily built features; and the rows not run at
    this size, with why."""
    n_rows = len(users.split)
    cls_tasks = [t.name for t in tasks if t.kind != "ranking"]
    all_tasks = [t.name for t in tasks]
    rank_tasks = [t.name for t in tasks if t.kind == "ranking"]
    rows: list[Row] = []
    extra: dict = {}
    not_run: dict[str, str] = {}
    if "pooled" in representations:
        rows.append(Row("pooled", "representation", None, "float32 × dim", all_tasks, features=R.Pooled(dm)))
    tok_bytes = None
    if tokens_dir:
        tok = R.TokenFeatures(Path(tokens_dir), Path(tokenizer_dir) if tokenizer_dir else None, n_rows)
        tok_bytes = tok.bytes_per_user
        extra["tokens"] = tok
        built = R.token_rows(tok)
        for name in ("tokens_bag", "tokens_sum"):
            if name in representations and (name != "tokens_sum" or tokenizer_dir):
                if name not in built:
                    tok.summed(users.fit)  # the DataError that names the missing export
                rows.append(Row(name, "tokens", tok_bytes, "codes as stored (tokens' report.json)", all_tasks,
                                features=built[name], collision_rate=R.token_collision_rate(Path(tokens_dir))))
    for name, folder in (embeddings or {}).items():
        emb = R.Embedding(Path(folder), n_rows)
        meta = read_output_meta(folder) or {}
        if meta.get("row_kind") == "tokens":  # e.g. stage 3: built from the tokens alone, its weights shared
            rows.append(Row(name, "tokens", float(meta["bytes_per_user"]),
                            "the tokens as stored (the model's weights are shared by all users)", all_tasks,
                            features=emb, collision_rate=R.token_collision_rate(Path(folder))))
        else:
            rows.append(Row(name, "representation", None, "float32 × dim", all_tasks, features=emb))
    for qa in qanchor or []:  # base, prompt-tuned and no-query rows of each Q-Anchor model
        size, kind, what = qa.bytes_per_user(tok_bytes if qa.prefix == "tokens" else None)
        if n_rows > settings.qanchor_max_users:
            for name in qa.row_names:
                not_run[name] = (f"the LLM embeds every one of the {n_rows:,} users for each task's query, more than "
                                 f"bench.qanchor_max_users ({settings.qanchor_max_users:,})")
            continue
        for name in qa.row_names:
            rows.append(Row(name, kind, size, what, all_tasks,
                            task_features=lambda batch, task, qa=qa, name=name: qa.build()[name][task.name][batch.rows]))
    sizes = sorted({int(b) for b in storage_bytes} | ({int(round(tok_bytes))} if tok_bytes else set()))
    ctx = _Baselines(users, dm, sizes, seed, sasrec_epochs, settings, all_tasks, cls_tasks, rank_tasks, rows, extra,
                     not_run)
    for name in baselines:
        if name not in BASELINES:
            raise DataError(f"unknown baseline '{name}'; known: {', '.join(BASELINES)}.")
        if name in ITEM_BASELINES and not has_items:
            continue
        BASELINES[name](ctx, name)
    return rows, extra, not_run


# ---------------------------------------------------------------------------------- baselines
@dataclass
class _Baselines:
    """What a baseline's rows are built from, and where they go (:data:`BASELINES`)."""

    users: BenchUsers
    dm: UserDataModule
    sizes: list[int]  # the storage budgets in bytes (the tokens' own among them)
    seed: int
    sasrec_epochs: int
    settings: Settings
    all_tasks: list[str]
    cls_tasks: list[str]
    rank_tasks: list[str]
    rows: list[Row]
    extra: dict
    not_run: dict[str, str]


def _tfidf(ctx: _Baselines, name: str) -> None:
    ctx.rows.append(Row("tfidf", "baseline", None, "sparse (uint32 id, float32 weight) pairs, mean over users",
                        ctx.all_tasks, features=R.TfIdf(), sparse_bytes=True))


def _tfidf_svd(ctx: _Baselines, name: str) -> None:
    """One row per storage budget: ``k`` int8 dimensions, ``k`` capped by the SVD's limit."""
    n_items, n_train = ctx.users.n_items, len(ctx.users.train)
    if min(n_items, n_train) < 2:
        return  # no SVD of even one dimension (B.svd_width)
    seen = set()
    for k in ctx.sizes:
        k_eff = B.svd_width(k, n_items, n_train) if k >= 1 else 0
        if k_eff < 1 or k_eff in seen:
            continue
        seen.add(k_eff)
        ctx.rows.append(Row(f"tfidf_svd{k_eff}_int8", "baseline", float(k_eff),
                            "int8 × k (k float32 scales shared by all users)", ctx.all_tasks,
                            features=R.TfIdfSVD(k_eff, ctx.seed)))


def _top_items(ctx: _Baselines, name: str) -> None:
    """One row per storage budget: as many uint16 item ids as fit."""
    seen = set()
    n_items = ctx.users.n_items
    for b in ctx.sizes:
        n_bytes = B.UINT16_BYTES * (b // B.UINT16_BYTES)
        if n_bytes < B.UINT16_BYTES or n_bytes in seen:
            continue
        seen.add(n_bytes)
        if n_items > TOP_ITEMS_MAX:
            ctx.not_run[f"top_items{n_bytes}"] = (f"its item ids are uint16, and this catalogue has {n_items:,} "
                                                  f"items (> {TOP_ITEMS_MAX:,})")
            continue
        ctx.rows.append(Row(f"top_items{n_bytes}", "baseline", float(n_bytes), f"{n_bytes // 2} uint16 item ids (padded)",
                            ctx.all_tasks, features=R.TopItems(n_bytes)))


def _activity(ctx: _Baselines, name: str) -> None:
    act = R.Activity(len(ctx.dm.spec.sources))
    ctx.rows.append(Row("activity", "baseline", float(act.dim * 4), "float32 × dim", ctx.all_tasks, features=act))


def _majority_row(ctx: _Baselines, name: str) -> None:
    ctx.rows.append(Row("majority", "baseline", 0.0, "none (a constant)", ctx.cls_tasks, fit=_majority(ctx.users)))


#: the catalogue limit of a ranking baseline: (setting, its value's attribute, what grows with items)
_ITEM_LIMITS = {"ease": ("bench.ease_max_items", "ease_max_items",
                         "a dense item × item inverse per λ (O(items³) time, 3 × items² float64)"),
                "itemknn": ("bench.itemknn_max_items", "itemknn_max_items",
                            "a dense item × item similarity (items² float32, twice)")}


def _ranking(ctx: _Baselines, name: str) -> None:
    """popularity, EASE, item-kNN, SASRec: next-item rankers (EASE and item-kNN up to a catalogue size)."""
    n_items = ctx.users.n_items
    if name in _ITEM_LIMITS:
        setting, attr, grows = _ITEM_LIMITS[name]
        if n_items > getattr(ctx.settings, attr):
            ctx.not_run[name] = (f"{grows}: this catalogue has {n_items:,} items, more than {setting} "
                                 f"({getattr(ctx.settings, attr):,})")
            return
    if "history" not in ctx.extra:
        ctx.extra["history"] = _History(ctx.users)
    size, what = (0.0, "none (one ranking for all)") if name == "popularity" else (None, "the full history")
    ctx.rows.append(Row(name, "baseline", size, what, ctx.rank_tasks,
                        fit=_ranking_baseline(name, ctx.users, ctx.settings, ctx.sasrec_epochs, ctx.seed,
                                              ctx.extra["history"])))


#: every baseline of ``bench.baselines``: name → the function that adds its rows (or why they are not run)
BASELINES: dict[str, Callable[[_Baselines, str], None]] = {
    "tfidf": _tfidf, "tfidf_svd": _tfidf_svd, "top_items": _top_items, "activity": _activity,
    "majority": _majority_row, "popularity": _ranking, "ease": _ranking, "itemknn": _ranking, "sasrec": _ranking,
}


# ---------------------------------------------------------------------------------- evaluation
class _TestScores:
    """One (row, task)'s test users, a batch at a time: scores and labels (classification), or the
    running ranking metrics with each user's values (next items)."""

    def __init__(self, task: Task, fitted: Fitted, ks=(10, 20)):
        self.task, self.fitted = task, fitted
        self.ranking = TopKRanking(ks, keep_per_user=True) if task.kind == "ranking" else None
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, batch: UserBatch, X) -> None:
        if self.ranking is None:
            self.scores.append(np.asarray(self.fitted.score(batch, X, np.arange(len(batch)))))
            self.labels.append(batch.labels[self.task.name])
            return
        for start in range(0, len(batch), RANK_CHUNK):
            pos = np.arange(start, min(start + RANK_CHUNK, len(batch)))
            with torch.no_grad():
                scores = torch.as_tensor(self.fitted.score(batch, X, pos))
            self.ranking.update(scores, batch.future[pos], exclude=batch.history[pos])

    def result(self) -> tuple[dict, np.ndarray]:
        """``(metrics, the test scores saved for the paired bootstrap)``."""
        if self.ranking is None:
            scores = np.concatenate(self.scores)
            return score_predictions(self.task.kind, scores, np.concatenate(self.labels)), scores
        from foundv2.bench.report import MAIN

        metrics = {k: float(v) for k, v in self.ranking.compute().items()}
        per_user = self.ranking.per_user or []
        key = MAIN["ranking"]
        values = torch.cat([p[key] for p in per_user]).cpu().numpy() if per_user else np.zeros(0)
        return metrics, values


def _fit_probe(row: Row, X, task: Task, users: BenchUsers, probe_epochs: int, seed: int) -> Fitted:
    """The protocol's probe of one representation on one task, fitted on the samples: one
    ProbeStage for every task kind, 256 users a step (a quarter of the optimiser steps of 64 for
    the same epochs)."""
    data = users.fit
    if task.kind == "ranking":
        stage = fit_next_item(X, data.history, data.future, data.split, epochs=probe_epochs, batch_size=256,
                              seed=seed)
        return Fitted(lambda batch, Xb, pos: next_item_scores(stage, Xb[pos]), probe_info(stage))
    stage = fit_label(X, data.labels[task.name], data.split, task.kind, epochs=probe_epochs, batch_size=256,
                      seed=seed)
    return Fitted(lambda batch, Xb, pos: label_scores(stage, Xb[pos]), probe_info(stage))


def _versions() -> dict:
    v = {}
    for lib in ("torch", "lightning", "torchmetrics", "datasets", "transformers", "scikit-learn", "numpy"):
        try:
            v[lib] = version(lib)
        except PackageNotFoundError:
            v[lib] = None
    return v


@contextlib.contextmanager
def _quiet(log_path: Path) -> Iterator[None]:
    """Send every log line (the probes' choices included) and every Python warning, once per
    place, to ``log_path`` instead of the console (:func:`foundv2.console.log_to_file`)."""
    with log_to_file(log_path), warnings.catch_warnings():
        warnings.simplefilter("default")
        yield


def _save_scores(folder: Path, row: str, task: str, scores: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(scores), allow_pickle=False)
    atomic_write_bytes(folder / SCORES_DIR / f"{row}.{task}.npy", buf.getvalue())


def _paired(out_dir: Path, pairs: list[list[str]], tasks: list[Task], labels: dict) -> dict:
    """``task → [{a, b, metric, delta, lo, hi, p_le_0, n}]`` for each requested pair of rows that both
    have that task's test scores, on the metric the tables show (see
    :func:`~foundv2.bench.probes.paired_bootstrap`)."""
    from foundv2.bench.probes import paired_bootstrap
    from foundv2.bench.report import MAIN

    out: dict[str, list] = {}
    for t in tasks:
        for a, b in pairs:
            sa, sb = load_scores(out_dir, a, t.name), load_scores(out_dir, b, t.name)
            if sa is None or sb is None:
                continue
            metric = MAIN[t.kind] if t.kind != "ranking" else None
            d = paired_bootstrap(t.kind, sa, sb, labels.get(t.name), metric=metric)
            out.setdefault(t.name, []).append({"a": a, "b": b, "metric": metric or MAIN[t.kind],
                                               **{k: float(v) for k, v in d.items()}})
    return out


def load_scores(folder: Path, row: str, task: str) -> np.ndarray | None:
    """The test scores of one (row, task) saved by this run (None when there are none)."""
    path = Path(folder) / SCORES_DIR / f"{row}.{task}.npy"
    return np.load(path, allow_pickle=False) if path.exists() else None


def _fingerprint(dm: UserDataModule, inputs: dict) -> str:
    """What must match for a rerun to reuse finished (row, task) results."""
    parts = {"prepared": str(dm.prepared_dir), "inputs": inputs}
    for key in ("tokens_dir", "tokenizer_dir"):
        if inputs.get(key):
            for f in ("meta.json", "report.json", "config.json"):
                p = Path(inputs[key]) / f
                parts[f"{key}/{f}"] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    for name, folder in (inputs.get("embeddings") or {}).items():
        p = Path(folder) / "meta.json"
        parts[f"emb/{name}"] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    for name, ckpt in (inputs.get("qanchor") or {}).items():
        from foundv2.bench.qanchor import checkpoint_path

        st = checkpoint_path(ckpt).stat()
        parts[f"qanchor/{name}"] = [st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_bench(
    dm: UserDataModule,
    output_dir: str,
    tokens_dir: str | None = None,
    tokenizer_dir: str | None = None,
    embeddings: dict[str, str] | None = None,
    baselines: list[str] | None = None,
    representations: list[str] | None = None,
    storage_bytes: list[int] | None = None,
    sasrec_epochs: int = 15,
    probe_epochs: int = 30,
    seed: int = 0,
    skip_tasks: list[str] | None = None,
    compare: list[list[str]] | None = None,
    qanchor: dict[str, str] | None = None,
    qanchor_queries: dict[str, str] | None = None,
    qanchor_tune_steps: int = 300,
    qanchor_prompt_tokens: int = 6,
    probe_users: int | None = 20_000,
    val_users: int | None = 10_000,
    sample_seed: int = 0,
    batch_users: int = 4096,
    sasrec_users: int | None = None,
    ease_max_items: int = 5_000,
    itemknn_max_items: int = 10_000,
    qanchor_max_users: int = 50_000,
    progress: bool = True,
    resume: bool = True,
) -> dict:
    """Run the whole protocol; returns the bench.json dict.

    Args:
        dm: the data (its prepared cache is reused).
        output_dir: where bench.json, report.md, the plots, tb/ and bench.log go.
        tokens_dir: a tokens dataset (TokenizerStage predict) for the token rows.
        tokenizer_dir: the tokenizer's export folder, to sum code vectors (``tokens_sum``).
        embeddings: name → a stage output folder with a ``user_emb`` column (e.g. stage 1).
        baselines: which baselines to train (default: all of tfidf, tfidf_svd, top_items,
            activity, majority, popularity, ease, itemknn, sasrec; those that need item ids are
            skipped on a data set without items).
        representations: which built-in representations to probe (pooled, tokens_bag, tokens_sum).
        storage_bytes: sizes (bytes per user) of the storage-matched baselines ``tfidf_svd<k>_int8``
            and ``top_items<k>``; the token rows' size is always added (default 16 and 64).
        sasrec_epochs: SASRec's epoch budget (early-stopped on val).
        probe_epochs: every probe's epoch budget, each early-stopped on val (a label probe's
            epoch is at least :data:`~foundv2.bench.probes.LABEL_MIN_STEPS` optimiser steps: a
            small train set is gone over several times an epoch).
        seed: seed of the probes.
        skip_tasks: tasks left out (a quick bench, e.g. ["next_items"]).
        compare: pairs of rows ``[a, b]`` compared on every task with the paired 95 % interval of
            ``a - b`` (bench.json ``pairs``), whatever their sizes: e.g. stage 3 against the token
            bag it reads, or an ablation against the full model.
        qanchor: name → a QAnchorStage checkpoint (or a pipeline qanchor step's ``model``
            folder): rows ``<name>`` (each task its own query), ``<name>_tuned`` (plus a
            scenario prompt tuned per task on the training users) and ``<name>_noquery``
            (:mod:`foundv2.bench.qanchor`); a token-prefix model reads ``tokens_dir``.
        qanchor_queries: task → the query it is asked with (defaults:
            ``foundv2.bench.qanchor.TASK_QUERIES``).
        qanchor_tune_steps: scenario-tuning steps per task.
        qanchor_prompt_tokens: learned prompt tokens per scenario.
        probe_users: the train users every probe and every fitted baseline (TF-IDF's IDF, the SVD
            and its int8 scales, popularity, SASRec, the activity reference date, majority) learns
            from: a seeded sample of this many (every train user when there are fewer; null: every
            one; the draw of ``data.fit_users`` for the same number and seed). On 50,000 synthetic
            users 20,000 gave the attribute probes' figures of all 40,000 to within 0.003 and the
            next-item probe's to within 0.007 NDCG@10, in three quarters of the time and memory
            (``docs/bench-size.md``); every user's features held at once would not fit at 1M.
            EASE and item-kNN read the histories of every user the bench reads (these, the
            validation sample and the test users).
        val_users: the validation users that choose C, weight decay, λ, k and early stopping: a
            seeded sample of this many (null: every one). Test metrics always cover every test user.
        sample_seed: seed of the ``probe_users``, ``val_users`` and ``sasrec_users`` samples.
        batch_users: test users read, featurised and scored at a time: bounds the memory of a
            row's test pass (and of the EASE / item-kNN history gram's pass).
        sasrec_users: SASRec trains on a seeded sample of this many of the ``probe_users`` (null:
            all of them): the slowest baseline by far (about 6 s per thousand users per epoch on
            2 cores), and one that keeps gaining from more users, so it takes them all by default.
        ease_max_items: EASE runs up to this many items; past it the report lists it as not run
            (its cost is a dense item × item inverse per λ: O(items³) time and three items²
            float64 matrices, 600 MB at 5,000 items).
        itemknn_max_items: item-kNN runs up to this many items; past it the report lists it as
            not run (a dense item × item float32 similarity, held twice: 800 MB at 10,000 items).
        qanchor_max_users: Q-Anchor rows run on data sets of up to this many users; past it the
            report lists them as not run (the LLM embeds every user for every task's query).
        progress: show one progress bar over rows × tasks.
        resume: reuse the finished (row, task) results of an unfinished run with the same inputs.
    """
    inputs = {"tokens_dir": tokens_dir, "tokenizer_dir": tokenizer_dir, "embeddings": embeddings or {},
              "baselines": baselines, "representations": representations, "storage_bytes": storage_bytes,
              "sasrec_epochs": sasrec_epochs, "probe_epochs": probe_epochs, "seed": seed, "skip_tasks": skip_tasks,
              "compare": [list(p) for p in compare or []], "qanchor": qanchor or {},
              "qanchor_queries": qanchor_queries, "qanchor_tune_steps": qanchor_tune_steps,
              "qanchor_prompt_tokens": qanchor_prompt_tokens}
    settings = Settings(probe_users, val_users, sample_seed, batch_users, sasrec_users, ease_max_items,
                        itemknn_max_items, qanchor_max_users)
    inputs["settings"] = {k: v for k, v in vars(settings).items() if k != "batch_users"}  # batches change no figure
    R.check_inputs(tokens_dir, tokenizer_dir, embeddings or {}, qanchor or {})  # before any data is read or probe run
    out_dir = Path(output_dir)
    check_writable(out_dir, "bench output (bench.output_dir)", "point bench.output_dir at a folder you can write, or "
                   "fix its permissions")
    remove_dead_tmp(out_dir, recursive=True)  # what a killed bench left (files being written)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").unlink(missing_ok=True)  # this folder is being rewritten: no stale marker
    except OSError as err:
        raise DataError(f"{out_dir}: the bench's output folder cannot be written ({err.strerror}); "
                        f"pick another output_dir or fix its permissions.") from None
    with _quiet(out_dir / LOG_FILE):
        return _run(dm, out_dir, inputs, settings, progress, resume)


def _checked_tasks(dm: UserDataModule, users: BenchUsers, skip: tuple[str, ...]) -> tuple[list[Task], list[str], bool]:
    """The tasks this run scores, the notes about those it leaves out, and whether it has items.
    Every label is checked on all users and on the train sample (one column read at a time)."""
    spec = dm.spec
    notes = []
    for t in users.tasks:
        if t.column:
            y = users.column(t.column)
            train = np.zeros(len(y), bool)
            train[users.train] = True
            _check_label(t.name, t.kind, y, users.split, spec.name, train)
    fit = users.fit
    tasks = [t for t in users.tasks if t.name not in skip
             and not (t.kind == "multilabel" and not fit.labels[t.name].any())]
    has_items = fit.history.shape[1] > 0 and (fit.history.nnz > 0 or fit.future.nnz > 0)
    if not has_items:
        tasks = [t for t in tasks if t.kind != "ranking"]
        notes.append(f"{spec.name} has no item ids: next_items and the item baselines "
                     f"({', '.join(ITEM_BASELINES)}) are skipped.")
    elif fit.future.nnz == 0:
        tasks = [t for t in tasks if t.kind != "ranking"]
        notes.append(f"{spec.name} holds no future events back (future_frac 0: labels from a separate "
                     f"period): next_items and the future-behaviour tasks are skipped.")
    return tasks, notes, has_items


def _run(dm: UserDataModule, out_dir: Path, inputs: dict, settings: Settings, progress: bool, resume: bool) -> dict:
    seed = inputs["seed"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    t_start = time.perf_counter()
    users = _bench_users(dm, settings)
    plan = _plan(dm, users, inputs, settings, out_dir)
    prog_path = out_dir / PROGRESS_FILE
    fp = _fingerprint(dm, inputs)
    results = _resumed(out_dir, prog_path, fp, plan.rows, resume)
    _score_rows(plan, users, inputs, results, out_dir, prog_path, fp, progress)
    bench = _record(dm, users, settings, inputs, plan, results, time.perf_counter() - t_start)
    from foundv2.bench.report import write_report

    labels = users.test_labels([t for t in plan.tasks if t.kind != "ranking"])
    bench["pairs"] = _paired(out_dir, inputs["compare"], plan.tasks, labels)
    tok = plan.extra.get("tokens")
    usage = (tok.usage.tolist(), tok.levels) if tok is not None and tok.usage.any() else None
    write_report(bench, out_dir, usage, labels)
    prog_path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / SCORES_DIR, ignore_errors=True)
    return bench


def _bench_users(dm: UserDataModule, settings: Settings) -> BenchUsers:
    """The prepared data's users as the bench reads them (the probes' samples, every test user)."""
    dm.prepare_data()
    dm.setup()
    users = BenchUsers(dm, bench_tasks(dm), settings.probe_users, settings.val_users, settings.sample_seed,
                       settings.batch_users)
    if not len(users.test):
        raise DataError(f"{dm.spec.name}: the split has no test users, so there is nothing to score; "
                        f"use more users or check the split fractions.")
    return users


@dataclass
class _Plan:
    """What a bench run scores: its tasks, its rows and what it says about them."""

    tasks: list[Task]
    notes: list[str]
    has_items: bool
    rows: list[Row]
    extra: dict
    not_run: dict[str, str]
    qanchor: list


def _plan(dm: UserDataModule, users: BenchUsers, inputs: dict, settings: Settings, out_dir: Path) -> _Plan:
    """The tasks and rows of this run (representations, baselines, Query-as-Anchor), its notes
    and the baselines not run at this size, each said on the console."""
    from foundv2.bench.qanchor import QAnchorRows

    tasks, notes, has_items = _checked_tasks(dm, users, tuple(inputs["skip_tasks"] or ()))
    notes = [f"data: {w}" for w in dm.data_warnings(dm.meta)] + notes
    names = list(BASELINES if inputs["baselines"] is None else inputs["baselines"])
    wanted = inputs["representations"] or ["pooled", "tokens_bag", "tokens_sum"]
    seed = inputs["seed"]
    qanchor = []
    for name, ckpt in inputs["qanchor"].items():
        labelled = [Task(t.name, t.kind, t.column, users.column(t.column) if t.column else None) for t in tasks]
        qanchor.append(QAnchorRows(name, ckpt, dm, labelled, out_dir, inputs["tokens_dir"], inputs["qanchor_queries"],
                                   inputs["qanchor_tune_steps"], inputs["qanchor_prompt_tokens"], seed))
    rows, extra, not_run = _rows(users, dm, inputs["tokens_dir"], inputs["tokenizer_dir"], inputs["embeddings"], names,
                                 wanted, inputs["storage_bytes"] or [16, 64], inputs["sasrec_epochs"], seed, tasks,
                                 has_items, settings, qanchor)
    for note in notes:
        print(f"bench: {note}", flush=True)
    for name, why in not_run.items():
        print(f"bench: {name} not run at this size: {why}.", flush=True)
    return _Plan(tasks, notes, has_items, rows, extra, not_run, qanchor)


def _resumed(out_dir: Path, prog_path: Path, fp: str, rows: list[Row], resume: bool) -> dict[str, dict]:
    """Each row's figures so far: those a killed run of the same inputs (``fp``) scored and whose
    test scores are still on disk, with ``resume``; none otherwise (and no old scores kept)."""
    done: dict = {}
    if resume and prog_path.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            saved = json.loads(prog_path.read_text())
            if saved.get("fingerprint") == fp:
                done = saved.get("results", {})
    if not done:
        shutil.rmtree(out_dir / SCORES_DIR, ignore_errors=True)
    results: dict[str, dict] = {}
    for row in rows:
        results[row.name] = {"kind": row.kind, "bytes_per_user": row.bytes_per_user, "storage": row.storage,
                             **({"collision_rate": row.collision_rate} if row.collision_rate is not None else {})}
        for task in row.tasks:
            if task in done.get(row.name, {}) and load_scores(out_dir, row.name, task) is not None:
                results[row.name][task] = done[row.name][task]
                results[row.name]["bytes_per_user"] = done[row.name]["bytes_per_user"]
    return results


def _score_rows(plan: _Plan, users: BenchUsers, inputs: dict, results: dict, out_dir: Path, prog_path: Path,
                fp: str, progress: bool) -> None:
    """Probe every row on every task it has not scored yet, saving the progress after each row."""
    from tqdm.auto import tqdm

    by_name = {t.name: t for t in plan.tasks}
    n_jobs = sum(len(r.tasks) for r in plan.rows)
    bar = tqdm(total=n_jobs, desc="bench", unit="probe", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    bar.update(sum(1 for r in plan.rows for t in r.tasks if t in results[r.name]))
    try:
        for row in plan.rows:
            todo = [by_name[t] for t in row.tasks if t not in results[row.name]]
            if not todo:
                continue
            _run_row(row, todo, users, inputs, results, out_dir, bar)
            atomic_write_json(prog_path, {"fingerprint": fp, "results": results})
    finally:
        bar.close()


def _record(dm: UserDataModule, users: BenchUsers, settings: Settings, inputs: dict, plan: _Plan, results: dict,
            seconds: float) -> dict:
    """``bench.json``: the protocol, the data, the settings, the machine and every row's figures."""
    return {
        "protocol": PROTOCOL,
        "dataset": dm.spec.name,  # the data set's own name (own files: loader_args.name), the report's title
        "split_sizes": {s.name.lower(): int((users.split == s).sum()) for s in Split},
        "users": users.counts(),
        "settings": {k: v for k, v in vars(settings).items()},
        "seed": inputs["seed"],
        "split_seed": dm.hparams.split_seed,
        "num_items": int(users.n_items),
        "has_items": plan.has_items,
        "notes": plan.notes + [n for qa in plan.qanchor for n in qa.notes],
        "not_run": plan.not_run,
        "tasks": {t.name: t.kind for t in plan.tasks},
        "storage_bytes": sorted({int(b) for b in inputs["storage_bytes"] or [16, 64]}),
        "versions": _versions(),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "seconds": seconds,
        "results": results,
        "inputs": {k: inputs[k] for k in ("tokens_dir", "tokenizer_dir", "embeddings", "qanchor")},
    }


def _run_row(row: Row, todo: list[Task], users: BenchUsers, inputs: dict, results: dict, out_dir: Path, bar) -> None:
    """Fit the row's probes (or its model) for ``todo`` on the samples, score every test user a
    batch at a time, record each task's metrics and test scores."""
    seed = inputs["seed"]
    seconds = {t.name: 0.0 for t in todo}
    t0 = time.perf_counter()
    X = None
    nonzeros = [0, 0]  # of the features read, and their users (sparse_bytes)
    if row.features is not None:
        row.features.fit(users.fit)
        X = row.features(users.fit)
        if row.kind == "representation":
            results[row.name]["bytes_per_user"] = float(X.shape[1] * 4)
        if row.sparse_bytes:
            nonzeros = [X.nnz, X.shape[0]]
    shared = (time.perf_counter() - t0) / len(todo)
    if X is not None:
        log.info("%s: features of the %d sampled users in %.1f s", row.name, X.shape[0], shared * len(todo))
    fitted = {}
    for task in todo:
        bar.set_postfix_str(f"{row.name} / {task.name}")
        t1 = time.perf_counter()
        if row.fit is not None:
            fitted[task.name] = row.fit(task)
        else:
            Xt = X if row.task_features is None else row.task_features(users.fit, task)
            if row.kind == "representation" and Xt is not None:
                results[row.name]["bytes_per_user"] = float(Xt.shape[1] * 4)
            fitted[task.name] = _fit_probe(row, Xt, task, users, inputs["probe_epochs"], seed)
        seconds[task.name] += shared + time.perf_counter() - t1
    del X
    bar.set_postfix_str(f"{row.name} / test users")
    t2 = time.perf_counter()
    test = {t.name: _TestScores(t, fitted[t.name]) for t in todo}
    for batch in users.test_batches():
        Xb = row.features(batch) if row.features is not None else None
        if row.sparse_bytes:
            nonzeros = [nonzeros[0] + Xb.nnz, nonzeros[1] + Xb.shape[0]]
        for task in todo:
            test[task.name].add(batch, Xb if row.task_features is None else row.task_features(batch, task))
    per_task = (time.perf_counter() - t2) / len(todo)
    log.info("%s: %d test users scored in %.1f s", row.name, len(users.test), per_task * len(todo))
    if row.sparse_bytes:  # the mean over the users read: every user when the samples hold them all
        results[row.name]["bytes_per_user"] = float(nonzeros[0] / max(nonzeros[1], 1) * 8)
    for task in todo:
        metrics, scores = test[task.name].result()
        _save_scores(out_dir, row.name, task.name, scores)
        res = {**metrics, **fitted[task.name].info}
        results[row.name][task.name] = {**{k: float(v) for k, v in res.items()},
                                        "seconds": seconds[task.name] + per_task}
        log.info("%s / %s: %s", row.name, task.name, results[row.name][task.name])
        bar.update(1)
