"""Ranking metric and next-item baselines (popularity, EASE, item-kNN, SASRec) on planted data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from foundv2.bench.baselines import (
    SASRecConfig,
    activity_features,
    dequantise_int8,
    ease,
    ease_weights,
    itemknn,
    popularity,
    quantise_int8,
    sasrec,
    tfidf_features,
    tfidf_svd_int8,
    top_items,
)
from foundv2.bench.probes import fit_label_probe
from foundv2.metrics.ranking import TopKRanking, evaluate_ranking

RANK_KEYS = {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}
N_USERS, N_ITEMS = 300, 50


def _split(n_users: int, seed: int = 0) -> np.ndarray:
    """80/10/10 train/val/test split, from a stream independent of the data generators'."""
    rng = np.random.default_rng([seed, 1])
    return rng.choice(3, size=n_users, p=[0.8, 0.1, 0.1])


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """0/1 CSR matrix from per-user item lists."""
    r = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
    c = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows])
    return sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=(len(rows), n_items))


def _cooccurrence_data(seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """Users pick one of 5 item groups; history and future are disjoint draws from that group.
    Item popularity is skewed inside each group so popularity is a fair but weak baseline."""
    rng = np.random.default_rng(seed)
    n_groups = 5
    groups = np.arange(N_ITEMS).reshape(n_groups, -1)
    weights = 1.0 / np.arange(1, groups.shape[1] + 1)
    weights /= weights.sum()
    hist, fut = [], []
    for _ in range(N_USERS):
        group = groups[rng.integers(n_groups)]
        items = rng.choice(group, size=8, replace=False, p=weights)
        noise = rng.integers(N_ITEMS)  # one random off-group item in the history
        hist.append(sorted(set(items[:5].tolist() + [int(noise)])))
        fut.append([i for i in items[5:].tolist() if i not in hist[-1]])
    return _csr(hist, N_ITEMS), _csr(fut, N_ITEMS), _split(N_USERS, seed)


# ----------------------------------------------------------------------------- TopKRanking


def test_topk_ranking_hand_computed() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    relevant = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    exclude = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    metric = TopKRanking(ks=(2, 3))
    metric.update(scores, relevant, exclude)
    out = {k: float(v) for k, v in metric.compute().items()}
    # user 0: item 0 excluded → ranking 1, 2, 3, 4; relevant {1, 4}: hit at rank 1 only in top 3
    # user 1: item 4 excluded → ranking 3, 2, 1, 0; relevant {0}: not in top 3
    d = [1 / math.log2(r + 1) for r in (1, 2, 3)]
    assert out["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["ndcg@2"] == pytest.approx((d[0] / (d[0] + d[1]) + 0) / 2)
    assert out["recall@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["ndcg@3"] == pytest.approx((d[0] / (d[0] + d[1]) + 0) / 2)
    assert int(metric.n_users) == 2 and int(metric.n_skipped) == 0


def test_topk_ranking_perfect_and_skipped_users() -> None:
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    relevant = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 0, 0]]))
    metric = TopKRanking(ks=(2,))
    metric.update(scores, relevant)
    out = metric.compute()
    assert float(out["recall@2"]) == pytest.approx(1.0)
    assert float(out["ndcg@2"]) == pytest.approx(1.0)
    assert int(metric.n_skipped) == 1 and int(metric.n_users) == 1


def test_topk_ranking_recall_is_hits_over_relevant() -> None:
    # 3 relevant items, K = 2 → at most 2/3 recall; the relevant item that is excluded is dropped
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    relevant = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    exclude = torch.tensor([[0, 0, 0, 1, 0]], dtype=torch.bool)
    metric = TopKRanking(ks=(2,))
    metric.update(scores, relevant, exclude)
    assert float(metric.compute()["recall@2"]) == pytest.approx(2 / 3)
    assert float(metric.compute()["ndcg@2"]) == pytest.approx(1.0)


def test_topk_ranking_batches_equal_one_shot() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(30, 40, generator=gen)
    relevant = torch.rand(30, 40, generator=gen) < 0.1
    exclude = torch.rand(30, 40, generator=gen) < 0.2
    whole = TopKRanking()
    whole.update(scores, relevant, exclude)
    parts = TopKRanking()
    for idx in torch.arange(30).split(10):  # 3 batches
        parts.update(scores[idx], relevant[idx], exclude[idx])
    a, b = whole.compute(), parts.compute()
    assert set(a) == RANK_KEYS
    for key in RANK_KEYS:
        assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-12)
    assert int(whole.n_users) == int(parts.n_users)


# ----------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def cooc() -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    return _cooccurrence_data()


def test_popularity_returns_ranking_keys(cooc) -> None:
    metrics, seconds = popularity(*cooc)
    assert set(metrics) == RANK_KEYS and seconds >= 0
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_ease_and_itemknn_beat_popularity(cooc) -> None:
    pop, _ = popularity(*cooc)
    ease_m, _ = ease(*cooc)
    knn_m, _ = itemknn(*cooc)
    assert set(ease_m) == RANK_KEYS and set(knn_m) == RANK_KEYS
    for key in ("recall@10", "ndcg@10"):
        assert ease_m[key] > pop[key] + 0.1, (key, ease_m, pop)
        assert knn_m[key] > pop[key] + 0.1, (key, knn_m, pop)


