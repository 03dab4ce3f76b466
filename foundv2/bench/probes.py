"""Linear probes of frozen user representations (benchmark protocol ``foundv2-bench-v1``).

- :func:`fit_logistic_probe`: logistic regression per task; C chosen on the validation users,
  metrics reported on the test users only.
- :func:`fit_next_item_probe`: a linear softmax layer from the representation to the items,
  trained on the train users' future items; weight decay and early stopping chosen on the
  validation users; Recall@K / NDCG@K on the test users with their history items excluded.

Splits are integer arrays over users: ``0`` train, ``1`` validation, ``2`` test.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from data_modules.arrays import ArrayRepresentations
from foundv2.metrics.bootstrap import resampled_differences, weighted_metric
from foundv2.metrics.classification import (
    binary_auc,
    ks_statistic,
    multiclass_metrics,
    multilabel_macro_auc,
)
from foundv2.metrics.ranking import evaluate_ranking
from foundv2.stages.probe import NEXT_ITEMS, SELECTION_METRIC, STD_EPS, ProbeStage, fit_probe

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


class Standardiser:
    """Centre and scale dense features with the mean and std of some (train) rows; sparse
    features pass unchanged (centring would densify them; TF-IDF rows are already L2-normalised)."""

    def __init__(self, X: Features, rows: np.ndarray):
        self.mean = self.scale = None
        if not sp.issparse(X):
            Xr = np.asarray(X, dtype=np.float64)[rows]
            std = Xr.std(axis=0)
            self.mean, self.scale = Xr.mean(axis=0), np.where(std > STD_EPS, std, 1.0)

    def __call__(self, X: Features) -> Features:
        if self.mean is None or sp.issparse(X):
            return X
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale).astype(np.float32)


def standardise(X: Features, train: np.ndarray) -> Features:
    """``X`` centred and scaled with the mean and std of its ``train`` rows (:class:`Standardiser`)."""
    return Standardiser(X, train)(X)


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
# logistic probes


class _ConstantModel:
    """Predicts fixed scores; stands in for a label that is constant among the train users."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores

    def predict(self, X: Features) -> np.ndarray:
        """The fixed scores, one row per sample."""
        return np.broadcast_to(self.scores, (X.shape[0],) + self.scores.shape).copy()


class _LogisticModel:
    """A fitted ``LogisticRegression`` whose scores follow the task's column convention."""

    def __init__(self, clf: LogisticRegression, kind: TaskKind, n_classes: int) -> None:
        self.clf, self.kind, self.n_classes = clf, kind, n_classes

    def predict(self, X: Features) -> np.ndarray:
        """Binary / per-label: P(y=1) ``[N]``; multi-class: ``[N, C]`` (absent classes get 0)."""
        proba = self.clf.predict_proba(X)
        if self.kind != "multiclass":
            return proba[:, 1]
        full = np.zeros((X.shape[0], self.n_classes))
        full[:, self.clf.classes_.astype(int)] = proba
        return full


