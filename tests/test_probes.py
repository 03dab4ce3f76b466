"""Classification metrics, the KS Metric, the label / next-item probes and the majority baseline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

from foundv2.bench.baselines import majority, popularity
from foundv2.bench.probes import (
    fit_label,
    fit_label_probe,
    fit_next_item_probe,
    label_scores,
    paired_bootstrap,
)
from foundv2.metrics.classification import (
    KSStatistic,
    binary_auc,
    ks_statistic,
    multiclass_metrics,
    multilabel_macro_auc,
)

N_USERS, DIM, N_ITEMS = 300, 16, 50
WDS = (1e-4, 1e-2, 1.0)  # weight decays tried by the label probes here



# ----------------------------------------------------------------------------- metrics


def test_ks_hand_computed() -> None:
    # descending: 0.8(+) 0.4(-) 0.35(+) 0.1(-) → (TPR, FPR) = (.5, 0) (.5, .5) (1, .5) (1, 1)
    assert ks_statistic([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.5)
    # perfect separation, and tied scores move together (no threshold splits a tie)
    assert ks_statistic([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert ks_statistic([0.5, 0.5], [0, 1]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        ks_statistic([0.1, 0.2], [1, 1])


def test_binary_auc_matches_sklearn_and_survives_large_logits() -> None:
    assert binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y * 1.0 + rng.normal(size=200)
    assert binary_auc(s, y) == pytest.approx(roc_auc_score(y, s))
    # logits far outside [0, 1] must not collapse into ties (no sigmoid saturation)
    assert binary_auc(s * 1000.0, y) == pytest.approx(roc_auc_score(y, s))


def test_ks_metric_batches_equal_one_shot() -> None:
    n_bins = 50
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    bins = np.clip(rng.integers(0, n_bins, 300) + 10 * labels, 0, n_bins - 1)
    scores = (bins + 0.5) / n_bins  # bin centres: the histogram loses nothing
    whole = KSStatistic(n_bins=n_bins)
    whole.update(torch.from_numpy(scores), torch.from_numpy(labels))
    parts = KSStatistic(n_bins=n_bins)
    for idx in np.array_split(np.arange(300), 3):
        parts.update(torch.from_numpy(scores[idx]), torch.from_numpy(labels[idx]))
    assert torch.equal(whole.pos_hist, parts.pos_hist) and torch.equal(whole.neg_hist, parts.neg_hist)
    assert float(parts.compute()) == pytest.approx(float(whole.compute()))
    assert float(parts.compute()) == pytest.approx(ks_statistic(scores, labels))


def test_ks_metric_close_to_exact_on_continuous_scores() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 2000)
    scores = 1 / (1 + np.exp(-(labels + rng.normal(size=2000))))
    metric = KSStatistic(n_bins=1000)
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    assert float(metric.compute()) == pytest.approx(ks_statistic(scores, labels), abs=0.01)


def test_multiclass_metrics_hand_computed() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 1])
    out = multiclass_metrics(probs, labels)
    assert out["accuracy"] == pytest.approx(3 / 4)
    per_class = [roc_auc_score(labels == c, probs[:, c]) for c in range(3)]
    assert out["macro_auc"] == pytest.approx(np.mean(per_class))


def test_multilabel_macro_auc_skips_single_class_labels(caplog: pytest.LogCaptureFixture) -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.7, 0.3, 0.5], [0.1, 0.9, 0.5]])
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])  # label 2 is always 1
    with caplog.at_level(logging.WARNING, logger="foundv2.metrics.classification"):
        auc = multilabel_macro_auc(scores, labels)
    expected = np.mean([roc_auc_score(labels[:, c], scores[:, c]) for c in range(2)])
    assert auc == pytest.approx(expected)
    assert "1 of 3 labels skipped" in caplog.text


# ----------------------------------------------------------------------------- logistic probes


def _split(seed: int = 0) -> np.ndarray:
    """80/10/10 train/val/test split, independent of the data stream."""
    return np.random.default_rng([seed, 1]).choice(3, size=N_USERS, p=[0.8, 0.1, 0.1])


@pytest.fixture(scope="module")
def planted() -> dict[str, np.ndarray]:
    """Users in 4 clusters; labels are noisy functions of the cluster (and of the features)."""
    rng = np.random.default_rng(0)
    cluster = rng.integers(0, 4, N_USERS)
    centres = rng.normal(size=(4, DIM)) * 2.0
    X = (centres[cluster] + rng.normal(size=(N_USERS, DIM))).astype(np.float32)
    flip = rng.random(N_USERS) < 0.1  # 10% label noise
    binary = (cluster >= 2).astype(int) ^ flip
    multiclass = np.where(flip, rng.integers(0, 4, N_USERS), cluster)
    multilabel = np.stack([cluster == 0, cluster == 1, (cluster % 2) == 0], axis=1).astype(int)
    return {"X": X, "binary": binary, "multiclass": multiclass, "multilabel": multilabel, "split": _split()}


def test_binary_probe_recovers_label_and_majority_is_chance(planted) -> None:
    out = fit_label_probe(planted["X"], planted["binary"], planted["split"], "binary", weight_decays=WDS)
    assert set(out) == {"auc", "ks", "weight_decay", "val_neg_log_loss"}
    assert out["auc"] > 0.8 and out["ks"] > 0.5
    base, seconds = majority(planted["binary"], planted["split"], "binary")
    assert base["auc"] == pytest.approx(0.5) and base["ks"] == pytest.approx(0.0) and seconds >= 0
    assert set(base) == {"auc", "ks", "val_auc"}


def test_paired_bootstrap_separates_a_real_gap_from_noise(planted) -> None:
    """A probe on the informative features against one on pure noise: the interval of the
    difference excludes 0; a probe against itself: delta 0 and an interval around it."""
    good: dict = {}
    fit_label_probe(planted["X"], planted["binary"], planted["split"], "binary", weight_decays=WDS, scores_out=good)
    noise = np.random.default_rng(5).normal(size=planted["X"].shape).astype(np.float32)
    bad: dict = {}
    fit_label_probe(noise, planted["binary"], planted["split"], "binary", weight_decays=WDS, scores_out=bad)
    y = planted["binary"][planted["split"] == 2]
    assert good["test"].shape == y.shape
    gap = paired_bootstrap("binary", good["test"], bad["test"], y, n_boot=200)
    assert gap["delta"] > 0.2 and gap["lo"] > 0 and gap["p_le_0"] < 0.025
    same = paired_bootstrap("binary", good["test"], good["test"], y, n_boot=50)
    assert same["delta"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0
    multi: dict = {}
    fit_label_probe(planted["X"], planted["multilabel"], planted["split"], "multilabel", weight_decays=WDS, scores_out=multi)
    ym = planted["multilabel"][planted["split"] == 2]
    assert paired_bootstrap("multilabel", multi["test"], multi["test"] * 0, ym, n_boot=20)["lo"] > 0.2


def test_multiclass_probe(planted) -> None:
    out = fit_label_probe(planted["X"], planted["multiclass"], planted["split"], "multiclass", weight_decays=WDS)
    assert set(out) == {"accuracy", "macro_auc", "weight_decay", "val_neg_log_loss"}
    assert out["macro_auc"] > 0.8 and out["accuracy"] > 0.6
    base, _ = majority(planted["multiclass"], planted["split"], "multiclass")
    assert base["macro_auc"] == pytest.approx(0.5) and base["accuracy"] < 0.5


def test_multilabel_probe_dense_and_sparse(planted) -> None:
    out = fit_label_probe(planted["X"], planted["multilabel"], planted["split"], "multilabel", weight_decays=WDS)
    assert set(out) == {"macro_auc", "weight_decay", "val_neg_log_loss"}
    assert out["macro_auc"] > 0.8
    X_sparse = sp.csr_matrix(np.maximum(planted["X"], 0.0))  # sparse input is used as is
    out_sparse = fit_label_probe(X_sparse, planted["multilabel"], planted["split"], "multilabel", weight_decays=WDS)
    assert out_sparse["macro_auc"] > 0.7
    base, _ = majority(planted["multilabel"], planted["split"], "multilabel")
    assert base["macro_auc"] == pytest.approx(0.5)


def test_weight_decay_is_chosen_on_validation_only(planted) -> None:
    split, y = planted["split"], planted["binary"].copy()
    first = fit_label_probe(planted["X"], y, split, "binary", weight_decays=WDS)
    assert first["weight_decay"] in WDS
    test = split == 2
    y[test] = 1 - y[test]  # invert every test label: test AUC flips, the choice must not move
    second = fit_label_probe(planted["X"], y, split, "binary", weight_decays=WDS)
    assert second["weight_decay"] == first["weight_decay"]
    assert second["val_neg_log_loss"] == first["val_neg_log_loss"]
    assert second["auc"] == pytest.approx(1 - first["auc"])


def test_label_probe_keeps_the_lowest_validation_log_loss(planted) -> None:
    """The kept head's score is minus its log-loss on the validation users, recomputed here from
    its scores; and a train set of one batch goes over itself ``min_steps`` times an epoch."""
    X, y, split = planted["X"], planted["multiclass"], planted["split"]
    stage = fit_label(X, y, split, "multiclass", weight_decays=WDS, min_steps=20, epochs=30)
    val = split == 1
    p = label_scores(stage, X[val])
    log_loss = -np.mean(np.log(p[np.arange(val.sum()), y[val]]))
    assert float(stage.best_score) == pytest.approx(-log_loss, rel=1e-4)
    assert stage.select_key == "neg_log_loss"
    assert stage.trainer.global_step == 20 * stage.trainer.current_epoch  # 240 train users: one step a pass
    by_metric = fit_label(X, y, split, "multiclass", weight_decays=WDS, min_steps=20, epochs=30, selection="metric")
    assert by_metric.select_key == "macro_auc" and float(by_metric.best_score) > 0.8


def test_unknown_kind_is_rejected(planted) -> None:
    with pytest.raises(ValueError, match="kind"):
        fit_label_probe(planted["X"], planted["binary"], planted["split"], "regression")


# ----------------------------------------------------------------------------- next-item probe


def test_next_item_probe_beats_popularity(one_thread) -> None:
    """Each cluster owns 10 items; the representation reveals the cluster, the history does not
    (history items are random), the future items come from the cluster's items."""
    rng = np.random.default_rng(0)
    n_clusters = 5
    cluster = rng.integers(0, n_clusters, N_USERS)
    X = (np.eye(n_clusters)[cluster] * 3.0 + rng.normal(size=(N_USERS, n_clusters))).astype(np.float32)
    own = np.arange(N_ITEMS).reshape(n_clusters, -1)
    hist = np.zeros((N_USERS, N_ITEMS), np.float32)
    fut = np.zeros((N_USERS, N_ITEMS), np.float32)
    for u in range(N_USERS):
        hist[u, rng.choice(N_ITEMS, 3, replace=False)] = 1
        fut[u, rng.choice(own[cluster[u]], 4, replace=False)] = 1
    fut[hist > 0] = 0
    history, future, split = sp.csr_matrix(hist), sp.csr_matrix(fut), _split()
    out = fit_next_item_probe(X, history, future, split, weight_decays=(0.0, 1e-3), epochs=30)
    assert set(out) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20", "weight_decay", "val_ndcg@20"}
    pop, _ = popularity(history, future, split)
    assert out["recall@10"] > 0.8 and out["recall@10"] > pop["recall@10"] + 0.3, (out, pop)
    sparse = fit_next_item_probe(sp.csr_matrix(np.maximum(X, 0.0)), history, future, split, epochs=30)
    assert sparse["recall@10"] > pop["recall@10"] + 0.3, (sparse, pop)


