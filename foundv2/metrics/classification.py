"""Classification metrics of the probes: binary AUC and KS, multi-class accuracy and macro AUC,
multi-label macro AUC, and a DDP-safe :class:`KSStatistic` with histogram (sum) states.

AUROC and accuracy come from ``torchmetrics.functional``; KS is computed with numpy (one-shot)
or from per-class score histograms (the Metric). Inputs may be numpy arrays or torch tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Return ``x`` as a numpy array (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _has_both_classes(labels: np.ndarray) -> bool:
    """True when a 0/1 label vector holds at least one positive and one negative."""
    n_pos = int(labels.sum())
    return 0 < n_pos < labels.size


def ks_statistic(scores: ArrayLike, labels: ArrayLike) -> float:
    """Kolmogorov–Smirnov statistic of a binary scorer: ``max_t |TPR(t) - FPR(t)|``.

    Thresholds are taken at every distinct score (predicted positive when ``score >= t``), so
    tied scores move together, exactly as an ROC curve does.

    Args:
        scores: ``[N]`` real scores, higher means more likely positive.
        labels: ``[N]`` 0/1 (or bool) ground truth.

    Returns:
        KS in ``[0, 1]``.

    Raises:
        ValueError: when ``labels`` hold a single class (KS is undefined).
    """
    s = _to_numpy(scores).astype(np.float64).ravel()
    y = _to_numpy(labels).astype(bool).ravel()
    if not _has_both_classes(y):
        raise ValueError("KS needs both classes among the labels")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tpr = np.cumsum(y) / y.sum()
    fpr = np.cumsum(~y) / (~y).sum()
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # evaluate only after a whole run of ties
    return float(np.max(np.abs(tpr[last_of_tie] - fpr[last_of_tie])))


def binary_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of a binary scorer (torchmetrics ``binary_auroc``).

    Scores are replaced by their normalised ranks first (ties kept): AUC depends on the order
    only, and torchmetrics would otherwise squash scores outside ``[0, 1]`` with a sigmoid,
    which turns large logits into ties.

    Raises:
        ValueError: when ``labels`` hold a single class.
    """
    s = _to_numpy(scores).astype(np.float64).ravel()
    y = _to_numpy(labels).astype(np.int64).ravel()
    if not _has_both_classes(y):
        raise ValueError("AUC needs both classes among the labels")
    ranks = rankdata(s, method="average") / s.size  # in (0, 1], order and ties preserved
    return float(binary_auroc(torch.from_numpy(ranks), torch.from_numpy(y)))


def one_vs_rest_aucs(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, list[int]]:
    """Per-column AUC of ``scores [N, C]`` against 0/1 ``labels [N, C]``.

    Returns:
        ``(aucs, skipped)``: ``aucs[c]`` is NaN for every column ``c`` listed in ``skipped``,
        the columns whose labels hold a single class in this evaluation set.
    """
    s = _to_numpy(scores)
    y = _to_numpy(labels)
    aucs = np.full(s.shape[1], np.nan)
    skipped: list[int] = []
    for c in range(s.shape[1]):
        if _has_both_classes(y[:, c].astype(bool)):
            aucs[c] = binary_auc(s[:, c], y[:, c])
        else:
            skipped.append(c)
    return aucs, skipped


def _macro_auc(scores: ArrayLike, labels: ArrayLike, what: str) -> float:
    """Mean of the one-vs-rest AUCs over the columns that hold both classes; logs the skipped."""
    aucs, skipped = one_vs_rest_aucs(scores, labels)
    if skipped:
        logger.warning(
            "macro AUC: %d of %d %s skipped (a single class in the evaluation set): %s",
            len(skipped),
            aucs.size,
            what,
            skipped,
        )
    if len(skipped) == aucs.size:
        return float("nan")
    return float(np.nanmean(aucs))


