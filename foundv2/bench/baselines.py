"""Reference baselines of the benchmark protocol ``foundv2-bench-v1``.

Next items (each returns ``({'recall@10', 'ndcg@10', 'recall@20', 'ndcg@20'}, seconds)``, scored
on the test users with their history items excluded from the ranking; with ``scores_out`` each
also puts the test users' per-user metrics in ``scores_out['test']``, for a paired bootstrap):

- :func:`popularity`: item interaction counts over the train users' histories;
- :func:`ease`: EASE (Steck 2019), λ chosen on the validation users;
- :func:`itemknn`: cosine item-item kNN, number of neighbours chosen on the validation users;
- :func:`sasrec`: a small task-specific SASRec with full cross-entropy over the items.

Classification: :func:`tfidf_features` (fed to :func:`~foundv2.bench.probes.fit_label_probe`)
and :func:`majority` (a constant predictor).

Storage-matched representations (the claim under test is storage efficiency, so every one has
an exact size in bytes per user):

- :func:`tfidf_svd_int8`: TF-IDF of the history items → truncated SVD fitted on the train users →
  one int8 per dimension with per-dimension scales from the train users (``k`` bytes per user;
  the ``k`` scales are shared by all users and not counted);
- :func:`top_items`: each user's most frequent history item ids, kept up to a byte budget as
  uint16 (2 bytes an id), read as a bag;
- :func:`activity_features`: what any event log has without item ids: counts and value
  statistics per source, recency, frequency, tenure and calendar position (float32).

Histories are inputs (EASE and item-kNN fit on every user's history rows, like any
unsupervised representation; in the bench, every user it reads); futures are targets, and only
the validation users' futures choose hyper-parameters. Splits: ``0`` train, ``1`` validation,
``2`` test. Each model has a ``fit_*`` that returns what it learned (:func:`fit_ease`,
:func:`fit_itemknn`, :func:`fit_sasrec`), for scoring other users later, a batch at a time.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from data_modules import activity as A
from foundv2.bench.probes import (
    SELECTION_METRIC,
    TaskKind,
    n_classes_of,
    score_predictions,
    split_indices,
)
from foundv2.metrics.ranking import evaluate_ranking
from foundv2.nn.item_factors import ItemFactors, fit_idf, tfidf_rows

logger = logging.getLogger(__name__)

RankingResult = tuple[dict[str, float], float]
DEFAULT_KS: tuple[int, ...] = (10, 20)
EASE_LAMBDAS: tuple[float, ...] = (10.0, 100.0, 500.0, 2000.0, 10000.0)
KNN_NEIGHBOURS: tuple[int, ...] = (5, 10, 20, 50, 100, 200)


def _select_key(ks: Sequence[int]) -> str:
    """Validation metric that chooses hyper-parameters: NDCG at the largest cut-off."""
    return f"ndcg@{max(ks)}"


def _per_user(scores_out: dict | None) -> dict | None:
    """Where a ranking baseline puts its test users' per-user metrics: ``scores_out['test']``."""
    return None if scores_out is None else scores_out.setdefault("test", {})


def _binary(history: sp.spmatrix) -> sp.csr_matrix:
    """History as a float32 0/1 CSR matrix (interaction counts are ignored)."""
    return (sp.csr_matrix(history) != 0).astype(np.float32)


def _dense_scorer(X: sp.csr_matrix, W: np.ndarray | sp.spmatrix) -> Callable[[np.ndarray], np.ndarray]:
    """Scorer ``users → X[users] @ W`` as dense ``[B, I]`` float32 scores."""

    def score(users: np.ndarray) -> np.ndarray:
        out = X[users] @ W
        return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float32)

    score.weights = W  # what a caller keeps of the chosen one
    return score


def _choose_on_val(
    grid: Sequence[float],
    make_scorer: Callable[[float], Callable[[np.ndarray], np.ndarray]],
    history: sp.csr_matrix,
    future: sp.csr_matrix,
    val: np.ndarray,
    ks: Sequence[int],
    name: str,
) -> tuple[float, Callable[[np.ndarray], np.ndarray]]:
    """Grid value (and its scorer) with the best validation NDCG; the first one on ties."""
    key = _select_key(ks)
    best: tuple[float, float, Callable[[np.ndarray], np.ndarray]] | None = None
    for value in grid:
        scorer = make_scorer(value)
        val_score = evaluate_ranking(scorer, val, history, future, ks)[key]
        logger.info("%s %g: val %s=%.4f", name, value, key, val_score)
        if best is None or val_score > best[0]:
            best = (val_score, value, scorer)
    assert best is not None, f"the {name} grid must not be empty"
    logger.info("%s: chose %g", name, best[1])
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# popularity, EASE, item-kNN