def test_next_item_probe_starts_from_popularity(one_thread) -> None:
    """Features with no signal: early stopping keeps (about) the popularity start."""
    rng = np.random.default_rng(2)
    hist = (rng.random((N_USERS, N_ITEMS)) < 0.1).astype(np.float32)
    weights = np.linspace(0.5, 0.02, N_ITEMS)  # skewed item popularity
    fut = ((rng.random((N_USERS, N_ITEMS)) < weights) & (hist == 0)).astype(np.float32)
    history, future, split = sp.csr_matrix(hist), sp.csr_matrix(fut), _split()
    noise = rng.normal(size=(N_USERS, DIM)).astype(np.float32)
    out = fit_next_item_probe(noise, history, future, split, epochs=10)
    pop, _ = popularity(history, future, split)
    assert out["ndcg@20"] > pop["ndcg@20"] - 0.05, (out, pop)


def test_paired_bootstrap_ranking_means() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(size=500)
    same = paired_bootstrap("ranking", a, a.copy(), n_boot=100)
    assert same["delta"] == 0 and same["lo"] == 0 == same["hi"] and same["n"] == 500
    noisy = paired_bootstrap("ranking", a, rng.permutation(a), n_boot=200)
    assert noisy["lo"] < 0 < noisy["hi"]  # the same distribution: the interval includes 0
    better = paired_bootstrap("ranking", a + 0.05, a, n_boot=100)
    assert better["lo"] == pytest.approx(0.05) and better["delta"] == pytest.approx(0.05)