def multiclass_metrics(probs: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Accuracy and macro one-vs-rest AUC of a multi-class scorer.

    Args:
        probs: ``[N, C]`` class scores (probabilities or logits); column ``c`` is class ``c``.
        labels: ``[N]`` integer classes in ``0..C-1``.

    Returns:
        ``{'accuracy', 'macro_auc'}``. Accuracy is micro (share of correct argmax). The macro
        AUC averages the one-vs-rest AUCs of the classes present (and not alone) in ``labels``;
        the others are skipped and logged.
    """
    p = torch.as_tensor(_to_numpy(probs), dtype=torch.float64)
    y = torch.as_tensor(_to_numpy(labels), dtype=torch.int64)
    n_classes = p.shape[1]
    accuracy = multiclass_accuracy(p, y, num_classes=n_classes, average="micro")
    one_hot = torch.nn.functional.one_hot(y, n_classes).numpy()
    return {"accuracy": float(accuracy), "macro_auc": _macro_auc(p.numpy(), one_hot, "classes")}


def multilabel_macro_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Macro AUC over labels of a multi-label scorer (``scores``, ``labels``: ``[N, C]``).

    Labels with a single class in this evaluation set are skipped and the skip is logged as a
    warning; NaN when every label is skipped.
    """
    return _macro_auc(scores, labels, "labels")


class KSStatistic(Metric):
    """DDP-safe KS statistic from per-class score histograms (sum states, no scores kept).

    Scores are binned into ``n_bins`` equal bins over ``score_range`` (values outside are
    clamped into the edge bins); KS is then ``max_b |TPR_b - FPR_b|`` over the bin edges. It
    equals :func:`ks_statistic` of the binned scores, and differs from the exact value by at
    most the share of one class's scores that falls inside a single bin.

    Args:
        n_bins: number of histogram bins (the resolution of the thresholds).
        score_range: ``(low, high)`` of the scores; ``(0, 1)`` for probabilities.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pos_hist: torch.Tensor
    neg_hist: torch.Tensor

    def __init__(self, n_bins: int = 1000, score_range: tuple[float, float] = (0.0, 1.0), **kwargs) -> None:
        super().__init__(**kwargs)
        low, high = score_range
        if not high > low:
            raise ValueError(f"score_range must be increasing, got {score_range}")
        self.n_bins = n_bins
        self.low, self.high = float(low), float(high)
        self.add_state("pos_hist", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("neg_hist", torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def _bin(self, scores: torch.Tensor) -> torch.Tensor:
        """Bin index of each score."""
        scaled = (scores.double() - self.low) / (self.high - self.low) * self.n_bins
        return scaled.floor().long().clamp(0, self.n_bins - 1)

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of ``[N]`` scores with their ``[N]`` 0/1 labels."""
        scores = torch.as_tensor(scores, device=self.pos_hist.device).reshape(-1)
        labels = torch.as_tensor(labels, device=self.pos_hist.device).reshape(-1).bool()
        bins = self._bin(scores)
        self.pos_hist += torch.bincount(bins[labels], minlength=self.n_bins).double()
        self.neg_hist += torch.bincount(bins[~labels], minlength=self.n_bins).double()

    def compute(self) -> torch.Tensor:
        """KS over every bin edge; NaN while either class is empty."""
        n_pos, n_neg = self.pos_hist.sum(), self.neg_hist.sum()
        if n_pos == 0 or n_neg == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        # share of each class at or above each bin (threshold at the bin's lower edge)
        tpr = self.pos_hist.flip(0).cumsum(0) / n_pos
        fpr = self.neg_hist.flip(0).cumsum(0) / n_neg
        return (tpr - fpr).abs().max()


class MacroAUROC(Metric):
    """DDP-safe macro one-vs-rest AUC over the columns that hold both classes, as
    :func:`multiclass_metrics` and :func:`multilabel_macro_auc` compute it (torchmetrics' own
    macro average counts a column with one class as AUC 0).

    The per-column AUCs are torchmetrics' ``MulticlassAUROC`` / ``MultilabelAUROC``
    (``average=None``): exact (every score kept, gathered across ranks) or, with ``thresholds``,
    binned with constant memory; the positives per column are sum states.

    Args:
        num_classes: C, the columns.
        multiclass: targets are ``[N]`` classes and scores ``[N, C]`` class probabilities; else
            targets are ``[N, C]`` 0/1 and scores per-label probabilities.
        thresholds: None for the exact AUC, or a number of bins.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    positives: torch.Tensor
    total: torch.Tensor

    def __init__(self, num_classes: int, multiclass: bool, thresholds: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        from torchmetrics.classification import MulticlassAUROC, MultilabelAUROC

        self.num_classes, self.multiclass = num_classes, multiclass
        self.auroc = (MulticlassAUROC(num_classes, average=None, thresholds=thresholds) if multiclass
                      else MultilabelAUROC(num_classes, average=None, thresholds=thresholds))
        self.add_state("positives", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add ``[N, C]`` scores with their ``[N]`` classes (multiclass) or ``[N, C]`` 0/1 labels."""
        target = target.long()
        self.auroc.update(scores, target)
        one_hot = torch.nn.functional.one_hot(target, self.num_classes) if self.multiclass else target
        self.positives += one_hot.sum(0).double()
        self.total += float(target.shape[0])

    def compute(self) -> torch.Tensor:
        """The mean AUC of the columns with both classes; NaN when there is none."""
        aucs = self.auroc.compute().double()
        both = (self.positives > 0) & (self.positives < self.total)
        return aucs[both].mean() if both.any() else torch.tensor(float("nan"), dtype=torch.float64)

    def reset(self) -> None:
        super().reset()
        self.auroc.reset()
