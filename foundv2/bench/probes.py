"""Linear probes of frozen user representations (benchmark protocol ``foundv2-bench-v1``).

- :func:`fit_label_probe`: a linear head per label task (logistic, softmax or a sigmoid per
  label); weight decay and early stopping chosen on the validation users, metrics reported on the
  test users only.
- :func:`fit_next_item_probe`: a linear softmax layer from the representation to the items,
  trained on the train users' future items; weight decay and early stopping chosen on the
  validation users; Recall@K / NDCG@K on the test users with their history items excluded.

Splits are integer arrays over users: ``0`` train, ``1`` validation, ``2`` test.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from data_modules.arrays import ArrayRepresentations
from foundv2.metrics.bootstrap import resampled_differences, weighted_metric
from foundv2.metrics.classification import (
    binary_auc,
    ks_statistic,
    multiclass_metrics,
    multilabel_macro_auc,
)
from foundv2.metrics.ranking import evaluate_ranking
from foundv2.stages.probe import NEXT_ITEMS, SELECTION_METRIC, ProbeStage, fit_probe, probabilities

logger = logging.getLogger(__name__)

TRAIN, VAL, TEST = 0, 1, 2
TaskKind = Literal["binary", "multiclass", "multilabel"]
Features = np.ndarray | sp.spmatrix | sp.sparray


# ---------------------------------------------------------------------------------------------
# shared helpers


def split_indices(split: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train, validation and test users of a ``split`` array."""
    split = np.asarray(split)
    return tuple(np.flatnonzero(split == part) for part in (TRAIN, VAL, TEST))  # type: ignore[return-value]


def _check_kind(kind: str) -> None:
    """Raise on an unknown task kind."""
    if kind not in SELECTION_METRIC:
        raise ValueError(f"kind must be one of {sorted(SELECTION_METRIC)}, got {kind!r}")


def n_classes_of(y: np.ndarray, kind: TaskKind) -> int:
    """Number of classes (multi-class) or labels (multi-label); 2 for binary."""
    if kind == "multiclass":
        return int(np.max(y)) + 1
    if kind == "multilabel":
        return int(np.asarray(y).shape[1])
    return 2