def _item_item_inputs(history: sp.spmatrix, future: sp.spmatrix, split: np.ndarray):
    """CSR history and future, the binarised history every item-item model fits, val and test users."""
    history, future = sp.csr_matrix(history), sp.csr_matrix(future)
    _, val, test = split_indices(split)
    return history, future, _binary(history), val, test


def popularity(
    history: sp.spmatrix, future: sp.spmatrix, split: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
    scores_out: dict | None = None,
) -> RankingResult:
    """Rank items by their interaction counts summed over the train users' histories.

    Returns:
        ``(test ranking metrics, seconds)``.
    """
    start = time.perf_counter()
    history, future = sp.csr_matrix(history), sp.csr_matrix(future)
    train, _, test = split_indices(split)
    counts = np.asarray(history[train].sum(axis=0), dtype=np.float32).ravel()
    metrics = evaluate_ranking(lambda users: np.tile(counts, (users.size, 1)), test, history, future, ks,
                               per_user_out=_per_user(scores_out))
    return metrics, time.perf_counter() - start


def item_gram(X: sp.spmatrix) -> np.ndarray:
    """``XᵀX`` of binarised histories as a dense ``[I, I]`` float64: co-occurrence counts, whole
    numbers, so a sum of per-batch grams equals the gram of the stacked rows exactly."""
    X = _binary(X)
    return np.asarray((X.T @ X).toarray(), dtype=np.float64)


def ease_weights(X: sp.spmatrix, lam: float, gram: np.ndarray | None = None) -> np.ndarray:
    """EASE item-item weights (Steck 2019): ``B = I − P · diagMat(1 / diag(P))``,
    ``P = (XᵀX + λI)⁻¹``, i.e. ``B_ij = −P_ij / P_jj`` off the diagonal and ``B_jj = 0``.
    ``gram``: ``XᵀX`` when already summed (:func:`item_gram`; ``X`` is then unused).
    """
    gram = (item_gram(X) if gram is None else gram).copy()
    gram[np.diag_indices_from(gram)] += lam
    P = np.linalg.inv(gram)
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return B.astype(np.float32)


def ease(
    history: sp.spmatrix,
    future: sp.spmatrix,
    split: np.ndarray,
    lambdas: Sequence[float] = EASE_LAMBDAS,
    ks: Sequence[int] = DEFAULT_KS,
    scores_out: dict | None = None,
) -> RankingResult:
    """EASE fitted on every user's binarised history; λ chosen on the validation users' futures.

    Cost: one dense ``I × I`` inversion per λ (``O(I³)``); fine up to ~10k items.

    Returns:
        ``(test ranking metrics, seconds)``.
    """
    return _item_item(lambda gram, h, f, val: fit_ease(gram, h, f, val, lambdas, ks), history, future, split, ks,
                      scores_out)


def _item_item(fit, history: sp.spmatrix, future: sp.spmatrix, split: np.ndarray, ks: Sequence[int],
               scores_out: dict | None) -> RankingResult:
    """An item-item baseline end to end: ``fit(gram, history, future, val)`` gives the ``[I, I]``
    weights (its settings chosen on the validation users), then the test users are ranked by
    ``binarised history @ weights``."""
    start = time.perf_counter()
    history, future, X, val, test = _item_item_inputs(history, future, split)
    W = fit(item_gram(X), history, future, val)
    metrics = evaluate_ranking(_dense_scorer(X, W), test, history, future, ks, per_user_out=_per_user(scores_out))
    return metrics, time.perf_counter() - start


def fit_ease(gram: np.ndarray, history: sp.csr_matrix, future: sp.csr_matrix, val: np.ndarray,
             lambdas: Sequence[float] = EASE_LAMBDAS, ks: Sequence[int] = DEFAULT_KS) -> np.ndarray:
    """EASE's ``[I, I]`` weights from a history gram (:func:`item_gram`), λ chosen on the ``val``
    rows of ``history``/``future``; a user's scores are ``binarised history @ weights``."""
    X = _binary(history)
    _, scorer = _choose_on_val(lambdas, lambda lam: _dense_scorer(X, ease_weights(X, lam, gram)), history, future,
                               val, ks, "EASE lambda")
    return scorer.weights


