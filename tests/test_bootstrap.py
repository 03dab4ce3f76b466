"""The paired bootstrap's vectorised resamples: unit weights give the reported metrics, the exact
path gives the differences of resampling one user list at a time (on real probe scores of
synthetic users), and the first-order path at scale stays within a small share of the spread."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.datamodule import UserDataModule
from foundv2.bench.probes import fit_label_probe, fit_next_item_probe, paired_bootstrap, score_predictions
from foundv2.bench.run import load_bench_data, pooled_representation
from foundv2.metrics.bootstrap import (
    EXACT_MAX_USERS,
    first_order_macro_auc,
    reference_differences,
    resample_weights,
    resampled_differences,
    weighted_metric,
)

DATA = {"dataset": "synthetic", "loader_args": {"n_users": 1200, "seed": 3}, "window_mode": "week",
        "text_encoder": "hashing", "batch_size": 64, "progress": False}


def test_unit_weights_give_the_reported_metrics() -> None:
    rng = np.random.default_rng(0)
    one = np.ones((1, 300))
    s, y = rng.normal(size=300).round(1), rng.integers(0, 2, 300)  # rounded: ties count half in both
    for metric in ("auc", "ks"):
        assert weighted_metric("binary", metric, s, y)(one)[0] == pytest.approx(score_predictions("binary", s, y)[metric])
    P, c = rng.dirichlet(np.ones(4), 300), rng.integers(0, 4, 300)
    c[c == 3] = 2  # a class that never occurs is skipped by both
    for metric in ("accuracy", "macro_auc"):
        assert weighted_metric("multiclass", metric, P, c)(one)[0] == pytest.approx(
            score_predictions("multiclass", P, c)[metric])
    S, Y = rng.normal(size=(300, 5)), rng.integers(0, 2, (300, 5))
    Y[:, 0] = 0  # a label with one class is skipped by both
    assert weighted_metric("multilabel", "macro_auc", S, Y)(one)[0] == pytest.approx(
        score_predictions("multilabel", S, Y)["macro_auc"])
    # a weight of 2 is the user counted twice
    w = rng.integers(0, 3, 300)
    idx = np.repeat(np.arange(300), w)
    assert weighted_metric("binary", "auc", s, y)(w[None].astype(float))[0] == pytest.approx(
        score_predictions("binary", s[idx], y[idx])["auc"])
    with pytest.raises(ValueError, match="no resampled metric"):
        weighted_metric("binary", "accuracy", s, y)


def test_exact_weights_are_the_draws_of_one_resample_at_a_time() -> None:
    n = 37
    blocks = np.concatenate(list(resample_weights(n, 50, seed=4)))
    rng = np.random.default_rng(4)
    expect = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(50)])
    assert np.array_equal(blocks, expect)
    poisson = np.concatenate(list(resample_weights(20_000, 20, seed=4, exact=False)))
    assert poisson.mean() == pytest.approx(1.0, abs=0.01) and poisson.var() == pytest.approx(1.0, abs=0.02)


@pytest.fixture(scope="module")
def probe_scores(tmp_path_factory):
    """Test scores of two real probes per task on synthetic users: pooled features and the same
    features with half their columns replaced by noise."""
    dm = UserDataModule(**DATA, cache_dir=str(tmp_path_factory.mktemp("boot") / "cache"))
    dm.prepare_data()
    data = load_bench_data(dm)
    X, _ = pooled_representation(dm)
    worse = X.copy()
    worse[:, ::2] = np.random.default_rng(0).normal(size=worse[:, ::2].shape)
    test = data.split == 2
    out = {}
    for task in data.tasks:
        pair = []
        for feats in (X, worse):
            s: dict = {}
            if task.kind == "ranking":
                fit_next_item_probe(feats, data.history, data.future, data.split, epochs=3, scores_out=s)
                pair.append(s["test"]["ndcg@10"])
            else:
                fit_label_probe(feats, task.y, data.split, task.kind, weight_decays=(1e-2,), scores_out=s)
                pair.append(s["test"])
        out[task.name] = (task.kind, *pair, None if task.y is None else task.y[test])
    return out


def test_vectorised_resamples_equal_one_resample_at_a_time(probe_scores) -> None:
    """On every task kind of the synthetic bench: the same resamples, the same differences."""
    checked = set()
    for kind, a, b, y in probe_scores.values():
        metrics = {"binary": ("auc", "ks"), "multiclass": ("accuracy", "macro_auc"), "multilabel": ("macro_auc",),
                   "ranking": ("mean",)}[kind]
        for metric in metrics:
            fast = resampled_differences(kind, metric, a, b, y, n_boot=150, seed=2)
            slow = reference_differences(kind, metric, a, b, y, score_predictions, n_boot=150, seed=2)
            assert len(a) <= EXACT_MAX_USERS and fast.shape == slow.shape, (kind, metric)
            np.testing.assert_allclose(fast, slow, atol=1e-6, err_msg=f"{kind} {metric}")
            checked.add((kind, metric))
    assert len(checked) == 6


def test_paired_bootstrap_takes_the_vectorised_resamples(probe_scores) -> None:
    kind, a, b, y = probe_scores["segment"]
    got = paired_bootstrap(kind, a, b, y, metric="macro_auc", n_boot=200, seed=1)
    diffs = reference_differences(kind, "macro_auc", a, b, y, score_predictions, n_boot=200, seed=1)
    assert got["lo"] == pytest.approx(np.quantile(diffs, 0.025), abs=1e-6)
    assert got["hi"] == pytest.approx(np.quantile(diffs, 0.975), abs=1e-6)
    assert got["p_le_0"] == pytest.approx(np.mean(diffs <= 0))


def _scorers(n: int, C: int, seed: int = 0):
    """Two noisy scorers of C labels of n users; b is noisier, so AUC(a) − AUC(b) > 0."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, C)) < np.linspace(0.05, 0.5, C)
    a = y + rng.normal(0, 1.5, (n, C))
    b = y + rng.normal(0, 1.8, (n, C))
    return a, b, y


def test_first_order_resamples_track_the_exact_ones_at_scale() -> None:
    """Above EXACT_MAX_USERS: on the same Poisson weights, each resample's first-order macro AUC
    difference is the exact one to within a few % of the differences' spread (their correlation
    above 0.999), and the interval of the Poisson path is the exact draws' to within a tenth of
    its width."""
    n, C = 30_000, 4
    a, b, y = _scorers(n, C)
    W = next(resample_weights(n, 60, seed=1, exact=False))
    exact = weighted_metric("multilabel", "macro_auc", a, y)(W) - weighted_metric("multilabel", "macro_auc", b, y)(W)
    linear = first_order_macro_auc("multilabel", a, b, y)(W)
    assert (linear - exact).std() < 0.03 * exact.std() and np.abs(linear - exact).max() < 0.1 * exact.std()
    assert np.corrcoef(linear, exact)[0, 1] > 0.999
    fast = resampled_differences("multilabel", "macro_auc", a, b, y)
    draws = resampled_differences("multilabel", "macro_auc", a, b, y, exact=True)
    width = np.quantile(draws, 0.975) - np.quantile(draws, 0.025)
    for q in (0.025, 0.5, 0.975):
        assert abs(np.quantile(fast, q) - np.quantile(draws, q)) < 0.1 * width, q
    binary = resampled_differences("binary", "auc", a[:, 3], b[:, 3], y[:, 3])
    assert np.quantile(binary, 0.025) > 0  # b is noisier on every label