def score_predictions(kind: TaskKind, scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of one evaluation set.

    Args:
        kind: task kind.
        scores: binary ``[N]`` P(y=1); multi-class ``[N, C]`` class probabilities;
            multi-label ``[N, C]`` per-label P(y=1).
        y: ground truth (``[N]`` ints, or ``[N, C]`` 0/1 for multi-label).

    Returns:
        binary ``{'auc', 'ks'}``; multi-class ``{'accuracy', 'macro_auc'}``; multi-label
        ``{'macro_auc'}``.
    """
    if kind == "binary":
        return {"auc": binary_auc(scores, y), "ks": ks_statistic(scores, y)}
    if kind == "multiclass":
        return multiclass_metrics(scores, y)
    return {"macro_auc": multilabel_macro_auc(scores, y)}


def paired_bootstrap(
    kind: TaskKind | Literal["ranking"], scores_a: np.ndarray, scores_b: np.ndarray, y: np.ndarray | None = None,
    metric: str | None = None, n_boot: int = 1000, seed: int = 0,
) -> dict[str, float]:
    """Difference ``metric(a) - metric(b)`` on the same evaluation users, with a 95 % interval
    from a paired bootstrap (users resampled with replacement, both score sets on the same
    resample).

    On a test split of a few hundred users a probe's AUC moves by a few points with the sample;
    a difference whose interval excludes 0 is one the data supports. A resample in which a
    metric is undefined (e.g. one class only) is skipped. The resamples are computed a block at a
    time from weighted cumulative sums (:mod:`foundv2.metrics.bootstrap`): seconds for 100,000
    users, and up to 20,000 users the very differences of resampling one user list at a time.

    Args:
        kind: the task kind; ``'ranking'`` takes per-user metric values (e.g. each test user's
            NDCG@10 from ``evaluate_ranking(per_user_out=...)``) as the scores, ``y`` unused, and
            the metric is their mean.
        scores_a, scores_b: the two representations' test scores, same users in the same order.
        y: the test labels (classification).
        metric: a key of :func:`score_predictions` (default: the kind's selection metric).

    Returns:
        ``{'delta', 'lo', 'hi', 'p_le_0', 'n'}``: the difference on the full set, the 2.5 % and
        97.5 % quantiles over resamples, the fraction of resamples with a difference ≤ 0, and the
        number of users.
    """
    n = len(scores_a)
    if len(scores_b) != n:
        raise ValueError(f"paired scores must cover the same users: {n} vs {len(scores_b)}")
    metric = "mean" if kind == "ranking" else metric or SELECTION_METRIC[kind]
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    y = None if y is None else np.asarray(y)
    one = np.ones((1, n))  # unit weights: the metric itself
    delta = float(weighted_metric(kind, metric, a, y)(one)[0] - weighted_metric(kind, metric, b, y)(one)[0]) if n \
        else float("nan")
    diffs = resampled_differences(kind, metric, a, b, y, n_boot, seed)
    diffs = diffs if diffs.size else np.asarray([np.nan])
    return {"delta": float(delta), "lo": float(np.quantile(diffs, 0.025)), "hi": float(np.quantile(diffs, 0.975)),
            "p_le_0": float(np.mean(diffs <= 0)), "n": int(n)}


# ---------------------------------------------------------------------------------------------
# the probes: ProbeStage fitted in-process on arrays

#: the label probes' settings (chosen by ``research/probe_choice.py``: the figures of an LBFGS
#: logistic regression with C chosen on validation, in a fraction of its time)
LABEL_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
LABEL_LR = 3e-3
LABEL_PATIENCE = 5
LABEL = "label"  # the task name under which the arrays hand the label to the stage
LABEL_SELECTION = "loss"  # the validation log-loss picks a label probe's head and epoch
LABEL_MIN_STEPS = 50  # label probes: optimiser steps an epoch (a validation after each) at least, any train set size


def _fit_stage(X: Features, split: np.ndarray, task: str, kind: str, outputs: int, data: dict,
               weight_decays: Sequence[float], lr: float, epochs: int, batch_size: int, patience: int,
               ks: Sequence[int], seed: int, min_steps: int = 1, selection: str = "metric") -> ProbeStage:
    """A :class:`~foundv2.stages.probe.ProbeStage` fitted on the train rows of ``split`` and chosen
    on its validation rows (a fit never reads a test row); ``data``: the arrays' targets.

    ``min_steps``: optimiser steps between two validations at least. A pass over a small train set
    is a step or two; an epoch of ``ceil(min_steps / steps per pass)`` passes (each in its own
    order) gives a fit the same step budget whatever the number of train users, so a small set
    is not stopped before its heads have moved."""
    fit_split = np.where(np.asarray(split, np.int64) == TEST, -1, np.asarray(split, np.int64))
    n_train = int((fit_split == TRAIN).sum())
    passes = max(1, math.ceil(min_steps / max(1, math.ceil(n_train / batch_size))))
    arrays = ArrayRepresentations(X, fit_split, batch_size=batch_size, seed=seed, passes=passes, **data)
    stage = ProbeStage(task=task, weight_decays=tuple(weight_decays), lr=lr, patience=patience, ks=tuple(ks),
                       selection=selection)
    fit_probe(stage, arrays, max_epochs=epochs,
              dims={"input_dim": X.shape[1], "task": task, "kind": kind, "outputs": outputs})
    logger.info("%s probe: chose weight decay %g (epoch %d, val %s=%.4f)", kind, stage.best_weight_decay,
                int(stage.best_epoch), stage.select_key, float(stage.best_score))
    return stage


def probe_info(stage: ProbeStage) -> dict[str, float]:
    """``{'weight_decay', 'val_<selection metric>'}`` of a fitted probe."""
    return {"weight_decay": float(stage.best_weight_decay), f"val_{stage.select_key}": float(stage.best_score)}


def fit_label(
    X: Features,
    y: np.ndarray,
    split: np.ndarray,
    kind: TaskKind,
    weight_decays: Sequence[float] = LABEL_WEIGHT_DECAYS,
    lr: float = LABEL_LR,
    epochs: int = 100,
    batch_size: int = 256,
    patience: int = LABEL_PATIENCE,
    seed: int = 0,
    min_steps: int = LABEL_MIN_STEPS,
    selection: str = LABEL_SELECTION,
) -> ProbeStage:
    """The label probe of :func:`fit_label_probe`, fitted on the train rows of ``split`` and chosen
    on its validation rows; its test users are scored later, any number at a time
    (:func:`label_scores`).

    Args:
        weight_decays: L2 strengths tried, a head each (``wd ≈ 1/(C·n_train)`` of a logistic
            regression's C).
        lr: Adam learning rate.
        epochs: at most this many epochs, a validation after each.
        batch_size: users per step.
        patience: validations without a better one before stopping.
        seed: seed of the shuffling.
        min_steps: optimiser steps an epoch at least (a small train set's epoch goes over it
            several times, each pass in its own order).
        selection: ``loss`` (the validation log-loss) or ``metric`` (AUC, macro AUC) picks the
            head and the epoch.

    The defaults were chosen with ``research/probe_choice.py``: on MovieLens-1M level with an
    LBFGS logistic regression whose C is chosen on validation, in a fraction of its time on
    wide inputs, and converged on train sets of a few hundred users.
    """
    _check_kind(kind)
    y = np.asarray(y)
    if kind == "multilabel" and y.ndim != 2:
        raise ValueError(f"multi-label y must be [U, C], got shape {y.shape}")
    outputs = 1 if kind == "binary" else n_classes_of(y, kind)
    return _fit_stage(X, split, LABEL, kind, outputs, {"labels": {LABEL: y}}, weight_decays, lr, epochs,
                      batch_size, patience, (), seed, min_steps, selection)


def label_scores(stage: ProbeStage, X: Features) -> np.ndarray:
    """Some users' scores from the head kept on validation, in :func:`score_predictions` layout:
    binary ``[N]`` P(y=1), multi-class ``[N, C]`` probabilities, multi-label ``[N, C]``."""
    with torch.no_grad():
        p = probabilities(stage.kind, stage.best_logits({"user_emb": features_tensor(X)}).double())
    return (p[:, 0] if stage.kind == "binary" else p).numpy()


def fit_label_probe(X: Features, y: np.ndarray, split: np.ndarray, kind: TaskKind, scores_out: dict | None = None,
                    **settings) -> dict[str, float]:
    """Linear probe of a label: weight decay and epoch chosen on the validation users, metrics on
    the test users only.

    The :class:`~foundv2.stages.probe.ProbeStage` of the label (:func:`fit_label`), fitted
    in-process on these arrays: one linear head per weight decay (binary: logistic; multi-class:
    softmax; multi-label: a sigmoid per label), trained side by side with Adam on the train users'
    batches, inputs standardised with the train users' statistics (sparse inputs as they are), the
    bias starting at the log prior. Every ``min_steps`` optimiser steps at least, each head is
    scored on the validation users; the (head, epoch) with the lowest validation log-loss is kept,
    training stops after ``patience`` validations without a better one, and only that head ever
    sees the test users.

    Args:
        X: ``[U, d]`` representations, dense float or scipy sparse.
        y: binary / multi-class ``[U]`` ints; multi-label ``[U, C]`` 0/1.
        split: ``[U]`` 0 train, 1 val, 2 test (any other code: in no set).
        kind: ``'binary'``, ``'multiclass'`` or ``'multilabel'``.
        scores_out: if given, ``scores_out['test']`` receives the test scores (in
            :func:`score_predictions` layout, test users in row order), for :func:`paired_bootstrap`.
        settings: :func:`fit_label`'s (weight decays, lr, epochs, batch size, patience, seed,
            min_steps, selection).

    Returns:
        Test metrics — binary ``{'auc', 'ks'}``, multi-class ``{'accuracy', 'macro_auc'}``,
        multi-label ``{'macro_auc'}`` — plus ``'weight_decay'`` (the chosen one) and
        ``'val_<selection>'`` (its validation value, e.g. ``'val_neg_log_loss'``).
    """
    stage = fit_label(X, y, split, kind, **settings)
    test = split_indices(split)[2]
    test_scores = label_scores(stage, X[test])
    if scores_out is not None:
        scores_out["test"] = test_scores
    return {**score_predictions(kind, test_scores, np.asarray(y)[test]), **probe_info(stage)}


# ---------------------------------------------------------------------------------------------
# next-item probe


def _users_with_targets(users: np.ndarray, history: sp.csr_matrix, future: sp.csr_matrix) -> np.ndarray:
    """The users that have at least one future item outside their history."""
    fut = (future[users] != 0).astype(np.int64)
    n_new = np.asarray(fut.sum(axis=1) - fut.multiply(history[users] != 0).sum(axis=1)).ravel()
    return users[n_new > 0]


def fit_next_item_probe(X: Features, history: sp.csr_matrix, future: sp.csr_matrix, split: np.ndarray,
                        scores_out: dict | None = None, **settings) -> dict[str, float]:
    """Linear softmax probe from the representation to the items (next-items task): the
    :class:`~foundv2.stages.probe.ProbeStage` (task ``next_items``) fitted in-process
    (:func:`~foundv2.stages.probe.fit_probe`) on these arrays.

    One ``Linear(d, I)`` head per weight decay, trained side by side with Adam on the train users
    that have a future item outside their history (multi-target softmax, history items removed
    from the softmax), starting as the popularity ranking (zero weights, log-frequency bias), on
    inputs standardised with the train users' statistics (sparse inputs as they are). After every
    epoch each head is scored on the validation users' ``ndcg@max(ks)``; the best (head, epoch)
    is kept and training stops after ``patience`` epochs without a better one. That head ranks
    every item not in a test user's history.

    Args:
        X: ``[U, d]`` representations (dense float, or scipy sparse).
        history: ``[U, I]`` history interactions (the items excluded from the ranking).
        future: ``[U, I]`` binary future items (the targets / relevant items).
        split: ``[U]`` 0 train, 1 val, 2 test.
        scores_out: if given, ``scores_out['test']`` receives the test users' per-user metrics
            (``{'recall@K', 'ndcg@K'}`` → ``[n]`` arrays), for :func:`paired_bootstrap`.
        settings: :func:`fit_next_item`'s (weight decays, lr, epochs, batch size, patience, ks, seed).

    Returns:
        ``{'recall@K', 'ndcg@K'}`` on the test users for each K in ``ks``, plus
        ``'weight_decay'`` (the chosen one) and ``'val_ndcg@<max K>'`` (its validation value).
    """
    history, future = sp.csr_matrix(history), sp.csr_matrix(future)
    split = np.asarray(split, np.int64)
    stage = fit_next_item(X, history, future, split, **settings)
    ks = stage.ks
    with torch.no_grad():
        metrics = evaluate_ranking(lambda rows: next_item_scores(stage, X[rows]), split_indices(split)[2],
                                   history, future, ks, per_user_out=None if scores_out is None
                                   else scores_out.setdefault("test", {}))
    return {**metrics, **probe_info(stage)}


def fit_next_item(
    X: Features,
    history: sp.csr_matrix,
    future: sp.csr_matrix,
    split: np.ndarray,
    weight_decays: Sequence[float] = (0.0, 1e-4),
    lr: float = 1e-2,
    epochs: int = 100,
    batch_size: int = 64,
    patience: int = 3,
    ks: Sequence[int] = (10, 20),
    seed: int = 0,
) -> ProbeStage:
    """The next-item probe of :func:`fit_next_item_probe`, fitted on the train rows of ``split``
    and chosen on its validation rows; its test users are scored later, any number at a time
    (:func:`next_item_scores`).

    Args:
        weight_decays: L2 strengths tried (chosen on validation).
        lr: Adam learning rate.
        epochs: maximum epochs.
        batch_size: users per step.
        patience: epochs without validation improvement before stopping.
        ks: ranking cut-offs.
        seed: seed of the shuffling.
    """
    history, future = sp.csr_matrix(history), sp.csr_matrix(future)
    split = np.asarray(split, np.int64)
    train = split_indices(split)[0]
    fit_split = split.copy()
    fit_split[np.setdiff1d(train, _users_with_targets(train, history, future))] = -1  # nothing to learn from
    return _fit_stage(X, fit_split, NEXT_ITEMS, NEXT_ITEMS, history.shape[1], {"history": history, "future": future},
                      weight_decays, lr, epochs, batch_size, patience, ks, seed)


def features_tensor(X: Features) -> torch.Tensor:
    """Some users' features as the probe's ``user_emb``: float32, or a coalesced sparse COO tensor
    (as :class:`~data_modules.arrays.ArrayRepresentations` hands them)."""
    if not sp.issparse(X):
        return torch.from_numpy(np.asarray(X, np.float32))
    coo = sp.coo_matrix(X, dtype=np.float32)
    index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(index, torch.from_numpy(coo.data), coo.shape, check_invariants=False).coalesce()


def next_item_scores(stage: ProbeStage, X: Features) -> torch.Tensor:
    """``[B, I]`` item scores of the head kept on validation for some users' features."""
    with torch.no_grad():
        return stage.best_logits({"user_emb": features_tensor(X)})