def cosine_item_similarity(X: sp.spmatrix, gram: np.ndarray | None = None) -> np.ndarray:
    """Dense ``[I, I]`` cosine similarity of the item columns of binarised ``X``, zero diagonal:
    ``G_ij / sqrt(G_ii G_jj)`` of the gram ``G = XᵀX`` (:func:`item_gram`; given when already
    summed, ``X`` is then unused)."""
    gram = item_gram(X) if gram is None else gram
    norms = np.sqrt(np.diag(gram))
    inv = np.where(norms > 0, 1.0 / np.maximum(norms, np.finfo(np.float64).tiny), 0.0)
    sim = (gram * inv[:, None] * inv[None, :]).astype(np.float32)
    np.fill_diagonal(sim, 0.0)
    return sim


def top_k_neighbours(sim: np.ndarray, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of each row of ``sim`` (item ``i``'s neighbours)."""
    n = sim.shape[0]
    k = min(k, n - 1)
    cols = np.argpartition(-sim, kth=k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(n), k)
    vals = np.take_along_axis(sim, cols, axis=1).ravel()
    return sp.csr_matrix((vals, (rows, cols.ravel())), shape=sim.shape)


def itemknn(
    history: sp.spmatrix,
    future: sp.spmatrix,
    split: np.ndarray,
    neighbours: Sequence[int] = KNN_NEIGHBOURS,
    ks: Sequence[int] = DEFAULT_KS,
    scores_out: dict | None = None,
) -> RankingResult:
    """Item-kNN: ``score(u, j) = Σ_{i ∈ hist(u)} sim_k(i, j)``, cosine similarity of the items'
    binarised history columns over every user, each item keeping its ``k`` most similar items;
    ``k`` chosen on the validation users' futures.

    Returns:
        ``(test ranking metrics, seconds)``.
    """
    return _item_item(lambda gram, h, f, val: fit_itemknn(gram, h, f, val, neighbours, ks), history, future, split,
                      ks, scores_out)


def fit_itemknn(gram: np.ndarray, history: sp.csr_matrix, future: sp.csr_matrix, val: np.ndarray,
                neighbours: Sequence[int] = KNN_NEIGHBOURS, ks: Sequence[int] = DEFAULT_KS) -> sp.csr_matrix:
    """Item-kNN's sparse ``[I, I]`` weights from a history gram (:func:`item_gram`), ``k`` chosen
    on the ``val`` rows of ``history``/``future``; a user's scores are ``binarised history @ weights``."""
    X = _binary(history)
    sim = cosine_item_similarity(X, gram)
    _, scorer = _choose_on_val(neighbours, lambda k: _dense_scorer(X, top_k_neighbours(sim, int(k))), history,
                               future, val, ks, "item-kNN k")
    return scorer.weights


# ---------------------------------------------------------------------------------------------
# classification baselines


def tfidf_features(history: sp.spmatrix, split: np.ndarray | None = None) -> sp.csr_matrix:
    """TF-IDF of the history item counts, ``[U, I]`` CSR (sklearn ``TfidfTransformer``, rows
    L2-normalised). With ``split`` the IDF is fitted on the train users only; feed the result
    to :func:`~foundv2.bench.probes.fit_label_probe`.
    """
    history = sp.csr_matrix(history, dtype=np.float64)
    fit_rows = history if split is None else history[split_indices(split)[0]]
    return tfidf_rows(history, fit_idf(fit_rows))


# ---------------------------------------------------------------------------------------------
# storage-matched representations

INT8_MAX = 127
UINT16_BYTES = 2


def quantise_int8(Z: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-dimension int8: ``scale_d = max_train |Z_d| / 127``, ``q = round(Z / scale)``
    clipped to ±127 (a val/test value beyond the train range saturates).

    Returns:
        ``(codes [U, d] int8, scales [d] float32)``; :func:`dequantise_int8` inverts it up to
        half a step (``scale / 2``) inside the train range.
    """
    Z = np.asarray(Z, np.float64)
    peak = np.abs(Z[train]).max(axis=0) if len(train) else np.zeros(Z.shape[1])
    scales = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    return quantise_with(Z, scales), scales


def quantise_with(Z: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes of ``Z`` at given per-dimension ``scales`` (values beyond ±127 steps saturate)."""
    return np.clip(np.rint(np.asarray(Z, np.float64) / scales), -INT8_MAX, INT8_MAX).astype(np.int8)


def dequantise_int8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values of int8 codes."""
    return codes.astype(np.float32) * scales


def tfidf_svd_int8(history: sp.spmatrix, split: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF of the history items (IDF from the train users) → truncated SVD to ``k`` dimensions
    fitted on the train users → :func:`quantise_int8` with scales from the train users.

    Validation and test users are only transformed, never fitted on. ``k`` is capped at
    ``min(items, train users) - 1`` (the SVD's limit); the returned codes' width is the real ``k``.

    Returns:
        ``(codes [U, k] int8, scales [k] float32)``: ``k`` bytes per user.
    """
    train = split_indices(split)[0]
    history = sp.csr_matrix(history, dtype=np.float64)
    factors = ItemFactors(history.shape[1], svd_width(k, history.shape[1], train.size))
    return quantise_int8(factors.fit_matrix(history[train], seed).project(history), train)


def svd_width(k: int, n_items: int, n_train: int) -> int:
    """``k`` capped at ``min(items, train users) - 1`` (a truncated SVD's limit)."""
    width = int(min(k, n_items - 1, n_train - 1))
    if width < 1:
        raise ValueError(f"tfidf_svd needs at least 2 items and 2 train users, got {n_items} and {n_train}")
    return width


def top_items(history: sp.spmatrix, n_bytes: int) -> sp.csr_matrix:
    """Each user's ``n_bytes // 2`` most frequent history items (uint16 ids, 2 bytes each; ties
    broken by the lower item id), as a ``[U, I]`` CSR bag of their counts.

    A user with fewer distinct items keeps them all; the stored record is still ``n_bytes // 2``
    ids wide (padded), so the size is exactly ``2 * (n_bytes // 2)`` bytes per user.
    """
    history = sp.csr_matrix(history, dtype=np.float32)
    history.sum_duplicates()
    if history.shape[1] > 2**16:
        raise ValueError(f"top_items stores uint16 ids; {history.shape[1]} items do not fit")
    n_ids = n_bytes // UINT16_BYTES
    rows, cols, vals = [], [], []
    for u in range(history.shape[0]):
        lo, hi = history.indptr[u], history.indptr[u + 1]
        items, counts = history.indices[lo:hi], history.data[lo:hi]
        keep = np.lexsort((items, -counts))[:n_ids]
        rows.append(np.full(keep.size, u))
        cols.append(items[keep])
        vals.append(counts[keep])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return sp.csr_matrix((cat(vals, np.float32), (cat(rows, np.int64), cat(cols, np.int64))), shape=history.shape)


def activity_reference(times: Sequence[np.ndarray]) -> float:
    """The reference date of :func:`activity_features`: the latest history event of these users
    (the train users'), 0 when none has any."""
    ends = [t.max() for t in times if len(t)]
    return float(max(ends)) if ends else 0.0


def activity_features(
    sources: Sequence[np.ndarray],
    times: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    n_sources: int,
    split: np.ndarray,
    reference: float | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Item-free per-user features from the history events alone
    (:func:`data_modules.activity.activity_features`, from per-user arrays).

    The reference date is the latest history event of the train users, so val/test users never
    set it (``reference``: that date given, e.g. from :func:`activity_reference` of the train
    users when these are other users; ``split`` is then unused).

    Returns:
        ``([U, d] float32, d feature names)``: ``4 d`` bytes per user.
    """
    ref = activity_reference([times[u] for u in split_indices(split)[0]]) if reference is None else float(reference)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in times])]).astype(np.int64)
    flat = lambda xs, dt: np.concatenate([np.asarray(x, dt) for x in xs]) if len(xs) else np.zeros(0, dt)  # noqa: E731
    X = A.activity_features(offsets, flat(sources, np.int64), flat(times, np.float64), flat(values, np.float64),
                            n_sources, ref)
    return X, A.activity_names(n_sources)


def majority(y: np.ndarray, split: np.ndarray, kind: TaskKind,
             scores_out: dict | None = None) -> tuple[dict[str, float], float]:
    """Constant predictor: the train users' class (or label) frequencies for every user.

    Its AUCs are 0.5 and its KS 0 by construction; multi-class accuracy is the test share of
    the most frequent train class.

    Args:
        scores_out: if given, ``scores_out['test']`` receives the test scores (as in
            :func:`~foundv2.bench.probes.fit_label_probe`).

    Returns:
        ``(metrics, seconds)`` with the keys of :func:`~foundv2.bench.probes.fit_label_probe`
        except ``'weight_decay'``: the test metrics plus ``'val_<metric>'``.
    """
    start = time.perf_counter()
    y = np.asarray(y)
    train, val, test = split_indices(split)
    if kind == "multiclass":
        prior = np.bincount(y[train], minlength=n_classes_of(y, kind)) / train.size
    else:
        prior = np.asarray(y[train].mean(axis=0), dtype=np.float64)

    def constant(rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(prior, (rows.size,) + prior.shape).copy()

    key = SELECTION_METRIC[kind]
    if scores_out is not None:
        scores_out["test"] = constant(test)
    metrics = score_predictions(kind, constant(test), y[test])
    metrics[f"val_{key}"] = score_predictions(kind, constant(val), y[val])[key]
    return metrics, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# SASRec


@dataclass
class SASRecConfig:
    """Hyper-parameters of the task-specific SASRec (defaults: CPU friendly, ML-1M scale)."""

    max_len: int = 50  # the last max_len history items are read (RecBole's default for ML-1M)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    epochs: int = 15  # ~20 s an epoch on ML-1M on a busy 2-core CPU; still improving at 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    patience: int = 3  # epochs without validation improvement before stopping
    seed: int = 0


class SASRecModel(nn.Module):
    """SASRec (Kang & McAuley 2018): causal self-attention over item ids, tied output embedding.

    Item ``i`` has embedding row ``i + 1``; row 0 is padding. Sequences are right-padded, so the
    causal mask alone keeps every real position from seeing padding.
    """

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.dim,
            cfg.n_heads,
            dim_feedforward=cfg.dim,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        # unit-scale inputs after the sqrt(dim) factor, and O(1) tied output logits at init
        nn.init.normal_(self.item_emb.weight, std=cfg.dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, dim]`` of right-padded item sequences ``[B, L]`` (ids + 1)."""
        length = seq.shape[1]
        pos = torch.arange(length, device=seq.device)
        h = self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=seq.device)
        h = self.encoder(self.dropout(h), mask=mask, is_causal=True)
        return self.norm(h)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every item (``[..., n_items]``) from hidden states ``[..., dim]``."""
        return hidden @ self.item_emb.weight[1:].T


_BUCKET_BATCHES = 20  # batches per length-sorted chunk: enough mixing, little padding


def _pad_right(seqs: list[np.ndarray], length: int) -> torch.Tensor:
    """Stack sequences of item ids (already shifted by +1) into ``[B, length]``, 0-padded."""
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.from_numpy(s)
    return out


def _length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled batches of similar lengths (less padding): shuffle, sort within chunks of
    ``_BUCKET_BATCHES`` batches, cut into batches, shuffle the batches."""
    order = rng.permutation(lengths.size)
    chunk = batch_size * _BUCKET_BATCHES
    batches: list[np.ndarray] = []
    for start in range(0, order.size, chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, part.size, batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def _sasrec_epoch(
    model: SASRecModel,
    opt: torch.optim.Optimizer,
    seqs: list[np.ndarray],
    cfg: SASRecConfig,
    rng: np.random.Generator,
) -> float:
    """One epoch of next-item cross-entropy over every position; returns the mean loss."""
    model.train()
    lengths = np.array([len(s) - 1 for s in seqs])  # inputs are s[:-1], targets s[1:]
    total, count = 0.0, 0
    for batch in _length_bucketed_batches(lengths, cfg.batch_size, rng):
        length = int(lengths[batch].max())
        inputs = _pad_right([seqs[i][:-1] for i in batch], length)
        targets = _pad_right([seqs[i][1:] for i in batch], length)
        valid = targets > 0
        hidden = model(inputs)[valid]  # only real positions reach the item softmax
        loss = nn.functional.cross_entropy(model.item_logits(hidden), targets[valid] - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total, count = total + loss.item() * int(valid.sum()), count + int(valid.sum())
    return total / max(count, 1)


def _sasrec_scorer(model: SASRecModel, seqs: list[np.ndarray]) -> Callable[[np.ndarray], torch.Tensor]:
    """Scorer ``users → item scores`` from the hidden state after each user's last history item."""

    @torch.no_grad()
    def score(users: np.ndarray) -> torch.Tensor:
        model.eval()
        batch = [seqs[u] for u in users]
        lengths = torch.tensor([max(len(s), 1) for s in batch])
        inputs = _pad_right(batch, int(lengths.max()))
        hidden = model(inputs)[torch.arange(len(batch)), lengths - 1]
        return model.item_logits(hidden)

    return score


def _history_from_sequences(sequences: Sequence[Sequence[int]], n_items: int) -> sp.csr_matrix:
    """``[U, I]`` 0/1 matrix of the items in each user's sequence."""
    rows = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    cols = np.fromiter((i for s in sequences for i in s), dtype=np.int64, count=rows.size)
    return sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(len(sequences), n_items))


def sasrec(
    sequences: Sequence[Sequence[int]],
    future: sp.spmatrix,
    split: np.ndarray,
    config: SASRecConfig | None = None,
    history: sp.spmatrix | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    scores_out: dict | None = None,
) -> RankingResult:
    """Task-specific SASRec: trained on the train users' history sequences (next item at every
    position, full softmax cross-entropy over the items), early-stopped on the validation users'
    ``ndcg@max(ks)``; each test user is scored from the last ``max_len`` items of their history,
    ranking every item not in the history against their future items.

    Args:
        sequences: per user, the history item ids in time order (``U`` lists of ints).
        future: ``[U, I]`` binary future items (``I`` = number of items).
        split: ``[U]`` 0 train, 1 val, 2 test.
        config: hyper-parameters (:class:`SASRecConfig`).
        history: ``[U, I]`` items excluded from the ranking; by default those of ``sequences``.
        ks: ranking cut-offs.

    Returns:
        ``(test ranking metrics, seconds)``.
    """
    start = time.perf_counter()
    cfg = config or SASRecConfig()
    model = fit_sasrec(sequences, future, split, cfg, history, ks)
    future = sp.csr_matrix(future)
    history = _history_from_sequences(sequences, future.shape[1]) if history is None else sp.csr_matrix(history)
    metrics = evaluate_ranking(sasrec_scorer(model, sequences, cfg.max_len), split_indices(split)[2], history, future,
                               ks, per_user_out=_per_user(scores_out))
    return metrics, time.perf_counter() - start


def sasrec_scorer(model: SASRecModel, sequences: Sequence[Sequence[int]],
                  max_len: int) -> Callable[[np.ndarray], torch.Tensor]:
    """Scorer ``positions → [B, I]`` item scores of the users at these positions of ``sequences``,
    from the hidden state after each one's last history item (its last ``max_len`` items read)."""
    return _sasrec_scorer(model, [np.asarray(s[-max_len:], dtype=np.int64) + 1 for s in sequences])


def fit_sasrec(
    sequences: Sequence[Sequence[int]],
    future: sp.spmatrix,
    split: np.ndarray,
    config: SASRecConfig | None = None,
    history: sp.spmatrix | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> SASRecModel:
    """Train :func:`sasrec`'s model on the train users of ``split`` (early-stopped on its
    validation users) and return it at its best validation epoch, in eval mode."""
    cfg = config or SASRecConfig()
    future = sp.csr_matrix(future)
    n_items = future.shape[1]
    history = _history_from_sequences(sequences, n_items) if history is None else sp.csr_matrix(history)
    train, val, _ = split_indices(split)
    # a train sequence of n items gives n - 1 (input, next item) pairs; max_len inputs at most
    train_seqs = [
        np.asarray(sequences[u][-(cfg.max_len + 1) :], dtype=np.int64) + 1
        for u in train
        if len(sequences[u]) >= 2
    ]

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = SASRecModel(n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    key = _select_key(ks)
    val_scorer = sasrec_scorer(model, sequences, cfg.max_len)
    best_val, best_state, bad_epochs = -np.inf, copy.deepcopy(model.state_dict()), 0
    for epoch in range(cfg.epochs):
        loss = _sasrec_epoch(model, opt, train_seqs, cfg, rng)
        val_score = evaluate_ranking(val_scorer, val, history, future, ks)[key]
        logger.info("SASRec epoch %d: loss %.4f, val %s=%.4f", epoch, loss, key, val_score)
        if val_score > best_val:
            best_val, best_state, bad_epochs = val_score, copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return model.eval()