def _fit_one(
    X: Features, y: np.ndarray, kind: TaskKind, C: float, n_classes: int, max_iter: int, seed: int,
    start: _LogisticModel | _ConstantModel | None = None,
) -> _LogisticModel | _ConstantModel:
    """Fit one logistic regression on (X, y); a constant model when y has a single class.
    ``start``: the same problem's fit at a smaller C, whose solution LBFGS starts from (the
    same optimum, to the solver's tolerance, in far fewer iterations at large C)."""
    classes = np.unique(y)
    if classes.size < 2:
        if kind == "multiclass":
            return _ConstantModel(np.eye(n_classes)[int(classes[0])])
        return _ConstantModel(np.asarray(float(classes[0])))
    warm = isinstance(start, _LogisticModel)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed, warm_start=warm)
    if warm:
        clf.coef_, clf.intercept_ = start.clf.coef_.copy(), start.clf.intercept_.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(X, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("logistic probe (C=%g) did not converge in %d iterations", C, max_iter)
    return _LogisticModel(clf, kind, n_classes)


class _Probe:
    """One fitted probe: a model per label (multi-label) or a single model."""

    def __init__(self, models: list[_LogisticModel | _ConstantModel], kind: TaskKind) -> None:
        self.models, self.kind = models, kind

    def predict(self, X: Features) -> np.ndarray:
        """Scores in the layout :func:`score_predictions` expects."""
        if self.kind == "multilabel":
            return np.stack([m.predict(X) for m in self.models], axis=1)
        return self.models[0].predict(X)


def _fit_probe(
    X: Features, y: np.ndarray, kind: TaskKind, C: float, n_classes: int, max_iter: int, seed: int,
    start: _Probe | None = None,
) -> _Probe:
    """Fit the probe of one C on the given (train) rows, warm-started from ``start`` (the
    probe of the previous, smaller C) when given."""
    if kind == "multilabel":
        models = [_fit_one(X, y[:, c], kind, C, n_classes, max_iter, seed, start.models[c] if start else None)
                  for c in range(y.shape[1])]
    else:
        models = [_fit_one(X, y, kind, C, n_classes, max_iter, seed, start.models[0] if start else None)]
    return _Probe(models, kind)


class LogisticProbe:
    """A fitted logistic probe: the train users' standardisation, the model of the C chosen on
    validation, that C and its validation metric (:func:`fit_logistic`)."""

    def __init__(self, standardiser: Standardiser, probe: _Probe, C: float, val_metric: float, key: str):
        self.standardiser, self.probe, self.C, self.val_metric, self.key = standardiser, probe, C, val_metric, key

    def predict(self, X: Features) -> np.ndarray:
        """Scores of any users' features (:func:`score_predictions` layout)."""
        return self.probe.predict(self.standardiser(X))

    def info(self) -> dict[str, float]:
        """``{'C', 'val_<metric>'}``."""
        return {"C": self.C, f"val_{self.key}": float(self.val_metric)}


def fit_logistic(
    X: Features,
    y: np.ndarray,
    split: np.ndarray,
    kind: TaskKind,
    Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    max_iter: int = 1000,
    seed: int = 0,
    warm_start: bool = True,
) -> LogisticProbe:
    """The logistic probe of :func:`fit_logistic_probe`, fitted on the train rows of ``split`` and
    chosen on its validation rows; its test users are scored later, any number at a time
    (:meth:`LogisticProbe.predict`)."""
    _check_kind(kind)
    y = np.asarray(y)
    if kind == "multilabel" and y.ndim != 2:
        raise ValueError(f"multi-label y must be [U, C], got shape {y.shape}")
    train, val, _ = split_indices(split)
    standardiser = Standardiser(X, train)
    X = standardiser(X)
    n_classes = n_classes_of(y, kind)
    key = SELECTION_METRIC[kind]

    best_C, best_val, best_probe, probe = float(Cs[0]), -np.inf, None, None
    for C in sorted(Cs):  # ascending: each fit starts from the previous C's solution
        probe = _fit_probe(X[train], y[train], kind, C, n_classes, max_iter, seed, start=probe if warm_start else None)
        val_metric = score_predictions(kind, probe.predict(X[val]), y[val])[key]
        logger.info("logistic probe C=%g: val %s=%.4f", C, key, val_metric)
        if best_probe is None or val_metric > best_val:
            best_C, best_val, best_probe = float(C), val_metric, probe
    return LogisticProbe(standardiser, best_probe, best_C, best_val, key)


def fit_logistic_probe(
    X: Features,
    y: np.ndarray,
    split: np.ndarray,
    kind: TaskKind,
    Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    max_iter: int = 1000,
    seed: int = 0,
    scores_out: dict | None = None,
    warm_start: bool = True,
) -> dict[str, float]:
    """Logistic-regression probe; C chosen on the validation users, metrics on the test users.

    Dense ``X`` is standardised with the train users' statistics; sparse ``X`` (e.g. TF-IDF) is
    used as is. For every C a model is fitted on the train users and scored on the validation
    users (C ascending, each LBFGS run warm-started from the previous C's solution); the C with
    the best validation metric (AUC for binary, macro AUC otherwise; the smallest C on ties) is kept and only that model ever sees the test users. Multi-label tasks
    fit one binary model per label (one-vs-rest); a label constant among the train users gets a
    constant prediction.

    Args:
        X: ``[U, d]`` representations, dense float or scipy sparse.
        y: binary / multi-class ``[U]`` ints; multi-label ``[U, C]`` 0/1.
        split: ``[U]`` 0 train, 1 val, 2 test.
        kind: ``'binary'``, ``'multiclass'`` or ``'multilabel'``.
        Cs: inverse regularisation strengths to try.
        max_iter: LBFGS iterations per fit.
        seed: random state of the solver.
        warm_start: start each C's LBFGS from the previous C's solution (False: from zero;
            ``research/probe_solver.py`` times both).
        scores_out: if given, ``scores_out['test']`` receives the chosen probe's test scores (in
            :func:`score_predictions` layout, test users in row order), e.g. for
            :func:`paired_bootstrap`.

    Returns:
        Test metrics — binary ``{'auc', 'ks'}``, multi-class ``{'accuracy', 'macro_auc'}``,
        multi-label ``{'macro_auc'}`` — plus ``'C'`` (the chosen C) and ``'val_<metric>'`` (its
        validation value, e.g. ``'val_auc'``).
    """
    probe = fit_logistic(X, y, split, kind, Cs, max_iter, seed, warm_start)
    test = split_indices(split)[2]
    test_scores = probe.predict(X[test])
    if scores_out is not None:
        scores_out["test"] = test_scores
    metrics = score_predictions(kind, test_scores, np.asarray(y)[test])
    return {**metrics, **probe.info()}


# ---------------------------------------------------------------------------------------------
# next-item probe


def _users_with_targets(users: np.ndarray, history: sp.csr_matrix, future: sp.csr_matrix) -> np.ndarray:
    """The users that have at least one future item outside their history."""
    fut = (future[users] != 0).astype(np.int64)
    n_new = np.asarray(fut.sum(axis=1) - fut.multiply(history[users] != 0).sum(axis=1)).ravel()
    return users[n_new > 0]


def fit_next_item_probe(
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
    scores_out: dict | None = None,
) -> dict[str, float]:
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
        weight_decays: L2 strengths tried (chosen on validation).
        lr: Adam learning rate.
        epochs: maximum epochs.
        batch_size: users per step.
        patience: epochs without validation improvement before stopping.
        ks: ranking cut-offs.
        seed: seed of the shuffling.
        scores_out: if given, ``scores_out['test']`` receives the test users' per-user metrics
            (``{'recall@K', 'ndcg@K'}`` → ``[n]`` arrays), for :func:`paired_bootstrap`.

    Returns:
        ``{'recall@K', 'ndcg@K'}`` on the test users for each K in ``ks``, plus
        ``'weight_decay'`` (the chosen one) and ``'val_ndcg@<max K>'`` (its validation value).
    """
    history, future = sp.csr_matrix(history), sp.csr_matrix(future)
    split = np.asarray(split, np.int64)
    stage = fit_next_item(X, history, future, split, weight_decays, lr, epochs, batch_size, patience, ks, seed)
    with torch.no_grad():
        metrics = evaluate_ranking(lambda rows: next_item_scores(stage, X[rows]), split_indices(split)[2],
                                   history, future, ks, per_user_out=None if scores_out is None
                                   else scores_out.setdefault("test", {}))
    return {**metrics, **next_item_info(stage)}


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
    (:func:`next_item_scores`)."""
    history, future = sp.csr_matrix(history), sp.csr_matrix(future)
    split = np.asarray(split, np.int64)
    train = split_indices(split)[0]
    fit_split = split.copy()
    fit_split[np.setdiff1d(train, _users_with_targets(train, history, future))] = -1  # nothing to learn from
    fit_split[fit_split == TEST] = -1  # a fit never reads a test user
    data = ArrayRepresentations(X, fit_split, history, future, batch_size=batch_size, seed=seed)
    stage = ProbeStage(task=NEXT_ITEMS, weight_decays=tuple(weight_decays), lr=lr, patience=patience, ks=tuple(ks))
    dims = {"input_dim": X.shape[1], "task": NEXT_ITEMS, "kind": NEXT_ITEMS, "outputs": history.shape[1]}
    fit_probe(stage, data, max_epochs=epochs, dims=dims)
    logger.info("next-item probe: chose weight decay %g (epoch %d, val %s=%.4f)", stage.best_weight_decay,
                int(stage.best_epoch), stage.select_key, float(stage.best_score))
    return stage


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


def next_item_info(stage: ProbeStage) -> dict[str, float]:
    """``{'weight_decay', 'val_ndcg@K'}`` of a fitted next-item probe."""
    return {"weight_decay": float(stage.best_weight_decay), f"val_{stage.select_key}": float(stage.best_score)}