def test_ease_weights_closed_form() -> None:
    X = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float32))
    lam = 2.0
    B = ease_weights(X, lam)
    P = np.linalg.inv(X.T.toarray() @ X.toarray() + lam * np.eye(3))
    expected = np.eye(3) - P @ np.diag(1 / np.diag(P))
    np.testing.assert_allclose(B, expected, atol=1e-6)
    assert np.allclose(np.diag(B), 0.0)


def _chosen(caplog: pytest.LogCaptureFixture, name: str) -> str:
    """The hyper-parameter value a baseline logged as chosen."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{name}: chose")]
    assert len(lines) == 1, lines
    return lines[0]


def test_hyperparameters_do_not_see_test_futures(cooc, caplog: pytest.LogCaptureFixture) -> None:
    history, future, split = cooc
    rng = np.random.default_rng(1)
    scrambled = future.tolil()
    for u in np.flatnonzero(split == 2):  # replace every test user's future by random items
        scrambled[u, :] = 0
        scrambled[u, rng.choice(N_ITEMS, size=3, replace=False)] = 1
    choices = []
    for fut in (future, scrambled.tocsr()):
        caplog.clear()
        with caplog.at_level("INFO", logger="foundv2.bench.baselines"):
            ease(history, fut, split, lambdas=(1.0, 30.0, 1000.0))
            itemknn(history, fut, split, neighbours=(2, 10, 40))
        choices.append((_chosen(caplog, "EASE lambda"), _chosen(caplog, "item-kNN k")))
    assert choices[0] == choices[1]


def test_tfidf_features_shape_and_norm(cooc) -> None:
    history, _, split = cooc
    X = tfidf_features(history, split)
    assert sp.issparse(X) and X.shape == history.shape
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms[np.asarray(history.sum(axis=1)).ravel() > 0], 1.0, rtol=1e-6)


def _sequential_data(seed: int = 0) -> tuple[list[list[int]], sp.csr_matrix, np.ndarray]:
    """Each user walks i → i+1 from a random start; the future is the next item of the walk."""
    rng = np.random.default_rng(seed)
    seqs, fut = [], []
    for _ in range(N_USERS):
        length = int(rng.integers(6, 15))
        begin = int(rng.integers(0, N_ITEMS - length - 1))
        walk = list(range(begin, begin + length + 1))
        seqs.append(walk[:length])
        fut.append(walk[length:])
    return seqs, _csr(fut, N_ITEMS), _split(N_USERS, seed)



def test_sasrec_learns_sequential_pattern(one_thread) -> None:
    seqs, future, split = _sequential_data()
    history = _csr(seqs, N_ITEMS)
    pop, _ = popularity(history, future, split)
    cfg = SASRecConfig(max_len=20, dim=32, epochs=12, batch_size=32, lr=5e-3, dropout=0.1, patience=2)
    metrics, seconds = sasrec(seqs, future, split, config=cfg)
    assert set(metrics) == RANK_KEYS and seconds > 0
    assert metrics["ndcg@10"] > pop["ndcg@10"] + 0.2, (metrics, pop)
    assert metrics["recall@10"] > 0.8, metrics


def test_evaluate_ranking_excludes_history() -> None:
    history = sp.csr_matrix(np.array([[1, 0, 0, 0]], dtype=np.float32))
    future = sp.csr_matrix(np.array([[0, 1, 0, 0]], dtype=np.float32))
    # item 0 scores highest but is in the history: item 1 must come first
    out = evaluate_ranking(
        lambda u: np.array([[9.0, 5.0, 1.0, 0.0]]), np.array([0]), history, future, ks=(1,)
    )
    assert out == {"recall@1": 1.0, "ndcg@1": 1.0}


# ----------------------------------------------------------------------------- storage-matched


def test_int8_round_trip_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(200, 6)) * np.array([0.01, 1, 5, 100, 1e-4, 3])
    split = _split(200)
    train = np.flatnonzero(split == 0)
    codes, scales = quantise_int8(Z, train)
    assert codes.dtype == np.int8 and scales.shape == (6,) and scales.dtype == np.float32
    back = dequantise_int8(codes, scales)
    inside = np.abs(Z) <= np.abs(Z[train]).max(0)  # val/test values beyond the train range saturate
    assert np.all(np.abs(back - Z)[inside] <= scales.repeat(200).reshape(6, 200).T[inside] * 0.5 + 1e-6)
    assert np.abs(codes[train]).max(0).tolist() == [127] * 6  # the train peak uses the full range
    assert np.abs(codes).max() <= 127


def test_tfidf_svd_is_fitted_on_train_users_only(cooc) -> None:
    history, _, split = cooc
    codes, scales = tfidf_svd_int8(history, split, k=8)
    assert codes.shape == (N_USERS, 8) and codes.dtype == np.int8
    # rewrite every val/test user's history: train codes and scales must not move at all
    rng = np.random.default_rng(1)
    other = history.tolil()
    for u in np.flatnonzero(split != 0):
        other.rows[u], other.data[u] = sorted(rng.choice(N_ITEMS, 20, replace=False).tolist()), [3.0] * 20
    codes2, scales2 = tfidf_svd_int8(other.tocsr(), split, k=8)
    train = split == 0
    np.testing.assert_array_equal(codes2[train], codes[train])
    np.testing.assert_array_equal(scales2, scales)
    assert not np.array_equal(codes2[~train], codes[~train])


def test_tfidf_svd16_carries_the_groups(cooc) -> None:
    history, _, split = cooc
    group = np.asarray(history.argmax(axis=1)).ravel() // (N_ITEMS // 5)  # a mostly-correct group label
    codes, scales = tfidf_svd_int8(history, split, k=16)
    res = fit_label_probe(dequantise_int8(codes, scales), group, split, "multiclass")
    assert res["accuracy"] > 0.8


def test_top_items_bytes_exact() -> None:
    hist = sp.csr_matrix(np.array([[5, 0, 1, 3, 3, 0, 2, 1], [0, 0, 0, 0, 0, 0, 1, 0], [0] * 8], np.float32))
    for n_bytes in (2, 5, 6, 64):
        bag = top_items(hist, n_bytes)
        per_user = np.diff(bag.indptr)
        assert per_user.tolist() == [min(n_bytes // 2, 6), 1, 0]
        assert (per_user * 2 <= n_bytes).all()
    bag = top_items(hist, 6)  # 3 ids: item 0 (5), then the tie 3/4 (3 each) broken by the lower id
    assert bag[0].indices.tolist() == [0, 3, 4] and bag[0].data.tolist() == [5, 3, 3]


def test_activity_features_see_time_and_values() -> None:
    day = 86400
    sources = [np.array([0, 0, 1]), np.array([1]), np.array([], np.int64)]
    times = [np.array([0, day, 10 * day]), np.array([20 * day]), np.array([], np.int64)]
    values = [np.array([1.0, 3.0, np.nan]), np.array([np.nan]), np.array([])]
    split = np.array([0, 0, 1])
    X, names = activity_features(sources, times, values, 2, split)
    f = dict(zip(names, X[0], strict=True))
    assert X.shape == (3, len(names)) and X.dtype == np.float32
    assert f["value_mean/0"] == 2.0 and f["share/1"] == pytest.approx(1 / 3)
    assert f["tenure_days"] == 10 and f["recency_days"] == 10 and f["first_day_before_ref"] == 20
    assert f["active_days"] == 3 and f["no_history"] == 0
    assert X[2, names.index("no_history")] == 1 and X[1, names.index("recency_days")] == 0
    # last events: day 10 (1970-01-11, a Sunday: weekday 6) and day 20 (a Wednesday: 2); none for user 2
    for u, weekday in ((0, 6), (1, 2)):
        angle = 2 * np.pi * weekday / 7
        assert X[u, names.index("last_dow_sin")] == pytest.approx(np.sin(angle), abs=1e-6)
        assert X[u, names.index("last_dow_cos")] == pytest.approx(np.cos(angle), abs=1e-6)
    assert not X[2, names.index("last_dow_sin")] and not X[2, names.index("last_dow_cos")]


def test_per_user_ranking_metrics_average_to_the_metric(cooc) -> None:
    history, future, split = cooc
    out: dict = {}
    res, _ = ease(history, future, split, scores_out=out)
    for k, v in res.items():
        assert out["test"][k].mean() == pytest.approx(v)
    assert out["test"]["ndcg@10"].size == int(((future[split == 2] != 0).sum(1) > 0).sum())


def test_the_one_tfidf_svd_equals_scikit_learns_up_to_sign(cooc) -> None:
    """ItemFactors (stage 1's item table, the user tokenizer, the tfidf_svd baselines) gives
    scikit-learn's TfidfTransformer → TruncatedSVD on the same rows, each component up to its sign."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    from foundv2.nn.item_factors import ItemFactors, fit_idf, tfidf_rows

    history, _, split = cooc
    history = history.astype(np.float64)  # as the bench reads it
    train = history[split == 0]
    ref = TfidfTransformer().fit(train)
    np.testing.assert_allclose(tfidf_rows(history, fit_idf(train)).toarray(), ref.transform(history).toarray(), atol=1e-12)
    Z = ItemFactors(history.shape[1], 8).fit_matrix(train, seed=3).project(history)
    R = TruncatedSVD(8, algorithm="randomized", n_iter=7, random_state=3).fit(ref.transform(train)).transform(
        ref.transform(history))
    np.testing.assert_allclose(np.abs(Z), np.abs(R), atol=1e-8)
